"""The QC scan: per-section statistics of predicted affinities and the z range worth decoding.

Owns :func:`scan_affinities`: one streaming pass over ``[C, z, y, x]`` affinities (bounded memory:
z slabs of ``max(chunk z, z_stride)`` sections, split into chunk-aligned y / x tiles when a slab
would exceed :data:`BOX_VOXELS`; :func:`read_plan`), giving per-section means and stds per
channel, NaN / Inf counts, finite min / max, the interior mean, ``low_z`` / ``high_z`` and, with an
image (``[z, y, x]`` or ``[c, z, y, x]``, first channel used), the XY-border diagnostic; the result
is a :class:`jaxseg.quality.report.QcReport`. Also owns opening and checking the affinities and
the image (:func:`open_affinity_volume`, :func:`open_image_volume`, :func:`image_box`).

The rules follow PyTC's QC (``docs/quality.md``, "Section rules"): the interior mean is the mean of
the sampled (every ``z_stride``-th) section means without ``k_edge`` samples at each end; a section
is good when every channel's mean is at least ``interior - drift_thresh``; ``low_z`` is the first
good section within ``refine_window`` of the start (``refine_window`` if none), ``high_z`` one past
the last good one within ``refine_window`` of the end (``Z - refine_window`` if none). Three choices
of ours: each channel is compared with its own interior mean (one mean over all channels would
flag every section whenever one channel, often z, sits ``drift_thresh`` below the others), a
section holding NaN / Inf is never good, and when no section at all is good the keep range is
empty (``low_z = high_z = 0``: the mask keeps nothing) rather than PyTC's fallback middle. Paths
(affinities, image) are recorded absolute, so a report or QC is usable from any working directory.
Never imports JAX.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from absl import logging

from jaxseg.common.progress import progress
from jaxseg.io import Volume, VolumeError, open_volume
from jaxseg.quality.report import NOTHING_KEPT, QcReport, stable_path
from jaxseg.quality.settings import QcSettings

# Largest box (voxels, all channels) read at once; a slab larger than this is split into y / x
# tiles along chunk boundaries, so memory stays bounded for any section size.
BOX_VOXELS = 1 << 25
# The interior mean needs at least this many samples once k_edge are dropped at each end.
MIN_INTERIOR_SAMPLES = 3


def _nullable(a: np.ndarray) -> list:
  """A float array as a list with None for NaN (JSON has no NaN)."""
  return [None if not math.isfinite(v) else float(v) for v in np.asarray(a, np.float64).tolist()]


def open_affinity_volume(spec: str | os.PathLike | Volume) -> Volume:
  """Opens affinities (``pred.zarr/affinities``, a predict output folder, or a Volume) and checks
  them.

  Raises:
    VolumeError: not a ``[C, z, y, x]`` floating-point volume.
  """
  if isinstance(spec, Volume):
    volume = spec
  else:
    spec = os.fspath(spec)
    if os.path.isdir(spec) and os.path.isdir(os.path.join(spec, "affinities")):
      spec = os.path.join(spec, "affinities")
    volume = open_volume(spec)
  if volume.ndim != 4:
    raise VolumeError(f"{volume.path}: expected affinities [C, z, y, x], got shape {volume.shape}")
  if not np.issubdtype(volume.dtype, np.floating):
    raise VolumeError(f"{volume.path}: affinities must be floating point, got {volume.dtype}")
  return volume


def open_image_volume(
  spec: str | os.PathLike | Volume | None, spatial_shape: Sequence[int]
) -> Volume | None:
  """Opens an image ``[z, y, x]`` or ``[c, z, y, x]`` and checks it covers ``spatial_shape``."""
  if spec is None:
    return None
  volume = spec if isinstance(spec, Volume) else open_volume(os.fspath(spec))
  if tuple(volume.shape[-3:]) != tuple(spatial_shape):
    raise VolumeError(
      f"{volume.path}: image (z, y, x) {tuple(volume.shape[-3:])} does not match the affinities' "
      f"{tuple(spatial_shape)}; check the axis orders and that both cover the same region"
    )
  return volume


def image_box(image: Volume, box: tuple[slice, slice, slice]) -> np.ndarray:
  """A ``[z, y, x]`` box of the image's first channel."""
  return np.asarray(image[(0, *box)] if image.ndim == 4 else image[box])


