"""Tests for jaxseg.decoding.branch_merge and branch_overlaps: stages by hand, reference, blocks."""

import numpy as np
import pytest

from jaxseg.decoding import branch_merge as bm
from jaxseg.decoding import branch_overlaps as bo

NO_STAGES = dict(iou_threshold=2.0, size_ratio=0.0, best_buddy=False, one_sided_threshold=0.0)


def _reference(seg, z_aff, iou, ratio, best_buddy, os_thr, os_min, aff_thr):
  """The stages as the spec (and PyTC's code) describe them, with dicts, on the whole volume.

  The table keeps rows with a == b, unlike the module, to show that leaving them out is harmless.
  """
  depth = seg.shape[0]
  first, last = {}, {}
  for z in range(depth):
    for i in np.unique(seg[z]):
      if i:
        first.setdefault(int(i), z)
        last[int(i)] = z
  parent = {}

  def find(x):
    while parent.get(x, x) != x:
      x = parent[x]
    return x

  def union(x, y):
    rx, ry = find(x), find(y)
    if rx == ry:
      return False
    parent[ry] = rx
    return True

  tables = []
  for z in range(depth - 1):
    lo, hi = seg[z].ravel(), seg[z + 1].ravel()
    area0 = dict(zip(*np.unique(lo, return_counts=True), strict=True))
    area1 = dict(zip(*np.unique(hi, return_counts=True), strict=True))
    rows = {}
    for p in range(lo.size):
      if lo[p] and hi[p]:
        row = rows.setdefault((int(lo[p]), int(hi[p])), [0, 0.0])
        row[0] += 1
        row[1] += 0.0 if z_aff is None else float(z_aff[z + 1].ravel()[p])
    table = []
    for (a, b), (ov, aff_sum) in sorted(rows.items()):
      ends, begins = last[a] == z, first[b] == z + 1
      gate = aff_thr <= 0 or aff_sum / ov >= aff_thr
      table.append((a, b, area0[a], area1[b], ov, ends or begins, ends and begins, gate))
    tables.append(table)

  for table in tables:  # stage 1
    merged = set()
    for a, b, s0, s1, ov, relaxed, _, gate in table:
      if relaxed and gate and ov / ((s0 + s1 - ov) or 1) >= iou and union(a, b):
        merged |= {a, b}
    if ratio > 0:
      for a, b, s0, s1, _, relaxed, _, gate in table:
        r = s0 / max(s1, 1)
        if relaxed and gate and not (a in merged and b in merged) and ratio <= r <= 1 / ratio:
          union(a, b)
  if best_buddy:  # stage 2
    for table in tables:
      rows = [(find(a), find(b), ov, gate) for a, b, _, _, ov, _, strict, gate in table if strict]
      rows = [r for r in rows if r[0] != r[1]]
      fwd, bwd = {}, {}
      for ra, rb, ov, gate in rows:
        if ra not in fwd or ov > fwd[ra][1]:
          fwd[ra] = (rb, ov, gate)
        if rb not in bwd or ov > bwd[rb][1]:
          bwd[rb] = (ra, ov)
      for ra, (rb, _, gate) in fwd.items():
        if bwd[rb][0] == ra and gate:
          union(ra, rb)
  if os_thr > 0:  # stage 3
    for table in tables:
      start = [find(a) != find(b) for a, b, *_ in table]
      for (a, b, s0, s1, ov, relaxed, _, gate), differ in zip(table, start, strict=True):
        small = min(s0, s1)
        if relaxed and differ and gate and small >= os_min and ov / max(small, 1) >= os_thr:
          union(a, b)
  out = np.zeros(seg.shape, np.int64)
  for i in np.unique(seg[seg > 0]):
    out[seg == i] = find(int(i))
  return out


def _same_partition(x, y):
  pairs = np.unique(np.stack([x.ravel(), y.ravel()]).astype(np.int64), axis=1)
  return (
    np.unique(pairs[0]).size == pairs.shape[1]
    and np.unique(pairs[1]).size == pairs.shape[1]
    and np.all((pairs[0] == 0) == (pairs[1] == 0))
  )


def _n_segments(seg):
  return np.unique(seg[seg > 0]).size


def _stack(*slices):
  return np.stack([np.asarray(s) for s in slices]).astype(np.uint16)


