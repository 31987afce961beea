"""The slice-overlap table and id z-ranges that branch merge decides on.

Owns, for :mod:`~jaxseg.decoding.branch_merge`, the measurements of a segmentation ``[z, y, x]``
(unsigned ids, 0 = background) and optional z-affinity ``[z, y, x]`` (waterz's layout):

* the overlap table (:class:`OverlapTable`, :func:`slice_overlaps`, :func:`concat_overlaps`): per
  consecutive slice pair (z, z + 1), the overlap ov of every id pair (a in slice z, b in slice
  z + 1, a != b) with the sum of the z-affinity over those pixels, and the area of every id in
  every slice;
* the id z-ranges (:func:`id_ranges`, :func:`area_ranges`, :func:`merge_ranges`): the first and
  last slice of every id;
* :func:`check_segmentation`, and :func:`thread_pool` / :data:`MIN_VOXELS_PER_THREAD`, the
  process-wide threads the decoding kernels run their chunks on (also used by
  :mod:`~jaxseg.decoding.waterz_post`).

Tables and ranges of blocks combine exactly, whether the blocks split the volume in z (give each
block one trailing plane of the next as context) or in y/x (overlaps and areas add up; ``aff_sum``
up to float64 rounding).

The table is measured in one pass by a numba kernel with hash tables (no sorting of pixels), on
z-slabs in parallel threads (:func:`thread_pool`) for large volumes, optionally reading the ids
through a lookup table (``slice_overlaps(..., lut=)``: the table of ``lut[segmentation]`` without
making that volume; ``waterz_post`` measures the dust-merged volume this way).

This module never imports JAX.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from collections.abc import Sequence

import numba
import numpy as np


@dataclasses.dataclass(frozen=True)
class OverlapTable:
  """Overlaps of consecutive slices, and the per-slice areas of the ids.

  Rows (one per slice pair and id pair, sorted by ``(z, a, b)``, unique):
    z: ``[R]`` int64, the lower slice of the pair (global index).
    a: ``[R]`` uint64, id in slice z.
    b: ``[R]`` uint64, id in slice z + 1 (a != b, both > 0).
    ov: ``[R]`` int64, pixels where slice z holds a and slice z + 1 holds b.
    aff_sum: ``[R]`` float64, sum of the z-affinity linking those pixel pairs (0 without one).

  Areas (sorted by ``(area_z, area_id)``, unique):
    area_z: ``[S]`` int64 slice; area_id: ``[S]`` uint64 id; area: ``[S]`` int64 pixels.

  has_affinity: whether ``aff_sum`` was measured.
  """

  z: np.ndarray
  a: np.ndarray
  b: np.ndarray
  ov: np.ndarray
  aff_sum: np.ndarray
  area_z: np.ndarray
  area_id: np.ndarray
  area: np.ndarray
  has_affinity: bool

  @property
  def num_rows(self) -> int:
    return int(self.z.size)

  def pair_areas(self) -> tuple[np.ndarray, np.ndarray]:
    """``(s0, s1)``: area of a in slice z and of b in slice z + 1, per row (int64).

    Raises:
      ValueError: if a needed area is missing (a block's trailing context plane whose owner's
        table was not concatenated in).
    """
    s0 = _lookup_areas(self.area_z, self.area_id, self.area, self.z, self.a)
    s1 = _lookup_areas(self.area_z, self.area_id, self.area, self.z + 1, self.b)
    if (s0 < 0).any() or (s1 < 0).any():
      raise ValueError("overlap table lacks the area of some id; concatenate all blocks first")
    return s0, s1


@numba.njit(cache=True, nogil=True)
def _lookup_kernel(key_z, key_id, values, query_z, query_id, out):
  # Binary search in keys sorted by (z, id); -1 where absent.
  n = key_z.shape[0]
  for q in range(query_z.shape[0]):
    lo = 0
    hi = n
    while lo < hi:
      mid = (lo + hi) >> 1
      if key_z[mid] < query_z[q] or (key_z[mid] == query_z[q] and key_id[mid] < query_id[q]):
        lo = mid + 1
      else:
        hi = mid
    if lo < n and key_z[lo] == query_z[q] and key_id[lo] == query_id[q]:
      out[q] = values[lo]
    else:
      out[q] = -1


def _lookup_areas(key_z, key_id, values, query_z, query_id) -> np.ndarray:
  out = np.empty(query_z.size, np.int64)
  _lookup_kernel(key_z, key_id, values, query_z, query_id, out)
  return out


def _group_sum(keys: Sequence[np.ndarray], weights: Sequence[np.ndarray]):
  """Unique rows of the key columns (sorted lexicographically) and per-row sums of weights."""
  n = keys[0].size
  if n == 0:
    return [k[:0] for k in keys], [w[:0] for w in weights]
  order = np.lexsort(tuple(reversed(keys)))  # lexsort: last key is the primary one
  sorted_keys = [k[order] for k in keys]
  new = np.zeros(n, bool)
  new[0] = True
  for k in sorted_keys:
    new[1:] |= k[1:] != k[:-1]
  starts = np.flatnonzero(new)
  return (
    [k[starts] for k in sorted_keys],
    [np.add.reduceat(w[order], starts) for w in weights],
  )


def check_segmentation(segmentation: np.ndarray) -> np.ndarray:
  """The array as ``[z, y, x]`` non-negative integer ids, or a ValueError / TypeError."""
  segmentation = np.asarray(segmentation)
  if segmentation.ndim != 3:
    raise ValueError(f"segmentation must be [z, y, x], got shape {segmentation.shape}")
  if not np.issubdtype(segmentation.dtype, np.integer):
    raise TypeError(f"segmentation must be integer, got {segmentation.dtype}")
  if np.issubdtype(segmentation.dtype, np.signedinteger) and segmentation.min(initial=0) < 0:
    raise ValueError("segmentation ids must be non-negative")
  return segmentation


# -- the overlap kernel ----------------------------------------------------------------------------
# One pass over the volume measures the overlaps of every slice pair and the areas of every slice,
# with open-addressing hash tables keyed by id pairs (a slot is in use when its stamp is the
# current slice's, so nothing is cleared between slices). A table is ``tab`` uint64 ``[cap, 4]``
# (key a, key b, count, stamp) and ``tot`` float64 ``[cap]`` (affinity sums); cap is a power of
# two and the load stays <= 1/2. ``aff_sum`` adds the float64 z-affinities of a row's pixels one
# at a time in C order: a fixed order, so every caller (a volume, or a volume seen through a
# lookup table) gets the same bits.
# numba notes: a call that is not inlined costs ~50 ns per pixel (reference counts), and a callee
# that stores to arrays is not inlined, so the pixel loop calls only _probe and leaves the stores
# of a new entry to _add (rare); arrays reassigned inside a loop make it ~20x slower, so tables
# grow between rows, outside the pixel loop.

_MIX_A = np.uint64(0x9E3779B97F4A7C15)
_MIX_B = np.uint64(0xC2B2AE3D27D4EB4F)
_SHIFT = np.uint64(31)
_FIRST_CAP = 1024


@numba.njit(cache=True, nogil=True)
def _probe(tab, current, a, b):
  # Slot of (a, b) if present in this round, else ~(the empty slot where it would go).
  mask = tab.shape[0] - 1
  h = a * _MIX_A ^ (b + _MIX_B) * _MIX_B
  h ^= h >> _SHIFT
  s = np.int64(h & np.uint64(mask))
  while tab[s, 3] == current:
    if tab[s, 0] == a and tab[s, 1] == b:
      return s
    s = (s + 1) & mask
  return ~s


@numba.njit(cache=True, nogil=True, inline="never")
def _add(tab, tot, current, a, b, s, state, k):
  # A new entry (a, b) with zero count at the free slot s; state[k] counts the table's entries.
  tab[s, 0] = a
  tab[s, 1] = b
  tab[s, 2] = 0
  tab[s, 3] = current
  tot[s] = 0.0
  state[k] += 1


@numba.njit(cache=True, nogil=True)
def _grown(tab, tot, current, need):
  # The table, doubled until `need` entries keep the load <= 1/2 (this round's entries moved).
  cap = tab.shape[0]
  if 2 * need <= cap:
    return tab, tot
  while 2 * need > cap:
    cap *= 2
  new_tab = np.zeros((cap, 4), np.uint64)
  new_tot = np.zeros(cap, np.float64)
  for s in range(tab.shape[0]):
    if tab[s, 3] == current:
      t = ~_probe(new_tab, current, tab[s, 0], tab[s, 1])
      for k in range(4):  # element loops: numba compiles array slicing much more slowly
        new_tab[t, k] = tab[s, k]
      new_tot[t] = tot[s]
  return new_tab, new_tot


@numba.njit(cache=True, nogil=True)
def _through_lut(value, lut, lut_size, state):
  # The id a stored id stands for: lut[value], or 0 (and state[2] = 1) beyond the table.
  if value >= lut_size:
    state[2] = 1
    return np.uint64(0)
  return np.uint64(lut[value])


@numba.njit(cache=True, nogil=True)
def _scan_rows(
  labels, lut, use_lut, z_affinity, has_affinity, z, y, pairs, areas, current, ptab, ptot, atab,
  atot, state,
):  # fmt: skip
  # Rows y, y + 1, ... of slice z: areas of its ids and overlaps with slice z + 1, until the
  # slice ends or a table lacks room for one more row (<= width new entries); returns the next
  # row. state: [pair entries, area entries, 1 if an id was beyond the lookup table].
  height, width = labels.shape[1], labels.shape[2]
  zero = np.uint64(0)
  one = np.uint64(1)
  lut_size = np.uint64(lut.shape[0])
  while y < height:
    if 2 * (state[0] + width) > ptab.shape[0] or 2 * (state[1] + width) > atab.shape[0]:
      return y
    # The current run's entries are counted (and summed) in registers and stored when the run
    # ends: adding to the table every pixel would chain each pixel to the previous one's store.
    # The sums still add the pixels one by one in C order.
    area_slot = -1
    area_run = zero
    pair_slot = -1
    pair_run = zero
    pair_sum = 0.0
    last_a = zero
    last_b = zero
    # Ids through the table only where the stored id changes along the row.
    raw_a = zero
    raw_b = zero
    a = zero
    b = zero
    have_b = False
    for x in range(width):
      value = np.uint64(labels[z, y, x])
      if x == 0 or value != raw_a:
        raw_a = value
        a = _through_lut(value, lut, lut_size, state) if use_lut else value
        if areas and a != zero and (area_slot < 0 or a != atab[area_slot, 0]):
          if area_slot >= 0:
            atab[area_slot, 2] += area_run
          area_slot = _probe(atab, current, a, zero)
          if area_slot < 0:
            area_slot = ~area_slot
            _add(atab, atot, current, a, zero, area_slot, state, 1)
          area_run = zero
      if a == zero:
        continue
      if areas:
        area_run += one
      if not pairs:
        continue
      value = np.uint64(labels[z + 1, y, x])
      if value == raw_a:  # the same stored id: the same id
        continue
      if not have_b or value != raw_b:
        have_b = True
        raw_b = value
        b = _through_lut(value, lut, lut_size, state) if use_lut else value
      if b == zero or a == b:
        continue
      if pair_slot < 0 or a != last_a or b != last_b:
        if pair_slot >= 0:
          ptab[pair_slot, 2] += pair_run
          ptot[pair_slot] = pair_sum
        pair_slot = _probe(ptab, current, a, b)
        if pair_slot < 0:
          pair_slot = ~pair_slot
          _add(ptab, ptot, current, a, b, pair_slot, state, 0)
        pair_run = zero
        pair_sum = ptot[pair_slot]
        last_a = a
        last_b = b
      pair_run += one
      if has_affinity:
        pair_sum += np.float64(z_affinity[z + 1, y, x])
    if area_slot >= 0:
      atab[area_slot, 2] += area_run
    if pair_slot >= 0:
      ptab[pair_slot, 2] += pair_run
      ptot[pair_slot] = pair_sum
    y += 1
  return y


@numba.njit(cache=True, nogil=True)
def _emit(tab, tot, current, z, rows, sums, n):
  # Appends this round's entries as rows (z, a, b, count) and sums, growing the buffers.
  need = n
  for s in range(tab.shape[0]):
    need += tab[s, 3] == current
  if need > rows.shape[0]:
    size = max(need, 2 * rows.shape[0])
    new_rows = np.empty((size, 4), np.uint64)
    new_sums = np.empty(size, np.float64)
    for i in range(n):
      for k in range(4):
        new_rows[i, k] = rows[i, k]
      new_sums[i] = sums[i]
    rows, sums = new_rows, new_sums
  for s in range(tab.shape[0]):
    if tab[s, 3] == current:
      rows[n, 0] = z
      rows[n, 1] = tab[s, 0]
      rows[n, 2] = tab[s, 1]
      rows[n, 3] = tab[s, 2]
      sums[n] = tot[s]
      n += 1
  return rows, sums, n


@numba.njit(cache=True, nogil=True)
def _overlap_kernel(labels, lut, use_lut, z_affinity, has_affinity, pairs, area_slices):
  """Pair rows ``(z, a, b, ov)`` with ``aff_sum`` and area rows ``(z, id, 0, area)``, both
  unsorted, and a status (1: an id beyond the lookup table)."""
  depth, height, width = labels.shape
  ptab = np.zeros((_FIRST_CAP, 4), np.uint64)
  ptot = np.zeros(_FIRST_CAP, np.float64)
  atab = np.zeros((_FIRST_CAP, 4), np.uint64)
  atot = np.zeros(_FIRST_CAP, np.float64)
  rows = np.empty((_FIRST_CAP, 4), np.uint64)
  sums = np.empty(_FIRST_CAP, np.float64)
  area_rows = np.empty((_FIRST_CAP, 4), np.uint64)
  area_sums = np.empty(_FIRST_CAP, np.float64)
  n_rows = 0
  n_areas = 0
  state = np.zeros(3, np.int64)
  for z in range(depth):
    with_pairs = pairs and z + 1 < depth
    with_areas = z < area_slices
    if not (with_pairs or with_areas):
      continue
    current = np.uint64(z + 1)
    state[0] = 0
    state[1] = 0
    y = 0
    while y < height:
      ptab, ptot = _grown(ptab, ptot, current, state[0] + width)
      atab, atot = _grown(atab, atot, current, state[1] + width)
      y = _scan_rows(
        labels, lut, use_lut, z_affinity, has_affinity, z, y, with_pairs, with_areas, current,
        ptab, ptot, atab, atot, state,
      )  # fmt: skip
    rows, sums, n_rows = _emit(ptab, ptot, current, z, rows, sums, n_rows)
    area_rows, area_sums, n_areas = _emit(atab, atot, current, z, area_rows, area_sums, n_areas)
  return rows[:n_rows], sums[:n_rows], area_rows[:n_areas], state[2]


def _kernel_affinity(z_affinity: np.ndarray | None, shape) -> np.ndarray:
  """z-affinity as the kernel reads it: float32/float64 as given, other dtypes as float64."""
  if z_affinity is None:
    return np.zeros((1, 1, 1), np.float32)
  z_affinity = np.asarray(z_affinity)
  if z_affinity.shape != tuple(shape):
    raise ValueError(f"z_affinity {z_affinity.shape} must match {tuple(shape)}")
  if z_affinity.dtype not in (np.float32, np.float64):
    z_affinity = z_affinity.astype(np.float64)  # exact for float16 and small integers
  return np.ascontiguousarray(z_affinity)


# Slabs of at least this many voxels go to separate threads (the kernel releases the GIL).
MIN_VOXELS_PER_THREAD = 1 << 20
_POOL: list = [None, None, 0]  # pid, executor, threads: kept (starting threads costs ms)


def thread_pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
  """A process-wide pool of at least ``threads`` threads (made anew after a fork)."""
  pid, pool, size = _POOL
  if pool is None or pid != os.getpid() or size < threads:
    pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="jaxseg_decoding")
    _POOL[:] = [os.getpid(), pool, threads]
  return pool


def _measure(labels, lut, use_lut, z_affinity, has_affinity, pairs, area_slices):
  """:func:`_overlap_kernel` on z-slabs in parallel threads, as unsorted columns.

  Each slab measures its own slices' areas and the pairs from its slices to the next one (it
  reads one plane of the next slab), so the rows and their sums are those of one pass.

  Returns:
    ``((z, a, b, ov, aff_sum, area_z, area_id, area), status)``.
  """
  depth = labels.shape[0]
  threads = min(numba.get_num_threads(), depth, labels.size // MIN_VOXELS_PER_THREAD)
  bounds = [depth * k // max(threads, 1) for k in range(max(threads, 1) + 1)]

  def slab(k):
    z0, z1 = bounds[k], bounds[k + 1]
    end = min(z1 + 1, depth) if pairs else z1
    aff = z_affinity[z0:end] if has_affinity else z_affinity
    areas = max(0, min(area_slices, z1) - z0)
    rows, sums, area_rows, status = _overlap_kernel(
      labels[z0:end], lut, use_lut, aff, has_affinity, pairs, areas
    )
    rows[:, 0] += np.uint64(z0)
    area_rows[:, 0] += np.uint64(z0)
    return rows, sums, area_rows, status

  if threads <= 1:
    parts = [slab(0)]
  else:
    parts = list(thread_pool(threads).map(slab, range(threads)))
  rows, sums, area_rows = (np.concatenate([p[i] for p in parts]) for i in range(3))
  columns = (
    rows[:, 0].astype(np.int64),
    rows[:, 1].copy(),
    rows[:, 2].copy(),
    rows[:, 3].astype(np.int64),
    sums,
    area_rows[:, 0].astype(np.int64),
    area_rows[:, 1].copy(),
    area_rows[:, 3].astype(np.int64),
  )
  return columns, max(p[3] for p in parts)


def slice_overlaps(
  segmentation: np.ndarray,
  z_affinity: np.ndarray | None = None,
  z0: int = 0,
  last_plane_is_context: bool = False,
  lut: np.ndarray | None = None,
) -> OverlapTable:
  """The overlap table of every consecutive slice pair (z, z + 1) inside the array.

  Args:
    segmentation: ``[z, y, x]`` non-negative integer ids, 0 = background.
    z_affinity: optional ``[z, y, x]`` z-affinity in waterz's layout: the value at
      ``(z + 1, y, x)`` links ``(z, y, x)`` and ``(z + 1, y, x)`` (waterz channel 0).
    z0: global index of the first slice (for blocks).
    last_plane_is_context: the last slice belongs to the next block: its pairs with the slice
      before are measured here, but its areas are left to the block that owns it (so that
      concatenated tables count every slice once).
    lut: optional dense lookup table (non-negative integers, ``lut.size > segmentation.max()``):
      the table of ``lut[segmentation]`` is measured without making that volume (e.g. waterz
      ids seen through the dust merge).

  Returns:
    The :class:`OverlapTable`. ``aff_sum`` adds the float64 z-affinities of a row's pixel pairs
    one by one in C order, so it is the same bits whichever way the volume is handed in.
  """
  segmentation = check_segmentation(segmentation)
  depth = segmentation.shape[0]
  aff = _kernel_affinity(z_affinity, segmentation.shape)
  if lut is None:
    table_lut = np.zeros(1, np.int64)
  else:
    lut = np.asarray(lut)
    if lut.ndim != 1 or not np.issubdtype(lut.dtype, np.integer) or lut.min(initial=0) < 0:
      raise ValueError(
        f"lut must be a 1-d array of non-negative integers, got {lut.dtype} {lut.shape}"
      )
    table_lut = np.ascontiguousarray(lut, np.int64)  # one compiled kernel for every table dtype
  (z, a, b, ov, aff_sum, area_z, area_id, area), status = _measure(
    np.ascontiguousarray(segmentation),
    table_lut,
    lut is not None,
    aff,
    z_affinity is not None,
    True,
    depth - 1 if last_plane_is_context else depth,
  )
  if status:
    raise ValueError(f"lut of size {table_lut.size} does not cover the ids of the segmentation")
  order = np.lexsort((b, a, z))
  area_order = np.lexsort((area_id, area_z))
  return OverlapTable(
    z=z[order] + z0,
    a=a[order],
    b=b[order],
    ov=ov[order],
    aff_sum=aff_sum[order],
    area_z=area_z[area_order] + z0,
    area_id=area_id[area_order],
    area=area[area_order],
    has_affinity=z_affinity is not None,
  )


def _cat(parts: list[np.ndarray], dtype) -> np.ndarray:
  return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


def concat_overlaps(tables: Sequence[OverlapTable]) -> OverlapTable:
  """Combines the tables of blocks: rows and areas with the same key add up.

  Raises:
    ValueError: if some tables measured z-affinity and others did not, or none are given.
  """
  tables = list(tables)
  if not tables:
    raise ValueError("need at least one overlap table")
  has_affinity = {t.has_affinity for t in tables}
  if len(has_affinity) != 1:
    raise ValueError("cannot mix overlap tables with and without z-affinity")
  (z, a, b), (ov, aff) = _group_sum(
    [np.concatenate([getattr(t, f) for t in tables]) for f in ("z", "a", "b")],
    [np.concatenate([t.ov for t in tables]), np.concatenate([t.aff_sum for t in tables])],
  )
  (area_z, area_id), (area,) = _group_sum(
    [np.concatenate([t.area_z for t in tables]), np.concatenate([t.area_id for t in tables])],
    [np.concatenate([t.area for t in tables])],
  )
  return OverlapTable(z, a, b, ov, aff, area_z, area_id, area, has_affinity.pop())


def id_ranges(segmentation: np.ndarray, z0: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """First and last slice of every non-zero id.

  Args:
    segmentation: ``[z, y, x]`` non-negative integer ids.
    z0: global index of the first slice.

  Returns:
    ``(ids uint64 sorted, first_z int64, last_z int64)``.
  """
  segmentation = check_segmentation(segmentation)
  (_, _, _, _, _, area_z, area_id, _), _ = _measure(
    np.ascontiguousarray(segmentation),
    np.zeros(1, np.int64),
    False,
    np.zeros((1, 1, 1), np.float32),
    False,
    False,
    segmentation.shape[0],
  )
  return merge_ranges([(area_id, area_z + z0, area_z + z0)])


def area_ranges(table: OverlapTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """First and last slice of every id in a table's areas.

  Equals :func:`id_ranges` of the measured volume when the table holds the areas of every slice
  (measured without ``last_plane_is_context``, or all blocks concatenated).
  """
  return merge_ranges([(table.area_id, table.area_z, table.area_z)])


def merge_ranges(
  ranges: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Combines ``(ids, first_z, last_z)`` triples of blocks: min of firsts, max of lasts per id."""
  ids = _cat([np.asarray(r[0]) for r in ranges], np.uint64)
  first = _cat([np.asarray(r[1]) for r in ranges], np.int64)
  last = _cat([np.asarray(r[2]) for r in ranges], np.int64)
  if ids.size == 0:
    return ids, first, last
  unique, inverse = np.unique(ids, return_inverse=True)
  first_z = np.full(unique.size, np.iinfo(np.int64).max, np.int64)
  last_z = np.full(unique.size, np.iinfo(np.int64).min, np.int64)
  np.minimum.at(first_z, inverse, first)
  np.maximum.at(last_z, inverse, last)
  return unique, first_z, last_z
