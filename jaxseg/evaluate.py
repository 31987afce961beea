"""The ``python -m jaxseg.evaluate`` / ``jaxseg-evaluate`` entry point: flags, main, metrics file.

Scores a segmentation with :func:`jaxseg.metrics.evaluation.evaluate` (adapted Rand and VOI
against dense GT, ERL / NERL against skeletons), prints
:func:`jaxseg.metrics.evaluation.format_table` and writes the metrics as JSON::

  python -m jaxseg.evaluate --seg=seg.zarr --gt=gt.h5:stack --skeleton=skeleton.pkl \\
      --resolution=20,9,9 --arand=snemi --crop_fraction=1 --output=metrics.json

With ``--skeletonize`` and dense ``--gt`` but no ``--skeleton``, NERL / ERL are scored against a
skeleton made from the GT (:func:`jaxseg.metrics.skeletonize.cached_skeleton`, cached).

Volumes are [z, y, x] label volumes (anything ``jaxseg.io.open_volume`` opens, in any on-disk axis
order). This module never imports JAX.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from absl import app, flags

from jaxseg.common import cli, config_util, files, outputs
from jaxseg.common.errors import OutputError, from_os_error
from jaxseg.io import open_volume
from jaxseg.metrics import ARAND_METHODS
from jaxseg.metrics.evaluation import evaluate, format_table
from jaxseg.metrics.skeletonize import cached_skeleton

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags; only the entry point calls this.

  Defining them at import time would make the tuner's or a test's own flags collide with these.
  """
  if "seg" in FLAGS:
    return
  flags.DEFINE_string(
    "seg", None, "Segmentation volume (h5:dataset, zarr, n5, tif, png folder, ...)."
  )
  flags.DEFINE_string("gt", None, "Dense GT volume; may be omitted when --skeleton is given.")
  flags.DEFINE_string("skeleton", None, "Skeleton GT: NISB skeleton.pkl or em_erl gt_graph.npz.")
  flags.DEFINE_bool(
    "skeletonize",
    False,
    "With --gt and no --skeleton: skeletonize the GT labels (cached in ~/.cache/jaxseg) so that "
    "ERL / NERL are reported too.",
  )
  flags.DEFINE_list("resolution", None, "Voxel size z,y,x in nm (default: from the seg file).")
  flags.DEFINE_enum("arand", "snemi", list(ARAND_METHODS), "Adapted Rand definition.")
  flags.DEFINE_float(
    "crop_fraction",
    1.0,
    "Score the centred crop with this voxel fraction "
    "(0.33 = SNEMI3D evaluator); skeleton metrics are never cropped.",
  )
  flags.DEFINE_integer("merge_threshold", 1, "NERL: nodes of a skeleton in a segment for a merge.")
  flags.DEFINE_string("seg_axis_order", None, "On-disk axis order of --seg (e.g. xyz for NISB).")
  flags.DEFINE_string("gt_axis_order", None, "On-disk axis order of --gt.")
  flags.DEFINE_string("output", None, "Write the metrics as JSON here.")
  # Optional recipe: its `eval` section and `data.resolution` are the defaults of the flags above
  # (a flag given on the command line wins); the resolved config is written beside --output.
  config_util.define_config_flag(required=False)
  flags.DEFINE_bool(
    "overwrite", False, "Replace an --output that jaxseg wrote from other inputs or settings."
  )


def metrics_output(path: str, settings: dict[str, Any]) -> outputs.StageOutput:
  """The metrics file's entry in its folder's manifest (the folder may be the user's own).

  The file and its ``<stem>.config.json`` are jaxseg's once written; an existing file jaxseg did
  not write is never replaced, and one made from other inputs or settings only with
  ``--overwrite``.
  """
  folder, name = os.path.split(os.path.abspath(path))
  stem = os.path.splitext(name)[0]
  inputs = [settings.get(k) for k in ("seg", "gt", "skeleton") if settings.get(k)]
  return outputs.StageOutput(
    folder,
    name=f"evaluate:{name}",
    stage="evaluation",
    fingerprint={
      **settings,
      "inputs": {
        k: outputs.input_identity(settings[k]) for k in ("seg", "gt", "skeleton") if settings.get(k)
      },
    },
    paths=(name, f"{stem}.config.json"),
    inputs=inputs,
    what="--output",
    shared=True,
  )


