"""Local shape descriptors (LSDs) of label crops, on the device: the MTLSD auxiliary target.

After Sheridan et al., "Local shape descriptors for neuron segmentation", Nature Methods 2022;
the definition and the normalisation are in ``docs/targets_and_losses.md``, "Local shape
descriptors". Written from that definition (not from the authors' ``lsd`` package).

Owns :func:`local_shape_descriptors` (one crop) and :func:`lsd_targets` (a batch). Shapes:

* in: labels int ``[Z, Y, X]`` (or ``[b, Z, Y, X]``): > 0 object ids, 0 background, -1 unlabeled;
* out: ``lsd`` float32 ``[Z, Y, X, 10]`` in ``[0, 1]`` (channels: mean offset z, y, x; covariance
  zz, yy, xx, zy, zx, yx; size) and ``mask`` float32 ``[Z, Y, X, 1]`` (1 = trained), with a
  leading ``b`` for batches.

Method, for the ``K = target.lsd.max_objects`` smallest positive ids of the crop:

1. Relabel the crop to ``0..K-1`` (sorted unique ids; larger ids and labels <= 0 become -1).
2. The coarse grid: per axis, the centres of the crop's blocks of ``d`` voxels
   (``target.lsd.downsample``), ``ceil(n / d)`` points.
3. For a chunk of ``C`` objects, the one-hot masks ``[C, Z, Y, X]`` are multiplied, axis by axis,
   with ``[ceil(n / d), n]`` matrices of the kernels ``g(t) t^p`` (``t``: the offset of a voxel
   from a coarse point in sigmas; ``p`` the moment's power on that axis; ``g`` the Gaussian,
   truncated at 3 sigma). Nineteen such products (three along x, six along y, ten along z) give
   the ten moments of every object's voxels in the window of every coarse point: its mass, three
   first and six second moments about the window's centre. The sums run over the crop only, so
   the crop border truncates the window, and they are exact at the coarse points (no
   subsampling of the labels).
4. Every voxel of an object in the chunk takes its own object's moments, trilinearly interpolated
   from the coarse points (exactly its own when ``d = 1``). The moments are smooth functions of
   the window's centre, so interpolating them (not the descriptors) is accurate.
5. Descriptors from the moments: mean = m1 / m0, covariance = m2 / m0 - mean mean^T, size =
   m0 / (mass of a whole window no border cuts), each mapped into ``[0, 1]``.

Chunks run in a ``lax.fori_loop`` whose trip count is the crop's number of objects divided by
``C``, so absent objects cost nothing; ``C`` is at most :data:`MAX_CHUNK` and keeps a chunk's
one-hot masks under :data:`CHUNK_VOXELS` voxels, which bounds memory (the masks, their 19 partial
products, each smaller by ``d`` per contracted axis, and a few ``[Z, Y, X, 10]`` arrays: about
0.6 GB for a batch of two 128^3 patches at ``d = 2``). Cost per object:
about ``3 N Xc + 6 N Yc / dx + 10 N Zc / (dx dy)`` multiply-adds for ``N`` voxels.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxseg.data.targets import LSD_CHANNELS, LsdSettings

# The window is cut at this many standard deviations per axis (a box, not an ellipsoid).
TRUNCATE = 3.0
# Voxels x objects per chunk: the chunk's one-hot masks take 4 bytes each (128 MB).
CHUNK_VOXELS = 1 << 25
MAX_CHUNK = 8  # measured on CPU: small chunks beat large ones even with many objects
# Voxels whose own object has less window mass than this get no descriptor. The voxel itself
# weighs at least g(d / 2) in each corner's window, so this only guards the division.
MIN_MASS = 1e-3
# (pz, py, px) of the ten moments, in output order: mass, first moments, second moments.
_POWERS = (
  (0, 0, 0),
  (1, 0, 0),
  (0, 1, 0),
  (0, 0, 1),
  (2, 0, 0),
  (0, 2, 0),
  (0, 0, 2),
  (1, 1, 0),
  (1, 0, 1),
  (0, 1, 1),
)
assert len(_POWERS) == LSD_CHANNELS


def _units(settings: LsdSettings) -> tuple[float, float, float]:
  """One voxel per axis in units of sigma: ``resolution / sigma_nm``."""
  return tuple(r / s for r, s in zip(settings.resolution, settings.sigma_nm, strict=True))


def _centres(n: int, d: int) -> np.ndarray:
  """Fine positions of the coarse points of an axis: the centres of its blocks of ``d`` voxels."""
  return np.arange(0, n, d) + (d - 1) / 2


def axis_kernels(n: int, d: int, unit: float) -> np.ndarray:
  """``[3, ceil(n / d), n]`` float32: ``K[p, i, j] = g(t) t^p``, ``t = (j - c_i) * unit`` the
  offset of fine voxel ``j`` from coarse point ``c_i`` in sigmas, 0 where ``|t| > TRUNCATE``.

  Row ``i`` is the window centred on coarse point ``i``, cut at the crop's ends (``j`` only runs
  over the crop); a product with it sums a fine axis into the coarse one exactly.
  """
  t = (np.arange(n)[None, :] - _centres(n, d)[:, None]) * unit
  g = np.where(np.abs(t) <= TRUNCATE + 1e-9, np.exp(-0.5 * t * t), 0.0)
  return np.stack([g, g * t, g * t * t]).astype(np.float32)


def window_mass(settings: LsdSettings) -> float:
  """The sum of the Gaussian weights over a whole window that no crop border cuts (centred, like
  the coarse points, on a voxel for odd ``d`` and between two for even ``d``)."""
  mass = 1.0
  for d, unit in zip(settings.downsample, _units(settings), strict=True):
    reach = math.ceil(TRUNCATE / unit) + 1
    t = (np.arange(-reach, reach + 1) + ((d - 1) / 2) % 1) * unit
    mass *= float(np.sum(np.where(np.abs(t) <= TRUNCATE + 1e-9, np.exp(-0.5 * t * t), 0.0)))
  return mass


def _interpolation(n: int, d: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per fine voxel of an axis: ``[(coarse index, weight)]`` corners of linear interpolation
  between the coarse points (:func:`_centres`); before the first and after the last coarse
  point (under ``d / 2`` voxels) the nearest one's value is used."""
  if d == 1:
    return [(np.arange(n), np.ones(n, np.float32))]
  last = len(range(0, n, d)) - 1
  at = np.clip((np.arange(n) - (d - 1) / 2) / d, 0, last)
  lo = np.floor(at).astype(np.int64)
  frac = (at - lo).astype(np.float32)
  return [(lo, 1.0 - frac), (np.minimum(lo + 1, last), frac)]


