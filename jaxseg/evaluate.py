"""Evaluate a segmentation: adapted Rand and VOI against dense GT, ERL / NERL against skeletons.

Owns :func:`evaluate` (the library call used by tests and the tuner) and the thin absl entry point
``python -m jaxseg.evaluate`` / ``jaxseg-evaluate``::

  python -m jaxseg.evaluate --seg=seg.zarr --gt=gt.h5:stack --skeleton=skeleton.pkl \\
      --resolution=20,9,9 --arand=snemi --crop_fraction=1 --output=metrics.json

Volumes are [z, y, x] label arrays (numpy, lazy ``jaxseg.io`` volumes, or anything
``jaxseg.io.open_volume`` opens, in any on-disk axis order). Dense metrics stream the volumes in
z slabs through one contingency table, so memory stays bounded; NERL reads only voxels under
skeleton nodes. GT labels <= 0 are ignored. This module never imports JAX.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags

from jaxseg.common import cli, config_util, files, outputs
from jaxseg.common.errors import ConfigError, InputError, OutputError, from_os_error
from jaxseg.io import Volume, VolumeError, open_volume
from jaxseg.io.skeleton import Skeletons, load_skeletons
from jaxseg.metrics import (
  ARAND_METHODS,
  adapted_rand_from_table,
  centered_crop,
  contingency_table,
  expected_run_length,
  merge_contingency,
  voi_from_table,
)

# Dense volumes are read in z slabs of about this many voxels (x2 volumes, x8 bytes worst case).
_SLAB_VOXELS = 1 << 26


def _open(spec, axis_order: str | None, resolution, what: str):
  """Returns a numpy array or Volume for ``spec`` and a name for messages."""
  if spec is None:
    return None, None
  if isinstance(spec, np.ndarray):
    return spec, what
  if isinstance(spec, Volume):
    return spec, spec.path
  vol = open_volume(spec, axis_order=axis_order, resolution=resolution)
  return vol, vol.path


def _check_labels(vol, name: str) -> None:
  if len(vol.shape) != 3:
    raise VolumeError(f"{name}: expected a 3-D (z, y, x) label volume, found shape {vol.shape}")
  dtype = np.dtype(vol.dtype)
  if not (np.issubdtype(dtype, np.integer) or dtype == np.bool_):
    raise VolumeError(f"{name}: expected integer labels, found dtype {dtype}")


def _dense_table(gt, seg, crop: tuple[slice, ...]):
  """Contingency table over ``crop``, read in z slabs."""
  z0, z1 = crop[0].start, crop[0].stop
  plane = (crop[1].stop - crop[1].start) * (crop[2].stop - crop[2].start)
  step = max(1, _SLAB_VOXELS // max(plane, 1))
  tables = []
  for z in range(z0, z1, step):
    box = (slice(z, min(z + step, z1)), crop[1], crop[2])
    tables.append(contingency_table(np.asarray(gt[box]), np.asarray(seg[box])))
  return merge_contingency(tables)


def _resolution_for_skeleton(resolution, seg) -> tuple[float, float, float] | None:
  if resolution is not None:
    return tuple(float(r) for r in resolution)
  # A Volume defaults to 1 nm when its file says nothing; only trust a stored resolution.
  if isinstance(seg, Volume) and "resolution" in seg.attrs:
    return tuple(float(r) for r in seg.resolution)
  return None


def evaluate(
  seg,
  gt=None,
  skeletons: Skeletons | str | os.PathLike | None = None,
  *,
  resolution: Sequence[float] | None = None,
  arand: str = "snemi",
  crop_fraction: float = 1.0,
  merge_threshold: int = 1,
  seg_axis_order: str | None = None,
  gt_axis_order: str | None = None,
  erl_cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
  """Computes every metric the inputs allow.

  Args:
    seg: [z, y, x] segmentation: numpy array, ``jaxseg.io.Volume`` or an ``open_volume`` spec.
    gt: dense GT in the same forms, or None (then only skeleton metrics).
    skeletons: :class:`Skeletons`, or a ``skeleton.pkl`` / em_erl ``.npz`` path, or None.
    resolution: (z, y, x) nm; used to open paths and to map skeleton nm positions to voxels
      (default: the segmentation file's stored resolution, if any).
    arand: adapted Rand definition, ``"snemi"`` or ``"pairs"`` (see ``jaxseg.metrics.rand``).
    crop_fraction: dense metrics use only the centred crop with this fraction of the voxels
      (``jaxseg.metrics.centered_crop``; 0.33 = SNEMI3D evaluator). Skeleton metrics never crop.
    merge_threshold: NERL merge threshold in nodes (1 = funlib / BANIS).
    seg_axis_order: on-disk axis order of a ``seg`` path (e.g. ``"xyz"`` for NISB).
    gt_axis_order: on-disk axis order of a ``gt`` path.
    erl_cache_dir: where a ``skeleton.pkl`` path's parsed arrays are cached (default
      :func:`jaxseg.io.skeleton.default_cache_dir`; never beside the skeleton).

  Returns:
    A flat dict. With GT: ``adapted_rand``, ``adapted_rand_precision``, ``adapted_rand_recall``,
    ``adapted_rand_method``, ``voi_split``, ``voi_merge``, ``voi``, ``n_voxels_scored``,
    ``crop``. With skeletons: ``erl_nm``, ``max_erl_nm``, ``nerl``, ``n_mergers``,
    ``n_non0_mergers``, ``n_merging_segments``, ``skeleton_voi_split``, ``skeleton_voi_merge``
    and edge / node counts. Always ``seconds``.

  Raises:
    InputError: nothing to compare against (a ``ValueError``).
    ConfigError: an unknown ``arand`` (a ``ValueError``).
    VolumeError: unreadable inputs, or seg / gt shapes differ (names both).
  """
  if gt is None and skeletons is None:
    raise InputError("evaluate needs dense GT (gt), skeletons, or both")
  if arand not in ARAND_METHODS:
    raise ConfigError(f"arand (eval.arand) must be one of {ARAND_METHODS}, got {arand!r}")
  # The metrics check these too, but with a bare ValueError after the inputs were read.
  try:
    crop_ok = 0.0 < float(crop_fraction) <= 1.0  # NaN fails both
  except (TypeError, ValueError):
    crop_ok = False
  if not crop_ok:
    raise ConfigError(
      "crop_fraction (--crop_fraction / eval.crop_fraction) must be in (0, 1], got "
      f"{crop_fraction!r}"
    )
  try:
    merge_ok = int(merge_threshold) == merge_threshold >= 1
  except (TypeError, ValueError, OverflowError):
    merge_ok = False
  if not merge_ok:
    raise ConfigError(
      "merge_threshold (--merge_threshold / eval.merge_threshold) must be a whole number of "
      f"skeleton nodes >= 1, got {merge_threshold!r}"
    )
  start = time.perf_counter()
  seg, seg_name = _open(seg, seg_axis_order, resolution, "segmentation")
  _check_labels(seg, seg_name)
  result: dict[str, Any] = {}
  if gt is not None:
    gt, gt_name = _open(gt, gt_axis_order, resolution, "ground truth")
    _check_labels(gt, gt_name)
    if tuple(gt.shape) != tuple(seg.shape):
      raise VolumeError(
        f"segmentation {seg_name} has shape (z, y, x) {tuple(seg.shape)} but ground truth "
        f"{gt_name} has {tuple(gt.shape)}; check the axis orders (--seg_axis_order, "
        "--gt_axis_order) and that both cover the same region"
      )
    crop = centered_crop(seg.shape, crop_fraction)
    table = _dense_table(gt, seg, crop)
    rand = adapted_rand_from_table(table, method=arand)
    v = voi_from_table(table)
    result.update(
      adapted_rand=rand.error,
      adapted_rand_precision=rand.precision,
      adapted_rand_recall=rand.recall,
      adapted_rand_method=arand,
      voi_split=v.split,
      voi_merge=v.merge,
      voi=v.total,
      n_voxels_scored=table.n_counted,
      crop=[[s.start, s.stop] for s in crop],
    )
  if skeletons is not None:
    if not isinstance(skeletons, Skeletons):
      skeletons = load_skeletons(
        skeletons, resolution=_resolution_for_skeleton(resolution, seg), cache_dir=erl_cache_dir
      )
    erl = expected_run_length(skeletons, seg, merge_threshold=merge_threshold, volume_name=seg_name)
    stats = erl.to_dict()
    stats["skeleton_voi_split"] = stats.pop("voi_split")
    stats["skeleton_voi_merge"] = stats.pop("voi_merge")
    result.update(stats)
  result["seconds"] = time.perf_counter() - start
  return result


# ---------------------------------------------------------------------------------------------
# Command line.

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


# Rows of the printed table: key, label, format.
_TABLE = (
  ("adapted_rand", "adapted Rand error", "{:.6f}"),
  ("adapted_rand_precision", "  precision", "{:.6f}"),
  ("adapted_rand_recall", "  recall", "{:.6f}"),
  ("voi_split", "VOI split (bits)", "{:.6f}"),
  ("voi_merge", "VOI merge (bits)", "{:.6f}"),
  ("voi", "VOI total (bits)", "{:.6f}"),
  ("erl_nm", "ERL (µm)", "{:.4f}"),
  ("max_erl_nm", "max ERL (µm)", "{:.4f}"),
  ("nerl", "NERL", "{:.4f}"),
  ("n_mergers", "mergers (skeletons)", "{}"),
  ("n_non0_mergers", "  without segment 0", "{}"),
  ("n_merging_segments", "merging segments", "{}"),
  ("skeleton_voi_split", "node VOI split (bits)", "{:.6f}"),
  ("skeleton_voi_merge", "node VOI merge (bits)", "{:.6f}"),
  ("seconds", "time (s)", "{:.2f}"),
)


def format_table(metrics: dict[str, Any]) -> str:
  """A two-column text table of the metrics present in ``metrics``."""
  rows = []
  for key, label, fmt in _TABLE:
    if key not in metrics or metrics[key] is None:
      continue
    value = metrics[key]
    if key in ("erl_nm", "max_erl_nm"):
      value = value / 1000.0
    text = "nan" if isinstance(value, float) and math.isnan(value) else fmt.format(value)
    rows.append((label, text))
  width = max((len(label) for label, _ in rows), default=0)
  return "\n".join(f"{label:<{width}}  {text}" for label, text in rows)


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
  entry = metrics_output(FLAGS.output, settings) if FLAGS.output else None
  # Refused (or found done) now, not after the evaluation.
  if entry is not None and entry.peek(overwrite=FLAGS.overwrite) is outputs.Decision.REUSE:
    with open(FLAGS.output) as f:
      print(format_table(json.load(f)))
    print(f"{FLAGS.output}: already evaluated from these inputs and settings (reused)")
    return 0
  # Unreadable or mismatched inputs raise JaxsegError (VolumeError, SkeletonError): one line.
  metrics = evaluate(
    FLAGS.seg,
    FLAGS.gt,
    FLAGS.skeleton,
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
