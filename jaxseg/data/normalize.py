"""Image normalisation shared by training and inference, and the volume statistics it uses.

Owns ``data.normalize``, ``data.normalize_scope`` and ``data.normalize_percentiles``:

* ``"divide_255"``: ``x / 255`` (NISB, BANIS); no statistics.
* ``"minmax"``: ``(x - min) / (max - min)``; the min and max of every voxel of the volume.
* ``"zscore"``: ``(x - mean) / std`` (population std); mean and std of the volume.
* ``"percentile"``: ``(x - p_low) / (p_high - p_low)`` clipped to ``[0, 1]``, with ``p_low`` and
  ``p_high`` the volume's ``data.normalize_percentiles`` (default ``(1.0, 99.0)``; numpy's
  ``"linear"`` percentile definition). Only this mode reads that key.

``data.normalize_scope`` (``"volume"``, the default, or ``"crop"``) says whose statistics the last
three modes use: the whole volume's (the same at training and test time) or those of each array
handed to :func:`normalize_image` (a training crop, an inference hull; PyTC's training behaviour
for min-max).

Statistics (:func:`volume_stats`, one :class:`VolumeStats` record) are streamed slab by slab
along z (a chunk's depth, or slabs of ``2**24`` voxels), so memory stays bounded:

* ``minmax``: the min and max of every voxel, whatever the volume's size.
* ``zscore`` / ``percentile``: min, max, mean, std (and the percentiles for ``percentile``) of
  every voxel of volumes up to :data:`LARGE_VOLUME_VOXELS` (``2**30``, channels counted); larger
  volumes are summarised from a deterministic sample of about :data:`SAMPLE_VOXELS` (``2**26``,
  67 M) voxels: chunk-sized boxes (the volume's chunk shape, or 16 x 256 x 256 when it has none;
  cut smaller while one holds over ``2**22`` voxels), one drawn with a fixed seed from each of
  equal runs of the grid of such boxes in (z, y, x) order, so the sample spreads evenly through z. The
  record says so (``sampled``, ``voxels``).
* Percentiles of 8- and 16-bit integer (and bool) images are exact: one pass builds a histogram
  of every value (``bincount``), which also gives min, max, mean and std. Other dtypes take a
  second pass over the same voxels: a histogram of :data:`FLOAT_HISTOGRAM_BINS` (``2**16``) bins
  over ``[min, max]``, each bin's voxels spread evenly across it, so a percentile is within
  ``(max - min) / 2**16`` of the exact one.

:func:`normalization_stats` is what training and inference call: it returns the statistics the
config's mode needs (None when it needs none) and computes them once per volume per process,
keyed by the volume's identity (path, file sizes and times, shape, dtype) and the settings.
:func:`normalize_image` maps raw intensities of any shape (numpy or jax) to float32 with them.
The training crops of ``jaxseg.data.pipeline`` and the inference inputs go through this same
mapping; inference computes the statistics of the volume it predicts, not the training volume's.
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from jaxseg.common.errors import ConfigError, InputError
from jaxseg.common.outputs import input_identity
from jaxseg.data.affinity import array_namespace
from jaxseg.io.volume import Volume

NORMALIZE_MODES = ("divide_255", "minmax", "zscore", "percentile")
NORMALIZE_SCOPES = ("volume", "crop")
DEFAULT_PERCENTILES = (1.0, 99.0)
# Volumes with more voxels than this (channels counted) are summarised from a sample for the
# zscore / percentile statistics (tests lower it to reach the sampled path on small volumes).
LARGE_VOLUME_VOXELS = 1 << 30
# About how many voxels that sample holds, and the seed that picks its boxes.
SAMPLE_VOXELS = 1 << 26
SAMPLE_SEED = 0
# Box shape sampled from volumes without chunks.
_SAMPLE_BOX = (16, 256, 256)
# Bins of the histogram that gives percentiles of float (and wide integer) images.
FLOAT_HISTOGRAM_BINS = 1 << 16
# Spatial voxels per slab when streaming a volume for its statistics without a chunk shape.
_STATS_SLAB_VOXELS = 1 << 24
# Values handled at once within a slab (bounds the float64 / index temporaries).
_PIECE = 1 << 22
# Volumes whose statistics are remembered (per process).
_MEMO_SIZE = 64


class VolumeStats(NamedTuple):
  """Intensity statistics of an image volume (all channels together).

  ``minmax`` fills ``min`` and ``max``; ``zscore`` also ``mean`` and ``std``; ``percentile`` also
  ``percentiles`` (the levels asked for) and ``p_low`` / ``p_high`` (their values). ``voxels``
  is how many voxels they summarise and ``sampled`` whether those were a sample of the volume.
  """

  min: float
  max: float
  mean: float | None = None
  std: float | None = None
  percentiles: tuple[float, float] | None = None
  p_low: float | None = None
  p_high: float | None = None
  voxels: int | None = None
  sampled: bool = False

  def to_dict(self) -> dict:
    """JSON-ready, with the fields that are set (what predict records in its outputs)."""
    out = {k: v for k, v in self._asdict().items() if v is not None}
    if self.percentiles is not None:
      out["percentiles"] = [float(p) for p in self.percentiles]
    return out

  @classmethod
  def from_record(cls, record: Any) -> VolumeStats:
    """From :meth:`to_dict`'s dict, or the ``[min, max]`` list older outputs recorded."""
    if isinstance(record, dict):
      fields = dict(record)
      if fields.get("percentiles") is not None:
        fields["percentiles"] = tuple(float(p) for p in fields["percentiles"])
      return cls(**fields)
    return cls(*record)


