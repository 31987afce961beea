"""Sparse contingency tables of two label arrays: the one pass over voxels every metric shares.

Owns :func:`contingency_table` (two label arrays of any equal shape, e.g. [z, y, x] volumes or [N]
per-node labels) and :class:`Contingency`, the sparse result as three [K] arrays: ``gt_ids``,
``seg_ids`` and ``counts`` (one entry per distinct (gt, seg) pair that occurs).

The count is a numba single pass with an open-addressing hash table over (gt, seg) pairs. Runs of
equal consecutive pairs (the common case in label volumes) are counted before they touch the
table, so the pass is close to memory bandwidth. Large arrays are split between threads (numba
``nogil``) and the partial tables merged.

Label conventions: any integer dtype, including uint64 ids above 2**63 and int64. GT labels
``<= 0`` (0 = background, negative = unlabeled as in NISB's -1) are **ignored** when
``ignore_gt_nonpositive`` is set: they contribute no entry and are counted in ``n_ignored``.
Segmentation labels are all kept (0 included, so each metric decides what 0 means).

This module never imports JAX.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import os

import numba
import numpy as np

_EMPTY_SEG = np.uint64(0)
_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xC2B2AE3D27D4EB4F)
_S29 = np.uint64(29)
_S32 = np.uint64(32)
_INITIAL_CAPACITY = 1 << 12
# Below this many elements one thread is faster than the thread start-up and merge.
_PARALLEL_MIN_SIZE = 1 << 22


@dataclasses.dataclass(frozen=True)
class Contingency:
  """Sparse (gt, seg) co-occurrence counts.

  Attributes:
    gt_ids: [K] GT label of each entry (int64 for signed inputs, uint64 for unsigned).
    seg_ids: [K] segmentation label of each entry (same dtype rule).
    counts: [K] int64 number of elements with that (gt, seg) pair; all > 0.
    n_total: number of elements looked at, ignored ones included.
    n_ignored: number of elements skipped because their GT label was <= 0.
  """

  gt_ids: np.ndarray
  seg_ids: np.ndarray
  counts: np.ndarray
  n_total: int
  n_ignored: int

  @property
  def n_counted(self) -> int:
    """Number of elements in the table (n_total - n_ignored)."""
    return self.n_total - self.n_ignored

  def gt_sizes(self) -> np.ndarray:
    """[n_gt] float64 row sums (sizes of the GT segments), in :func:`np.unique` order of ids."""
    _, inverse = np.unique(self.gt_ids, return_inverse=True)
    return np.bincount(inverse, weights=self.counts.astype(np.float64))

  def seg_sizes(self, exclude_zero: bool = False) -> np.ndarray:
    """[n_seg] float64 column sums, optionally leaving out segmentation label 0."""
    ids, counts = self.seg_ids, self.counts
    if exclude_zero:
      keep = ids != 0
      ids, counts = ids[keep], counts[keep]
    _, inverse = np.unique(ids, return_inverse=True)
    return np.bincount(inverse, weights=counts.astype(np.float64))

  def to_scipy(self):
    """The table as a ``scipy.sparse.csr_array`` over factorised row / column indices.

    Returns:
      (table, gt_unique, seg_unique): the table and the label of every row / column.
    """
    # Imported here because only tests and debugging need scipy in this module.
    import scipy.sparse

    gt_unique, rows = np.unique(self.gt_ids, return_inverse=True)
    seg_unique, cols = np.unique(self.seg_ids, return_inverse=True)
    table = scipy.sparse.csr_array(
      (self.counts.astype(np.float64), (rows, cols)), shape=(gt_unique.size, seg_unique.size)
    )
    return table, gt_unique, seg_unique


@numba.njit(inline="always")
def _hash(g, s, mask):
  h = (g * _M1) ^ (s * _M2)
  h ^= h >> _S29
  h *= _M1
  h ^= h >> _S32
  return h & mask


@numba.njit(cache=True, nogil=True)
def _insert(keys_g, keys_s, counts, used, g, s, c):
  """Adds ``c`` to pair (g, s); returns 1 if a new slot was taken, else 0."""
  mask = np.uint64(keys_g.size - 1)
  i = _hash(g, s, mask)
  while True:
    if not used[i]:
      used[i] = True
      keys_g[i] = g
      keys_s[i] = s
      counts[i] = c
      return 1
    if keys_g[i] == g and keys_s[i] == s:
      counts[i] += c
      return 0
    i = (i + np.uint64(1)) & mask


@numba.njit(cache=True, nogil=True)
def _grow(keys_g, keys_s, counts, used):
  cap = keys_g.size * 2
  new_g = np.empty(cap, np.uint64)
  new_s = np.empty(cap, np.uint64)
  new_c = np.zeros(cap, np.int64)
  new_used = np.zeros(cap, np.bool_)
  for i in range(keys_g.size):
    if used[i]:
      _insert(new_g, new_s, new_c, new_used, keys_g[i], keys_s[i], counts[i])
  return new_g, new_s, new_c, new_used


@numba.njit(cache=True, nogil=True)
def _compact(keys_g, keys_s, counts, used, n_used):
  out_g = np.empty(n_used, np.uint64)
  out_s = np.empty(n_used, np.uint64)
  out_c = np.empty(n_used, np.int64)
  j = 0
  for i in range(keys_g.size):
    if used[i]:
      out_g[j] = keys_g[i]
      out_s[j] = keys_s[i]
      out_c[j] = counts[i]
      j += 1
  return out_g, out_s, out_c


@numba.njit(cache=True, nogil=True)
def _count_pairs(gt, seg, ignore_gt_nonpositive, zero):
  """Counts (gt, seg) pairs of two flat arrays; returns (keys_g, keys_s, counts, n_ignored)."""
  cap = _INITIAL_CAPACITY
  keys_g = np.empty(cap, np.uint64)
  keys_s = np.empty(cap, np.uint64)
  counts = np.zeros(cap, np.int64)
  used = np.zeros(cap, np.bool_)
  n_used = 0
  n_ignored = 0
  n = gt.size
  prev_g = gt[0]
  prev_s = seg[0]
  run = 0
  for i in range(n):
    g = gt[i]
    s = seg[i]
    if g == prev_g and s == prev_s:
      run += 1
      continue
    if ignore_gt_nonpositive and prev_g <= zero:
      n_ignored += run
    else:
      n_used += _insert(keys_g, keys_s, counts, used, np.uint64(prev_g), np.uint64(prev_s), run)
      if 2 * n_used > keys_g.size:
        keys_g, keys_s, counts, used = _grow(keys_g, keys_s, counts, used)
    prev_g = g
    prev_s = s
    run = 1
  if ignore_gt_nonpositive and prev_g <= zero:
    n_ignored += run
  else:
    n_used += _insert(keys_g, keys_s, counts, used, np.uint64(prev_g), np.uint64(prev_s), run)
  out_g, out_s, out_c = _compact(keys_g, keys_s, counts, used, n_used)
  return out_g, out_s, out_c, n_ignored


@numba.njit(cache=True, nogil=True)
def _merge_pairs(keys_g, keys_s, weights):
  """Sums ``weights`` over equal (g, s) pairs (merges per-thread tables)."""
  cap = _INITIAL_CAPACITY
  while cap < 2 * keys_g.size:
    cap *= 2
  tg = np.empty(cap, np.uint64)
  ts = np.empty(cap, np.uint64)
  tc = np.zeros(cap, np.int64)
  used = np.zeros(cap, np.bool_)
  n_used = 0
  for i in range(keys_g.size):
    n_used += _insert(tg, ts, tc, used, keys_g[i], keys_s[i], weights[i])
  return _compact(tg, ts, tc, used, n_used)


def _as_label_array(x: np.ndarray, name: str) -> np.ndarray:
  x = np.asarray(x)
  if x.dtype == np.bool_:
    return x.astype(np.uint8)
  if not np.issubdtype(x.dtype, np.integer):
    raise TypeError(f"{name} labels must be integers, got dtype {x.dtype}")
  return x


def _output_ids(keys: np.ndarray, dtype: np.dtype) -> np.ndarray:
  # Keys hold the 64-bit two's-complement pattern, so signed labels come back by a view.
  return keys.view(np.int64) if np.issubdtype(dtype, np.signedinteger) else keys


def contingency_table(
  gt: np.ndarray,
  seg: np.ndarray,
  ignore_gt_nonpositive: bool = True,
  num_threads: int | None = None,
) -> Contingency:
  """Counts how often every (gt, seg) label pair occurs.

  Args:
    gt: ground-truth labels, any integer dtype, any shape (e.g. [z, y, x] or [N] nodes).
    seg: segmentation labels of the same shape, any integer dtype.
    ignore_gt_nonpositive: skip elements whose GT label is <= 0 (background / unlabeled).
    num_threads: threads for large inputs (default: ``min(os.cpu_count(), 8)``).

  Returns:
    The sparse table. Pair order is arbitrary.

  Raises:
    ValueError: shapes differ. TypeError: non-integer labels.
  """
  gt = _as_label_array(gt, "gt")
  seg = _as_label_array(seg, "seg")
  if gt.shape != seg.shape:
    raise ValueError(f"gt and seg shapes differ: {gt.shape} vs {seg.shape}")
  # ravel() is free for C-contiguous arrays; anything else is copied once.
  g = np.ascontiguousarray(gt).reshape(-1)
  s = np.ascontiguousarray(seg).reshape(-1)
  zero = g.dtype.type(0)
  n = g.size
  threads = num_threads or min(os.cpu_count() or 1, 8)
  if n == 0:
    empty = np.zeros(0, np.uint64)
    kg, ks, kc, n_ignored = empty, empty, np.zeros(0, np.int64), 0
  elif threads <= 1 or n < _PARALLEL_MIN_SIZE:
    kg, ks, kc, n_ignored = _count_pairs(g, s, ignore_gt_nonpositive, zero)
  else:
    bounds = np.linspace(0, n, threads + 1).astype(np.int64)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      parts = list(
        pool.map(
          lambda ab: _count_pairs(g[ab[0] : ab[1]], s[ab[0] : ab[1]], ignore_gt_nonpositive, zero),
          itertools.pairwise(bounds),
        )
      )
    kg, ks, kc = _merge_pairs(
      np.concatenate([p[0] for p in parts]),
      np.concatenate([p[1] for p in parts]),
      np.concatenate([p[2] for p in parts]),
    )
    n_ignored = sum(int(p[3]) for p in parts)
  return Contingency(_output_ids(kg, g.dtype), _output_ids(ks, s.dtype), kc, int(n), int(n_ignored))


def merge_contingency(tables: list[Contingency]) -> Contingency:
  """Sums tables of disjoint parts of the same volume (e.g. slabs read one at a time).

  Args:
    tables: tables from :func:`contingency_table` over the parts; all with the same id dtypes.

  Returns:
    The table of the union.
  """
  if not tables:
    raise ValueError("merge_contingency needs at least one table")
  if len(tables) == 1:
    return tables[0]
  gt_dtype, seg_dtype = tables[0].gt_ids.dtype, tables[0].seg_ids.dtype
  kg = np.concatenate([t.gt_ids.astype(gt_dtype).view(np.uint64) for t in tables])
  ks = np.concatenate([t.seg_ids.astype(seg_dtype).view(np.uint64) for t in tables])
  kc = np.concatenate([t.counts for t in tables])
  out_g, out_s, out_c = _merge_pairs(kg, ks, kc)
  return Contingency(
    out_g.view(gt_dtype),
    out_s.view(seg_dtype),
    out_c,
    sum(t.n_total for t in tables),
    sum(t.n_ignored for t in tables),
  )
