"""The SNEMI post-processing of one waterz segmentation in three passes over the volume.

The SNEMI decoder runs, after waterz, dust merge (:mod:`~jaxseg.decoding.dust`), branch merge
(:mod:`~jaxseg.decoding.branch_merge`) and :func:`labels.relabel_sequential` (size filter, ids in
scan order). Run one after the other, each stage relabels the whole volume and the next one
sorts it again. :func:`postprocess` gives the same array, bit for bit, and touches the volume only
three times:

1. one counting pass: each id's voxel count and the linear index of its first voxel (waterz ids
   are small integers, so these are dense arrays indexed by id; other ids are compacted first);
2. the dust merge on the region graph alone (:func:`dust.dust_merge_lut`), and, for the branch
   merge, one pass that measures the slice-overlap table of the *dust-merged* volume by reading
   the waterz ids through the dust lookup table (:func:`branch_overlaps.slice_overlaps` with
   ``lut``), so that volume is never made; the stages then run on the table as
   :func:`branch_merge.branch_merge` runs them;
3. the lookup tables composed, the final size filter and the scan-order numbering worked out from
   the per-id counts and first indices (a set's first voxel is the least first index of its
   members), and one pass writing the result in the smallest unsigned dtype.

The passes are numba kernels that release the GIL; on volumes of a few million voxels or more
they run on chunks (z-slabs for the table) in a shared pool of Python threads, one per numba
thread (``NUMBA_NUM_THREADS``), with results identical to one serial pass.

Why the table is measured through the dust table rather than once on the waterz ids and then
merged row by row: its ``aff_sum`` column is a float64 sum whose rounding depends on the order of
the additions; measuring it on the merged ids adds the same pixels in the same order as the
sequential pipeline, so the mean z-affinity gate sees the same bits.

Shapes: ``segmentation`` ``[z, y, x]`` non-negative integer ids (0 = background), ``z_affinity``
``[z, y, x]`` in waterz's layout (the value at ``(z + 1, y, x)`` links ``(z, y, x)`` and
``(z + 1, y, x)``: waterz channel 0), region-graph arrays ``[E]``.

This module never imports JAX.
"""

from __future__ import annotations

import itertools

import numba
import numpy as np

from jaxseg.decoding import branch_merge as branch_lib
from jaxseg.decoding import branch_overlaps
from jaxseg.decoding import dust as dust_lib
from jaxseg.decoding import labels as labels_lib
from jaxseg.decoding.settings import BranchMergeSettings, DustSettings

# Ids up to this many times the voxel count (plus a little) are indexed densely.
_DENSE_FACTOR = 4


@numba.njit(cache=True, nogil=True)
def _count_run(flat, start, counts, first):
  # counts[v] += 1 per voxel of id v and first[v] = linear index of v's first voxel (-1: none),
  # from `start` until the end or an id beyond the arrays; returns where it stopped.
  size = np.uint64(counts.shape[0])
  for i in range(start, flat.shape[0]):
    v = np.uint64(flat[i])
    if v >= size:
      return i
    if first[v] < 0:
      first[v] = i
    counts[v] += 1
  return flat.shape[0]


@numba.njit(cache=True, nogil=True)
def _count_first(flat, limit):
  """Dense per-id counts and first indices in one pass; (.., .., -1) once an id exceeds limit."""
  counts = np.zeros(1024, np.int64)
  first = np.full(1024, -1, np.int64)
  top = 0
  i = _count_run(flat, 0, counts, first)
  while i < flat.shape[0]:
    v = np.uint64(flat[i])
    if v > np.uint64(limit):
      return counts, first, -1
    size = max(2 * counts.shape[0], np.int64(v) + 1)
    grown = np.zeros(size, np.int64)
    grown[: counts.shape[0]] = counts
    counts = grown
    grown = np.full(size, -1, np.int64)
    grown[: first.shape[0]] = first
    first = grown
    i = _count_run(flat, i, counts, first)
  for v in range(counts.shape[0] - 1, 0, -1):
    if counts[v]:
      top = v
      break
  return counts[: top + 1], first[: top + 1], top