class NormalizeSettings(NamedTuple):
  """``data.normalize`` / ``normalize_scope`` / ``normalize_percentiles``, checked."""

  mode: str
  scope: str
  percentiles: tuple[float, float]

  @property
  def needs_volume_stats(self) -> bool:
    """True when :func:`normalize_image` needs statistics of the whole volume."""
    return self.mode != "divide_255" and self.scope == "volume"

  def record(self) -> dict:
    """The settings that change the mapping, as config keys (``data.<key>``) and JSON values."""
    out: dict = {"normalize": self.mode}
    if self.mode != "divide_255":
      out["normalize_scope"] = self.scope
    if self.mode == "percentile":
      out["normalize_percentiles"] = [float(p) for p in self.percentiles]
    return out


def _percentiles(value: Any) -> tuple[float, float]:
  try:
    low, high = (float(v) for v in value)
    ok = math.isfinite(low) and math.isfinite(high) and 0.0 <= low < high <= 100.0
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ConfigError(
      f"data.normalize_percentiles must be two numbers (low, high) with 0 <= low < high <= 100, "
      f"got {value!r}"
    )
  return low, high


def normalize_settings(data_config) -> NormalizeSettings:
  """``config.data``'s normalisation settings, checked.

  Raises:
    ConfigError: an unknown mode or scope, or bad percentiles (one line naming the key).
  """
  mode = data_config.get("normalize", None)
  if mode not in NORMALIZE_MODES:
    raise ConfigError(f"data.normalize must be one of {NORMALIZE_MODES}, got {mode!r}")
  scope = data_config.get("normalize_scope", "volume")
  if mode != "divide_255" and scope not in NORMALIZE_SCOPES:
    raise ConfigError(f"data.normalize_scope must be one of {NORMALIZE_SCOPES}, got {scope!r}")
  percentiles = data_config.get("normalize_percentiles", None)
  percentiles = DEFAULT_PERCENTILES if percentiles is None else _percentiles(percentiles)
  return NormalizeSettings(mode, scope, percentiles)


def needs_volume_stats(data_config) -> bool:
  """True when :func:`normalize_image` needs :func:`volume_stats` of the volume."""
  return normalize_settings(data_config).needs_volume_stats


