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

The volume passes of :func:`apply_lut` and :func:`relabel_sequential` run on fastremap's hash
tables (3-33x faster than sorting with numpy: ``benchmarks/RESULTS.md``, "Label renumbering");
the ids, their order and the dtypes are jaxseg's own.

Arrays are plain numpy; label volumes are ``[z, y, x]`` (any shape works), 0 is background.
This module never imports JAX.
"""

from __future__ import annotations

import fastremap
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

  One hash-table pass (``fastremap.remap``) when every label is in the table (or is 0), as after
  an agglomeration; else the others are masked to 0 first (``benchmarks/RESULTS.md``, "Label
  renumbering").

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
  table = dict(zip(keys.tolist(), values.tolist(), strict=True))
  table.setdefault(0, 0)
  # C order: fastremap 1.21 scrambles a strided input whose values need a wider dtype.
  labels = np.ascontiguousarray(labels)
  try:
    out = fastremap.remap(labels, table, preserve_missing_labels=False)
  except KeyError:  # some labels are not in the table: they map to 0
    if table[0] == 0:
      out = fastremap.remap(fastremap.mask_except(labels, list(table)), table)
    else:  # 0 has a new id of its own, so absent labels cannot pass through 0
      flat = labels.ravel()
      pos = np.searchsorted(keys, flat)
      np.minimum(pos, keys.size - 1, out=pos)
      found = keys[pos] == flat
      out = np.where(found, values[pos], 0).reshape(labels.shape)
  return out.astype(out_dtype, copy=False)


def relabel_sequential(labels: np.ndarray, min_size: int = 0) -> tuple[np.ndarray, int]:
  """Renumbers non-zero labels to ``1..K`` in C-order scan of first appearance.

  Args:
    labels: integer array of any shape (0 = background).
    min_size: segments with fewer voxels become 0 before renumbering.

  Returns:
    ``(relabelled array in the smallest unsigned dtype, K)``.
  """
  flat = np.ascontiguousarray(labels)  # fastremap scans in memory order
  if min_size > 1:
    ids, counts = fastremap.unique(flat, return_counts=True)
    small = ids[(counts < min_size) & (ids != 0)]
    if small.size:
      flat = fastremap.mask(flat, small.tolist())
  out, mapping = fastremap.renumber(flat, start=1, preserve_zero=True)
  count = len(mapping) - (0 in mapping)
  return out.astype(smallest_uint_dtype(count), copy=False), count