def _slice(shape=(10, 10), **boxes):
  """A slice with rectangles ``id=(y0, y1, x0, x1)`` (later ones on top)."""
  out = np.zeros(shape, np.uint16)
  for name, (y0, y1, x0, x1) in boxes.items():
    out[y0:y1, x0:x1] = int(name[1:])
  return out


def test_stage1_iou_at_a_bbox_boundary():
  # 1 ends at z = 0, 2 starts at z = 1 on the same footprint: IoU 1.
  seg = _stack(_slice(s1=(0, 5, 0, 5)), _slice(s2=(0, 5, 0, 5)), _slice(s2=(0, 5, 0, 5)))
  assert _n_segments(bm.branch_merge(seg, **{**NO_STAGES, "iou_threshold": 0.5})) == 1
  assert _n_segments(bm.branch_merge(seg, **NO_STAGES)) == 2
  # Relaxed is enough: 1 runs on through z = 2, 2 starts at z = 1 and covers 70 of 1's 100 px.
  full = _slice(s1=(0, 10, 0, 10))
  seg = _stack(full, _slice(s1=(0, 10, 0, 10), s2=(3, 10, 0, 10)), full)
  assert _n_segments(bm.branch_merge(seg, **{**NO_STAGES, "iou_threshold": 0.7})) == 1
  assert _n_segments(bm.branch_merge(seg, **{**NO_STAGES, "iou_threshold": 0.71})) == 2


def test_stage1_needs_an_id_to_end_or_begin():
  # 1 and 2 both run through all slices and swap places: IoU 1 between 1 and 2 at every
  # boundary, but neither ends nor begins there.
  a = _slice(s1=(0, 5, 0, 5), s2=(5, 10, 0, 5))
  b = _slice(s2=(0, 5, 0, 5), s1=(5, 10, 0, 5))
  seg = _stack(a, b, a)
  assert _n_segments(bm.branch_merge(seg, iou_threshold=0.5, size_ratio=0.5)) == 2


def test_stage1_size_ratio_merges_low_iou_pairs_unless_both_were_iou_merged():
  # 1 (25 px) ends at z = 0; 2 (20 px) starts at z = 1 and overlaps it by 10 px:
  # IoU 10/35 < 0.5, ratio 1.25 in [0.5, 2].
  seg = _stack(_slice(s1=(0, 5, 0, 5)), _slice(s2=(3, 7, 0, 5)))
  assert _n_segments(bm.branch_merge(seg, **{**NO_STAGES, "iou_threshold": 0.5})) == 2
  merged = bm.branch_merge(seg, **{**NO_STAGES, "iou_threshold": 0.5, "size_ratio": 0.5})
  assert _n_segments(merged) == 1
  assert _n_segments(bm.branch_merge(seg, **{**NO_STAGES, "size_ratio": 0.9})) == 2  # 1.25 > 1/0.9
  # 1 joins 4 and 3 joins 2 by IoU at this boundary; the pair 1-2 (IoU 0.1, ratio 50/60 in
  # range) is then skipped because both of its ids took part in IoU merges here.
  lower = _slice(s1=(0, 5, 0, 10), s3=(5, 10, 0, 10))
  upper = _slice(s4=(0, 4, 0, 10), s2=(4, 10, 0, 10))
  seg = _stack(lower, upper)
  table = bo.slice_overlaps(seg)
  assert table.a.tolist() == [1, 1, 3] and table.b.tolist() == [2, 4, 2]
  assert table.ov.tolist() == [10, 40, 50]
  out = bm.branch_merge(seg, **{**NO_STAGES, "iou_threshold": 0.5, "size_ratio": 0.5})
  assert _n_segments(out) == 2  # {1, 4}, {3, 2}
  assert out[0, 0, 0] == out[1, 0, 0] and out[0, 9, 0] == out[1, 9, 0]