def _moments(onehot: jax.Array, kernels) -> jax.Array:
  """``[C, Z, Y, X]`` object masks -> ``[C, Zc, Yc, Xc, 10]`` windowed moments at the coarse
  points.

  ``kernels``: ``(kz, ky, kx)``, each ``[3, n_coarse, n]`` from :func:`axis_kernels`. Separable:
  three x passes, six y passes, ten z passes, each a matrix product along one axis.
  """
  kz, ky, kx = kernels
  mm = functools.partial(jnp.einsum, precision=lax.Precision.HIGHEST)
  by_x = {p: mm("czyx,wx->czyw", onehot, kx[p]) for p in range(3)}
  by_yx = {}
  for _, py, px in _POWERS:
    if (py, px) not in by_yx:
      by_yx[py, px] = mm("czyx,vy->czvx", by_x[px], ky[py])
  out = [mm("czyx,uz->cuyx", by_yx[py, px], kz[pz]) for pz, py, px in _POWERS]
  return jnp.stack(out, axis=-1)


def _relabel(labels: jax.Array, max_objects: int) -> tuple[jax.Array, jax.Array]:
  """``(k, n)``: each voxel's rank among the ``max_objects`` smallest positive ids of the crop
  (int32 ``[Z, Y, X]``, -1 for labels <= 0 and larger ids) and how many objects have a rank."""
  big = jnp.iinfo(jnp.int32).max
  keyed = jnp.where(labels > 0, labels, big)
  ids = jnp.unique(keyed, size=max_objects, fill_value=big)
  rank = jnp.clip(jnp.searchsorted(ids, keyed), 0, max_objects - 1)
  found = (labels > 0) & (ids[rank] == labels)
  return jnp.where(found, rank, -1).astype(jnp.int32), jnp.sum(ids < big).astype(jnp.int32)


