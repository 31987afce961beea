"""Region-graph statistics of fragments: the edge tables graph agglomeration merges on.

Owns, for :mod:`~jaxseg.decoding.graph_agglomeration`:

  * :class:`EdgeTable`: one row per fragment pair (u < v), sorted by (u, v): contact count, mean
    and largest contact affinity, optional per-contact histograms (CSR).
  * :func:`edge_statistics`: one block's table from ``fragments [z, y, x]`` (any integer dtype,
    0 = background, ids globally unique across blocks) and ``aff_w [3, z, y, x]`` float32 in
    waterz's convention (channels z, y, x; ``aff_w[c, p]`` links voxel p and p - e_c).
  * :func:`reduce_edges`: joins the tables of several blocks (an edge cut by a block face occurs
    in several) into one.
  * :func:`int_hash`: the integer hash of the open-addressing tables here and in
    :mod:`~jaxseg.decoding.graph_merge`.

The region graph, the running mean and the histogram bins follow waterz bit for bit (see the
module docstring of :mod:`~jaxseg.decoding.graph_agglomeration`).

This module never imports JAX.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numba
import numpy as np

from jaxseg.decoding import graph_scoring

_HASH_M1 = np.uint64(0xBF58476D1CE4E5B9)
_HASH_M2 = np.uint64(0x94D049BB133111EB)
_S27 = np.uint64(27)
_S30 = np.uint64(30)
_S31 = np.uint64(31)


@dataclasses.dataclass(frozen=True)
class EdgeTable:
  """Region-graph statistics, one row per fragment pair, rows sorted by (u, v), unique.

  Attributes:
    u, v: ``[E]`` uint64 fragment ids, ``u < v``.
    count: ``[E]`` int64 number of contact voxel pairs.
    mean: ``[E]`` float32 mean contact affinity, computed as waterz does (see the module docstring
      of :mod:`~jaxseg.decoding.graph_agglomeration`).
    aff_max: ``[E]`` float32 largest contact affinity (NaN affinities are skipped; -inf if all
      are NaN).
    hist_ptr: ``[E + 1]`` int64 CSR offsets into ``hist_bin`` / ``hist_count`` (per-contact
      histograms; only for scoring functions with ``needs_histograms``), else None.
    hist_bin: ``[H]`` int32 bin of each histogram entry, ascending within an edge.
    hist_count: ``[H]`` int64 count of each entry (> 0).
    hist_bins: number of histogram bins (0 without histograms).
  """

  u: np.ndarray
  v: np.ndarray
  count: np.ndarray
  mean: np.ndarray
  aff_max: np.ndarray
  hist_ptr: np.ndarray | None = None
  hist_bin: np.ndarray | None = None
  hist_count: np.ndarray | None = None
  hist_bins: int = 0

  @property
  def num_edges(self) -> int:
    return int(self.u.shape[0])


# -- hashing --------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _mix(h):
  # splitmix64's finaliser: every input bit reaches the low bits that index the table.
  h = (h ^ (h >> _S30)) * _HASH_M1
  h = (h ^ (h >> _S27)) * _HASH_M2
  return h ^ (h >> _S31)


@numba.njit(cache=True, nogil=True)
def _pair_hash(lo, hi, mask):
  return np.int64(_mix(np.uint64(lo) ^ _mix(np.uint64(hi))) & np.uint64(mask))


@numba.njit(cache=True, nogil=True)
def int_hash(key, mask):
  return np.int64(_mix(np.uint64(key)) & np.uint64(mask))


# -- the statistics kernel ------------------------------------------------------------------------
# One pass over the voxels in C order; rows in order of first contact, found through an
# open-addressing table (fragment pair -> row) with load <= 1/2. Growing and rehashing are rare,
# so they are helpers that return the new arrays; the per-contact work stays in the kernel.


@numba.njit(cache=True, nogil=True)
def _grow(array, size):
  out = np.empty(size, array.dtype)
  out[: array.shape[0]] = array
  return out


@numba.njit(cache=True, nogil=True)
def _grown_rows(eu, ev, cnt, mean, amax, row_cap):
  return (_grow(eu, row_cap), _grow(ev, row_cap), _grow(cnt, row_cap), _grow(mean, row_cap),
          _grow(amax, row_cap))  # fmt: skip


@numba.njit(cache=True, nogil=True)
def _pair_slots(eu, ev, rows, cap):
  # The pair table of the first `rows` rows, with `cap` slots.
  mask = cap - 1
  key_u = np.zeros(cap, np.uint64)
  key_v = np.zeros(cap, np.uint64)
  slot_row = np.full(cap, -1, np.int64)
  for k in range(rows):
    j = _pair_hash(eu[k], ev[k], mask)
    while slot_row[j] != -1:
      j = (j + 1) & mask
    key_u[j] = eu[k]
    key_v[j] = ev[k]
    slot_row[j] = k
  return key_u, key_v, slot_row


@numba.njit(cache=True, nogil=True)
def _rehashed_counts(hkey, hcnt):
  # The histogram table (key -> count) in twice the slots.
  hcap = 2 * hkey.shape[0]
  hmask = hcap - 1
  new_key = np.full(hcap, -1, np.int64)
  new_cnt = np.zeros(hcap, np.int64)
  for k in range(hkey.shape[0]):
    if hkey[k] != -1:
      j = int_hash(hkey[k], hmask)
      while new_key[j] != -1:
        j = (j + 1) & hmask
      new_key[j] = hkey[k]
      new_cnt[j] = hcnt[k]
  return new_key, new_cnt


@numba.njit(cache=True, nogil=True)
def _histogram_entries(hkey, hcnt, hused):
  # The used slots of the histogram table, in slot order.
  hist_key = np.empty(hused, np.int64)
  hist_count = np.empty(hused, np.int64)
  k = 0
  for j in range(hkey.shape[0]):
    if hkey[j] != -1:
      hist_key[k] = hkey[j]
      hist_count[k] = hcnt[j]
      k += 1
  return hist_key, hist_count


@numba.njit(cache=True, nogil=True)
def _edge_stats_kernel(frag, aff, lz, ly, lx, hist_bins):
  depth, height, width = frag.shape
  # Open-addressing table (fragment pair -> row), rows in order of first contact.
  cap = 1 << 12
  key_u = np.zeros(cap, np.uint64)
  key_v = np.zeros(cap, np.uint64)
  slot_row = np.full(cap, -1, np.int64)
  rows = 0
  row_cap = 1 << 10
  eu = np.empty(row_cap, np.uint64)
  ev = np.empty(row_cap, np.uint64)
  cnt = np.empty(row_cap, np.int64)
  mean = np.empty(row_cap, np.float32)
  amax = np.empty(row_cap, np.float32)
  # Per-contact histograms: (row * bins + bin) -> count.
  hcap = 1 << 12 if hist_bins > 0 else 1
  hkey = np.full(hcap, -1, np.int64)
  hcnt = np.zeros(hcap, np.int64)
  hused = 0
  last_lo = np.zeros(3, np.uint64)
  last_hi = np.zeros(3, np.uint64)
  last_row = np.full(3, -1, np.int64)
  for z in range(lz, depth):
    for y in range(ly, height):
      for x in range(lx, width):
        id1 = frag[z, y, x]
        if id1 == 0:
          continue
        for c in range(3):
          if c == 0:
            if z == 0:
              continue
            id2 = frag[z - 1, y, x]
          elif c == 1:
            if y == 0:
              continue
            id2 = frag[z, y - 1, x]
          else:
            if x == 0:
              continue
            id2 = frag[z, y, x - 1]
          if id2 == 0 or id2 == id1:
            continue
          a = aff[c, z, y, x]
          lo = np.uint64(min(id1, id2))
          hi = np.uint64(max(id1, id2))
          # Runs along x mostly repeat the pair of the previous voxel: skip the table then.
          if last_row[c] >= 0 and last_lo[c] == lo and last_hi[c] == hi:
            r = last_row[c]
          else:
            mask = cap - 1
            i = _pair_hash(lo, hi, mask)
            while slot_row[i] != -1 and not (key_u[i] == lo and key_v[i] == hi):
              i = (i + 1) & mask
            r = slot_row[i]
          if r == -1:
            if rows == row_cap:
              row_cap *= 2
              eu, ev, cnt, mean, amax = _grown_rows(eu, ev, cnt, mean, amax, row_cap)
            r = rows
            rows += 1
            key_u[i] = lo
            key_v[i] = hi
            slot_row[i] = r
            eu[r] = lo
            ev[r] = hi
            cnt[r] = 0
            mean[r] = np.float32(0.0)
            amax[r] = -np.inf
            if 2 * rows > cap:  # keep the load <= 1/2: rehash into twice the size
              cap *= 2
              key_u, key_v, slot_row = _pair_slots(eu, ev, rows, cap)
          last_lo[c] = lo
          last_hi[c] = hi
          last_row[c] = r
          # waterz's running mean, all in float32: (a + mean * n) / (n + 1).
          n = cnt[r]
          mean[r] = (a + mean[r] * np.float32(n)) / np.float32(n + 1)
          cnt[r] = n + 1
          if a > amax[r]:
            amax[r] = a
          if hist_bins > 0:
            key = r * hist_bins + graph_scoring.discretize(a, hist_bins)
            hmask = hcap - 1
            j = int_hash(key, hmask)
            while hkey[j] != -1 and hkey[j] != key:
              j = (j + 1) & hmask
            if hkey[j] == -1:
              hkey[j] = key
              hused += 1
            hcnt[j] += 1
            if 2 * hused > hcap:
              hcap *= 2
              hkey, hcnt = _rehashed_counts(hkey, hcnt)
  hist_key, hist_count = _histogram_entries(hkey, hcnt, hused)
  return eu[:rows], ev[:rows], cnt[:rows], mean[:rows], amax[:rows], hist_key, hist_count


def _csr_histograms(edge, bins, counts, num_edges):
  """Sorts (edge, bin, count) entries into CSR form."""
  order = np.lexsort((bins, edge))
  edge, bins, counts = edge[order], bins[order], counts[order]
  ptr = np.zeros(num_edges + 1, np.int64)
  np.cumsum(np.bincount(edge, minlength=num_edges), out=ptr[1:])
  return ptr, bins.astype(np.int32), counts.astype(np.int64)


def edge_statistics(
  fragments: np.ndarray,
  aff_w: np.ndarray,
  merge_function: str | graph_scoring.MergeFunction | None = None,
  lead: Sequence[int] = (0, 0, 0),
) -> EdgeTable:
  """Region-graph statistics of one block (or a whole volume).

  Args:
    fragments: ``[z, y, x]`` integer fragment ids (0 = background, never an edge end).
    aff_w: ``[3, z, y, x]`` affinities in waterz's convention (channels z, y, x; ``aff_w[c, p]``
      links p and p - e_c). Cast to float32 (waterz computes in float32).
    merge_function: scoring function (string or
      :class:`~jaxseg.decoding.graph_scoring.MergeFunction`); only decides whether per-contact
      histograms are collected (``MergeFunction.needs_histograms``). None: no histograms.
    lead: ``(dz, dy, dx)`` leading planes on each axis that are context owned by previous
      blocks: only pairs whose higher voxel p has ``p >= lead`` on every axis are counted (the
      pairs across the block's leading faces included), so each pair counts once globally.

  Returns:
    The block's :class:`EdgeTable`.
  """
  fragments = np.asarray(fragments)
  if fragments.ndim != 3 or not np.issubdtype(fragments.dtype, np.integer):
    raise ValueError(f"fragments must be an integer [z, y, x] array, got {fragments.dtype}")
  aff_w = np.ascontiguousarray(aff_w, dtype=np.float32)
  if aff_w.shape != (3, *fragments.shape):
    raise ValueError(f"aff_w {aff_w.shape} does not match fragments {fragments.shape}")
  lead = tuple(int(n) for n in lead)
  if len(lead) != 3 or min(lead) < 0:
    raise ValueError(f"lead must be three non-negative plane counts, got {lead}")
  if fragments.dtype.kind == "i" and fragments.size and fragments.min() < 0:
    raise ValueError("fragment ids must be non-negative")
  function = None if merge_function is None else graph_scoring.parse_merge_function(merge_function)
  hist_bins = function.bins if function is not None and function.needs_histograms else 0
  # One compiled kernel: ids as uint64 (what blockwise fragments are anyway).
  u, v, count, mean, amax, hkey, hcount = _edge_stats_kernel(
    np.ascontiguousarray(fragments, np.uint64), aff_w, *lead, hist_bins
  )
  order = np.lexsort((v, u))
  table = dict(u=u[order], v=v[order], count=count[order], mean=mean[order], aff_max=amax[order])
  if hist_bins:
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    ptr, bins, counts = _csr_histograms(
      rank[hkey // hist_bins], hkey % hist_bins, hcount, order.size
    )
    table.update(hist_ptr=ptr, hist_bin=bins, hist_count=counts, hist_bins=hist_bins)
  return EdgeTable(**table)


@numba.njit(cache=True, nogil=True)
def _join_means(starts, mean, count):
  # Joins the partial means of each group in order, with waterz's float32 edge-merge formula.
  groups = starts.shape[0] - 1
  out_mean = np.empty(groups, np.float32)
  out_count = np.empty(groups, np.int64)
  for g in range(groups):
    m = mean[starts[g]]
    n = count[starts[g]]
    for k in range(starts[g] + 1, starts[g + 1]):
      m = (mean[k] * np.float32(count[k]) + m * np.float32(n)) / np.float32(count[k] + n)
      n += count[k]
    out_mean[g] = m
    out_count[g] = n
  return out_mean, out_count


def reduce_edges(tables: Sequence[EdgeTable]) -> EdgeTable:
  """Joins edge tables of several blocks: one row per (u, v), statistics combined.

  Counts and histograms add, maxima take the max, means join in table order with waterz's
  float32 formula ``(m1 n1 + m2 n2) / (n1 + n2)``.

  Args:
    tables: tables from :func:`edge_statistics` (all with histograms of the same bins, or all
      without).
  """
  tables = list(tables)
  if not tables:
    raise ValueError("reduce_edges needs at least one table")
  hist_bins = {t.hist_bins for t in tables}
  if len(hist_bins) != 1:
    raise ValueError(f"tables disagree on histogram bins: {sorted(hist_bins)}")
  hist_bins = hist_bins.pop()
  u = np.concatenate([t.u for t in tables]).astype(np.uint64, copy=False)
  v = np.concatenate([t.v for t in tables]).astype(np.uint64, copy=False)
  if np.any(u >= v):
    raise ValueError("edge tables must have u < v in every row")
  order = np.lexsort((v, u))  # stable: rows of one edge stay in table order
  u, v = u[order], v[order]
  new_group = np.ones(u.size, bool)
  new_group[1:] = (u[1:] != u[:-1]) | (v[1:] != v[:-1])
  starts = np.flatnonzero(new_group)
  bounds = np.append(starts, u.size).astype(np.int64)
  count = np.concatenate([t.count for t in tables]).astype(np.int64, copy=False)[order]
  mean = np.concatenate([t.mean for t in tables]).astype(np.float32, copy=False)[order]
  amax = np.concatenate([t.aff_max for t in tables]).astype(np.float32, copy=False)[order]
  joined_mean, joined_count = _join_means(bounds, mean, count)
  table = dict(
    u=u[starts],
    v=v[starts],
    count=joined_count,
    mean=joined_mean,
    aff_max=np.maximum.reduceat(amax, starts) if u.size else amax,
  )
  if hist_bins:
    group = np.cumsum(new_group) - 1  # group of each sorted row
    group_of_row = np.empty_like(group)
    group_of_row[order] = group
    edge, bins, counts = [], [], []
    offset = 0
    for t in tables:
      per_edge = np.diff(t.hist_ptr)
      edge.append(group_of_row[offset + np.repeat(np.arange(t.num_edges), per_edge)])
      bins.append(t.hist_bin)
      counts.append(t.hist_count)
      offset += t.num_edges
    edge, bins, counts = np.concatenate(edge), np.concatenate(bins), np.concatenate(counts)
    key = edge.astype(np.int64) * hist_bins + bins
    uniq, inverse = np.unique(key, return_inverse=True)
    summed = np.zeros(uniq.size, np.int64)
    np.add.at(summed, inverse.ravel(), counts)
    ptr, hbin, hcount = _csr_histograms(uniq // hist_bins, uniq % hist_bins, summed, starts.size)
    table.update(hist_ptr=ptr, hist_bin=hbin, hist_count=hcount, hist_bins=hist_bins)
  return EdgeTable(**table)
