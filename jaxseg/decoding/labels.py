"""Label bookkeeping every decoder shares: union-find over id pairs, lookup tables, dtypes.

Owns:
  * :func:`smallest_uint_dtype`: the narrowest unsigned dtype that holds a maximum id.
  * :func:`find_root` (from :mod:`jaxseg.common.union_find`): the root of a node (numba).
  * :func:`merge_components`: union-find over ``[E]`` pairs of node indices into ``[N]`` roots,
    each set represented by its smallest index (so results never depend on the pair order).
  * :func:`compact_roots`: roots to consecutive ids ``1..K`` in order of first appearance.
  * :func:`apply_lut`: maps a label volume of any shape through a sparse ``keys -> values`` table
    (labels not in the table map to 0), block by block if need be.
  * :func:`relabel_sequential`: ``1..K`` in scan order of first appearance, optional size filter.

Arrays are plain numpy; label volumes are ``[z, y, x]`` (any shape works), 0 is background.
This module never imports JAX.
"""

from __future__ import annotations

import numba
import numpy as np

from jaxseg.common.union_find import find_root, union


def smallest_uint_dtype(max_value: int) -> np.dtype:
  """The narrowest of uint8/16/32/64 that holds ``max_value`` (>= 0)."""
  for dtype in (np.uint8, np.uint16, np.uint32):
    if max_value <= np.iinfo(dtype).max:
      return np.dtype(dtype)
  return np.dtype(np.uint64)


@numba.njit(cache=True, nogil=True)
def _merge_pairs(parent, a, b):
  for k in range(a.shape[0]):
    union(parent, a[k], b[k])  # every set is represented by its least index
  for i in range(parent.shape[0]):
    parent[i] = find_root(parent, i)


def merge_components(num_nodes: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Union-find over node indices.

  Args:
    num_nodes: N; nodes are ``0..N-1``.
    a, b: ``[E]`` integer node indices; pair ``k`` joins ``a[k]`` and ``b[k]``.

  Returns:
    ``[N]`` int64: each node's root, the smallest index in its set.
  """
  a = np.asarray(a, np.int64).ravel()
  b = np.asarray(b, np.int64).ravel()
  if a.shape != b.shape:
    raise ValueError(f"pair arrays differ in length: {a.shape} vs {b.shape}")
  if a.size and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= num_nodes):
    raise ValueError(f"pair indices must lie in [0, {num_nodes})")
  parent = np.arange(num_nodes, dtype=np.int64)
  _merge_pairs(parent, a, b)
  return parent


def compact_roots(roots: np.ndarray, keep: np.ndarray | None = None) -> tuple[np.ndarray, int]:
  """Consecutive ids for the sets of :func:`merge_components`.

  Args:
    roots: ``[N]`` root per node (as returned by :func:`merge_components`).
    keep: optional ``[N]`` bool per *root*: sets whose root is False get id 0.

  Returns:
    ``([N] int64 ids in 0..K, K)``; ids follow the order of the roots (smallest index first).
  """
  roots = np.asarray(roots, np.int64)
  is_root = roots == np.arange(roots.size)
  if keep is not None:
    is_root &= np.asarray(keep, bool)
  new_id = np.zeros(roots.size, np.int64)
  new_id[is_root] = np.arange(1, int(is_root.sum()) + 1)
  return new_id[roots], int(is_root.sum())


def apply_lut(
  labels: np.ndarray,
  keys: np.ndarray,
  values: np.ndarray,
  out_dtype=None,
) -> np.ndarray:
  """Maps labels through a sparse table; labels absent from ``keys`` (and 0) map to 0.

  Args:
    labels: integer array of any shape.
    keys: ``[K]`` label values, sorted ascending, unique.
    values: ``[K]`` new values.
    out_dtype: result dtype (default: ``values.dtype``).
  """
  keys = np.asarray(keys)
  values = np.asarray(values)
  out_dtype = np.dtype(out_dtype or values.dtype)
  if keys.size == 0:
    return np.zeros(labels.shape, out_dtype)
  flat = labels.ravel()
  pos = np.searchsorted(keys, flat)
  np.minimum(pos, keys.size - 1, out=pos)
  found = keys[pos] == flat
  out = np.where(found, values[pos], 0).astype(out_dtype, copy=False)
  return out.reshape(labels.shape)


@numba.njit(cache=True, nogil=True)
def _first_appearance_ids(flat, keys, out_ids):
  # out_ids[k] = rank of key k by first appearance in `flat` (1-based), 0 for label 0.
  next_id = 1
  for i in range(flat.shape[0]):
    v = flat[i]
    if v == 0:
      continue
    lo = 0
    hi = keys.shape[0]
    while lo < hi:  # binary search: keys are sorted
      mid = (lo + hi) >> 1
      if keys[mid] < v:
        lo = mid + 1
      else:
        hi = mid
    if out_ids[lo] == 0:
      out_ids[lo] = next_id
      next_id += 1


def relabel_sequential(labels: np.ndarray, min_size: int = 0) -> tuple[np.ndarray, int]:
  """Renumbers non-zero labels to ``1..K`` in C-order scan of first appearance.

  Args:
    labels: integer array of any shape (0 = background).
    min_size: segments with fewer voxels become 0 before renumbering.

  Returns:
    ``(relabelled array in the smallest unsigned dtype, K)``.
  """
  flat = np.ascontiguousarray(labels).ravel()
  keys, counts = np.unique(flat, return_counts=True)
  if keys.size and keys[0] == 0:
    keys, counts = keys[1:], counts[1:]
  if min_size > 1:
    small = counts < min_size
    if small.any():
      flat = apply_lut(flat, keys, np.where(small, 0, keys), out_dtype=flat.dtype)
      keys = keys[~small]
  ids = np.zeros(keys.size, np.int64)
  if keys.size:
    _first_appearance_ids(flat, keys, ids)
  count = int(keys.size)
  dtype = smallest_uint_dtype(count)
  return apply_lut(flat, keys, ids, out_dtype=dtype).reshape(labels.shape), count
