"""Branch merge: joins segments split between consecutive z-slices (PyTC's ``branch_merge``).

A segmentation ``[z, y, x]`` (unsigned ids, 0 = background) often breaks a neurite where it
crosses a bad section: one id ends at slice z and another starts at z + 1 on top of it. This
module finds such pairs from 2-d overlaps of consecutive slices and merges them in three stages
(``docs/decoding.md``, "Branch merge"; PyTC ``decoders/branch_merge.py``):

* **bbox touch.** A pair (a in slice z, b in slice z + 1) is considered only where an id ends or
  begins: *strict* = a's last slice is z **and** b's first slice is z + 1; *relaxed* = either.
  First and last slices are those of the original ids over the whole volume.
* **Stage 1 (relaxed)**, per slice pair z = 0, 1, ...: merge if IoU = ov / (s0 + s1 - ov) >=
  ``iou_threshold``; then, in the same slice pair, merge pairs whose area ratio s0 / s1 lies in
  ``[size_ratio, 1 / size_ratio]``, skipping a pair when *both* of its ids took part in an IoU
  merge of this slice pair (``size_ratio`` 0 disables this half).
* **Stage 2 (strict, best buddies)**, per z, on the sets formed so far: for every row whose two
  sets differ, each set's best partner is the row with the largest overlap (the first such row,
  rows in ascending ``(a, b)``); two sets that are each other's best partner merge.
* **Stage 3 (relaxed, one-sided)**, per z: merge if ov / min(s0, s1) >= ``one_sided_threshold``
  and min(s0, s1) >= ``one_sided_min_size`` (threshold 0 disables the stage).
* An optional gate on every stage: the mean z-affinity over the overlapping pixels must be >=
  ``affinity_threshold`` (0 disables it).

s0 is the area of a in slice z, s1 the area of b in slice z + 1, ov their overlap in pixels.

Owns the graph-level stages (:func:`branch_merge_pairs`, no volume needed) and
:func:`branch_merge` on a volume. They decide on the overlap table and id z-ranges of
:mod:`~jaxseg.decoding.branch_overlaps`, which blockwise decoding measures per block and
combines.

Interpretations (where PyTC's code, not the spec, decided):

* Rows with a == b (the same id in both slices) are left out of the table: they can never pass
  the bbox-touch rule (an id present in both slices neither ends at z nor starts at z + 1).
* "Still-unmerged" in stage 1's size-ratio half means PyTC's rule above: not *both* ids were
  merged by an IoU union of the same slice pair that actually joined two sets.
* The mean z-affinity gate needs z affinities: asking for it without them is an error (PyTC
  silently skips the gate).
* Output ids are renumbered ``1..K`` in the order of each merged set's smallest original id
  (PyTC renumbers with fastremap; any order is the same partition).

This module never imports JAX.
"""

from __future__ import annotations

import numba
import numpy as np

from jaxseg.decoding import branch_overlaps
from jaxseg.decoding import labels as labels_lib


@numba.njit(cache=True, nogil=True)
def _union(parent, x, y):
  rx = labels_lib.find_root(parent, x)
  ry = labels_lib.find_root(parent, y)
  if rx == ry:
    return False
  if rx < ry:  # the least index stays root (labels.py's convention)
    parent[ry] = rx
  else:
    parent[rx] = ry
  return True