def test_stage2_best_buddies_at_strict_boundaries():
  # 1 (20 px) ends at z = 0; 2 (48 px) starts at z = 1; overlap 12: IoU 0.21, ratio 0.42, one-
  # sided 0.6. Only best-buddy merges them.
  seg = _stack(_slice(s1=(0, 4, 0, 5)), _slice(s2=(1, 7, 2, 10)))
  assert bo.slice_overlaps(seg).ov.tolist() == [9]
  stages = dict(iou_threshold=0.5, size_ratio=0.5, one_sided_threshold=0.8, one_sided_min_size=1)
  assert _n_segments(bm.branch_merge(seg, best_buddy=False, **stages)) == 2
  assert _n_segments(bm.branch_merge(seg, best_buddy=True, **stages)) == 1
  # Near miss: 1 continues to z = 2, so the boundary is only relaxed, not strict.
  seg = _stack(_slice(s1=(0, 4, 0, 5)), _slice(s2=(1, 7, 2, 10)), _slice(s1=(0, 2, 0, 2)))
  seg[1, 9, 9] = 1
  assert _n_segments(bm.branch_merge(seg, best_buddy=True, **stages)) == 2


def test_stage2_takes_the_best_partner_only():
  # 1 ends at z = 0 over 2 (overlap 9), 3 (overlap 4) and 4 (overlap 6); 3's and 4's best
  # partner is 1, but 1's best is 2.
  seg = _stack(_slice(s1=(0, 5, 0, 5)), _slice(s2=(0, 3, 0, 3), s3=(3, 10, 0, 2)))
  seg[1, 3:10, 2:10] = 4
  out = bm.branch_merge(seg, **{**NO_STAGES, "best_buddy": True})
  assert out[0, 0, 0] == out[1, 0, 0] and out[1, 4, 0] != out[0, 0, 0]


def test_stage2_ties_go_to_the_first_row():
  # 1 ends at z = 0 and overlaps 2 and 3 (both starting at z = 1) by 6 px each: its best
  # partner is the first row, (1, 2); 3's best is 1 too, but not mutually.
  seg = _stack(_slice(s1=(0, 6, 0, 2)), _slice(s3=(3, 10, 0, 2), s2=(0, 3, 0, 2)))
  assert bo.slice_overlaps(seg).ov.tolist() == [6, 6]
  out = bm.branch_merge(seg, **{**NO_STAGES, "best_buddy": True})
  assert out[0, 0, 0] == out[1, 0, 0] != out[1, 9, 0]


def test_stage3_one_sided_containment():
  # 2 (100 px) starts at z = 1 inside 1 (400 px), which runs on: relaxed boundary, IoU 0.25,
  # ratio 4, ov / min = 1.
  big = _slice((20, 20), s1=(0, 20, 0, 20))
  small = big.copy()
  small[0:10, 0:10] = 2
  seg = _stack(big, small, big)
  stages = dict(iou_threshold=0.5, size_ratio=0.5, best_buddy=True)
  out = bm.branch_merge(seg, **stages, one_sided_threshold=0.8, one_sided_min_size=100)
  assert _n_segments(out) == 1
  # Near miss: min(s0, s1) = 100 is below a minimum size of 101.
  out = bm.branch_merge(seg, **stages, one_sided_threshold=0.8, one_sided_min_size=101)
  assert _n_segments(out) == 2
  out = bm.branch_merge(seg, **stages, one_sided_threshold=0.0, one_sided_min_size=1)
  assert _n_segments(out) == 2


def test_affinity_gate_applies_to_every_stage():
  seg = _stack(_slice(s1=(0, 5, 0, 5)), _slice(s2=(0, 5, 0, 5)))
  z_aff = np.zeros(seg.shape, np.float32)
  z_aff[1, :5, :5] = 0.6
  z_aff[1, 0, 0] = 0.0  # mean over the 25 overlapping pixels: 0.576
  for stage in (
    {"iou_threshold": 0.5},
    {"size_ratio": 0.5},
    {"best_buddy": True},
    {"one_sided_threshold": 0.8, "one_sided_min_size": 1},
  ):
    settings = {**NO_STAGES, **stage}
    assert _n_segments(bm.branch_merge(seg, z_aff, **settings, affinity_threshold=0.57)) == 1
    assert _n_segments(bm.branch_merge(seg, z_aff, **settings, affinity_threshold=0.58)) == 2
  with pytest.raises(ValueError, match="z_affinity"):
    bm.branch_merge(seg, affinity_threshold=0.5)


def _random_volume(rng, shape=(6, 9, 9)):
  """Slices of random coarse blocks with ids from a small pool, so ids start and end anywhere."""
  depth, height, width = shape
  out = np.zeros(shape, np.uint16)
  for z in range(depth):
    grid = rng.integers(0, 7, (3, 3))
    grid[rng.random((3, 3)) < 0.15] = 0
    out[z] = np.kron(grid, np.ones((3, 3), int))[:height, :width]
    # Ragged edges, so overlaps are partial.
    noise = rng.random((height, width)) < 0.2
    out[z][noise] = rng.integers(0, 7, int(noise.sum()))
  return out