def _keep_elsewhere(metrics: dict[str, Any]) -> str:
  """Saves ``metrics`` in the temp folder (often another disk) or else prints them; says where."""
  text = json.dumps(files.json_ready(metrics), indent=2, sort_keys=True) + "\n"
  path = None
  try:
    fd, path = tempfile.mkstemp(prefix="jaxseg-metrics-", suffix=".json")
    with os.fdopen(fd, "w") as f:
      f.write(text)
  except OSError:
    if path is not None and os.path.exists(path):
      os.remove(path)
    print(text, end="", flush=True)
    return "the JSON printed on stdout"
  return path


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.seg:
    raise app.UsageError("--seg is required")
  if not FLAGS.gt and not FLAGS.skeleton:
    raise app.UsageError("give --gt, --skeleton, or both")
  if FLAGS.skeletonize and (not FLAGS.gt or FLAGS.skeleton):
    raise app.UsageError("--skeletonize makes the skeleton from --gt: give --gt and no --skeleton")
  # Checked before the (possibly long) evaluation, not only when writing.
  if FLAGS.output and os.path.isdir(FLAGS.output):
    raise OutputError(f"--output={FLAGS.output} is a folder; name the metrics file (e.g. .json)")
  config = FLAGS.config
  arand, crop_fraction, merge_threshold = FLAGS.arand, FLAGS.crop_fraction, FLAGS.merge_threshold
  resolution = None
  if config is not None:
    arand = arand if FLAGS["arand"].present else config.eval.arand
    crop_fraction = crop_fraction if FLAGS["crop_fraction"].present else config.eval.crop_fraction
    merge_threshold = (
      merge_threshold if FLAGS["merge_threshold"].present else config.eval.merge_threshold
    )
    resolution = tuple(config.data.resolution)
  if FLAGS.resolution:
    try:
      resolution = tuple(float(r) for r in FLAGS.resolution)
    except ValueError as e:
      raise app.UsageError(f"--resolution must be z,y,x numbers: {FLAGS.resolution}") from e
    if len(resolution) != 3:
      raise app.UsageError(f"--resolution needs 3 values (z,y,x), got {FLAGS.resolution}")
  settings = {
    "seg": FLAGS.seg,
    "gt": FLAGS.gt,
    "skeleton": FLAGS.skeleton,
    "resolution": list(resolution) if resolution else None,
    "seg_axis_order": FLAGS.seg_axis_order,
    "gt_axis_order": FLAGS.gt_axis_order,
    "arand": arand,
    "merge_threshold": merge_threshold,
    "crop_fraction": crop_fraction,
  }
  if FLAGS.skeletonize:  # only then: the metrics files written without it stay reusable
    settings["skeletonize"] = True
  entry = metrics_output(FLAGS.output, settings) if FLAGS.output else None
  # Refused (or found done) now, not after the evaluation.
  if entry is not None and entry.peek(overwrite=FLAGS.overwrite) is outputs.Decision.REUSE:
    with open(FLAGS.output) as f:
      print(format_table(json.load(f)))
    print(f"{FLAGS.output}: already evaluated from these inputs and settings (reused)")
    return 0
  skeleton = FLAGS.skeleton
  if FLAGS.skeletonize:
    # Made once per GT (and resolution) in jaxseg's cache, never beside the user's data.
    gt = open_volume(FLAGS.gt, axis_order=FLAGS.gt_axis_order, resolution=resolution)
    if resolution is None and "resolution" not in gt.attrs:
      raise app.UsageError(f"--skeletonize needs --resolution: {gt.path} stores no voxel size")
    skeleton = cached_skeleton(gt, resolution or gt.resolution)
  # Unreadable or mismatched inputs raise JaxsegError (VolumeError, SkeletonError): one line.
  metrics = evaluate(
    FLAGS.seg,
    FLAGS.gt,
    skeleton,
    resolution=resolution,
    arand=arand,
    crop_fraction=crop_fraction,
    merge_threshold=merge_threshold,
    seg_axis_order=FLAGS.seg_axis_order,
    gt_axis_order=FLAGS.gt_axis_order,
  )
  metrics["inputs"] = settings
  print(format_table(metrics))
  if entry is not None:
    try:
      entry.open(overwrite=FLAGS.overwrite)
      files.write_json(FLAGS.output, files.json_ready(metrics))
    except OSError as e:
      # The evaluation may have taken hours: keep its result wherever it can still go.
      error = from_os_error(e, FLAGS.output) or OutputError(
        f"{FLAGS.output}: cannot write it ({e.strerror or e})"
      )
      raise OutputError(f"{error}; the metrics are in {_keep_elsewhere(metrics)}") from e
    print(f"wrote {FLAGS.output}")
    if config is not None:
      stem = os.path.splitext(os.path.basename(FLAGS.output))[0]
      config_util.save_config(
        config, os.path.dirname(os.path.abspath(FLAGS.output)), f"{stem}.config.json"
      )
    entry.finish()
  return 0


def run():
  define_flags()
  cli.run_main("jaxseg.evaluate", main)


if __name__ == "__main__":
  run()