# -- statistics ------------------------------------------------------------------------------------


def volume_stats(
  volume: Volume | np.ndarray,
  mode: str = "minmax",
  percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
) -> VolumeStats:
  """Statistics of a whole image volume for normalisation ``mode``, streamed slab by slab.

  Statistics cover the whole file, whatever split a z range assigns, so the training, validation
  and test crops of one file share one intensity mapping. Inference calls this (through
  :func:`normalization_stats`) on the volume it predicts. See the module docstring for what each
  mode computes, the sampling of large volumes and the precision of percentiles.

  Args:
    volume: a lazy :class:`Volume` (``[c,] z, y, x``) or an in-memory array.
    mode: ``"minmax"`` (min and max of every voxel), ``"zscore"`` or ``"percentile"``.
    percentiles: ``(low, high)`` in ``[0, 100]``, for ``"percentile"``.

  Returns:
    :class:`VolumeStats`.

  Raises:
    InputError: an empty volume, or NaN / Inf in a float volume (zscore, percentile).
  """
  shape = tuple(volume.shape)
  where = getattr(volume, "path", "array")
  if not shape or min(shape) == 0:
    raise InputError(f"{where}: cannot compute statistics of an empty volume {shape}")
  voxels = math.prod(shape)
  if mode in ("minmax", "divide_255"):
    lo, hi = np.inf, -np.inf
    for slab in _read(volume, _slabs(volume)):
      lo = min(lo, float(slab.min()))
      hi = max(hi, float(slab.max()))
    return VolumeStats(lo, hi, voxels=voxels)
  if mode not in ("zscore", "percentile"):
    raise ValueError(f"unknown normalisation mode {mode!r}; known: {NORMALIZE_MODES}")
  sampled = voxels > LARGE_VOLUME_VOXELS
  boxes = _sample_boxes(volume) if sampled else _slabs(volume)
  levels = _percentiles(percentiles) if mode == "percentile" else None
  dtype = np.dtype(volume.dtype)
  if dtype.kind == "b" or (dtype.kind in "iu" and dtype.itemsize <= 2):
    return _histogram_stats(volume, boxes, levels, sampled)
  return _float_stats(volume, boxes, levels, sampled, where)


def _slabs(volume) -> list[tuple]:
  """Keys of z slabs covering the volume: a chunk deep, or about ``2**24`` voxels."""
  shape = tuple(volume.shape)
  nz = shape[-3]
  chunks = getattr(volume, "chunks", None)
  if chunks:
    depth = int(chunks[-3])
  else:
    depth = max(
      1, _STATS_SLAB_VOXELS // int(np.prod(shape[-2:]) * (shape[0] if len(shape) == 4 else 1))
    )
  lead = (slice(None),) * (len(shape) - 3)
  return [(*lead, slice(z, min(nz, z + depth))) for z in range(0, nz, depth)]


