"""Scoring a segmentation: adapted Rand and VOI against dense GT, ERL / NERL against skeletons.

Owns :func:`evaluate` (the library call behind ``python -m jaxseg.evaluate``, the tuner and the
tests) and :func:`format_table` (the metrics as a two-column text table). Volumes are
[z, y, x] label arrays (numpy, lazy ``jaxseg.io`` volumes, or anything ``jaxseg.io.open_volume``
opens, in any on-disk axis order). Dense metrics stream the volumes in z slabs through one
contingency table, so memory stays bounded; NERL reads only voxels under skeleton nodes. GT labels
<= 0 are ignored. Never imports JAX.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxseg.common.errors import ConfigError, InputError
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
