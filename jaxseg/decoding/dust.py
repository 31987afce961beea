"""Dust merge: small segments join their best-connected neighbour, leftovers are removed.

PyTC's SNEMI recipe runs this after waterz (its ``dust_merge_from_region_graph``;
``docs/decoding.md``, "Dust merge"), on waterz's surviving region graph:

1. take the region-graph edges whose score is >= the agglomeration threshold, with affinity
   ``a = 1 - score`` (float32, as waterz's scores are), strongest first;
2. a union-find starts with each segment's voxel count; scanning the edges while
   ``a > affinity``, two different roots join if *either current root* (sizes add up as sets
   grow) has fewer than ``size`` voxels;
3. sets are renumbered ``1..K`` in the order of their smallest member id, and a set with fewer
   than ``remove_size`` voxels becomes 0.

Owns :func:`dust_merge_lut` (the graph-level step: segment ids and sizes in, id -> new id out, no
volume needed, so a blockwise decoder can run it on a global graph) and :func:`dust_merge` (the
same on a ``[z, y, x]`` segmentation). Ids are unsigned integers, 0 = background; the edge lists
are ``[E]`` arrays ``rg_u``, ``rg_v`` (ids) and ``rg_score`` (waterz scores, 1 - affinity).

Order of equal-affinity edges: PyTC sorts with a reversed (unstable) ``argsort`` of waterz's
edge list; here ties are broken by the edge's ids (smaller ``min(u, v)`` first, then smaller
``max(u, v)``), so the result does not depend on the order the edges come in (a blockwise graph
assembled in any order gives the whole-volume answer). Only equal affinities are affected.

This module never imports JAX.
"""

from __future__ import annotations

import numba
import numpy as np

from jaxseg.decoding import labels as labels_lib


@numba.njit(cache=True, nogil=True)
def _dust_union(parent, set_size, edge_u, edge_v, edge_aff, affinity, size):
  # Edges come sorted by descending affinity: the first one at or below `affinity` ends the scan.
  for k in range(edge_u.shape[0]):
    if edge_aff[k] <= affinity:
      break
    if edge_u[k] < 0 or edge_v[k] < 0:  # an end that is background or not a known segment
      continue
    ru = labels_lib.find_root(parent, edge_u[k])
    rv = labels_lib.find_root(parent, edge_v[k])
    if ru == rv:
      continue
    if set_size[ru] < size or set_size[rv] < size:
      lo, hi = min(ru, rv), max(ru, rv)  # the least index stays root (labels.py's convention)
      parent[hi] = lo
      set_size[lo] += set_size[hi]


@numba.njit(cache=True, nogil=True)
def _renumber(parent, set_size, remove_size, new_id):
  # Ids are sorted, so the first member met of each set is its smallest id: PyTC's order.
  next_id = 1
  for i in range(parent.shape[0]):
    root = labels_lib.find_root(parent, i)
    if root == i:
      if set_size[i] >= remove_size:
        new_id[i] = next_id
        next_id += 1
    else:
      new_id[i] = new_id[root]  # root < i: already numbered (or 0)
  return next_id - 1


def _edge_index(ids: np.ndarray, edge_ids: np.ndarray) -> np.ndarray:
  """Position of each edge end in ``ids`` (sorted), -1 where it is absent (or 0)."""
  edge_ids = np.asarray(edge_ids, np.uint64)
  if ids.size == 0:
    return np.full(edge_ids.shape, -1, np.int64)
  top = int(ids[-1])
  if top <= 4 * ids.size + 1024:  # dense ids (waterz's): a position table beats binary search
    table = np.full(top + 2, -1, np.int64)
    table[ids.astype(np.intp)] = np.arange(ids.size)
    table[0] = -1
    return table[np.minimum(edge_ids, np.uint64(top + 1)).astype(np.intp)]
  pos = np.searchsorted(ids, edge_ids)
  np.minimum(pos, ids.size - 1, out=pos)
  found = (ids[pos] == edge_ids) & (edge_ids != 0)
  return np.where(found, pos, -1).astype(np.int64)