@numba.njit(cache=True, nogil=True)
def _branch_stages(
  starts,
  row_z,
  node_a,
  node_b,
  s0,
  s1,
  ov,
  gate,
  first_z,
  last_z,
  iou_threshold,
  size_ratio,
  best_buddy,
  one_sided_threshold,
  one_sided_min_size,
  out_a,
  out_b,
):
  n_nodes = first_z.shape[0]
  parent = np.arange(n_nodes)
  n_groups = starts.shape[0] - 1
  n_out = 0
  rows = row_z.shape[0]
  relaxed = np.zeros(rows, np.bool_)
  strict = np.zeros(rows, np.bool_)
  for r in range(rows):
    ends = last_z[node_a[r]] == row_z[r]
    begins = first_z[node_b[r]] == row_z[r] + 1
    relaxed[r] = ends or begins
    strict[r] = ends and begins

  # Stage 1: IoU, then size ratio, slice pair by slice pair.
  stamp = np.zeros(n_nodes, np.int64)  # stamp[i] == g + 1: i joined by IoU in slice pair g
  for g in range(n_groups):
    for r in range(starts[g], starts[g + 1]):
      if not (relaxed[r] and gate[r]):
        continue
      denom = np.float64(s0[r] + s1[r] - ov[r])
      if denom == 0.0:
        denom = 1.0
      if ov[r] / denom >= iou_threshold and _union(parent, node_a[r], node_b[r]):
        stamp[node_a[r]] = g + 1
        stamp[node_b[r]] = g + 1
        out_a[n_out] = node_a[r]
        out_b[n_out] = node_b[r]
        n_out += 1
    if size_ratio > 0:
      for r in range(starts[g], starts[g + 1]):
        if not (relaxed[r] and gate[r]):
          continue
        if stamp[node_a[r]] == g + 1 and stamp[node_b[r]] == g + 1:
          continue
        ratio = s0[r] / np.float64(max(s1[r], 1))
        in_range = ratio >= size_ratio and ratio <= 1.0 / size_ratio
        if in_range and _union(parent, node_a[r], node_b[r]):
          out_a[n_out] = node_a[r]
          out_b[n_out] = node_b[r]
          n_out += 1

  # Stage 2: mutual best overlap between the current sets, at strict boundaries.
  if best_buddy:
    fwd_stamp = np.zeros(n_nodes, np.int64)
    bwd_stamp = np.zeros(n_nodes, np.int64)
    fwd_row = np.zeros(n_nodes, np.int64)
    bwd_row = np.zeros(n_nodes, np.int64)
    for g in range(n_groups):
      lo, hi = starts[g], starts[g + 1]
      root_a = np.empty(hi - lo, np.int64)
      root_b = np.empty(hi - lo, np.int64)
      keys = np.empty(hi - lo, np.int64)  # sets with a forward best, in order of first row
      n_keys = 0
      for r in range(lo, hi):
        root_a[r - lo] = labels_lib.find_root(parent, node_a[r])
        root_b[r - lo] = labels_lib.find_root(parent, node_b[r])
      for r in range(lo, hi):
        ra, rb = root_a[r - lo], root_b[r - lo]
        if not strict[r] or ra == rb:
          continue
        if fwd_stamp[ra] != g + 1:
          fwd_stamp[ra] = g + 1
          fwd_row[ra] = r
          keys[n_keys] = ra
          n_keys += 1
        elif ov[r] > ov[fwd_row[ra]]:  # strictly larger: the first of equal rows wins
          fwd_row[ra] = r
        if bwd_stamp[rb] != g + 1 or ov[r] > ov[bwd_row[rb]]:
          bwd_stamp[rb] = g + 1
          bwd_row[rb] = r
      for k in range(n_keys):
        ra = keys[k]
        r = fwd_row[ra]
        rb = root_b[r - lo]
        mutual = bwd_stamp[rb] == g + 1 and root_a[bwd_row[rb] - lo] == ra
        if mutual and gate[r] and _union(parent, ra, rb):
          out_a[n_out] = ra
          out_b[n_out] = rb
          n_out += 1

  # Stage 3: one-sided overlap, at relaxed boundaries.
  if one_sided_threshold > 0:
    for g in range(n_groups):
      lo, hi = starts[g], starts[g + 1]
      differ = np.empty(hi - lo, np.bool_)  # sets as they were when this slice pair began
      for r in range(lo, hi):
        differ[r - lo] = labels_lib.find_root(parent, node_a[r]) != labels_lib.find_root(
          parent, node_b[r]
        )
      for r in range(lo, hi):
        if not (relaxed[r] and differ[r - lo] and gate[r]):
          continue
        smaller = min(s0[r], s1[r])
        if smaller < one_sided_min_size:
          continue
        contained = ov[r] / np.float64(max(smaller, 1)) >= one_sided_threshold
        if contained and _union(parent, node_a[r], node_b[r]):
          out_a[n_out] = node_a[r]
          out_b[n_out] = node_b[r]
          n_out += 1
  return n_out