@numba.njit(cache=True, nogil=True)
def _apply_lut(flat, lut, out):
  # out[i] = lut[flat[i]]
  for i in range(flat.shape[0]):
    out[i] = lut[flat[i]]


def _chunks(size: int) -> list[tuple[int, int]]:
  """``[start, stop)`` ranges splitting ``size`` voxels over the threads worth starting."""
  threads = max(1, min(numba.get_num_threads(), size // branch_overlaps.MIN_VOXELS_PER_THREAD))
  bounds = [size * k // threads for k in range(threads + 1)]
  return list(itertools.pairwise(bounds))


def _threaded(fn, chunks: list[tuple[int, int]]) -> list:
  """``fn(start, stop)`` per chunk, in the shared thread pool when there are several (the numba
  kernels release the GIL; a pool of Python threads rather than ``parallel=True`` is safe to use
  from several threads and after a fork)."""
  if len(chunks) == 1:
    return [fn(*chunks[0])]
  return list(branch_overlaps.thread_pool(len(chunks)).map(lambda c: fn(*c), chunks))


def _index(flat: np.ndarray):
  """The volume as small non-negative indices, and per index its id, count and first voxel.

  Returns:
    ``(volume, keys, counts, first)``: ``volume`` holds indices into ``keys`` (the ids; index 0
    is id 0 whether it occurs or not), ``counts`` and ``first`` (int64, first = -1 where the id
    does not occur).
  """
  limit = _DENSE_FACTOR * flat.size + 1024
  chunks = _chunks(flat.size)
  parts = _threaded(lambda lo, hi: _count_first(flat[lo:hi], limit), chunks)
  if len(parts) == 1:
    counts, first, top = parts[0]
  else:  # combine the chunks' tables
    top = -1 if min(p[2] for p in parts) < 0 else max(p[2] for p in parts)
    if top >= 0:
      big = np.iinfo(np.int64).max
      counts = np.zeros(top + 1, np.int64)
      first = np.full(top + 1, big, np.int64)
      for (part_counts, part_first, _), (start, _) in zip(parts, chunks, strict=True):
        n = part_counts.size
        counts[:n] += part_counts
        np.minimum(first[:n], np.where(part_first >= 0, part_first + start, big), out=first[:n])
      first[first == big] = -1
  if top >= 0:
    return flat, np.arange(top + 1, dtype=np.uint64), counts, first
  # Sparse ids (e.g. globally unique uint64 block ids): np.unique gives all four at once.
  keys, first, inverse, counts = np.unique(
    flat, return_index=True, return_inverse=True, return_counts=True
  )
  if keys[0] != 0:  # index 0 is reserved for the background
    keys = np.concatenate([np.zeros(1, keys.dtype), keys])
    first = np.concatenate([[-1], first])
    counts = np.concatenate([[0], counts])
    inverse = inverse + 1
  return (
    inverse.reshape(-1).astype(np.uint64),  # the dtype of waterz's ids: kernels compiled once
    keys.astype(np.uint64),
    counts.astype(np.int64),
    first.astype(np.int64),
  )


def postprocess(
  segmentation: np.ndarray,
  rg_u: np.ndarray | None,
  rg_v: np.ndarray | None,
  rg_score: np.ndarray | None,
  *,
  threshold: float,
  z_affinity: np.ndarray | None,
  dust: DustSettings | None,
  branch_merge: BranchMergeSettings | None,
  min_size: int = 0,
) -> np.ndarray:
  """Dust merge, branch merge and the final relabelling of one waterz segmentation.

  Equal, dtype included, to::

    seg = dust.dust_merge(segmentation, rg_u, rg_v, rg_score, threshold=threshold,
                          size=dust.size, affinity=dust.affinity, remove_size=dust.remove_size)
    seg = branch_merge.branch_merge(seg, z_affinity, **branch_merge.as_kwargs())
    seg, _ = labels.relabel_sequential(seg, min_size=min_size)

  with each of the first two steps left out when its settings are None.

  Args:
    segmentation: ``[z, y, x]`` non-negative integer ids, 0 = background (waterz's result).
    rg_u, rg_v, rg_score: its region graph (``WaterzResult.rg_*``); needed for the dust merge
      only (None without it).
    threshold: the waterz threshold that made ``segmentation`` (dust merge edges need a score
      >= threshold).
    z_affinity: ``[z, y, x]`` z-affinity in waterz's layout (``aff_w[0]``), or None; the branch
      merge's mean-affinity gate needs it.
    dust: dust merge settings, or None to skip it.
    branch_merge: branch merge settings, or None to skip it.
    min_size: final segments with fewer voxels become 0 (0 or 1 keeps all).

  Returns:
    ``[z, y, x]`` ids ``1..K`` in C-order scan order of first appearance, 0 = background, in the
    smallest unsigned dtype that holds K.
  """
  segmentation = branch_overlaps.check_segmentation(segmentation)
  shape = segmentation.shape
  volume, keys, counts, first = _index(np.ascontiguousarray(segmentation).reshape(-1))
  present = np.flatnonzero(counts)
  present = present[present > 0]  # indices of the non-zero ids, ascending id order
  ids, sizes = keys[present], counts[present]

  # Stage ids (the dust-merged volume's ids 1..K1) of every present id; 0 = removed.
  if dust is not None:
    if rg_u is None or rg_v is None or rg_score is None:
      raise ValueError("the dust merge needs the region graph (rg_u, rg_v, rg_score)")
    stage_id, num_stage = dust_lib.dust_merge_lut(
      ids,
      sizes,
      rg_u,
      rg_v,
      rg_score,
      threshold,
      dust.size,
      dust.affinity,
      dust.remove_size,
    )
  else:
    # Without a dust merge the branch merge sees the waterz ids; it only uses their order.
    stage_id, num_stage = np.arange(1, ids.size + 1, dtype=np.int64), int(ids.size)

  # Group of every stage id after the branch merge: the least stage id of its set (0 stays 0).
  group = np.arange(num_stage + 1, dtype=np.int64)
  if branch_merge is not None and num_stage:
    lut = np.zeros(keys.size, np.int64)
    lut[present] = stage_id
    table = branch_overlaps.slice_overlaps(volume.reshape(shape), z_affinity, lut=lut)
    stage_ids, first_z, last_z = branch_overlaps.area_ranges(table)
    a, b = branch_lib.branch_merge_pairs(
      table, stage_ids, first_z, last_z, **branch_merge.as_kwargs()
    )
    group = labels_lib.merge_components(num_stage + 1, a.astype(np.int64), b.astype(np.int64))
  member_group = group[stage_id]  # per present id

  # The final sets: sizes and first voxels from their members, size filter, scan order.
  group_size = np.bincount(member_group, weights=sizes, minlength=num_stage + 1)
  group_first = np.full(num_stage + 1, np.iinfo(np.int64).max, np.int64)
  np.minimum.at(group_first, member_group, first[present])
  keep = group_size > 0
  keep[0] = False
  if min_size > 1:
    keep &= group_size >= min_size
  kept = np.flatnonzero(keep)
  final_of_group = np.zeros(num_stage + 1, np.int64)
  final_of_group[kept[np.argsort(group_first[kept], kind="stable")]] = np.arange(1, kept.size + 1)
  dtype = labels_lib.smallest_uint_dtype(int(kept.size))
  final_lut = np.zeros(keys.size, dtype)
  final_lut[present] = final_of_group[member_group]
  out = np.empty(volume.size, dtype)
  _threaded(lambda lo, hi: _apply_lut(volume[lo:hi], final_lut, out[lo:hi]), _chunks(volume.size))
  return out.reshape(shape)
