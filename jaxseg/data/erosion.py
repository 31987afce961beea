"""Label erosion at object contacts (Kisuk Lee's thesis, A.1.4; PyTC ``seg_erosion_instance``).

Takes label volumes ``[z, y, x]`` (integer; 0 background, -1 unlabeled, > 0 object id) and returns
the same shape and dtype. Works on numpy and on jax arrays (jit with ``erosion`` and ``plane``
static) with one code path; never imports jax for numpy input.

Rule: within each slice normal to one axis, look at the ``(2e+1) x (2e+1)`` window around every
voxel, with the slice reflect-padded (``np.pad(mode='reflect')``: mirrored, edge not repeated).
If the window holds two or more distinct *positive* ids the voxel becomes background 0. Touching
only background (or unlabeled -1) does not erode, so isolated objects keep their shape while a
gap opens wherever two objects touch; affinity targets then get clean boundaries.

Unlabeled (-1) voxels never count as an id and are never changed: zeroing them would turn "no
label" into a trained background negative, which the annotation never said.

Planes, in jaxseg's canonical ``[z, y, x]`` order:

- SNEMI (aff12): ``erosion=1``, ``plane='yx'`` (slices along z, 3x3 windows in y-x).
- NISB (banis6, PyTC v3_erosion2): ``erosion=2``, ``plane='zy'``. PyTC works on the untransposed
  ``x, y, z`` NISB arrays and erodes in the plane of their axes 1, 2 (= y, z), i.e. slices along
  x; jaxseg opens NISB as ``[z, y, x]``, where that plane is ``'zy'``.

Implementation: ">= 2 distinct positive ids in the window" is "window max != window min over the
positive entries". Non-positive entries are replaced by 0 for the max and by the dtype's largest
value for the min; both window reductions are separable, so each is two passes of shifted-slice
maximum / minimum over the reflect-padded plane (O(e) work per voxel, no gathers).
"""

from __future__ import annotations

import functools

import numpy as np

from jaxseg.data.affinity import array_namespace

PLANES = {"yx": (1, 2), "zy": (0, 1), "zx": (0, 2)}


def _window_reduce(xp, reduce, padded, axis: int, size: int, width: int):
  """``reduce`` over ``width`` consecutive entries along ``axis`` (already padded by width - 1)."""

  def window(k):
    index = [slice(None)] * padded.ndim
    index[axis] = slice(k, k + size)
    return padded[tuple(index)]

  return functools.reduce(reduce, (window(k) for k in range(width)))


def erode_labels(labels, erosion: int, plane: str = "yx"):
  """Zeroes positive voxels whose in-plane window touches two or more distinct positive ids.

  Args:
    labels: ``[z, y, x]`` integer labels (0 background, -1 unlabeled), numpy or jax.
    erosion: half-width ``e`` of the ``(2e+1)^2`` window; 0 returns ``labels`` unchanged.
    plane: the window's plane, ``'yx'`` (slices along z), ``'zy'`` (along x) or ``'zx'`` (along y).

  Returns:
    Labels of the same shape and dtype with the contact voxels set to 0.
  """
  if plane not in PLANES:
    raise ValueError(f"erosion plane must be one of {sorted(PLANES)}, got {plane!r}")
  if int(erosion) != erosion or erosion < 0:
    raise ValueError(f"erosion must be a non-negative int, got {erosion!r}")
  if labels.ndim != 3:
    raise ValueError(f"labels must be [z, y, x], got shape {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise TypeError(f"labels must be integers, got {labels.dtype}")
  erosion = int(erosion)
  if erosion == 0:
    return labels
  xp = array_namespace(labels)
  width = 2 * erosion + 1
  positive = labels > 0
  zero = xp.zeros_like(labels)
  # The dtype's maximum as the min-sentinel is exact even for an id equal to it: min == max then
  # still means "one distinct id".
  sentinel = xp.full_like(labels, np.iinfo(labels.dtype).max)
  high = xp.where(positive, labels, zero)
  low = xp.where(positive, labels, sentinel)

  pad = [(0, 0)] * 3
  for axis in PLANES[plane]:
    pad[axis] = (erosion, erosion)
  high = xp.pad(high, pad, mode="reflect")
  low = xp.pad(low, pad, mode="reflect")
  for axis in PLANES[plane]:
    size = labels.shape[axis]
    high = _window_reduce(xp, xp.maximum, high, axis, size, width)
    low = _window_reduce(xp, xp.minimum, low, axis, size, width)
  # high > 0 means the window holds a positive id, so low is a real id, not the sentinel.
  contact = (high > 0) & (high != low) & positive
  return xp.where(contact, zero, labels)