def read_plan(
  shape: Sequence[int], chunks: Sequence[int] | None, z_stride: int, budget: int | None = None
) -> tuple[int, int, int]:
  """Box ``(depth, rows, cols)`` of each read: ``max(chunk z, z_stride)`` sections, tiled in y /
  x along chunk boundaries when a whole slab holds more than ``budget`` (default
  :data:`BOX_VOXELS`) voxels; never less than one chunk."""
  budget = budget or BOX_VOXELS
  c, z, y, x = (int(n) for n in shape)
  cz, cy, cx = (int(n) for n in chunks[1:]) if chunks else (1, 1, 1)
  depth = min(max(cz, z_stride), z)
  plane = max(1, budget // (c * depth))  # voxels per (y, x) tile
  if y * x <= plane:
    return depth, y, x
  cols = x if min(cy, y) * x <= plane else min(x, max(cx, plane // cy // cx * cx))
  rows = min(y, max(cy, plane // cols // cy * cy))
  return depth, rows, cols


def scan_affinities(
  affinities: str | os.PathLike | Volume,
  settings: QcSettings | None = None,
  *,
  image: str | os.PathLike | Volume | None = None,
  show_progress: bool = False,
) -> QcReport:
  """Streams the affinities once and decides the z range worth decoding.

  Args:
    affinities: ``[C, z, y, x]`` float affinities (a path, a predict output folder or a Volume).
    settings: QC settings (default: PyTC's).
    image: optional image ``[z, y, x]`` or ``[c, z, y, x]`` of the same (z, y, x) shape, for the
      XY-border diagnostic: at ``n_z_border`` sections spread over the part never cut
      (``[refine_window, Z - refine_window)``), the mean affinity at background pixels (image <=
      ``bg_thresh``) in the ``border_width`` ring vs in the interior. Report only; the mask
      (:func:`jaxseg.quality.build_affinity_mask`) drops ring background.
    show_progress: a progress bar over the slabs.

  Returns:
    A :class:`QcReport`.

  Raises:
    VolumeError: unreadable or malformed affinities or image (the message names the file).
  """
  start = time.perf_counter()
  settings = settings or QcSettings()
  volume = open_affinity_volume(affinities)
  n_ch, depth_z = volume.shape[:2]
  img = open_image_volume(image, volume.shape[1:])
  warnings: list[str] = []
  if img is not None and img.ndim == 4 and img.shape[0] > 1:
    warnings.append(f"the image has {img.shape[0]} channels; the border check uses the first")
  if img is not None and np.issubdtype(img.dtype, np.floating) and settings.bg_thresh >= 1:
    warnings.append(
      f"bg_thresh {settings.bg_thresh:g} is compared with a floating-point image ({img.dtype}); "
      "set qc.bg_thresh on the image's own scale"
    )

  window, border_z = _border_sections(settings, depth_z, img, warnings)
  (sums, sumsq, counts, nonfinite, nan_count, inf_count, vmin, vmax, b_sum, b_n, b_bg, b_all) = (
    _accumulate(volume, img, settings, border_z, show_progress)
  )
  with np.errstate(invalid="ignore", divide="ignore"):
    mean = sums / counts
    std = np.sqrt(np.maximum(sumsq / counts - mean**2, 0.0))
  sampled, interior, interior_mean = _interior_mean(mean, settings, warnings)
  cutoff = interior_mean - settings.drift_thresh
  if nan_count.sum() or inf_count.sum():
    bad = np.flatnonzero(nonfinite)
    listed = ", ".join(str(z) for z in bad[:10]) + (", ..." if len(bad) > 10 else "")
    warnings.append(
      f"{int(nan_count.sum())} NaN and {int(inf_count.sum())} Inf values in {len(bad)} "
      f"section(s) (z = {listed}); the decoder refuses non-finite affinities"
    )

  channels, offsets = _channel_attributes(volume.attrs, n_ch)
  report = QcReport(
    # Absolute: the report and qc.json are read from other working directories.
    affinities=stable_path(volume.path),
    image=None if img is None else stable_path(img.path),
    shape=[int(n) for n in volume.shape],
    dtype=str(volume.dtype),
    channels=channels,
    offsets=offsets,
    settings=settings,
    slice_mean=[_nullable(m) for m in mean],
    slice_std=[_nullable(s) for s in std],
    slice_nonfinite=[int(n) for n in nonfinite],
    sampled_z=sampled,
    interior_z=list(interior),
    interior_mean=_nullable(interior_mean),
    cutoff=_nullable(cutoff),
    nan_count=[int(n) for n in nan_count],
    inf_count=[int(n) for n in inf_count],
    min=_nullable(np.where(np.isfinite(vmin), vmin, np.nan)),
    max=_nullable(np.where(np.isfinite(vmax), vmax, np.nan)),
    low_z=0,
    high_z=depth_z,
    warnings=warnings,
  )
  _keep_range(report, window, depth_z, warnings)
  if border_z:
    report.border = _border_summary(border_z, settings, b_sum, b_n, b_bg, b_all, warnings)
  elif img is not None:
    warnings.append("XY-border check skipped: border_width, n_z_border or the kept range is 0")
  report.seconds = round(time.perf_counter() - start, 3)
  return report


def _border_sections(
  settings: QcSettings, depth_z: int, img: Volume | None, warnings: list[str]
) -> tuple[int, list[int]]:
  """The search window at each end (at most half the sections) and the sections the XY-border
  diagnostic samples, spread over the part never cut (none without an image)."""
  window = settings.refine_window
  if 2 * window > depth_z:
    window = depth_z // 2
    warnings.append(
      f"refine_window {settings.refine_window} is more than half of the {depth_z} sections; "
      f"searched within {window} of each end instead"
    )
  border_z: list[int] = []
  bw = settings.border_width
  if img is not None and settings.n_z_border > 0 and bw > 0 and depth_z - 2 * window > 0:
    border_z = sorted(
      set(
        np.linspace(window, depth_z - window - 1, settings.n_z_border).round().astype(int).tolist()
      )
    )
  return window, border_z


class _Sums(NamedTuple):
  """One pass's running totals: ``[C, Z]`` sums, squares and counts of the finite values, ``[Z]``
  non-finite counts, ``[C]`` NaN / Inf counts and finite min / max, and the XY-border totals
  (``[2, C]`` sums and counts, ``[2]`` background and all pixels; ring first, then interior)."""

  sums: np.ndarray
  sumsq: np.ndarray
  counts: np.ndarray
  nonfinite: np.ndarray
  nan_count: np.ndarray
  inf_count: np.ndarray
  vmin: np.ndarray
  vmax: np.ndarray
  b_sum: np.ndarray
  b_n: np.ndarray
  b_bg: np.ndarray
  b_all: np.ndarray


def _accumulate(
  volume: Volume, img: Volume | None, settings: QcSettings, border_z: list[int], show_progress: bool
) -> _Sums:
  """The streaming pass: every box of :func:`read_plan` read once, its finite values summed."""
  n_ch, depth_z, ny, nx = volume.shape
  sums = np.zeros((n_ch, depth_z))
  sumsq = np.zeros((n_ch, depth_z))
  counts = np.zeros((n_ch, depth_z), np.int64)
  nonfinite = np.zeros(depth_z, np.int64)
  nan_count = np.zeros(n_ch, np.int64)
  inf_count = np.zeros(n_ch, np.int64)
  vmin = np.full(n_ch, np.inf)
  vmax = np.full(n_ch, -np.inf)
  # Border accumulators: [ring, interior] x channel sums and counts of finite values, plus pixel
  # counts (background and all) per region.
  b_sum = np.zeros((2, n_ch))
  b_n = np.zeros((2, n_ch), np.int64)
  b_bg = np.zeros(2, np.int64)
  b_all = np.zeros(2, np.int64)

  slab, rows, cols = read_plan(volume.shape, volume.chunks, settings.z_stride)
  slabs = range(0, depth_z, slab)
  for z0 in progress(
    slabs, total=len(slabs), desc="qc", unit="slab", disable=not show_progress
  ):  # fmt: skip
    z1 = min(z0 + slab, depth_z)
    for y0 in range(0, ny, rows):
      y1 = min(y0 + rows, ny)
      for x0 in range(0, nx, cols):
        x1 = min(x0 + cols, nx)
        box = np.asarray(volume[:, z0:z1, y0:y1, x0:x1])
        finite = np.isfinite(box)
        all_finite = bool(finite.all())
        if not all_finite:
          nan = np.isnan(box)
          nan_count += nan.sum(axis=(1, 2, 3))
          inf_count += (~finite & ~nan).sum(axis=(1, 2, 3))
          nonfinite[z0:z1] += (~finite).sum(axis=(0, 2, 3))
          # Zero-filled so the sums below see only finite values (the counts say how many).
          box = np.where(finite, box, np.zeros((), box.dtype))
        for c in range(n_ch):
          a = box[c]
          sums[c, z0:z1] += a.sum(axis=(1, 2), dtype=np.float64)
          sumsq[c, z0:z1] += np.square(a, dtype=np.float32).sum(axis=(1, 2), dtype=np.float64)
          if all_finite:
            counts[c, z0:z1] += a.shape[1] * a.shape[2]
            vmin[c] = min(vmin[c], float(a.min()))
            vmax[c] = max(vmax[c], float(a.max()))
            continue
          f = finite[c]
          counts[c, z0:z1] += f.sum(axis=(1, 2))
          if f.any():
            vmin[c] = min(vmin[c], float(np.where(f, a, np.inf).min()))
            vmax[c] = max(vmax[c], float(np.where(f, a, -np.inf).max()))
        for z in (z for z in border_z if z0 <= z < z1):
          _accumulate_border(
            box[:, z - z0], finite[:, z - z0], img, z, (y0, y1), (x0, x1), (ny, nx), settings,
            b_sum, b_n, b_bg, b_all,
          )  # fmt: skip
  return _Sums(
    sums, sumsq, counts, nonfinite, nan_count, inf_count, vmin, vmax, b_sum, b_n, b_bg, b_all
  )


def _interior_mean(
  mean: np.ndarray, settings: QcSettings, warnings: list[str]
) -> tuple[list[int], list[int], np.ndarray]:
  """The sampled sections, the samples the interior mean uses, and that mean ``[C]`` (module
  docstring), from the ``[C, Z]`` section means."""
  n_ch, depth_z = mean.shape
  sampled = list(range(0, depth_z, settings.z_stride))
  usable = [z for z in sampled if np.isfinite(mean[:, z]).all()]
  if len(usable) < len(sampled):
    warnings.append(
      f"{len(sampled) - len(usable)} sampled section(s) have no finite value in some channel; "
      "the interior mean leaves them out"
    )
  k = settings.k_edge
  interior = usable[k : len(usable) - k] if k else usable
  if len(interior) < MIN_INTERIOR_SAMPLES:
    warnings.append(
      f"only {len(interior)} sample(s) remain after dropping k_edge={k} of {len(usable)} at each "
      f"end; the interior mean uses all {len(usable)} samples instead"
    )
    interior = usable
  if interior:
    interior_mean = mean[:, interior].mean(axis=1)
  else:
    interior_mean = np.full(n_ch, np.nan)
    warnings.append("no sampled section has finite values: every section counts as bad")
  return sampled, interior, interior_mean


def _channel_attributes(attrs, n_ch: int) -> tuple[list[int], list[list[int]] | None]:
  """Channel numbers and offsets from the file's attributes (``0..C-1`` / None when they do not
  name every channel)."""
  stored = attrs.get("channels")
  channels = (
    [int(c) for c in stored] if stored is not None and len(stored) == n_ch else list(range(n_ch))
  )
  offsets = attrs.get("offsets")
  offsets = (
    [[int(v) for v in o] for o in offsets] if offsets is not None and len(offsets) == n_ch else None
  )
  return channels, offsets


def _keep_range(report: QcReport, window: int, depth_z: int, warnings: list[str]) -> None:
  """Sets ``report.low_z`` / ``report.high_z`` (module docstring): the first good section within
  ``window`` of the start, one past the last good one within ``window`` of the end; ``0, 0`` when
  no section is good."""
  report.low_z = next((z for z in range(window) if report.good(z)), window)
  report.high_z = next(
    (z + 1 for z in reversed(range(depth_z - window, depth_z)) if report.good(z)),
    depth_z - window,
  )
  if not any(report.good(z) for z in range(depth_z)):
    # PyTC's fallback (``refine_window`` in from each end) would keep the middle of a volume with
    # no usable section at all.
    report.low_z = report.high_z = 0
    warnings.insert(0, NOTHING_KEPT)
    logging.warning("%s: %s", report.affinities, NOTHING_KEPT)


def ring_mask(rows: tuple[int, int], cols: tuple[int, int], shape: Sequence[int], width: int):
  """``[rows, cols]`` bool: pixels of a tile within ``width`` of the section's XY edge."""
  ny, nx = shape
  y = np.arange(*rows)[:, None]
  x = np.arange(*cols)[None, :]
  return (y < width) | (y >= ny - width) | (x < width) | (x >= nx - width)


def _accumulate_border(aff, finite, img, z, rows, cols, shape, settings, b_sum, b_n, b_bg, b_all):
  ring = ring_mask(rows, cols, shape, settings.border_width)
  bg = image_box(img, (slice(z, z + 1), slice(*rows), slice(*cols)))[0] <= settings.bg_thresh
  for r, region in enumerate((ring, ~ring)):
    sel = region & bg
    b_bg[r] += int(sel.sum())
    b_all[r] += int(region.sum())
    for c in range(aff.shape[0]):
      use = sel & finite[c]
      b_sum[r, c] += float(aff[c][use].sum(dtype=np.float64))
      b_n[r, c] += int(use.sum())


def _border_summary(border_z, settings, b_sum, b_n, b_bg, b_all, warnings) -> dict:
  with np.errstate(invalid="ignore", divide="ignore"):
    means = b_sum / b_n
    fraction = b_bg / b_all
  out = {
    "z": list(border_z),
    "ring_voxels": int(b_all[0]),
    "interior_voxels": int(b_all[1]),
    "ring_background": int(b_bg[0]),
    "interior_background": int(b_bg[1]),
    "ring_background_fraction": _nullable(fraction)[0],
    "interior_background_fraction": _nullable(fraction)[1],
    "ring_background_mean": _nullable(means[0]) if b_bg[0] else None,
    "interior_background_mean": _nullable(means[1]) if b_bg[1] else None,
  }
  if not b_all[1]:
    warnings.append(
      f"border_width {settings.border_width} leaves no interior in the XY sections: the border "
      "check has nothing to compare with"
    )
  return out
