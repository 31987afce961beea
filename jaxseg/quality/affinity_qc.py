"""Affinity QC: per-section statistics of a predicted affinity volume and the z range worth decoding.

Owns:
  * :func:`qc_settings`: ``config.qc`` checked and resolved into :class:`QcSettings`.
  * :func:`scan_affinities`: one streaming pass over ``[C, z, y, x]`` affinities (bounded memory:
    z slabs of ``max(chunk z, z_stride)`` sections, split into chunk-aligned y / x tiles when a slab
    would exceed :data:`BOX_VOXELS`), giving per-section means and stds per channel, NaN / Inf
    counts, finite min / max, the interior mean, ``low_z`` / ``high_z`` and, with an image
    (``[z, y, x]`` or ``[c, z, y, x]``, first channel used), the XY-border diagnostic.
  * :func:`write_report` / :func:`read_report`: markdown with YAML front matter (``img``, ``out``,
    ``low_z``, ``high_z``, ``bg_thresh``, ``border_width``, ...) and a PNG plot of the means.
  * :func:`run_qc`: scan, report and mask (``jaxseg.quality.mask``) in one call, reusing a finished
    identical result; what ``jaxseg.run`` and the prediction cache call.

The rules follow PyTC's affinity QC (``pytc_spec.md`` section 7): the interior mean is the mean of
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

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import yaml
from absl import logging

from jaxseg.common import outputs
from jaxseg.common.errors import ConfigError, InputError, MissingInputError
from jaxseg.common.files import atomic_output, local_abspath, write_json
from jaxseg.common.outputs import Decision, StageOutput, input_identity
from jaxseg.common.progress import progress
from jaxseg.io import Volume, VolumeError, open_volume

# Largest box (voxels, all channels) read at once; a slab larger than this is split into y / x
# tiles along chunk boundaries, so memory stays bounded for any section size.
BOX_VOXELS = 1 << 25
# The interior mean needs at least this many samples once k_edge are dropped at each end.
MIN_INTERIOR_SAMPLES = 3
REPORT_NAME = "report.md"
SUMMARY_NAME = "qc.json"
MASK_NAME = "mask.zarr"
_KEYS = {
  "enabled", "z_stride", "k_edge", "refine_window", "drift_thresh", "border_width", "bg_thresh",
  "n_z_border",
}  # fmt: skip
_REQUIRED_FRONT_MATTER = ("low_z", "high_z", "bg_thresh", "border_width")
# Report warning and log line when no section is good (low_z == high_z == 0).
NOTHING_KEPT = "no section passed QC: the mask keeps nothing"


# -- settings -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QcSettings:
  """``config.qc`` resolved (``pytc_spec.md`` section 7; the defaults are PyTC's numbers).

  Attributes:
    enabled: whether ``jaxseg.run`` runs QC on its predictions (the QC itself ignores it).
    z_stride: sections between samples of the interior mean.
    k_edge: samples left out at each end of the interior mean.
    refine_window: ``low_z`` / ``high_z`` are searched within this many sections of each end.
    drift_thresh: a channel's section mean below its interior mean minus this is bad.
    border_width: width (pixels) of the XY ring checked for background.
    bg_thresh: image intensity at or below which a pixel is background.
    n_z_border: sections sampled by the XY-border diagnostic.
  """

  enabled: bool = True
  z_stride: int = 10
  k_edge: int = 20
  refine_window: int = 30
  drift_thresh: float = 0.05
  border_width: int = 32
  bg_thresh: float = 30.0
  n_z_border: int = 8

  def fingerprint(self) -> dict:
    """Everything that changes the report (not ``enabled``)."""
    out = dataclasses.asdict(self)
    del out["enabled"]
    return out


def _int(value: Any, name: str, minimum: int) -> int:
  try:
    out = int(value)
    integral = float(value) == out
  except (TypeError, ValueError):
    integral = False
  if not integral or out < minimum:
    raise ConfigError(f"config.qc.{name} must be an integer >= {minimum}, not {value!r}")
  return out


def _float(value: Any, name: str, minimum: float | None = None) -> float:
  try:
    out = float(value)
  except (TypeError, ValueError):
    out = math.nan
  if not math.isfinite(out) or (minimum is not None and out < minimum):
    bound = f" >= {minimum:g}" if minimum is not None else ""
    raise ConfigError(f"config.qc.{name} must be a finite number{bound}, not {value!r}")
  return out


def qc_settings(config_or_section: Any = None) -> QcSettings:
  """Checks ``config.qc`` (or the section itself, a plain dict, or settings) and resolves it.

  ``None`` or an empty mapping gives PyTC's defaults.

  Raises:
    ValueError: an unknown key (refused rather than silently ignored) or a bad value, naming it.
  """
  if config_or_section is None:
    return QcSettings()
  if isinstance(config_or_section, QcSettings):
    return config_or_section
  if isinstance(config_or_section, Mapping) and "qc" in config_or_section:
    section = config_or_section["qc"]
  else:
    section = getattr(config_or_section, "qc", config_or_section)
  d = section.to_dict() if hasattr(section, "to_dict") else dict(section)
  unknown = sorted(set(d) - _KEYS)
  if unknown:
    raise ConfigError(
      f"config.qc: unknown key(s) {unknown}; known keys: {sorted(_KEYS)} (refusing rather than "
      "silently ignoring them)"
    )
  defaults = QcSettings()
  return QcSettings(
    enabled=bool(d.get("enabled", defaults.enabled)),
    z_stride=_int(d.get("z_stride", defaults.z_stride), "z_stride", 1),
    k_edge=_int(d.get("k_edge", defaults.k_edge), "k_edge", 0),
    refine_window=_int(d.get("refine_window", defaults.refine_window), "refine_window", 0),
    drift_thresh=_float(d.get("drift_thresh", defaults.drift_thresh), "drift_thresh", 0.0),
    border_width=_int(d.get("border_width", defaults.border_width), "border_width", 0),
    bg_thresh=_float(d.get("bg_thresh", defaults.bg_thresh), "bg_thresh"),
    n_z_border=_int(d.get("n_z_border", defaults.n_z_border), "n_z_border", 0),
  )


# -- the scan -------------------------------------------------------------------------------------


@dataclasses.dataclass
class QcReport:
  """What :func:`scan_affinities` found; plain JSON-able values (NaN stored as None).

  Attributes:
    affinities: path of the affinity volume.
    image: path of the image used by the border diagnostic, or None.
    shape: ``[C, Z, Y, X]``.
    dtype: stored affinity dtype.
    channels: channel numbers (the file's ``channels`` attribute, else ``0..C-1``).
    offsets: each channel's offset (z, y, x) from the file's attributes, or None.
    settings: the QC settings used.
    slice_mean: ``[C][Z]`` mean of the finite values of every section (None: no finite value).
    slice_std: ``[C][Z]`` their standard deviation.
    slice_nonfinite: ``[Z]`` NaN + Inf values per section, all channels.
    sampled_z: the sections sampled every ``z_stride``.
    interior_z: the samples the interior mean used.
    interior_mean: ``[C]`` per channel.
    cutoff: ``[C]`` ``interior_mean - drift_thresh``.
    nan_count, inf_count: ``[C]`` over the whole volume.
    min, max: ``[C]`` of the finite values.
    low_z, high_z: the sections ``[low_z, high_z)`` worth decoding; ``0, 0`` (empty) when no
      section passed.
    border: the XY-border diagnostic (see :func:`scan_affinities`), or None without an image.
    warnings: anything a user should know (fallbacks, non-finite values, ...).
    seconds: time the scan took.
  """

  affinities: str
  image: str | None
  shape: list[int]
  dtype: str
  channels: list[int]
  offsets: list[list[int]] | None
  settings: QcSettings
  slice_mean: list[list[float | None]]
  slice_std: list[list[float | None]]
  slice_nonfinite: list[int]
  sampled_z: list[int]
  interior_z: list[int]
  interior_mean: list[float | None]
  cutoff: list[float | None]
  nan_count: list[int]
  inf_count: list[int]
  min: list[float | None]
  max: list[float | None]
  low_z: int
  high_z: int
  border: dict | None = None
  warnings: list[str] = dataclasses.field(default_factory=list)
  seconds: float = 0.0

  @property
  def depth(self) -> int:
    return int(self.shape[1])

  @property
  def total_nan(self) -> int:
    return int(sum(self.nan_count))

  @property
  def total_inf(self) -> int:
    return int(sum(self.inf_count))

  def good(self, z: int) -> bool:
    """Whether section ``z`` passes: every channel at or above its cutoff, no NaN / Inf."""
    if self.slice_nonfinite[z]:
      return False
    for c, cut in enumerate(self.cutoff):
      mean = self.slice_mean[c][z]
      if cut is None or mean is None or mean < cut:
        return False
    return True

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping) -> QcReport:
    d = dict(d)
    d["settings"] = QcSettings(**d["settings"])
    return cls(**d)

  def frontmatter(self) -> dict:
    """The report's YAML front matter: PyTC's keys first, then the rest of the decision."""
    finite_min = [v for v in self.min if v is not None]
    finite_max = [v for v in self.max if v is not None]
    s = self.settings
    out = {
      # Absolute when local: a mask can be built from the report in any working directory.
      "img": stable_path(self.image),
      "out": stable_path(self.affinities),
      "low_z": int(self.low_z),
      "high_z": int(self.high_z),
      "bg_thresh": _plain_number(s.bg_thresh),
      "border_width": int(s.border_width),
      "generator": "jaxseg.qc",
      "shape": [int(n) for n in self.shape],
      "dtype": self.dtype,
      "channels": list(self.channels),
      "z_stride": s.z_stride,
      "k_edge": s.k_edge,
      "refine_window": s.refine_window,
      "drift_thresh": s.drift_thresh,
      "n_z_border": s.n_z_border,
      "interior_mean": [_round(v) for v in self.interior_mean],
      "cutoff": [_round(v) for v in self.cutoff],
      "nan_count": self.total_nan,
      "inf_count": self.total_inf,
      "min": _round(min(finite_min)) if finite_min else None,
      "max": _round(max(finite_max)) if finite_max else None,
    }
    if self.border is not None:
      b = self.border
      out["border"] = {
        "ring_background_fraction": _round(b["ring_background_fraction"]),
        "interior_background_fraction": _round(b["interior_background_fraction"]),
        "ring_background_mean": _round_list(b["ring_background_mean"]),
        "interior_background_mean": _round_list(b["interior_background_mean"]),
      }
    out["warnings"] = list(self.warnings)
    return out


def _round(v: float | None, digits: int = 6) -> float | None:
  return None if v is None or not math.isfinite(v) else round(float(v), digits)


def _round_list(values: Sequence[float | None] | None) -> list | None:
  return None if values is None else [_round(v) for v in values]


def _plain_number(v: float) -> int | float:
  return int(v) if float(v).is_integer() else float(v)


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
  n_ch, depth_z, ny, nx = volume.shape
  img = open_image_volume(image, volume.shape[1:])
  warnings: list[str] = []
  if img is not None and img.ndim == 4 and img.shape[0] > 1:
    warnings.append(f"the image has {img.shape[0]} channels; the border check uses the first")
  if img is not None and np.issubdtype(img.dtype, np.floating) and settings.bg_thresh >= 1:
    warnings.append(
      f"bg_thresh {settings.bg_thresh:g} is compared with a floating-point image ({img.dtype}); "
      "set qc.bg_thresh on the image's own scale"
    )

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

  with np.errstate(invalid="ignore", divide="ignore"):
    mean = sums / counts
    std = np.sqrt(np.maximum(sumsq / counts - mean**2, 0.0))
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
  cutoff = interior_mean - settings.drift_thresh
  if nan_count.sum() or inf_count.sum():
    bad = np.flatnonzero(nonfinite)
    listed = ", ".join(str(z) for z in bad[:10]) + (", ..." if len(bad) > 10 else "")
    warnings.append(
      f"{int(nan_count.sum())} NaN and {int(inf_count.sum())} Inf values in {len(bad)} "
      f"section(s) (z = {listed}); the decoder refuses non-finite affinities"
    )

  attrs = volume.attrs
  stored = attrs.get("channels")
  channels = (
    [int(c) for c in stored] if stored is not None and len(stored) == n_ch else list(range(n_ch))
  )
  offsets = attrs.get("offsets")
  offsets = (
    [[int(v) for v in o] for o in offsets] if offsets is not None and len(offsets) == n_ch else None
  )
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
  if border_z:
    report.border = _border_summary(border_z, settings, b_sum, b_n, b_bg, b_all, warnings)
  elif img is not None:
    warnings.append("XY-border check skipped: border_width, n_z_border or the kept range is 0")
  report.seconds = round(time.perf_counter() - start, 3)
  return report


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


# -- the report -----------------------------------------------------------------------------------


def plot_path(path_md: str) -> str:
  """The PNG beside a report: ``means.png`` next to ``report.md``, else ``<stem>_means.png``."""
  stem = os.path.splitext(os.path.basename(path_md))[0]
  name = "means.png" if stem == "report" else f"{stem}_means.png"
  return os.path.join(os.path.dirname(os.path.abspath(path_md)), name)


def write_report(report: QcReport, path_md: str | os.PathLike) -> dict:
  """Writes the markdown report (YAML front matter + tables) and the PNG plot beside it.

  Returns:
    ``{"report": path_md, "plot": png path}``.
  """
  path_md = os.fspath(path_md)
  os.makedirs(os.path.dirname(os.path.abspath(path_md)), exist_ok=True)
  png = plot_path(path_md)
  _plot_means(report, png)
  front = yaml.safe_dump(report.frontmatter(), sort_keys=False, default_flow_style=None, width=100)
  text = f"---\n{front}---\n\n{_markdown_body(report, os.path.basename(png))}"
  with atomic_output(path_md) as tmp, open(tmp, "w") as f:
    f.write(text)
  return {"report": path_md, "plot": png}


def _fmt(v: float | None, spec: str = ".4f") -> str:
  return "n/a" if v is None else format(v, spec)


def _markdown_body(report: QcReport, png_name: str) -> str:
  s, depth = report.settings, report.depth
  lines = [f"# Affinity QC: `{report.affinities}`", ""]
  dropped = [f"{report.low_z} at the start"] if report.low_z else []
  dropped += [f"{depth - report.high_z} at the end"] if report.high_z < depth else []
  if report.low_z >= report.high_z:
    kept = f"**{NOTHING_KEPT[0].upper()}{NOTHING_KEPT[1:]}** (low_z = high_z = {report.low_z})"
  else:
    kept = f"Keeps sections **[{report.low_z}, {report.high_z})** of {depth}: " + (
      ("drops " + " and ".join(dropped)) if dropped else "nothing dropped"
    )
  lines += [
    f"Shape (C, z, y, x) {tuple(report.shape)}, {report.dtype}. {kept}.",
    "",
    f"Sections sampled every {s.z_stride}; the interior mean leaves out {s.k_edge} samples at "
    f"each end ({len(report.interior_z)} used); a section is good when every channel's mean is "
    f"at least its interior mean - {s.drift_thresh:g} and it holds no NaN / Inf; the ends are "
    f"searched within {s.refine_window} sections.",
    "",
    "| channel | offset (z, y, x) | interior mean | cutoff | min | max | NaN | Inf |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for c, ch in enumerate(report.channels):
    offset = tuple(report.offsets[c]) if report.offsets else "?"
    lines.append(
      f"| {ch} | {offset} | {_fmt(report.interior_mean[c])} | {_fmt(report.cutoff[c])} | "
      f"{_fmt(report.min[c])} | {_fmt(report.max[c])} | {report.nan_count[c]} | "
      f"{report.inf_count[c]} |"
    )
  lines += ["", f"![per-section means]({png_name})", ""]
  lines += ["## XY border (report only)", ""]
  b = report.border
  if b is None:
    lines.append("No image given: not checked." if report.image is None else "Not checked.")
  else:
    lines += [
      f"Image `{report.image}`, {len(b['z'])} sections (z = {', '.join(map(str, b['z']))}), "
      f"{s.border_width}-pixel ring, background = image <= {s.bg_thresh:g}.",
      "",
      "| region | pixels | background | mean affinity at background (per channel) |",
      "|---|---|---|---|",
    ]
    for name, key in (("ring", "ring"), ("interior", "interior")):
      means = b[f"{key}_background_mean"]
      shown = ", ".join(_fmt(v, ".3f") for v in means) if means else "n/a"
      lines.append(
        f"| {name} | {b[f'{key}_voxels']} | {b[f'{key}_background']} "
        f"({_fmt(b[f'{key}_background_fraction'], '.1%')}) | {shown} |"
      )
    lines += ["", "The affinity mask drops ring pixels whose image is background."]
  lines.append("")
  if report.warnings:
    lines += ["## Warnings", ""] + [f"- {w}" for w in report.warnings] + [""]
  shown_z = sorted(
    set(report.sampled_z)
    | set(range(min(s.refine_window, depth)))
    | set(range(max(0, depth - s.refine_window), depth))
  )
  lines += [
    "## Per-section means",
    "",
    f"Every {s.z_stride}th section and the {s.refine_window} at each end.",
    "",
    "| z | " + " | ".join(f"ch {c}" for c in report.channels) + " | NaN/Inf | kept |",
    "|---|" + "---|" * len(report.channels) + "---|---|",
  ]
  for z in shown_z:
    means = " | ".join(_fmt(report.slice_mean[c][z]) for c in range(len(report.channels)))
    kept = "yes" if report.low_z <= z < report.high_z else "no"
    flag = "" if report.good(z) else " (bad)"
    lines.append(f"| {z} | {means} | {report.slice_nonfinite[z]} | {kept}{flag} |")
  return "\n".join(lines) + "\n"


def _plot_means(report: QcReport, path: str) -> str:
  import matplotlib

  matplotlib.use("Agg")  # files only; never needs a display
  import matplotlib.pyplot as plt

  depth = report.depth
  z = np.arange(depth)
  fig, ax = plt.subplots(figsize=(9, 4))
  if report.low_z > 0:
    ax.axvspan(-0.5, report.low_z - 0.5, color="0.85", label="dropped")
  if report.high_z < depth:
    ax.axvspan(report.high_z - 0.5, depth - 0.5, color="0.85", label=None if report.low_z else "dropped")  # fmt: skip
  for c, ch in enumerate(report.channels):
    color = f"C{c % 10}"
    mean = np.array([np.nan if v is None else v for v in report.slice_mean[c]])
    offset = f" {tuple(report.offsets[c])}" if report.offsets else ""
    ax.plot(z, mean, color=color, lw=1, label=f"channel {ch}{offset}")
    ax.plot(report.sampled_z, mean[report.sampled_z], "o", color=color, ms=3)
    if report.cutoff[c] is not None:
      ax.axhline(report.cutoff[c], color=color, ls="--", lw=0.8)
  for value, name in ((report.low_z, "low_z"), (report.high_z, "high_z")):
    ax.axvline(value - 0.5, color="k", lw=0.8)
    # Labels inside the axes: low_z to the right of its line, high_z to the left.
    right = name == "low_z"
    ax.annotate(f"{name} {value}", (value - 0.5, 1), xycoords=("data", "axes fraction"),
                xytext=(3 if right else -3, -10), textcoords="offset points", fontsize=8,
                ha="left" if right else "right")  # fmt: skip
  ax.set_xlabel("z (section)")
  ax.set_ylabel("mean affinity")
  ax.set_xlim(-0.5, depth - 0.5)
  ax.set_title("Per-section mean affinity (dots: samples; dashed: cutoffs)", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower center")
  fig.tight_layout()
  with atomic_output(path) as tmp:
    fig.savefig(tmp, dpi=100)
  plt.close(fig)
  return path


def read_report(path_md: str | os.PathLike) -> dict:
  """The front matter of a QC report, as a dict.

  Raises:
    FileNotFoundError: no such file.
    ValueError: no YAML front matter, YAML that does not parse to a mapping, or a missing /
      malformed ``low_z``, ``high_z``, ``bg_thresh`` or ``border_width`` (names the file).
  """
  path_md = os.fspath(path_md)
  if not os.path.isfile(path_md):
    raise MissingInputError(f"{path_md}: no such QC report")
  with open(path_md) as f:
    text = f.read()
  lines = text.splitlines()
  if not lines or lines[0].strip() != "---":
    raise InputError(f"{path_md}: not a QC report: it does not start with '---' front matter")
  end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), None)
  if end is None:
    raise InputError(f"{path_md}: the front matter has no closing '---' line")
  try:
    front = yaml.safe_load("\n".join(lines[1:end]))
  except yaml.YAMLError as e:
    raise InputError(f"{path_md}: the front matter is not valid YAML: {e}") from None
  if not isinstance(front, dict):
    raise InputError(f"{path_md}: the front matter must be a mapping, got {type(front).__name__}")
  missing = [k for k in _REQUIRED_FRONT_MATTER if k not in front]
  if missing:
    raise InputError(f"{path_md}: the front matter lacks {missing}")
  for key in ("low_z", "high_z", "border_width"):
    if isinstance(front[key], bool) or not isinstance(front[key], int) or front[key] < 0:
      raise InputError(f"{path_md}: {key} must be an integer >= 0, not {front[key]!r}")
  if isinstance(front["bg_thresh"], bool) or not isinstance(front["bg_thresh"], (int, float)):
    raise InputError(f"{path_md}: bg_thresh must be a number, not {front['bg_thresh']!r}")
  if front["low_z"] > front["high_z"]:  # equal: an empty range, a QC that passed no section
    raise InputError(f"{path_md}: low_z {front['low_z']} must not exceed high_z {front['high_z']}")
  return front


# -- the job --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QcResult:
  """What :func:`run_qc` made (or found).

  Attributes:
    scan: the :class:`QcReport`.
    report: path of ``report.md``.
    plot: path of the means PNG.
    mask: path of the affinity mask (uint8 ``[z, y, x]``, 1 = keep), or None.
    low_z, high_z: sections ``[low_z, high_z)`` kept.
    nan_count, inf_count: non-finite values in the whole volume.
    warnings: the scan's warnings.
    reused: True when a finished identical QC was found and nothing was recomputed.
    output_dir: the folder.
  """

  scan: QcReport
  report: str
  plot: str
  mask: str | None
  low_z: int
  high_z: int
  nan_count: int
  inf_count: int
  warnings: tuple[str, ...]
  reused: bool
  output_dir: str

  def summary(self) -> dict:
    """A JSON-ready summary (for the prediction cache and the run report)."""
    return {
      "low_z": self.low_z,
      "high_z": self.high_z,
      "depth": self.scan.depth,
      "nan_count": self.nan_count,
      "inf_count": self.inf_count,
      "interior_mean": self.scan.interior_mean,
      "report": self.report,
      "plot": self.plot,
      "mask": self.mask,
      "warnings": list(self.warnings),
      "reused": self.reused,
    }


def stable_path(path: str | None) -> str | None:
  """``path`` made absolute (stable across working directories), ``file.h5:dataset`` included;
  URLs and tensorstore specs (a volume opened from a dict is named by its JSON) as they are."""
  if path is None:
    return None
  path = os.fspath(path)
  return path if path.startswith("{") else local_abspath(path)


def _job_fingerprint(volume: Volume, image: Volume | None, settings: QcSettings) -> dict:
  # The attributes change with every new prediction (predict records model step and settings).
  digest = hashlib.sha1(json.dumps(volume.attrs, sort_keys=True, default=str).encode()).hexdigest()
  return {
    "affinities": stable_path(volume.path),
    "shape": [int(n) for n in volume.shape],
    "attributes_sha1": digest[:16],
    "image": None if image is None else stable_path(image.path),
    "image_shape": None if image is None else [int(n) for n in image.shape],
    "settings": settings.fingerprint(),
  }


def _result(summary: dict, output_dir: str, reused: bool) -> QcResult:
  scan = QcReport.from_dict(summary["scan"])
  return QcResult(
    scan=scan,
    report=os.path.join(output_dir, REPORT_NAME),
    plot=plot_path(os.path.join(output_dir, REPORT_NAME)),
    mask=summary.get("mask"),
    low_z=scan.low_z,
    high_z=scan.high_z,
    nan_count=scan.total_nan,
    inf_count=scan.total_inf,
    warnings=tuple(scan.warnings),
    reused=reused,
    output_dir=output_dir,
  )


@outputs.writes_outputs
def run_qc(
  config: Any,
  affinities: str | os.PathLike | Volume,
  output_dir: str | os.PathLike,
  *,
  image: str | os.PathLike | Volume | None = None,
  build_mask: bool = True,
  show_progress: bool = False,
  overwrite: bool = False,
) -> QcResult:
  """Scans the affinities, writes ``report.md`` + ``means.png`` and ``mask.zarr`` into
  ``output_dir``, and records the job in ``qc.json`` (written last: a killed run is redone).

  Args:
    config: a config with a ``qc`` section (``decode.block_shape`` sets the mask's chunks), the
      section itself, or None for PyTC's defaults.
    affinities: ``[C, z, y, x]`` affinities (path, predict output folder or Volume).
    output_dir: the QC folder (``<cache>/<name>_qc`` in ``jaxseg.run``).
    image: the image for the XY-border check and the mask's ring rule, or None.
    build_mask: also build the affinity mask.
    show_progress: progress bars.
    overwrite: replace a QC made here with other inputs or settings instead of refusing.

  Returns:
    A :class:`QcResult`; ``reused`` when an identical finished QC was already there.

  Raises:
    VolumeError: bad inputs, or ``output_dir`` holds a QC made differently (without overwrite).
    ValueError: bad ``config.qc`` values.
  """
  from jaxseg.quality import mask as mask_lib  # mask.py builds on this module's report

  settings = qc_settings(config)
  volume = open_affinity_volume(affinities)
  img = open_image_volume(image, volume.shape[1:])
  output_dir = os.fspath(output_dir)
  fingerprint = _job_fingerprint(volume, img, settings)
  summary_path = os.path.join(output_dir, SUMMARY_NAME)
  inputs = {
    "affinities": input_identity(volume.path),
    "image": None if img is None else input_identity(img.path),
  }
  stage = StageOutput(
    output_dir,
    name="qc",
    stage="qc",
    fingerprint={**fingerprint, "inputs": inputs},
    paths=[SUMMARY_NAME, REPORT_NAME, os.path.basename(plot_path(REPORT_NAME))],
    inputs=[volume.path, *([img.path] if img is not None else [])],
    what="--output folder",
  )
  decision = stage.open(overwrite=overwrite)
  block_shape = tuple(
    getattr(getattr(config, "decode", None), "block_shape", None) or mask_lib.DEFAULT_BLOCK_SHAPE
  )
  build = functools.partial(
    mask_lib.build_affinity_mask,
    output=os.path.join(output_dir, MASK_NAME),
    image=img,
    shape=volume.shape[1:],
    block_shape=block_shape,
    # The mask (its own entry in the folder) follows its QC: replaced when the QC is.
    overwrite=overwrite or decision is Decision.REPLACE,
    show_progress=show_progress,
  )
  if decision is Decision.REUSE:
    with open(summary_path) as f:
      saved = json.load(f)
    result = _result(saved, output_dir, reused=True)
    if not build_mask or (result.mask is not None and os.path.exists(result.mask)):
      return result
    # Finished without a mask: add it, the scan stands.
    stage.invalidate()
    mask = build(result.scan)
    saved["mask"] = mask.path
    write_json(summary_path, saved)
    stage.finish()
    return dataclasses.replace(result, mask=mask.path, reused=False)

  scan = scan_affinities(volume, settings, image=img, show_progress=show_progress)
  paths = write_report(scan, os.path.join(output_dir, REPORT_NAME))
  mask_path = None
  if build_mask:
    mask_path = build(scan).path
  saved = {
    "fingerprint": fingerprint,
    "complete": True,
    "scan": scan.to_dict(),
    "report": paths["report"],
    "plot": paths["plot"],
    "mask": mask_path,
  }
  write_json(summary_path, saved)
  stage.finish()
  return _result(saved, output_dir, reused=False)