def _descriptors(acc: jax.Array, found: jax.Array, mass: float) -> tuple[jax.Array, jax.Array]:
  """Moments ``[..., 10]`` (sigma units) -> ``(lsd [..., 10] in [0, 1], mask [..., 1])``."""
  m0 = acc[..., 0]
  ok = found & (m0 > MIN_MASS)
  m0 = jnp.where(ok, m0, 1.0)[..., None]
  mean = acc[..., 1:4] / m0
  second = acc[..., 4:10] / m0
  mz, my, mx = mean[..., 0], mean[..., 1], mean[..., 2]
  var = second[..., 0:3] - mean * mean
  cov = second[..., 3:6] - jnp.stack([mz * my, mz * mx, my * mx], axis=-1)
  size = acc[..., 0:1] / mass
  lsd = jnp.concatenate([0.5 + 0.5 * mean, var, 0.5 + 0.5 * cov, size], axis=-1)
  lsd = jnp.where(ok[..., None], jnp.clip(lsd, 0.0, 1.0), 0.0)
  return lsd, ok[..., None].astype(jnp.float32)


def local_shape_descriptors(labels, settings: LsdSettings) -> tuple[jax.Array, jax.Array]:
  """The LSDs of one label crop, the Gaussian window truncated at 3 sigma and at the crop border.

  Args:
    labels: int ``[Z, Y, X]``; > 0 objects, 0 background, -1 unlabeled.
    settings: :class:`jaxseg.data.targets.LsdSettings` (static).

  Returns:
    ``(lsd, mask)``: float32 ``[Z, Y, X, 10]`` in ``[0, 1]`` (0 where masked) and float32
    ``[Z, Y, X, 1]``: 1 at voxels of the ``max_objects`` smallest positive ids, 0 at labels <= 0
    and at objects beyond the cap.
  """
  labels = jnp.asarray(labels).astype(jnp.int32)
  if labels.ndim != 3:
    raise ValueError(f"labels must be [Z, Y, X], got shape {labels.shape}")
  shape = labels.shape
  ds = settings.downsample
  coarse_shape = tuple(len(range(0, n, d)) for n, d in zip(shape, ds, strict=True))
  n_coarse = math.prod(coarse_shape)
  kernels = tuple(
    jnp.asarray(axis_kernels(n, d, unit))
    for n, d, unit in zip(shape, ds, _units(settings), strict=True)
  )
  k, n_objects = _relabel(labels, settings.max_objects)
  chunk = max(1, min(settings.max_objects, MAX_CHUNK, CHUNK_VOXELS // math.prod(shape)))
  # Flat coarse index and weight of each interpolation corner, per fine voxel.
  yc, xc = coarse_shape[1], coarse_shape[2]
  corners = []
  for (iz, wz), (iy, wy), (ix, wx) in itertools.product(
    *(_interpolation(n, d) for n, d in zip(shape, ds, strict=True))
  ):
    # Broadcast on the device from per-axis vectors: no [Z, Y, X] constants in the program.
    iz, iy, ix = (jnp.asarray(i, jnp.int32) for i in (iz, iy, ix))
    wz, wy, wx = (jnp.asarray(w, jnp.float32) for w in (wz, wy, wx))
    index = (iz[:, None, None] * yc + iy[None, :, None]) * xc + ix[None, None, :]
    weight = wz[:, None, None] * wy[None, :, None] * wx[None, None, :]
    corners.append((index, weight[..., None]))

  def chunk_moments(j, acc):
    first = j * chunk
    onehot = k[None] == (first + jnp.arange(chunk, dtype=jnp.int32))[:, None, None, None]
    fields = _moments(onehot.astype(jnp.float32), kernels).reshape(chunk * n_coarse, LSD_CHANNELS)
    local = k - first
    base = jnp.clip(local, 0, chunk - 1) * n_coarse
    value = sum(w * jnp.take(fields, base + index, axis=0, mode="clip") for index, w in corners)
    inside = (local >= 0) & (local < chunk)
    return jnp.where(inside[..., None], value, acc)

  n_chunks = (n_objects + chunk - 1) // chunk
  acc = lax.fori_loop(0, n_chunks, chunk_moments, jnp.zeros((*shape, LSD_CHANNELS), jnp.float32))
  lsd, mask = _descriptors(acc, k >= 0, window_mass(settings))
  return lax.stop_gradient(lsd), lax.stop_gradient(mask)


def lsd_targets(labels, settings: LsdSettings) -> tuple[jax.Array, jax.Array]:
  """:func:`local_shape_descriptors` of each crop of a batch ``[b, Z, Y, X]`` (vmapped, so a
  batch-sharded input stays sharded): ``lsd`` ``[b, Z, Y, X, 10]``, ``mask`` ``[b, Z, Y, X, 1]``."""
  labels = jnp.asarray(labels)
  if labels.ndim != 4:
    raise ValueError(f"labels must be [b, Z, Y, X], got shape {labels.shape}")
  return jax.vmap(lambda one: local_shape_descriptors(one, settings))(labels)
