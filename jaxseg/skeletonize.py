"""The ``python -m jaxseg.skeletonize`` / ``jaxseg-skeletonize`` entry point: flags, main, output.

Makes the skeleton ground truth that NERL / ERL need from a dense label volume, with
:func:`jaxseg.metrics.skeletonize.skeletonize_labels` (kimimaro; ``docs/metrics.md``, "Skeletons
from labels"), and writes it as a NISB ``skeleton.pkl``::

  python -m jaxseg.skeletonize --labels=gt.h5:stack --resolution=20,9,9 --output=skeleton.pkl

The labels are a [z, y, x] volume (anything ``jaxseg.io.open_volume`` opens, in any on-disk axis
order; 0 = background); ``--mask`` a [z, y, x] volume of the same shape, 1 where the labels are
valid. The output is one named file in the user's folder: a file there that jaxseg did not write
is never replaced, one made from the same labels and settings is reused, and one made differently
is replaced only with ``--overwrite``. This module never imports JAX.
"""

from __future__ import annotations

import os
from typing import Any

from absl import app, flags

from jaxseg.common import cli, outputs
from jaxseg.common.errors import OutputError
from jaxseg.io import open_volume
from jaxseg.metrics.skeletonize import (
  DEFAULT_DUST,
  format_summary,
  skeleton_summary,
  skeletonize_labels,
  write_skeleton,
)

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags; only the entry point calls this."""
  if "labels" in FLAGS:
    return
  flags.DEFINE_string(
    "labels",
    None,
    "Dense label volume (h5:dataset, zarr, n5, tif, png folder, ...); 0 = background.",
  )
  flags.DEFINE_list("resolution", None, "Voxel size z,y,x in nm (default: from the labels file).")
  flags.DEFINE_string("output", None, "The skeleton .pkl (NISB networkx graph) to write.")
  flags.DEFINE_integer("dust", DEFAULT_DUST, "Objects with fewer voxels get no skeleton.")
  flags.DEFINE_string("mask", None, "Mask volume of the labels' shape: 1 where labels are valid.")
  flags.DEFINE_list(
    "block_shape",
    None,
    "Skeletonize in blocks of z,y,x voxels (default: the whole volume when it fits in memory).",
  )
  flags.DEFINE_string("labels_axis_order", None, "On-disk axis order of --labels (e.g. xyz).")
  flags.DEFINE_bool(
    "overwrite", False, "Replace an --output that jaxseg wrote from other labels or settings."
  )


def skeleton_output(path: str, settings: dict[str, Any]) -> outputs.StageOutput:
  """The skeleton file's entry in its folder's manifest (the folder may be the user's own)."""
  folder, name = os.path.split(os.path.abspath(path))
  inputs = [settings[k] for k in ("labels", "mask") if settings.get(k)]
  return outputs.StageOutput(
    folder,
    name=f"skeletonize:{name}",
    stage="skeletonize",
    fingerprint={
      **settings,
      "inputs": {k: outputs.input_identity(settings[k]) for k in ("labels", "mask") if settings[k]},
    },
    paths=(name,),
    inputs=inputs,
    what="--output",
    shared=True,
  )


def _numbers(values, flag: str, kind=float) -> tuple:
  try:
    out = tuple(kind(v) for v in values)
  except ValueError:
    out = ()
  if len(out) != 3:
    what = "whole numbers" if kind is int else "numbers"
    raise app.UsageError(f"--{flag} needs 3 {what} (z,y,x), got {','.join(values)}")
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.labels:
    raise app.UsageError("--labels is required")
  if not FLAGS.output:
    raise app.UsageError("--output is required (the skeleton .pkl to write)")
  if os.path.isdir(FLAGS.output):
    raise OutputError(f"--output={FLAGS.output} is a folder; name the skeleton file (e.g. .pkl)")
  if FLAGS.dust < 0:
    raise app.UsageError(f"--dust must be >= 0 voxels, got {FLAGS.dust}")
  block_shape = _numbers(FLAGS.block_shape, "block_shape", int) if FLAGS.block_shape else None
  if block_shape is not None and min(block_shape) < 1:
    raise app.UsageError(f"--block_shape must be positive, got {','.join(FLAGS.block_shape)}")
  # An unreadable volume raises VolumeError naming the spec: one line.
  labels = open_volume(FLAGS.labels, axis_order=FLAGS.labels_axis_order)
  if FLAGS.resolution:
    resolution = _numbers(FLAGS.resolution, "resolution")
    if min(resolution) <= 0:
      raise app.UsageError(f"--resolution must be positive, got {','.join(FLAGS.resolution)}")
  elif "resolution" in labels.attrs:
    resolution = tuple(float(r) for r in labels.resolution)
  else:
    raise app.UsageError(f"--resolution is required: {labels.path} stores no voxel size")
  mask = open_volume(FLAGS.mask) if FLAGS.mask else None
  settings = {
    "labels": FLAGS.labels,
    "labels_axis_order": FLAGS.labels_axis_order,
    "mask": FLAGS.mask,
    "resolution": list(resolution),
    "dust": FLAGS.dust,
    "block_shape": list(block_shape) if block_shape else None,
  }
  entry = skeleton_output(FLAGS.output, settings)
  # Refused (or found done) now, not after the skeletonization.
  if entry.peek(overwrite=FLAGS.overwrite) is outputs.Decision.REUSE:
    summary = (entry.saved() or {}).get("summary")
    shown = f": {format_summary(summary)}" if summary else ""
    print(f"{FLAGS.output}: already made from these labels and settings (reused){shown}")
    return 0
  graph = skeletonize_labels(
    labels,
    resolution,
    dust=FLAGS.dust,
    mask=mask,
    block_shape=block_shape,
    show_progress=True,
  )
  summary = skeleton_summary(graph)
  entry.open(overwrite=FLAGS.overwrite)
  # A disk that is full or read-only raises OSError naming the file: cli makes it one line.
  write_skeleton(graph, FLAGS.output)
  entry.finish(summary=summary)
  print(f"wrote {FLAGS.output}: {format_summary(summary)}")
  return 0


def run():
  define_flags()
  cli.run_main("jaxseg.skeletonize", main)


if __name__ == "__main__":
  run()