@pytest.mark.parametrize("seed", range(12))
def test_matches_plain_python_reference(seed):
  rng = np.random.default_rng(seed)
  seg = _random_volume(rng)
  z_aff = rng.random(seg.shape).astype(np.float32)
  for trial in range(6):
    settings = dict(
      iou_threshold=float(rng.choice([0.3, 0.5, 0.7])),
      size_ratio=float(rng.choice([0.0, 0.5, 0.8])),
      best_buddy=bool(trial % 2),
      one_sided_threshold=float(rng.choice([0.0, 0.6, 0.8])),
      one_sided_min_size=int(rng.choice([1, 4, 12])),
      affinity_threshold=float(rng.choice([0.0, 0.4])),
    )
    want = _reference(seg, z_aff, *settings.values())
    got = bm.branch_merge(seg, z_aff, **settings)
    assert _same_partition(got, want), settings
    assert got.max() == _n_segments(got)  # compact 1..K


def test_blocks_combine_to_the_whole_volume_table():
  rng = np.random.default_rng(7)
  seg = _random_volume(rng, (7, 9, 9)).astype(np.uint64) * 1000  # large, sparse ids
  z_aff = rng.random(seg.shape).astype(np.float32)
  whole = bo.slice_overlaps(seg, z_aff)
  # Blocks along z (each with the next block's first plane as context) and along x.
  tables, ranges = [], []
  for z0, z1 in ((0, 3), (3, 5), (5, 7)):
    for x0, x1 in ((0, 4), (4, 9)):
      context = z1 < seg.shape[0]
      block = seg[z0 : z1 + context, :, x0:x1]
      tables.append(bo.slice_overlaps(block, z_aff[z0 : z1 + context, :, x0:x1], z0, context))
      ranges.append(bo.id_ranges(seg[z0:z1, :, x0:x1], z0))
  combined = bo.concat_overlaps(tables)
  for field in ("z", "a", "b", "ov", "area_z", "area_id", "area"):
    np.testing.assert_array_equal(getattr(combined, field), getattr(whole, field))
  np.testing.assert_allclose(combined.aff_sum, whole.aff_sum, rtol=1e-12)
  for got, want in zip(bo.merge_ranges(ranges), bo.id_ranges(seg), strict=True):
    np.testing.assert_array_equal(got, want)
  settings = dict(one_sided_min_size=3, affinity_threshold=0.3)
  pairs = bm.branch_merge_pairs(combined, *bo.merge_ranges(ranges), **settings)
  want = bm.branch_merge_pairs(whole, *bo.id_ranges(seg), **settings)
  for got_ids, want_ids in zip(pairs, want, strict=True):
    np.testing.assert_array_equal(got_ids, want_ids)
  with pytest.raises(ValueError, match="area"):
    bm.branch_merge_pairs(tables[0], *bo.id_ranges(seg))
  with pytest.raises(ValueError, match="mix"):
    bo.concat_overlaps([whole, bo.slice_overlaps(seg)])


def test_table_contents():
  seg = _stack(_slice((2, 3), s1=(0, 2, 0, 2)), _slice((2, 3), s2=(0, 2, 1, 3)))
  z_aff = np.arange(12, dtype=np.float32).reshape(2, 2, 3) / 10
  table = bo.slice_overlaps(seg, z_aff, z0=5)
  assert table.z.tolist() == [5] and table.a.tolist() == [1] and table.b.tolist() == [2]
  assert table.ov.tolist() == [2]
  np.testing.assert_allclose(table.aff_sum, [z_aff[1, 0, 1] + z_aff[1, 1, 1]])
  assert [s.tolist() for s in table.pair_areas()] == [[4], [4]]
  ids, first_z, last_z = bo.id_ranges(seg, z0=5)
  assert ids.tolist() == [1, 2] and first_z.tolist() == [5, 6] and last_z.tolist() == [5, 6]
  empty = bo.slice_overlaps(np.zeros((1, 3, 3), np.uint8))
  assert empty.num_rows == 0
  assert bm.branch_merge(np.zeros((2, 3, 3), np.uint8)).max() == 0