def branch_merge_pairs(
  table: branch_overlaps.OverlapTable,
  ids: np.ndarray,
  first_z: np.ndarray,
  last_z: np.ndarray,
  *,
  iou_threshold: float = 0.5,
  size_ratio: float = 0.5,
  best_buddy: bool = True,
  one_sided_threshold: float = 0.8,
  one_sided_min_size: int = 100,
  affinity_threshold: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
  """The three branch-merge stages on a (whole-volume) overlap table.

  Args:
    table: from :func:`branch_overlaps.slice_overlaps` / :func:`branch_overlaps.concat_overlaps`,
      covering the whole volume.
    ids, first_z, last_z: from :func:`branch_overlaps.id_ranges` /
      :func:`branch_overlaps.merge_ranges`, the whole volume.
    iou_threshold: stage 1 IoU threshold.
    size_ratio: stage 1 area-ratio bound (``[r, 1/r]``); 0 disables that half of stage 1.
    best_buddy: run stage 2.
    one_sided_threshold: stage 3 threshold on ov / min(s0, s1); 0 disables stage 3.
    one_sided_min_size: stage 3 needs min(s0, s1) >= this.
    affinity_threshold: mean z-affinity gate on every stage; 0 disables it.

  Returns:
    ``(a, b)`` uint64 id pairs whose union (e.g. :func:`labels.merge_components`) is the merge.

  Raises:
    ValueError: for a gate without z-affinity, or ids of the table missing from ``ids``.
  """
  ids = np.asarray(ids, np.uint64)
  first_z = np.asarray(first_z, np.int64)
  last_z = np.asarray(last_z, np.int64)
  if affinity_threshold > 0 and not table.has_affinity:
    raise ValueError("affinity_threshold > 0 needs an overlap table measured with z_affinity")
  if table.num_rows == 0:
    return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
  node_a = _node_index(ids, table.a)
  node_b = _node_index(ids, table.b)
  s0, s1 = table.pair_areas()
  if affinity_threshold > 0:
    gate = table.aff_sum / np.maximum(table.ov, 1) >= affinity_threshold
  else:
    gate = np.ones(table.num_rows, bool)
  starts = np.flatnonzero(np.r_[True, table.z[1:] != table.z[:-1], True])
  out_a = np.empty(ids.size, np.int64)
  out_b = np.empty(ids.size, np.int64)
  n = _branch_stages(
    starts,
    table.z,
    node_a,
    node_b,
    s0,
    s1,
    table.ov,
    gate,
    first_z,
    last_z,
    float(iou_threshold),
    float(size_ratio),
    bool(best_buddy),
    float(one_sided_threshold),
    int(one_sided_min_size),
    out_a,
    out_b,
  )
  return ids[out_a[:n]], ids[out_b[:n]]


def _node_index(ids: np.ndarray, query: np.ndarray) -> np.ndarray:
  if query.size == 0:
    return np.zeros(0, np.int64)
  pos = np.searchsorted(ids, query)
  np.minimum(pos, max(ids.size - 1, 0), out=pos)
  if ids.size == 0 or np.any(ids[pos] != query):
    raise ValueError("the overlap table holds ids that the id ranges do not")
  return pos.astype(np.int64)


def branch_merge(
  segmentation: np.ndarray,
  z_affinity: np.ndarray | None = None,
  **settings,
) -> np.ndarray:
  """:func:`branch_merge_pairs` on a whole ``[z, y, x]`` segmentation.

  Args:
    segmentation: ``[z, y, x]`` non-negative integer ids, 0 = background.
    z_affinity: optional ``[z, y, x]`` z-affinity in waterz's layout (needed for the gate).
    **settings: keyword arguments of :func:`branch_merge_pairs`.

  Returns:
    ``[z, y, x]`` ids ``1..K`` in the smallest unsigned dtype, numbered by each merged set's
    smallest original id; 0 stays 0.
  """
  segmentation = branch_overlaps.check_segmentation(segmentation)
  table = branch_overlaps.slice_overlaps(segmentation, z_affinity)
  ids, first_z, last_z = branch_overlaps.id_ranges(segmentation)
  a, b = branch_merge_pairs(table, ids, first_z, last_z, **settings)
  roots = labels_lib.merge_components(ids.size, _node_index(ids, a), _node_index(ids, b))
  new_id, count = labels_lib.compact_roots(roots)
  return labels_lib.apply_lut(
    segmentation, ids, new_id, out_dtype=labels_lib.smallest_uint_dtype(count)
  )