def dust_merge_lut(
  ids: np.ndarray,
  sizes: np.ndarray,
  rg_u: np.ndarray,
  rg_v: np.ndarray,
  rg_score: np.ndarray,
  threshold: float,
  size: int = 800,
  affinity: float = 0.3,
  remove_size: int = 600,
) -> tuple[np.ndarray, int]:
  """Dust merge on a region graph: the new id of every segment.

  Args:
    ids: ``[N]`` segment ids, unique, sorted ascending, non-zero (any integer dtype).
    sizes: ``[N]`` voxel count of each segment.
    rg_u, rg_v: ``[E]`` ids joined by each region-graph edge; ends not in ``ids`` (or 0) are
      skipped, as PyTC skips ids beyond its count table.
    rg_score: ``[E]`` waterz scores (1 - affinity); compared in float32, as waterz stores them.
    threshold: the agglomeration threshold: only edges with ``score >= threshold`` take part
      (waterz's surviving edges already satisfy this).
    size: a merge needs at least one side's current set to have fewer voxels than this.
    affinity: edges merge only while ``1 - score > affinity``.
    remove_size: final sets with fewer voxels become 0 (0 keeps everything).

  Returns:
    ``([N] int64 new id per entry of ids, in 0..K, K)``; ids ``1..K`` follow each set's smallest
    member id.
  """
  ids = np.asarray(ids)
  sizes = np.asarray(sizes, np.int64)
  if ids.ndim != 1 or ids.shape != sizes.shape:
    raise ValueError(
      f"ids and sizes must be equal-length 1-d arrays, got {ids.shape}, {sizes.shape}"
    )
  if ids.size and (np.any(ids[1:] <= ids[:-1]) or ids[0] <= 0):
    raise ValueError("ids must be positive, unique and sorted ascending")
  rg_u = np.asarray(rg_u).ravel()
  rg_v = np.asarray(rg_v).ravel()
  rg_score = np.asarray(rg_score, np.float32).ravel()
  if not rg_u.shape == rg_v.shape == rg_score.shape:
    raise ValueError(
      f"region-graph arrays differ in length: {rg_u.shape}, {rg_v.shape}, {rg_score.shape}"
    )
  ids = ids.astype(np.uint64)

  edge_aff = np.float32(1.0) - rg_score  # float32, like PyTC's inversion
  # The scan stops at the first edge with a <= affinity: the weaker edges are dropped unsorted.
  keep = (rg_score >= np.float32(threshold)) & (edge_aff > np.float32(affinity))
  rg_u = rg_u[keep].astype(np.uint64)
  rg_v = rg_v[keep].astype(np.uint64)
  edge_aff = edge_aff[keep]
  lo = np.minimum(rg_u, rg_v)
  hi = np.maximum(rg_u, rg_v)
  order = np.lexsort((hi, lo, -edge_aff))  # descending affinity, ties by ids (see module doc)

  parent = np.arange(ids.size, dtype=np.int64)
  set_size = sizes.copy()
  _dust_union(
    parent,
    set_size,
    _edge_index(ids, rg_u[order]),
    _edge_index(ids, rg_v[order]),
    np.ascontiguousarray(edge_aff[order]),
    np.float32(affinity),
    int(size),
  )
  new_id = np.zeros(ids.size, np.int64)
  count = _renumber(parent, set_size, int(remove_size), new_id)
  return new_id, int(count)


def segment_sizes(segmentation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Non-zero ids of a label volume (sorted) and their voxel counts, as ``(uint64, int64)``."""
  flat = np.ascontiguousarray(segmentation).ravel()
  if flat.size == 0:
    return np.zeros(0, np.uint64), np.zeros(0, np.int64)
  if np.issubdtype(flat.dtype, np.signedinteger) and flat.min() < 0:
    raise ValueError("segment ids must be non-negative")
  top = int(flat.max())
  if top <= 4 * flat.size + 1024:  # dense ids: counting beats sorting
    counts = np.bincount(flat.astype(np.intp, copy=False), minlength=top + 1)
    ids = np.flatnonzero(counts)
    ids = ids[ids > 0]
    return ids.astype(np.uint64), counts[ids].astype(np.int64)
  ids, counts = np.unique(flat, return_counts=True)
  nonzero = ids > 0
  return ids[nonzero].astype(np.uint64), counts[nonzero].astype(np.int64)


def dust_merge(
  segmentation: np.ndarray,
  rg_u: np.ndarray,
  rg_v: np.ndarray,
  rg_score: np.ndarray,
  *,
  threshold: float,
  size: int = 800,
  affinity: float = 0.3,
  remove_size: int = 600,
) -> np.ndarray:
  """:func:`dust_merge_lut` applied to a segmentation (e.g. one waterz threshold's result).

  Args:
    segmentation: ``[z, y, x]`` unsigned ids (0 = background), e.g. ``WaterzResult.segmentation``.
    rg_u, rg_v, rg_score: its region graph (``WaterzResult.rg_*``).
    threshold, size, affinity, remove_size: see :func:`dust_merge_lut` (PyTC's SNEMI values are
      the defaults; ``threshold`` is the waterz threshold that produced ``segmentation``).

  Returns:
    ``[z, y, x]`` ids ``1..K`` (0 = background and removed dust) in the smallest unsigned dtype.
  """
  segmentation = np.asarray(segmentation)
  if not np.issubdtype(segmentation.dtype, np.integer):
    raise TypeError(f"segmentation must be integer, got {segmentation.dtype}")
  ids, sizes = segment_sizes(segmentation)
  new_id, count = dust_merge_lut(
    ids, sizes, rg_u, rg_v, rg_score, threshold, size, affinity, remove_size
  )
  dtype = labels_lib.smallest_uint_dtype(count)
  return labels_lib.apply_lut(segmentation, ids, new_id, out_dtype=dtype)
