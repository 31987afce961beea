"""Image normalisation shared by training and inference, and the volume statistics it uses.

Owns ``data.normalize`` (``"divide_255"`` | ``"minmax"``) and ``data.normalize_scope``
(``"volume"`` | ``"crop"``): :func:`volume_stats` streams a whole image volume (lazy or in memory,
``[c,] z, y, x``) slab by slab along z for its min and max, and :func:`normalize_image` maps raw
intensities of any shape (numpy or jax) to float32 with them. The training crops of
``jaxseg.data.pipeline`` and the inference inputs go through this same mapping.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxseg.common.errors import ConfigError, InputError
from jaxseg.data.affinity import array_namespace
from jaxseg.io.volume import Volume

NORMALIZE_MODES = ("divide_255", "minmax")
NORMALIZE_SCOPES = ("volume", "crop")
# Spatial voxels per slab when streaming a volume for its statistics without a chunk shape.
_STATS_SLAB_VOXELS = 1 << 24


class VolumeStats(NamedTuple):
  """Intensity range of a whole image volume (all channels together)."""

  min: float
  max: float


def volume_stats(volume: Volume | np.ndarray) -> VolumeStats:
  """Min and max of a whole image volume, streamed slab by slab along z.

  Statistics cover the whole file, whatever split a z range assigns, so the training, validation
  and test crops of one file share one intensity mapping. Inference calls this on the volume it
  predicts and passes the result to :func:`normalize_image`.

  Args:
    volume: a lazy :class:`Volume` (``[c,] z, y, x``) or an in-memory array.

  Returns:
    :class:`VolumeStats`.

  Raises:
    ValueError: for an empty volume.
  """
  shape = tuple(volume.shape)
  where = getattr(volume, "path", "array")
  if not shape or min(shape) == 0:
    raise InputError(f"{where}: cannot compute statistics of an empty volume {shape}")
  nz = shape[-3]
  chunks = getattr(volume, "chunks", None)
  if chunks:
    depth = int(chunks[-3])
  else:
    depth = max(
      1, _STATS_SLAB_VOXELS // int(np.prod(shape[-2:]) * (shape[0] if len(shape) == 4 else 1))
    )
  lo, hi = np.inf, -np.inf
  lead = (slice(None),) * (len(shape) - 3)
  for z in range(0, nz, depth):
    slab = np.asarray(volume[(*lead, slice(z, min(nz, z + depth)))])
    lo = min(lo, float(slab.min()))
    hi = max(hi, float(slab.max()))
  return VolumeStats(lo, hi)


def normalize_settings(data_config) -> tuple[str, str]:
  mode = data_config.get("normalize", None)
  if mode not in NORMALIZE_MODES:
    raise ConfigError(f"data.normalize must be one of {NORMALIZE_MODES}, got {mode!r}")
  scope = data_config.get("normalize_scope", "volume")
  if mode == "minmax" and scope not in NORMALIZE_SCOPES:
    raise ConfigError(f"data.normalize_scope must be one of {NORMALIZE_SCOPES}, got {scope!r}")
  return mode, scope


def needs_volume_stats(data_config) -> bool:
  """True when :func:`normalize_image` needs :func:`volume_stats` of the volume."""
  mode, scope = normalize_settings(data_config)
  return mode == "minmax" and scope == "volume"


def normalize_image(image, data_config, stats: VolumeStats | None = None, *, out=None):
  """Maps raw image intensities to float32 as ``data.normalize`` says.

  * ``"divide_255"``: ``image / 255`` (NISB, BANIS).
  * ``"minmax"`` with ``data.normalize_scope="volume"``: ``(image - min) / (max - min)`` with the
    :func:`volume_stats` of the whole volume (jaxseg's default, the same at train and test time).
  * ``"minmax"`` with ``"crop"``: the same with the min and max of ``image`` itself (PyTC's
    training behaviour).

  A constant range (``max == min``) maps to zeros. The arithmetic is float32 throughout.

  Args:
    image: raw intensities, any shape (numpy, or jax).
    data_config: ``config.data``.
    stats: the volume's statistics; required for ``minmax`` / ``volume``.
    out: optional float32 numpy array of ``image``'s shape to write into (numpy input only).

  Returns:
    float32 array of ``image``'s shape (``out`` when given).

  Raises:
    ValueError: an unknown mode or scope, or missing statistics.
  """
  xp = array_namespace(image)
  mode, scope = normalize_settings(data_config)
  if mode == "minmax" and scope == "volume" and stats is None:
    raise ValueError(
      "data.normalize='minmax' with normalize_scope='volume' needs the volume's statistics "
      "(volume_stats(volume))"
    )
  if xp is not np:  # jax: functional updates, no Python branching on traced values
    image = image.astype(xp.float32)
    if mode == "divide_255":
      return image / xp.float32(255.0)
    lo, hi = (stats.min, stats.max) if scope == "volume" else (image.min(), image.max())
    return (image - lo) / xp.where(hi > lo, hi - lo, 1.0).astype(xp.float32)
  if out is None:
    out = np.empty(np.shape(image), np.float32)
  np.copyto(out, image, casting="unsafe")  # = image.astype(float32), without a temporary
  if mode == "divide_255":
    out /= np.float32(255.0)
    return out
  if scope == "volume":
    lo, hi = float(stats.min), float(stats.max)
  else:
    lo, hi = float(out.min()), float(out.max())
  out -= np.float32(lo)
  out /= np.float32(hi - lo if hi > lo else 1.0)
  return out
