"""Augmentation building blocks and the geometric and intensity transforms of one sample.

Owns the random stream every transform draws from, the index helpers, the signed axis
permutations (flip, rot90, transpose), resampling (elastic, affine, and the optional control-grid
deformation :func:`grid_warp`) and the intensity transforms (``docs/recipes.md``, the two
"Augmentation" sections, and the optional contrast / gamma of another microscope,
:func:`contrast_gamma`). Section-level perturbations live in
``jaxseg.data.augment_sections``; the recipes that compose both in ``jaxseg.data.augment``.

Takes ONE sample:

- ``image``: ``[z, y, x, c]`` float32, nominally in ``[0, 1]``. Intensity ops act on every channel,
  geometric ops move all channels together.
- ``labels``: ``[z, y, x]`` int32: 0 background, -1 unlabeled, > 0 object id. Geometric ops move
  labels exactly like the image (nearest neighbour when resampling, so -1 stays -1 and no new ids
  appear); image-only ops (noise, intensity, slice drop/shift, EM defects) return the labels
  untouched.

Every public transform has the signature ``fn(key, image, labels, *, params) -> (image, labels)``,
is pure jax (jittable, vmappable over keys and samples) and keeps shapes and dtypes, so tests can
run each one alone. ``make_augment(aug_config, shape)`` composes them in the recipe order with the
probabilities of the config.

Static shapes
-------------
Output shapes equal input shapes, so every random choice is data, never a shape:

- Axis permutations and odd rot90 turns change the shape of a non-cubic crop. They are drawn only
  among the choices that keep it: ``aug_banis`` on a 138^3 crop draws all 6 permutations and
  k in 0..3 in every plane; on a (42, 74, 74) crop only the identity and the y <-> x swap, odd k
  only in the yx plane (k in {0, 2} in the zy and zx planes). ``aug_em_neuron``'s yx rot90 draws
  k in {1, 2, 3} when y == x and k = 2 otherwise. ``allowed_permutations`` and ``allowed_rot90``
  list the choices.
- Flips, rot90 and permutations are signed axis permutations; each becomes one integer gather, and
  ``make_augment`` composes the consecutive ones into a single gather.
- Sections, rectangles and slices are chosen with masks built from iota comparisons, discrete
  choices with ``jnp.where`` / ``lax.switch``; a variable number of sections (0-5) is a fixed
  number of slots, of which a random prefix is active.
- Resampling (elastic, affine, grid warp) is an own trilinear / nearest gather (``warp``) with
  MONAI's reflection padding done by index folding. The grid warp's B-spline weights depend only
  on the shape and spacing, so they are numpy constants.

Randomness
----------
Every transform draws all its random numbers from ONE ``jax.random.uniform`` call: its body is
written against a ``_Uniforms`` stream (consecutive pieces of one flat ``U[0, 1)`` array, normal
noise through ``erfinv`` as ``jax.random.normal`` does), a counting pass under ``jax.eval_shape``
sizes that array, and ``make_augment`` draws one array for the whole recipe. Each threefry call
costs XLA roughly a second of CPU compile time, so this keeps the training step's compile (and the
tests) short; the sample is still a pure function of the key.

MONAI semantics reproduced here (MONAI >= 1.2, ``grid_sample(align_corners=False)``):

- Sampling grids are in voxels relative to the volume centre ``(n - 1) / 2``; output voxel ``i``
  reads input position ``A (i - centre) + centre`` (+ displacement for elastic). The image is
  sampled trilinearly, the labels with nearest neighbour (round half to even, as ``nearbyint``).
- ``'reflection'`` padding mirrors about the voxel *edges* (``-0.5`` and ``n - 0.5``), i.e. index
  ``-1`` reads ``0`` and ``n`` reads ``n - 1`` (scipy ``mode='reflect'``). MONAI < 1.2 sampled with
  ``align_corners=True`` and mirrored about voxel centres instead; that only changes the values
  that leave the crop by less than a voxel.

Names with a leading underscore (the stream, the helpers and the stream-based transform bodies)
are shared with ``augment_sections`` and ``augment`` only; they are not API.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Shape3 = tuple[int, int, int]
# A signed axis permutation ``(src, rev)``: output voxel ``i`` reads input voxel ``j`` with
# ``j[a] = n[a] - 1 - i[src[a]]`` if ``rev[a]`` else ``i[src[a]]``. Flips, rot90 and transposes
# are all of this form when they keep the shape.
AxisMap = tuple[jax.Array, jax.Array]
Augmentation = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]

_HIGHEST = lax.Precision.HIGHEST


# -- helpers -------------------------------------------------------------------------------------


def _check_sample(image, labels):
  """Raises ``ValueError`` unless ``image`` is ``[z, y, x, c]`` and ``labels`` ``[z, y, x]``."""
  if image.ndim != 4 or labels.ndim != 3 or tuple(image.shape[:3]) != tuple(labels.shape):
    raise ValueError(
      f"need image [z, y, x, c] and labels [z, y, x] of the same spatial shape, got "
      f"{tuple(image.shape)} and {tuple(labels.shape)}"
    )


def _unit(key, shape=()) -> jax.Array:
  """``U[0, 1)`` float32 draws from one threefry call, drawn flat (XLA compiles threefry over a
  1-D shape several times faster than over a 4-D one) and reshaped."""
  shape = tuple(shape)
  return jax.random.uniform(key, (math.prod(shape),), jnp.float32).reshape(shape)


class _Uniforms:
  """Consecutive pieces of one flat ``U[0, 1)`` array; ``values=None`` only counts what is taken.

  Transforms take every random number they need from a stream, so a transform (or a whole recipe)
  costs one threefry call however many draws it makes.
  """

  def __init__(self, values: jax.Array | None):
    self._values = values
    self.used = 0

  def take(self, shape=()) -> jax.Array:
    """The next ``prod(shape)`` uniforms as a ``shape`` float32 array."""
    shape = tuple(shape)
    start, self.used = self.used, self.used + math.prod(shape)
    if self._values is None:
      return jnp.zeros(shape, jnp.float32)
    return self._values[start : self.used].reshape(shape)

  def normal(self, shape) -> jax.Array:
    """Standard normal draws ``sqrt(2) erfinv(2u - 1)``, as ``jax.random.normal`` makes them."""
    low = np.nextafter(np.float32(-1.0), np.float32(0.0))
    return math.sqrt(2.0) * jax.scipy.special.erfinv(jnp.maximum(2.0 * self.take(shape) - 1.0, low))


Impl = Callable[[_Uniforms, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def _count_uniforms(impl: Impl, image, labels) -> int:
  """How many uniforms ``impl`` takes for inputs shaped like ``image`` / ``labels`` (no compute)."""
  counter = _Uniforms(None)
  jax.eval_shape(
    lambda im, lb: impl(counter, im, lb),
    jax.ShapeDtypeStruct(image.shape, image.dtype),
    jax.ShapeDtypeStruct(labels.shape, labels.dtype),
  )
  return counter.used


def _with_key(impl: Impl, key, image, labels):
  """Runs a stream-based transform body on one stream drawn from ``key``."""
  image, labels = jnp.asarray(image), jnp.asarray(labels)
  _check_sample(image, labels)
  count = _count_uniforms(impl, image, labels)
  return impl(_Uniforms(_unit(key, (count,))), image, labels)


def _between(u, bounds: Sequence[float]) -> jax.Array:
  """Maps ``u ~ U[0, 1)`` to ``U(bounds[0], bounds[1])``."""
  return float(bounds[0]) + u * (float(bounds[1]) - float(bounds[0]))


def _integer(u, low, high) -> jax.Array:
  """Maps ``u ~ U[0, 1)`` to a uniform integer in ``[low, high)``; ``high`` may be traced."""
  return jnp.clip(jnp.floor(low + u * (high - low)), low, high - 1).astype(jnp.int32)


def _flat_index(index: Sequence[jax.Array], shape: Shape3) -> jax.Array:
  """Linear index of ``(z, y, x)`` integer index arrays into a C-ordered ``shape`` volume."""
  return (index[0] * shape[1] + index[1]) * shape[2] + index[2]


def _gather(volume, flat):
  """``volume`` (``[z, y, x, ...]``) read at linear spatial indices ``flat`` (``[z, y, x]``)."""
  rows = volume.reshape((-1, *volume.shape[3:]))
  return jnp.take(rows, flat, axis=0, mode="clip")


def _reflect(index, n: int):
  """Folds integer indices into ``[0, n)`` by mirroring about the voxel edges (scipy 'reflect')."""
  period = 2 * n
  m = jnp.mod(index, period)
  return jnp.where(m >= n, period - 1 - m, m)


def _mirror(index, n: int):
  """Folds integer indices into ``[0, n)`` by mirroring about the edge voxels (cv2 REFLECT_101)."""
  if n == 1:
    return jnp.zeros_like(index)
  period = 2 * n - 2
  m = jnp.mod(index, period)
  return jnp.where(m >= n, period - m, m)


def _along(axis: int, n: int) -> tuple[int, int, int]:
  """Shape that lays a length-``n`` vector along spatial ``axis`` for broadcasting."""
  return tuple(n if a == axis else 1 for a in range(3))


def _rect_mask(u, height: int, width: int, size: Sequence[float]) -> jax.Array:
  """``[..., height, width]`` bool masks of random axis-aligned rectangles.

  ``u`` is ``[..., 4]`` uniforms. Each side is ``U(size)`` times the plane's side (at least one
  pixel); the rectangle lies wholly inside the plane at a uniform position.
  """
  h = jnp.clip(jnp.round(_between(u[..., 0], size) * height), 1, height)
  w = jnp.clip(jnp.round(_between(u[..., 1], size) * width), 1, width)
  y0 = _integer(u[..., 2], 0, height - h + 1)[..., None, None]
  x0 = _integer(u[..., 3], 0, width - w + 1)[..., None, None]
  h, w = h[..., None, None], w[..., None, None]
  yy = jnp.arange(height)[:, None]
  xx = jnp.arange(width)[None, :]
  return (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)


def _pick_sections(u_count, u_order, max_sections: int):
  """``(index, active)``: distinct random sections in ``min(max_sections, depth)`` fixed slots.

  ``u_order`` is ``[depth]`` uniforms (their argsort is a uniform permutation). The number of
  sections is ``U{0..max_sections}``; slots beyond it are inactive (``active`` False), so the
  shape is static whatever the count.
  """
  slots = min(max_sections, u_order.shape[0])
  count = _integer(u_count, 0, max_sections + 1)
  index = jnp.argsort(u_order)[:slots]
  return index, jnp.arange(slots) < count


# -- signed axis permutations: flip, rot90, transpose ---------------------------------------------


def _identity_map() -> AxisMap:
  return jnp.arange(3, dtype=jnp.int32), jnp.zeros(3, bool)


def _compose(first: AxisMap, second: AxisMap) -> AxisMap:
  """The map of applying ``first``, then ``second`` (one gather instead of two); jax or numpy.

  ``second`` reads its input at ``j2`` and ``first`` reads at ``j1(j2)``: axis ``a`` of the result
  comes from output axis ``src2[src1[a]]``, reversed if exactly one of the two reversed it.
  """
  src1, rev1 = first
  src2, rev2 = second
  return src2[src1], rev1 ^ rev2[src1]


def _np_rot90_map(axes: tuple[int, int], k: int):
  """The map of ``np.rot90(volume, k, axes)`` as numpy ``(src, rev)``."""
  a, b = axes
  quarter_src, quarter_rev = np.arange(3), np.zeros(3, bool)
  # np.rot90 by one quarter: out[.., i_a, .., i_b, ..] = in[.., i_b, .., n - 1 - i_a, ..].
  quarter_src[a], quarter_src[b] = b, a
  quarter_rev[b] = True
  result = (np.arange(3), np.zeros(3, bool))
  for _ in range(k % 4):
    result = _compose(result, (quarter_src, quarter_rev))
  return result


def allowed_permutations(shape: Sequence[int]) -> tuple[tuple[int, int, int], ...]:
  """Axis orders ``p`` (``np.transpose`` convention) with ``shape[p[k]] == shape[k]``.

  All 6 for a cube; the identity and the y <-> x swap for ``(42, 74, 74)``; only the identity when
  all sides differ.
  """
  shape = tuple(shape)
  return tuple(
    p for p in itertools.permutations(range(3)) if all(shape[p[k]] == shape[k] for k in range(3))
  )


def allowed_rot90(
  shape: Sequence[int], axes: tuple[int, int], ks: Sequence[int]
) -> tuple[int, ...]:
  """The quarter turns among ``ks`` that keep ``shape``: odd ``k`` only in a square plane."""
  a, b = axes
  return tuple(k for k in ks if k % 2 == 0 or shape[a] == shape[b])


def apply_axis_map(image, labels, axis_map: AxisMap):
  """Applies a signed axis permutation (see ``AxisMap``) to image and labels with one gather."""
  src, rev = axis_map
  shape = tuple(labels.shape)
  grid = jnp.indices(shape, dtype=jnp.int32)  # [3, z, y, x]
  index = jnp.take(grid, src, axis=0)
  size = jnp.asarray(shape, jnp.int32)[:, None, None, None]
  index = jnp.where(rev[:, None, None, None], size - 1 - index, index)
  flat = _flat_index(index, shape)
  return _gather(image, flat), _gather(labels, flat)


def _flip_map(u: _Uniforms, p) -> AxisMap:
  p = jnp.broadcast_to(jnp.asarray(p, jnp.float32), (3,))
  return jnp.arange(3, dtype=jnp.int32), u.take((3,)) < p


def _rot90_map(
  u: _Uniforms, shape: Shape3, axes: tuple[int, int], p: float, ks: Sequence[int]
) -> AxisMap:
  ks = allowed_rot90(shape, axes, ks)
  if not ks:
    return _identity_map()
  draw = u.take((2,))
  maps = [_np_rot90_map(axes, k) for k in ks]
  choice = _integer(draw[1], 0, len(ks))
  src = jnp.asarray(np.stack([m[0] for m in maps]), jnp.int32)[choice]
  rev = jnp.asarray(np.stack([m[1] for m in maps]))[choice]
  fire = draw[0] < p
  identity_src, identity_rev = _identity_map()
  return jnp.where(fire, src, identity_src), jnp.where(fire, rev, identity_rev)


def _permute_map(u: _Uniforms, shape: Shape3, p: float) -> AxisMap:
  perms = allowed_permutations(shape)
  draw = u.take((2,))
  # np.transpose(volume, perm): out[i] = in[j] with j[perm[k]] = i[k], so src = argsort(perm).
  table = jnp.asarray(np.stack([np.argsort(perm) for perm in perms]), jnp.int32)
  src = table[_integer(draw[1], 0, len(perms))]
  src = jnp.where(draw[0] < p, src, jnp.arange(3, dtype=jnp.int32))
  return src, jnp.zeros(3, bool)


def flip(key, image, labels, *, p: float | Sequence[float] = 0.5):
  """Flips each spatial axis (z, y, x) independently with probability ``p`` (or ``p[axis]``)."""

  def impl(u, im, lb):
    return apply_axis_map(im, lb, _flip_map(u, p))

  return _with_key(impl, key, image, labels)


def rot90(
  key,
  image,
  labels,
  *,
  axes: tuple[int, int] = (1, 2),
  p: float = 0.5,
  ks: Sequence[int] = (1, 2, 3),
):
  """With probability ``p``, ``np.rot90(·, k, axes)`` with ``k`` uniform over the allowed ``ks``.

  Odd ``k`` are dropped from ``ks`` when the plane is not square (they would change the shape).
  """

  def impl(u, im, lb):
    return apply_axis_map(im, lb, _rot90_map(u, lb.shape, axes, p, ks))

  return _with_key(impl, key, image, labels)


def permute_axes(key, image, labels, *, p: float = 1.0):
  """With probability ``p``, transposes the spatial axes by a uniform shape-keeping permutation.

  The identity is one of the choices (BANIS's ``np.random.permutation(3)``).
  """

  def impl(u, im, lb):
    return apply_axis_map(im, lb, _permute_map(u, lb.shape, p))

  return _with_key(impl, key, image, labels)


# -- resampling: elastic, affine, grid warp ---------------------------------------------------------


def warp(image, labels, coords):
  """Samples image (trilinear) and labels (nearest) at input positions ``coords``.

  Args:
    image: ``[z, y, x, c]`` float.
    labels: ``[z, y, x]`` int.
    coords: ``[3, z, y, x]`` float: for every output voxel the input position in voxel indices
      (``(z, y, x)``). Positions outside the crop are folded back by MONAI's reflection padding
      (mirror about the voxel edges).

  Returns:
    ``(image, labels)`` of the input shapes and dtypes.
  """
  shape = tuple(labels.shape)
  coords = coords.astype(jnp.float32)
  low = jnp.floor(coords)
  frac = coords - low
  low = low.astype(jnp.int32)
  ends = [
    [_reflect(low[a], shape[a]), _reflect(low[a] + 1, shape[a])] for a in range(3)
  ]  # [axis][corner]
  weights = [[1.0 - frac[a], frac[a]] for a in range(3)]
  out = jnp.zeros(image.shape, jnp.float32)
  for cz, cy, cx in itertools.product((0, 1), repeat=3):
    flat = _flat_index((ends[0][cz], ends[1][cy], ends[2][cx]), shape)
    weight = weights[0][cz] * weights[1][cy] * weights[2][cx]
    out = out + weight[..., None] * _gather(image, flat).astype(jnp.float32)
  nearest = jnp.round(coords).astype(jnp.int32)  # round half to even, as torch's nearbyint
  flat = _flat_index([_reflect(nearest[a], shape[a]) for a in range(3)], shape)
  return out.astype(image.dtype), _gather(labels, flat)


def _apply_along(matrix, volume, axis: int):
  """``out[..., o, ...] = sum_i matrix[o, i] volume[..., i, ...]`` along ``axis``."""
  moved = jnp.moveaxis(volume, axis, -1)
  out = jnp.einsum("...i,oi->...o", moved, matrix, precision=_HIGHEST)
  return jnp.moveaxis(out, -1, axis)


def gaussian_filter_zero_padded(volume, sigma, *, truncated: float = 3.0):
  """MONAI ``GaussianFilter(3, sigma, truncated)`` on the last three axes of ``volume``.

  The kernel is MONAI's default ``'erf'`` one: tap ``t`` integrates a unit Gaussian of std
  ``sigma`` over ``[t - 0.5, t + 0.5]`` (not renormalised), for ``|t| <= int(max(sigma *
  truncated, 0.5) + 0.5)``. The volume is zero-padded (MONAI's ``separable_filtering``), so values
  near the faces shrink. ``sigma`` may be traced: each axis is one banded ``[n, n]`` matrix whose
  taps beyond the tail are zero.

  Args:
    volume: ``[..., z, y, x]`` float.
    sigma: scalar std in voxels (the same on every axis).
    truncated: tail length in units of ``sigma``.

  Returns:
    The smoothed volume, same shape, float32.
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  tail = jnp.floor(jnp.maximum(sigma * truncated, 0.5) + 0.5)
  scale = 1.0 / (math.sqrt(2.0) * jnp.abs(sigma))
  out = volume.astype(jnp.float32)
  for axis in range(volume.ndim - 3, volume.ndim):
    n = volume.shape[axis]
    offset = (jnp.arange(n)[None, :] - jnp.arange(n)[:, None]).astype(jnp.float32)
    taps = 0.5 * (
      jax.scipy.special.erf(scale * (offset + 0.5)) - jax.scipy.special.erf(scale * (offset - 0.5))
    )
    band = jnp.where(jnp.abs(offset) <= tail, jnp.maximum(taps, 0.0), 0.0)
    out = _apply_along(band, out, axis)
  return out


def elastic(
  key,
  image,
  labels,
  *,
  p: float = 0.7,
  sigma: Sequence[float] = (4.0, 8.0),
  magnitude: Sequence[float] = (8.0, 16.0),
):
  """MONAI ``Rand3DElastic``: a smoothed random displacement field, image bilinear, labels nearest.

  With probability ``p``: a field ``U(-1, 1)`` per voxel and axis (``[3, z, y, x]``, in voxels) is
  smoothed by ``gaussian_filter_zero_padded`` with ``sigma ~ U(sigma)`` and multiplied by
  ``magnitude ~ U(magnitude)``; output voxel ``i`` reads input position ``i + field[:, i]`` with
  reflection padding. ``sigma`` is in voxels on every axis (the z anisotropy is ignored, as in
  MONAI).

  How large is that? Smoothing white noise of variance 1/3 with a 3-D Gaussian of std ``s``
  leaves a std of about ``sqrt(1/3) * (2 sqrt(pi) s)^(-3/2)``: 0.011 for ``s = 4`` and 0.004 for
  ``s = 8`` (less near the faces, which are zero-padded). Times the magnitude (8-16), the
  displacement has a std of 0.02-0.16 voxels per axis and stays below 0.7 voxels (measured on
  16 x 224 x 224), so PyTC's elastic step is a sub-voxel jitter that mostly blurs the image a
  little and moves label boundaries by at most one voxel; it is reproduced as is.
  """
  impl = functools.partial(_elastic, p=p, sigma=sigma, magnitude=magnitude)
  return _with_key(impl, key, image, labels)


def _elastic(u: _Uniforms, image, labels, *, p, sigma, magnitude):
  shape = tuple(labels.shape)
  draw = u.take((3,))
  field = 2.0 * u.take((3, *shape)) - 1.0  # U(-1, 1)
  smooth = gaussian_filter_zero_padded(field, _between(draw[1], sigma))
  displacement = smooth * _between(draw[2], magnitude)
  coords = jnp.indices(shape, dtype=jnp.float32) + displacement
  warped_image, warped_labels = warp(image, labels, coords)
  fire = draw[0] < p
  return jnp.where(fire, warped_image, image), jnp.where(fire, warped_labels, labels)


def _rotation(axis: int, angle) -> jax.Array:
  """MONAI's rotation by ``angle`` for spatial dim ``axis`` (in the plane of the other two)."""
  c, s = jnp.cos(angle), jnp.sin(angle)
  a, b = [d for d in range(3) if d != axis]
  # MONAI's legacy 'XYZ' order: dims 0 and 2 rotate with +sin below the diagonal, dim 1 above.
  sign = -1.0 if axis == 1 else 1.0
  m = jnp.eye(3, dtype=jnp.float32)
  m = m.at[a, a].set(c).at[b, b].set(c)
  return m.at[a, b].set(-sign * s).at[b, a].set(sign * s)


def affine_matrix(angles, scales, shears) -> jax.Array:
  """MONAI's ``AffineGrid`` matrix ``R @ Sh @ S``, moved from BANIS's (x, y, z) to (z, y, x).

  BANIS applies MONAI ``RandAffined`` to its ``x, y, z`` arrays, so MONAI's dims 0, 1, 2 are
  x, y, z. Parameters are given in that (MONAI / BANIS) order, and the matrix is returned for
  jaxseg's ``[z, y, x]`` arrays (``P M P`` with ``P`` reversing the axes), so each parameter keeps
  its physical meaning.

  Args:
    angles: 3 radians; ``R = R0(a0) @ R1(a1) @ R2(a2)``, ``Ri`` rotating about MONAI dim ``i``.
    scales: 3 factors (MONAI adds 1 to the drawn ``scale_range`` values).
    shears: 6 factors: ``Sh = [[1, s0, s1], [s2, 1, s3], [s4, s5, 1]]``.

  Returns:
    ``[3, 3]`` float32 ``A``: output voxel ``i`` reads input position ``A (i - c) + c`` (``c`` the
    volume centre), MONAI's backward mapping (scale > 1 zooms out).
  """
  angles = jnp.asarray(angles, jnp.float32)
  shears = jnp.asarray(shears, jnp.float32)
  rotation = _rotation(0, angles[0]) @ _rotation(1, angles[1]) @ _rotation(2, angles[2])
  shear = jnp.array(
    [[1.0, shears[0], shears[1]], [shears[2], 1.0, shears[3]], [shears[4], shears[5], 1.0]]
  )
  matrix = rotation @ shear @ jnp.diag(jnp.asarray(scales, jnp.float32))
  return matrix[::-1, ::-1]


def affine_coords(matrix, shape: Shape3) -> jax.Array:
  """``[3, z, y, x]`` input positions ``matrix (i - c) + c`` of every output voxel ``i``."""
  centre = (jnp.asarray(shape, jnp.float32) - 1.0) / 2.0
  grid = jnp.indices(shape, dtype=jnp.float32) - centre[:, None, None, None]
  coords = jnp.einsum("ab,bzyx->azyx", matrix, grid, precision=_HIGHEST)
  return coords + centre[:, None, None, None]


def affine(
  key,
  image,
  labels,
  *,
  p: float = 0.5,
  rotation: float = math.pi,
  scale: float = 0.2,
  shear: float = 0.5,
):
  """MONAI ``RandAffined`` as BANIS configures it: image bilinear, labels nearest, reflection.

  With probability ``p``: 3 angles ``U(-rotation, rotation)``, 3 scales ``1 + U(-scale, scale)``
  and 6 shear factors ``U(-shear, shear)`` (BANIS passes ``shear_range=(0.5,) * 6``) build
  ``affine_matrix``; the transform is about the volume centre, without translation.
  """
  impl = functools.partial(_affine, p=p, rotation=rotation, scale=scale, shear=shear)
  return _with_key(impl, key, image, labels)


def _affine(u: _Uniforms, image, labels, *, p, rotation, scale, shear):
  u = u.take((13,))
  matrix = affine_matrix(
    _between(u[1:4], (-rotation, rotation)),
    1.0 + _between(u[4:7], (-scale, scale)),
    _between(u[7:13], (-shear, shear)),
  )
  warped_image, warped_labels = warp(image, labels, affine_coords(matrix, tuple(labels.shape)))
  fire = u[0] < p
  return jnp.where(fire, warped_image, image), jnp.where(fire, warped_labels, labels)


def grid_warp_weights(n: int, spacing: float) -> np.ndarray:
  """``[n, m + 3]`` float32 weights that spread a control grid of ``spacing`` over ``n`` voxels.

  ``m = max(1, ceil((n - 1) / spacing))`` control intervals, centred on the axis, cover voxels
  ``0 .. n - 1``, with one more control point beyond each end (the cubic B-spline of a position
  reads the 4 control points around it). Row ``i`` holds the uniform cubic B-spline weights of
  voxel ``i``, divided by their L2 norm: independent control values of std ``s`` then give every
  voxel std ``s`` (unnormalised, it would dip from 0.71 s at the control points to 0.68 s midway).
  The weights are non-negative and smooth (twice differentiable along the axis).
  """
  intervals = max(1, math.ceil((n - 1) / spacing))
  origin = (n - 1) / 2.0 - intervals * spacing / 2.0
  t = (np.arange(n, dtype=np.float64) - origin) / spacing  # in [0, intervals]
  cell = np.clip(np.floor(t), 0, intervals - 1).astype(np.int64)
  f = t - cell
  taps = np.stack(
    [
      (1.0 - f) ** 3,
      3.0 * f**3 - 6.0 * f**2 + 4.0,
      -3.0 * f**3 + 3.0 * f**2 + 3.0 * f + 1.0,
      f**3,
    ],
    axis=1,
  )  # / 6, which the normalisation removes
  weights = np.zeros((n, intervals + 3))
  for k in range(4):  # control point cell - 1 + k sits at column cell + k
    weights[np.arange(n), cell + k] = taps[:, k]
  weights /= np.linalg.norm(weights, axis=1, keepdims=True)
  return weights.astype(np.float32)


def grid_warp(
  key,
  image,
  labels,
  *,
  p: float = 0.5,
  spacing: Sequence[float] = (16.0, 16.0, 16.0),
  sigma: Sequence[float] = (2.0, 2.0, 2.0),
):
  """An elastic deformation from random displacements at coarse control points (gunpowder style).

  With probability ``p``: a control grid of ``spacing`` voxels per axis (z, y, x) covers the crop
  with one point beyond each end (:func:`grid_warp_weights`); each control point draws a normal
  displacement per axis, and a cubic B-spline carries them to every voxel, scaled so that the
  displacement along axis ``a`` has std ``sigma[a]`` voxels at every voxel. Neighbouring voxels
  move almost alike; points one spacing apart are correlated about 0.5, two spacings apart about
  0.05. Output voxel ``i`` reads input position ``i + displacement[:, i]`` through :func:`warp`
  (image trilinear, labels nearest, so no new ids and -1 stays -1; positions beyond the crop are
  mirrored back, as for elastic and affine).

  Unlike :func:`elastic` (PyTC's sub-voxel jitter), this bends membranes by several voxels at
  ``sigma`` 2, the deformation of Ronneberger et al. (2015) and Funke et al. (2018).
  """
  impl = functools.partial(_grid_warp, p=p, spacing=spacing, sigma=sigma)
  return _with_key(impl, key, image, labels)


def _materialized(volume):
  """``volume``, bit for bit, computed into a buffer of its own before gathers read it.

  XLA (on CPU at least) fuses an elementwise producer into every gather that reads it, so a
  resampling right after another one (the grid warp after the affine) recomputes the first one's
  8-corner interpolation for each of its own 8 corners: about 2.5x the time of the two apart. A
  reduction is a fusion boundary; the maximum with the type's lowest value changes no bit.
  """
  if jnp.issubdtype(volume.dtype, jnp.floating):
    lowest = -jnp.inf
  else:
    lowest = jnp.iinfo(volume.dtype).min
  return jnp.max(jnp.stack([volume, jnp.full_like(volume, lowest)]), axis=0)


def _grid_warp(u: _Uniforms, image, labels, *, p, spacing, sigma):
  shape = tuple(labels.shape)
  image, labels = _materialized(image), _materialized(labels)
  weights = [grid_warp_weights(n, float(s)) for n, s in zip(shape, spacing, strict=True)]
  fire = u.take() < p
  grid = tuple(w.shape[1] for w in weights)
  field = u.normal((3, *grid)) * jnp.asarray(sigma, jnp.float32)[:, None, None, None]
  for axis in (2, 1, 0):  # the small axes first: the last product is the only full-size one
    field = _apply_along(jnp.asarray(weights[axis]), field, axis + 1)
  coords = jnp.indices(shape, dtype=jnp.float32) + field
  warped_image, warped_labels = warp(image, labels, coords)
  return jnp.where(fire, warped_image, image), jnp.where(fire, warped_labels, labels)


# -- intensity (image only) ------------------------------------------------------------------------


def gaussian_noise(key, image, labels, *, p: float = 0.3, std: Sequence[float] = (0.0, 0.05)):
  """With probability ``p`` adds ``N(0, s^2)`` noise, ``s ~ U(std)`` (MONAI ``RandGaussianNoise``
  with ``sample_std``; BANIS draws ``0.5 * U(0, 1)``, the same law). Labels untouched."""
  return _with_key(functools.partial(_gaussian_noise, p=p, std=std), key, image, labels)


def _gaussian_noise(u: _Uniforms, image, labels, *, p, std):
  draw = u.take((2,))
  noise = u.normal(image.shape) * _between(draw[1], std)
  return jnp.where(draw[0] < p, image + noise.astype(image.dtype), image), labels


def intensity_shift(key, image, labels, *, p: float = 0.7, shift: float = 0.2):
  """With probability ``p`` adds one offset ``U(-shift, shift)`` (MONAI ``RandShiftIntensity``)."""
  return _with_key(functools.partial(_intensity_shift, p=p, shift=shift), key, image, labels)


def _intensity_shift(u: _Uniforms, image, labels, *, p, shift):
  u = u.take((2,))
  offset = _between(u[1], (-shift, shift)).astype(image.dtype)
  return jnp.where(u[0] < p, image + offset, image), labels


def gamma_contrast(key, image, labels, *, p: float = 0.7, gamma: Sequence[float] = (0.5, 1.5)):
  """With probability ``p``, MONAI ``RandAdjustContrast``: ``g ~ U(gamma)`` on the rescaled image.

  The power is taken of ``(image - min) / (max - min + 1e-7)``, which lies in ``[0, 1)``, and the
  result is mapped back to ``[min, max]``. So the base is never negative (noise and shifts may
  have left values below 0), the output stays finite and within the input's range, and an image
  in ``[0, 1]`` stays in ``[0, 1]``.
  """
  return _with_key(functools.partial(_gamma_contrast, p=p, gamma=gamma), key, image, labels)


def _gamma_contrast(u: _Uniforms, image, labels, *, p, gamma):
  u = u.take((2,))
  low, high = jnp.min(image), jnp.max(image)
  spread = high - low
  adjusted = ((image - low) / (spread + 1e-7)) ** _between(u[1], gamma) * spread + low
  return jnp.where(u[0] < p, adjusted.astype(image.dtype), image), labels


def intensity_scale_shift(
  key,
  image,
  labels,
  *,
  p: float = 0.5,
  mul: Sequence[float] = (0.9, 1.1),
  add: Sequence[float] = (-0.1, 0.1),
):
  """With probability ``p``: ``image * U(mul) + U(add)`` (BANIS ``intensity_aug``)."""
  impl = functools.partial(_intensity_scale_shift, p=p, mul=mul, add=add)
  return _with_key(impl, key, image, labels)


def _intensity_scale_shift(u: _Uniforms, image, labels, *, p, mul, add):
  u = u.take((3,))
  changed = image * _between(u[1], mul) + _between(u[2], add)
  return jnp.where(u[0] < p, changed.astype(image.dtype), image), labels


def contrast_gamma(
  key,
  image,
  labels,
  *,
  p: float = 0.5,
  contrast: Sequence[float] = (0.5, 1.5),
  gamma: Sequence[float] = (0.7, 1.5),
):
  """With probability ``p``, another microscope's intensity response: contrast, then gamma.

  ``c ~ U(contrast)`` scales the image about its mean (``mean + c (image - mean)``); then
  ``g ~ U(gamma)`` is applied to that rescaled to ``[0, 1]`` by its min and max, and mapped back
  (as :func:`gamma_contrast`). So the output lies within the input's range scaled by ``c`` about
  the mean; it works on any normalisation (``zscore`` images are not in ``[0, 1]``).
  """
  impl = functools.partial(_contrast_gamma, p=p, contrast=contrast, gamma=gamma)
  return _with_key(impl, key, image, labels)


def _contrast_gamma(u: _Uniforms, image, labels, *, p, contrast, gamma):
  u = u.take((3,))
  mean = jnp.mean(image)
  scaled = mean + (image - mean) * _between(u[1], contrast)
  low, high = jnp.min(scaled), jnp.max(scaled)
  spread = high - low
  adjusted = ((scaled - low) / (spread + 1e-7)) ** _between(u[2], gamma) * spread + low
  return jnp.where(u[0] < p, adjusted.astype(image.dtype), image), labels
