"""Section perturbations of one sample (image only): BANIS's slice drop and slice shift, and the
EM section defects of ``aug_em_neuron``'s OneOf, one picked at random by :func:`random_defect`.

Takes image ``[z, y, x, c]`` float32 and labels ``[z, y, x]`` int32 and returns the labels
untouched. The transforms have the signature and the random-stream conventions of
``jaxseg.data.augment_ops`` (``fn(key, image, labels, *, params) -> (image, labels)``, pure jax,
one uniform draw each). Sections and rectangles are chosen with masks built from iota
comparisons; a variable number of sections (0-5) is a fixed number of slots, of which a random
prefix is active, so every shape is static.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxseg.data.augment_ops import (
  _HIGHEST,
  Impl,
  _along,
  _apply_along,
  _between,
  _count_uniforms,
  _flat_index,
  _gather,
  _integer,
  _mirror,
  _pick_sections,
  _rect_mask,
  _Uniforms,
  _with_key,
)

# -- BANIS slice perturbations (image only) --------------------------------------------------------


def slice_drop(key, image, labels, *, p: float = 0.5, rate: float = 0.05):
  """With probability ``p``: on one uniform axis, zeroes each slice independently w.p. ``rate``."""
  return _with_key(functools.partial(_slice_drop, p=p, rate=rate), key, image, labels)


def _slice_drop(u: _Uniforms, image, labels, *, p, rate):
  shape = tuple(labels.shape)
  u = u.take((3 * max(shape) + 2,))
  axis = _integer(u[1], 0, 3)
  per_slice = u[2:].reshape(3, max(shape))
  drop = jnp.zeros(shape, bool)
  for a in range(3):
    dropped = (per_slice[a, : shape[a]] < rate).reshape(_along(a, shape[a]))
    drop = drop | ((axis == a) & dropped)
  drop = drop & (u[0] < p)
  return jnp.where(drop[..., None], jnp.zeros((), image.dtype), image), labels


def slice_shift(key, image, labels, *, p: float = 0.5, rate: float = 0.05, max_shift: int = 10):
  """With probability ``p``: on one uniform axis, rolls each slice w.p. ``rate`` (with wrap-around)
  by ``U{-max_shift..max_shift}`` voxels along each of its two in-plane axes (drawn separately).

  BANIS's loop rolls both in-plane axes only for slices normal to its first array axis; for the
  other two, one of its ``np.roll`` axes lands on the channel axis, so those slices move along a
  single axis. We roll both, as the recipe describes.
  """
  impl = functools.partial(_slice_shift, p=p, rate=rate, max_shift=max_shift)
  return _with_key(impl, key, image, labels)


def _slice_shift(u: _Uniforms, image, labels, *, p, rate, max_shift):
  shape = tuple(labels.shape)
  u = u.take((2 + 3 * max(shape) * 4,))
  axis = _integer(u[1], 0, 3)
  fire = u[0] < p
  per_slice = u[2:].reshape(3, max(shape), 4)  # [axis, slice, (pick, shift z, shift y, shift x)]
  source = []
  for b in range(3):  # input index along axis b: (i_b - shift_b) mod n_b, np.roll's convention
    shift = jnp.zeros((), jnp.int32)
    for a in range(3):
      if a == b:
        continue  # a slice moves within its own plane only
      picked = per_slice[a, : shape[a], 0] < rate
      amount = _integer(per_slice[a, : shape[a], 1 + b], -max_shift, max_shift + 1)
      amount = jnp.where(picked & fire & (axis == a), amount, 0)
      shift = shift + amount.reshape(_along(a, shape[a]))
    index = jnp.arange(shape[b]).reshape(_along(b, shape[b]))
    source.append(jnp.broadcast_to(jnp.mod(index - shift, shape[b]), shape))
  return _gather(image, _flat_index(source, shape)), labels


# -- EM section defects (aug_em_neuron's OneOf; image only) ----------------------------------------


def misalignment(key, image, labels, *, max_shift: int = 17, slip_fraction: float = 0.5):
  """Translates sections in y-x by ``U{-max_shift..max_shift}`` per axis, vacated pixels 0.

  A split section ``s ~ U{1..D-2}`` is drawn; with probability ``slip_fraction`` only section
  ``s`` moves (a "slip"), else sections ``s..D-1`` all move together (a block translation). Crops
  with fewer than 3 sections are returned unchanged. Labels are never moved (unlike DeepEM).
  """
  impl = functools.partial(_misalignment, max_shift=max_shift, slip_fraction=slip_fraction)
  return _with_key(impl, key, image, labels)


def _misalignment(u: _Uniforms, image, labels, *, max_shift, slip_fraction):
  depth, height, width = labels.shape
  if depth < 3:
    return image, labels
  u = u.take((4,))
  split = _integer(u[0], 1, depth - 1)
  dy = _integer(u[1], -max_shift, max_shift + 1)
  dx = _integer(u[2], -max_shift, max_shift + 1)
  moved = jnp.roll(image, (dy, dx), axis=(1, 2))
  yy, xx = jnp.arange(height) - dy, jnp.arange(width) - dx
  inside = ((yy >= 0) & (yy < height))[:, None] & ((xx >= 0) & (xx < width))[None, :]
  moved = jnp.where(inside[None, :, :, None], moved, jnp.zeros((), image.dtype))
  zz = jnp.arange(depth)
  affected = jnp.where(u[3] < slip_fraction, zz == split, zz >= split)
  return jnp.where(affected[:, None, None, None], moved, image), labels


def missing_sections(
  key,
  image,
  labels,
  *,
  max_sections: int = 5,
  whole_fraction: float = 0.5,
  partial_size: Sequence[float] = (0.25, 0.75),
):
  """Fills ``U{0..max_sections}`` distinct sections with a constant ``U(0, 1)``.

  Each chosen section is filled whole with probability ``whole_fraction``, else inside one
  rectangle whose sides are ``U(partial_size)`` of the section's.
  """
  impl = functools.partial(
    _missing_sections,
    max_sections=max_sections,
    whole_fraction=whole_fraction,
    partial_size=partial_size,
  )
  return _with_key(impl, key, image, labels)


def _missing_sections(u: _Uniforms, image, labels, *, max_sections, whole_fraction, partial_size):
  depth, height, width = labels.shape
  slots = min(max_sections, depth)
  u = u.take((1 + depth + 6 * slots,))
  index, active = _pick_sections(u[0], u[1 : 1 + depth], max_sections)
  per_slot = u[1 + depth :].reshape(slots, 6)  # (whole, fill, 4 for the rectangle)
  whole = per_slot[:, 0] < whole_fraction
  rect = _rect_mask(per_slot[:, 2:], height, width, partial_size)
  region = active[:, None, None] & (whole[:, None, None] | rect)
  fill = per_slot[:, 1].astype(image.dtype)
  sections = jnp.where(region[..., None], fill[:, None, None, None], image[index])
  return image.at[index].set(sections, unique_indices=True), labels


def lost_section(key, image, labels):
  """Replaces one uniform section by a copy of a random neighbour (the only one at the ends)."""
  return _with_key(_lost_section, key, image, labels)


def _lost_section(u: _Uniforms, image, labels):
  depth = labels.shape[0]
  if depth < 2:
    return image, labels
  u = u.take((2,))
  z = _integer(u[0], 0, depth)
  neighbour = jnp.where(u[1] < 0.5, z + 1, z - 1)
  neighbour = jnp.where(z == 0, 1, jnp.where(z == depth - 1, depth - 2, neighbour))
  zz = jnp.arange(depth)
  return jnp.take(image, jnp.where(zz == z, neighbour, zz), axis=0), labels


def _blur_matrix(n: int, sigma, radius: int) -> jax.Array:
  """``[n, n]`` matrix of a normalised sampled Gaussian (``2 radius + 1`` taps), mirror padded.

  cv2.GaussianBlur's kernel and default border (REFLECT_101), folded into one matrix so that a
  traced sigma costs no dynamic shapes.
  """
  taps = jnp.arange(-radius, radius + 1)
  weights = jnp.exp(-0.5 * (taps / sigma) ** 2)
  weights = weights / jnp.sum(weights)
  source = _mirror(jnp.arange(n)[:, None] + taps[None, :], n)  # [n, taps]
  return jnp.einsum("t,otn->on", weights, jax.nn.one_hot(source, n), precision=_HIGHEST)


def blur_sections(
  key,
  image,
  labels,
  *,
  max_sections: int = 5,
  kernel: int = 11,
  sigma: Sequence[float] = (1.0, 3.0),
  whole_fraction: float = 0.5,
  partial_size: Sequence[float] = (0.25, 0.75),
):
  """Gaussian-blurs ``U{0..max_sections}`` distinct sections in y-x (``kernel`` taps, ``U(sigma)``).

  Each chosen section is blurred whole with probability ``whole_fraction``, else only inside one
  rectangle whose sides are ``U(partial_size)`` of the section's.
  """
  impl = functools.partial(
    _blur_sections,
    max_sections=max_sections,
    kernel=kernel,
    sigma=sigma,
    whole_fraction=whole_fraction,
    partial_size=partial_size,
  )
  return _with_key(impl, key, image, labels)


def _blur_sections(
  u: _Uniforms, image, labels, *, max_sections, kernel, sigma, whole_fraction, partial_size
):
  depth, height, width = labels.shape
  slots = min(max_sections, depth)
  u = u.take((1 + depth + 6 * slots,))
  index, active = _pick_sections(u[0], u[1 : 1 + depth], max_sections)
  per_slot = u[1 + depth :].reshape(slots, 6)  # (whole, sigma, 4 for the rectangle)
  sigmas = _between(per_slot[:, 1], sigma)
  radius = kernel // 2

  def blur(section, s):  # [y, x, c]
    blurred = _apply_along(_blur_matrix(height, s, radius), section.astype(jnp.float32), 0)
    return _apply_along(_blur_matrix(width, s, radius), blurred, 1)

  sections = image[index]
  blurred = jax.vmap(blur)(sections, sigmas).astype(image.dtype)
  whole = per_slot[:, 0] < whole_fraction
  rect = _rect_mask(per_slot[:, 2:], height, width, partial_size)
  region = active[:, None, None] & (whole[:, None, None] | rect)
  sections = jnp.where(region[..., None], blurred, sections)
  return image.at[index].set(sections, unique_indices=True), labels


def missing_parts(key, image, labels, *, p: float = 0.2, size: Sequence[float] = (0.1, 0.25)):
  """With probability ``p``, zeroes one rectangle (sides ``U(size)`` of the plane's) in one
  uniform section."""
  return _with_key(functools.partial(_missing_parts, p=p, size=size), key, image, labels)


def _missing_parts(u: _Uniforms, image, labels, *, p, size):
  depth, height, width = labels.shape
  u = u.take((6,))
  z = _integer(u[1], 0, depth)
  hole = (jnp.arange(depth) == z)[:, None, None] & _rect_mask(u[2:], height, width, size)[None]
  hole = hole & (u[0] < p)
  return jnp.where(hole[..., None], jnp.zeros((), image.dtype), image), labels


DEFECTS = ("misalignment", "missing_sections", "lost_section", "blur_sections", "missing_parts")


def _defect_impls(defects: Any) -> list[Impl]:
  """The five defects of ``aug_em_neuron``'s OneOf with the settings of ``data.aug.defects``."""
  get = defects.get if hasattr(defects, "get") else lambda name, default: default
  return [
    functools.partial(
      _misalignment,
      max_shift=int(defects.misalignment_max_shift),
      slip_fraction=float(defects.misalignment_slip_fraction),
    ),
    functools.partial(
      _missing_sections,
      max_sections=int(defects.missing_sections_max),
      whole_fraction=float(defects.missing_whole_fraction),
      partial_size=tuple(defects.missing_partial_size),
    ),
    _lost_section,
    functools.partial(
      _blur_sections,
      max_sections=int(defects.blur_sections_max),
      kernel=int(defects.blur_kernel),
      sigma=tuple(defects.blur_sigma),
      whole_fraction=float(get("blur_whole_fraction", 0.5)),
      partial_size=tuple(get("blur_partial_size", (0.25, 0.75))),
    ),
    functools.partial(
      _missing_parts,
      p=float(defects.missing_parts_p),
      size=tuple(defects.missing_parts_size),
    ),
  ]


def random_defect(key, image, labels, *, defects: Any):
  """One of the five EM defects (``DEFECTS`` order), picked uniformly; labels untouched.

  Args:
    key: PRNG key.
    image: ``[z, y, x, c]``.
    labels: ``[z, y, x]``, returned as is.
    defects: ``data.aug.defects`` of ``configs/snemi.py`` (attributes, or a ConfigDict).
  """
  return _with_key(functools.partial(_random_defect, defects=defects), key, image, labels)


def _random_defect(u: _Uniforms, image, labels, *, defects):
  impls = _defect_impls(defects)
  choice = _integer(u.take(), 0, len(impls))
  # Every branch gets its own piece of the stream (lax.switch traces each branch separately).
  pieces = [u.take((_count_uniforms(f, image, labels),)) for f in impls]

  def branch(index):
    return lambda pieces, image: impls[index](_Uniforms(pieces[index]), image, labels)[0]

  return lax.switch(choice, [branch(i) for i in range(len(impls))], pieces, image), labels