def _sample_boxes(volume) -> list[tuple]:
  """Keys of the deterministic sample of a large volume (see the module docstring)."""
  shape = tuple(volume.shape)
  spatial = shape[-3:]
  channels = shape[0] if len(shape) == 4 else 1
  chunks = getattr(volume, "chunks", None)
  box = [int(n) for n in (chunks[-3:] if chunks else _SAMPLE_BOX)]
  box = [max(1, min(b, n)) for b, n in zip(box, spatial, strict=True)]
  # Huge chunks are cut into smaller boxes, so that the sample holds many places.
  while math.prod(box) * channels > max(1, SAMPLE_VOXELS // 16) and max(box) > 1:
    axis = int(np.argmax(box))
    box[axis] = -(-box[axis] // 2)
  grid = [-(-n // b) for n, b in zip(spatial, box, strict=True)]
  cells = math.prod(grid)
  count = min(cells, max(1, -(-SAMPLE_VOXELS // (math.prod(box) * channels))))
  # Stratified: one box at random from each of `count` equal runs of the grid in (z, y, x)
  # order, so the sample spreads evenly through z (EM intensity drifts from section to section).
  edges = np.arange(count + 1, dtype=np.int64) * cells // count
  jitter = np.random.default_rng(SAMPLE_SEED).random(count)
  picked = edges[:-1] + (jitter * (edges[1:] - edges[:-1])).astype(np.int64)
  lead = (slice(None),) * (len(shape) - 3)
  keys = []
  for flat in picked:
    index = np.unravel_index(int(flat), grid)
    keys.append(
      (
        *lead,
        *(slice(i * b, min(n, (i + 1) * b)) for i, b, n in zip(index, box, spatial, strict=True)),
      )
    )
  return keys


def _read(volume, keys: list[tuple]) -> Iterator[np.ndarray]:
  for key in keys:
    yield np.asarray(volume[key])


def _pieces(volume, keys: list[tuple]) -> Iterator[np.ndarray]:
  """The values of the boxes, flat, at most ``_PIECE`` at a time."""
  for slab in _read(volume, keys):
    flat = slab.reshape(-1)
    for start in range(0, flat.size, _PIECE):
      yield flat[start : start + _PIECE]


def _histogram_stats(volume, keys, levels, sampled: bool) -> VolumeStats:
  """Exact statistics of 8- / 16-bit integer or bool voxels from one histogram of values."""
  dtype = np.dtype(volume.dtype)
  if dtype.kind == "b":
    offset, bins = 0, 2
  else:
    offset, bins = int(np.iinfo(dtype).min), 1 << (8 * dtype.itemsize)
  hist = np.zeros(bins, np.int64)
  for piece in _pieces(volume, keys):
    values = piece.view(np.uint8) if dtype.kind == "b" else piece
    if offset:
      values = values.astype(np.int32) - offset
    hist += np.bincount(values, minlength=bins)
  values = np.arange(bins, dtype=np.float64) + offset
  n = int(hist.sum())
  present = np.flatnonzero(hist)
  mean = float(hist @ values) / n
  var = float(hist @ np.square(values - mean)) / n
  p_low = p_high = None
  if levels is not None:
    cum = np.cumsum(hist)
    p_low, p_high = (_exact_percentile(cum, values, n, q) for q in levels)
  return VolumeStats(
    float(values[present[0]]),
    float(values[present[-1]]),
    mean,
    math.sqrt(var),
    levels,
    p_low,
    p_high,
    n,
    sampled,
  )


def _exact_percentile(cum: np.ndarray, values: np.ndarray, n: int, q: float) -> float:
  """numpy's ``"linear"`` percentile ``q`` from a cumulative histogram of exact values."""
  virtual = (n - 1) * (q / 100.0)
  below = math.floor(virtual)
  ranks = np.array([below, min(below + 1, n - 1)])
  a, b = values[np.searchsorted(cum, ranks, side="right")]
  return _lerp(float(a), float(b), virtual - below)


def _lerp(a: float, b: float, t: float) -> float:
  """numpy's interpolation between neighbouring order statistics (``_lerp``), bit for bit."""
  diff = b - a
  return b - diff * (1.0 - t) if t >= 0.5 else a + diff * t


def _float_stats(volume, keys, levels, sampled: bool, where: str) -> VolumeStats:
  """Min, max, mean and std in one pass (Chan's merge), percentiles from a second."""
  lo, hi, n, mean, m2 = np.inf, -np.inf, 0, 0.0, 0.0
  for piece in _pieces(volume, keys):
    x = piece.astype(np.float64)
    lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
    k = x.size
    piece_mean = float(x.mean())
    np.subtract(x, piece_mean, out=x)
    piece_m2 = float(np.dot(x, x))
    delta = piece_mean - mean
    total = n + k
    mean += delta * k / total
    m2 += piece_m2 + delta * delta * n * k / total
    n = total
  if not (math.isfinite(lo) and math.isfinite(hi)):
    raise InputError(f"{where}: NaN or Inf in the image; cannot compute its statistics")
  p_low = p_high = None
  if levels is not None:
    p_low, p_high = _binned_percentiles(volume, keys, lo, hi, n, levels)
  return VolumeStats(lo, hi, mean, math.sqrt(m2 / n), levels, p_low, p_high, n, sampled)


def _binned_percentiles(volume, keys, lo: float, hi: float, n: int, levels) -> list[float]:
  """Percentiles from a ``FLOAT_HISTOGRAM_BINS`` histogram over ``[lo, hi]``."""
  if hi <= lo:
    return [lo, lo]
  bins = FLOAT_HISTOGRAM_BINS
  scale = bins / (hi - lo)
  hist = np.zeros(bins, np.int64)
  for piece in _pieces(volume, keys):
    x = piece.astype(np.float64)
    np.subtract(x, lo, out=x)
    np.multiply(x, scale, out=x)
    index = np.clip(x.astype(np.intp), 0, bins - 1)
    hist += np.bincount(index, minlength=bins)
  cum = np.cumsum(hist)
  width = (hi - lo) / bins

  def value(rank: int) -> float:
    # The voxels of a bin are taken as spread evenly across it.
    j = int(np.searchsorted(cum, rank, side="right"))
    before = int(cum[j - 1]) if j else 0
    return min(hi, lo + (j + (rank - before + 0.5) / int(hist[j])) * width)

  out = []
  for q in levels:
    virtual = (n - 1) * (q / 100.0)
    below = math.floor(virtual)
    out.append(_lerp(value(below), value(min(below + 1, n - 1)), virtual - below))
  return out


_memo: collections.OrderedDict[tuple, VolumeStats] = collections.OrderedDict()
_memo_lock = threading.Lock()


def _volume_key(volume) -> tuple | None:
  """What identifies a lazy volume's contents in this process (None: an in-memory array)."""
  path = getattr(volume, "path", None)
  if path is None or isinstance(volume, np.ndarray):
    return None
  identity = input_identity(path)
  return (
    str(identity["path"]),
    identity["content"],
    tuple(volume.shape),
    np.dtype(volume.dtype).str,
    getattr(volume, "axis_order", None),
  )


def normalization_stats(volume: Volume | np.ndarray, data_config) -> VolumeStats | None:
  """The statistics ``data_config``'s normalisation needs of ``volume``, or None.

  Computed once per volume per process: training opens several crops (and the train and val
  splits) of one file, and asks once for each. A volume is known by its path, the sizes and
  times of its files, shape, dtype and axis order, so a file rewritten in place is read again.

  Raises:
    ConfigError: bad normalisation settings.
    InputError: see :func:`volume_stats`.
  """
  settings = normalize_settings(data_config)
  if not settings.needs_volume_stats:
    return None
  volume_key = _volume_key(volume)
  if volume_key is None:
    return volume_stats(volume, settings.mode, settings.percentiles)
  sampling = (LARGE_VOLUME_VOXELS, SAMPLE_VOXELS, SAMPLE_SEED, FLOAT_HISTOGRAM_BINS)
  levels = settings.percentiles if settings.mode == "percentile" else None
  key = (volume_key, settings.mode, levels, sampling)
  with _memo_lock:
    if key in _memo:
      _memo.move_to_end(key)
      return _memo[key]
  stats = volume_stats(volume, settings.mode, settings.percentiles)
  with _memo_lock:
    _memo[key] = stats
    while len(_memo) > _MEMO_SIZE:
      _memo.popitem(last=False)
  return stats


# -- the mapping -----------------------------------------------------------------------------------


def _check_stats(settings: NormalizeSettings, stats: VolumeStats | None) -> None:
  if not settings.needs_volume_stats:
    return
  needed = {"minmax": ("min", "max"), "zscore": ("mean", "std"), "percentile": ("p_low", "p_high")}
  missing = [f for f in needed[settings.mode] if stats is None or getattr(stats, f) is None]
  if missing:
    raise ValueError(
      f"data.normalize={settings.mode!r} with normalize_scope='volume' needs the volume's "
      f"statistics ({', '.join(missing)}; normalization_stats(volume, config.data))"
    )


def _crop_stats(settings: NormalizeSettings, image, xp) -> tuple:
  """``(offset, scale)`` of ``image``'s own statistics (``normalize_scope="crop"``)."""
  if settings.mode == "minmax":
    if xp is np:  # the spread in float64, as it always was
      lo, hi = float(image.min()), float(image.max())
    else:
      lo, hi = image.min(), image.max()
    return lo, hi - lo
  if settings.mode == "zscore":
    if xp is np:
      return image.mean(dtype=np.float64), image.std(dtype=np.float64)
    return image.mean(), image.std()
  lo, hi = xp.percentile(image, xp.asarray(settings.percentiles))
  return lo, hi - lo


def _volume_offset_scale(settings: NormalizeSettings, stats: VolumeStats) -> tuple[float, float]:
  if settings.mode == "minmax":
    return float(stats.min), float(stats.max) - float(stats.min)
  if settings.mode == "zscore":
    return float(stats.mean), float(stats.std)
  return float(stats.p_low), float(stats.p_high) - float(stats.p_low)


def normalize_image(image, data_config, stats: VolumeStats | None = None, *, out=None):
  """Maps raw image intensities to float32 as ``data.normalize`` says.

  * ``"divide_255"``: ``image / 255`` (NISB, BANIS).
  * ``"minmax"``: ``(image - min) / (max - min)``.
  * ``"zscore"``: ``(image - mean) / std``.
  * ``"percentile"``: ``(image - p_low) / (p_high - p_low)``, clipped to ``[0, 1]``.

  With ``data.normalize_scope="volume"`` the statistics are ``stats``, those of the whole volume
  (:func:`normalization_stats`; jaxseg's default, the same at train and test time); with
  ``"crop"`` they are ``image``'s own (PyTC's training behaviour for min-max). A zero spread
  (constant image, ``std == 0``, ``p_high == p_low``) divides by 1 instead, so a constant image
  maps to zeros. The arithmetic is float32 throughout.

  Args:
    image: raw intensities, any shape (numpy, or jax).
    data_config: ``config.data``.
    stats: the volume's statistics; required for the scope ``"volume"`` (not for divide_255).
    out: optional float32 numpy array of ``image``'s shape to write into (numpy input only).

  Returns:
    float32 array of ``image``'s shape (``out`` when given).

  Raises:
    ValueError: an unknown mode or scope, or missing statistics.
  """
  xp = array_namespace(image)
  settings = normalize_settings(data_config)
  mode = settings.mode
  _check_stats(settings, stats)
  if xp is not np:  # jax: functional updates, no Python branching on traced values
    image = image.astype(xp.float32)
    if mode == "divide_255":
      return image / xp.float32(255.0)
    if settings.scope == "volume":
      lo, spread = _volume_offset_scale(settings, stats)
    else:
      lo, spread = _crop_stats(settings, image, xp)
    image = (image - lo) / xp.where(spread > 0, spread, 1.0).astype(xp.float32)
    return xp.clip(image, 0.0, 1.0) if mode == "percentile" else image
  if out is None:
    out = np.empty(np.shape(image), np.float32)
  np.copyto(out, image, casting="unsafe")  # = image.astype(float32), without a temporary
  if mode == "divide_255":
    out /= np.float32(255.0)
    return out
  if settings.scope == "volume":
    lo, spread = _volume_offset_scale(settings, stats)
  else:
    lo, spread = (float(v) for v in _crop_stats(settings, out, np))
  out -= np.float32(lo)
  out /= np.float32(spread if spread > 0 else 1.0)
  if mode == "percentile":
    np.clip(out, 0.0, 1.0, out=out)
  return out
