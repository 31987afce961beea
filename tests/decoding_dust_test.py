"""Tests for jaxseg.decoding.dust: the rules one by one, a plain-Python reference, real data."""

import numpy as np
import pytest

from jaxseg.decoding import dust


def _reference_dust(segmentation, rg_u, rg_v, rg_score, threshold, size, affinity, remove_size):
  """The spec's dust merge, step by step, with Python dicts."""
  ids, counts = np.unique(segmentation[segmentation > 0], return_counts=True)
  set_size = {int(i): int(c) for i, c in zip(ids, counts, strict=True)}
  parent = {i: i for i in set_size}

  def find(i):
    while parent[i] != i:
      i = parent[i]
    return i

  edges = []
  for u, v, score in zip(rg_u, rg_v, rg_score, strict=True):
    if np.float32(score) >= np.float32(threshold):
      a = np.float32(1.0) - np.float32(score)
      edges.append((-a, min(int(u), int(v)), max(int(u), int(v))))
  for neg_a, u, v in sorted(edges):
    if -neg_a <= np.float32(affinity):
      break
    if u not in parent or v not in parent:
      continue
    ru, rv = find(u), find(v)
    if ru != rv and (set_size[ru] < size or set_size[rv] < size):
      parent[rv] = ru
      set_size[ru] += set_size[rv]
  new_id, next_id = {}, 1
  for i in sorted(parent):  # sets numbered by their smallest member id
    root = find(i)
    if root not in new_id:
      new_id[root] = next_id if set_size[root] >= remove_size else 0
      next_id += new_id[root] > 0
    new_id[i] = new_id[root]
  out = np.zeros(segmentation.shape, np.int64)
  for i, j in new_id.items():
    out[segmentation == i] = j
  return out


def _blocks(sizes):
  """A 1-d 'volume' holding segments 1..len(sizes) with the given voxel counts."""
  return np.repeat(np.arange(1, len(sizes) + 1), sizes).reshape(1, 1, -1)


def _run(segmentation, edges, threshold=0.0, size=800, affinity=0.3, remove_size=600):
  u, v, score = (np.array(x) for x in zip(*edges, strict=True)) if edges else ([], [], [])
  return dust.dust_merge(
    segmentation,
    np.asarray(u, np.uint64),
    np.asarray(v, np.uint64),
    np.asarray(score, np.float32),
    threshold=threshold,
    size=size,
    affinity=affinity,
    remove_size=remove_size,
  )


def _sizes_of(labels):
  return np.bincount(labels.ravel().astype(np.int64))[1:].tolist()


def test_small_segment_joins_strong_neighbour_but_not_at_the_affinity_bound():
  seg = _blocks([1000, 100])
  merged = _run(seg, [(1, 2, 0.2)])  # affinity 0.8 > 0.3, segment 2 < 800 voxels
  assert _sizes_of(merged) == [1100]
  # 1 - 0.7 is 0.3 in float32 exactly at the bound: a > affinity fails, 2 stays and is dust.
  kept = _run(seg, [(1, 2, 0.7)], remove_size=0)
  assert _sizes_of(kept) == [1000, 100]
  assert _sizes_of(_run(seg, [(1, 2, 0.7)])) == [1000]  # 100 < 600: removed


def test_two_large_segments_never_merge():
  seg = _blocks([800, 900])
  assert _sizes_of(_run(seg, [(1, 2, 0.0)])) == [800, 900]
  assert _sizes_of(_run(seg, [(1, 2, 0.0)], size=801)) == [1700]  # 800 < 801 now


def test_edges_below_the_threshold_are_ignored():
  seg = _blocks([1000, 100])
  # waterz's graph holds only scores >= threshold; a lower one is no surviving edge.
  assert _sizes_of(_run(seg, [(1, 2, 0.4)], threshold=0.5, remove_size=0)) == [1000, 100]
  assert _sizes_of(_run(seg, [(1, 2, 0.4)], threshold=0.4, remove_size=0)) == [1100]


def test_size_rule_uses_current_set_sizes():
  # 1 and 2 (500 each) join first; the set is then 1000 >= 800, so the edge 2-3 (3 has 900)
  # no longer qualifies, although segment 2 alone had 500 voxels.
  seg = _blocks([500, 500, 900])
  merged = _run(seg, [(2, 3, 0.2), (1, 2, 0.1)])
  assert _sizes_of(merged) == [1000, 900]
  # Without the first merge, 2 (500) joins 3.
  assert _sizes_of(_run(seg, [(2, 3, 0.2)], remove_size=0)) == [500, 1400]


def test_scan_stops_at_the_first_weak_edge_and_numbering_follows_smallest_ids():
  seg = _blocks([700, 50, 900, 650, 30])
  # 5-4: affinity 0.9 (650 < 800): merge; 2-1: 0.5: merge (700 < 800); 3-5: 0.25 stops the scan.
  merged = _run(seg, [(3, 5, 0.75), (2, 1, 0.5), (5, 4, 0.1)], remove_size=0)
  # Sets {1, 2}, {3}, {4, 5}, numbered in order of their smallest id.
  np.testing.assert_array_equal(merged.ravel(), np.repeat([1, 1, 2, 3, 3], [700, 50, 900, 650, 30]))
  assert merged.dtype == np.uint8
  # remove_size 750: {1, 2} has exactly 750 voxels and stays, {4, 5} (680) goes.
  removed = _run(seg, [(3, 5, 0.75), (2, 1, 0.5), (5, 4, 0.1)], remove_size=750)
  np.testing.assert_array_equal(
    removed.ravel(), np.repeat([1, 1, 2, 0, 0], [700, 50, 900, 650, 30])
  )


def test_background_and_unknown_ids_in_the_graph_are_skipped():
  seg = _blocks([100, 100])
  seg[0, 0, :10] = 0
  merged = _run(seg, [(0, 1, 0.0), (7, 2, 0.0), (1, 2, 0.6)], remove_size=0)
  assert _sizes_of(merged) == [190]  # only the 1-2 edge counts; 0 stays background
  assert (merged[seg == 0] == 0).all()


@pytest.mark.parametrize("seed", range(6))
def test_matches_reference_and_ignores_edge_order(seed):
  rng = np.random.default_rng(seed)
  seg = rng.integers(0, 40, (3, 20, 30))
  seg[seg % 7 == 0] = 0
  n = 120
  u = rng.integers(0, 45, n).astype(np.uint64)
  v = rng.integers(0, 45, n).astype(np.uint64)
  score = (rng.integers(0, 10, n) / 10).astype(np.float32)  # many ties
  kwargs = dict(threshold=0.3, size=int(rng.integers(10, 60)), affinity=0.2, remove_size=25)
  want = _reference_dust(seg, u, v, score, **kwargs)
  got = dust.dust_merge(seg, u, v, score, **kwargs)
  np.testing.assert_array_equal(got, want)
  perm = rng.permutation(n)
  np.testing.assert_array_equal(dust.dust_merge(seg, v[perm], u[perm], score[perm], **kwargs), want)


def test_lut_works_without_a_volume():
  ids = np.array([3, 10, 11], np.uint64)
  new_id, count = dust.dust_merge_lut(
    ids, np.array([900, 5, 700]), [10, 11], [3, 10], [0.1, 0.2], 0.0, 800, 0.3, 0
  )
  # 10 (5) joins 3 (900); then 11 (700) joins that set of 905 as 700 < 800.
  np.testing.assert_array_equal(new_id, [1, 1, 1])
  assert count == 1
  with pytest.raises(ValueError, match="sorted"):
    dust.dust_merge_lut(np.array([3, 2]), np.array([1, 1]), [], [], [], 0.5)


@pytest.mark.realdata
def test_after_waterz_on_real_data(shared_data):
  tifffile = pytest.importorskip("tifffile")
  pytest.importorskip("waterz")
  from jaxseg.data.affinity import compute_affinities
  from jaxseg.decoding import waterz_ops

  labels = tifffile.imread(shared_data / "gala_snemi_mini" / "train-labels.tif")[:16, :96, :96]
  aff, _ = compute_affinities(labels.astype(np.int32), ((1, 0, 0), (0, 1, 0), (0, 0, 1)), "target")
  aff = np.clip(aff + np.random.default_rng(0).normal(0, 0.25, aff.shape), 0, 1).astype(np.float32)
  (result,) = waterz_ops.agglomerate(aff, 0.3, low=0.1, high=0.999, merge_function="aff85_his256")
  args = (result.segmentation, result.rg_u, result.rg_v, result.rg_score)
  cleaned = dust.dust_merge(*args, threshold=0.3)
  np.testing.assert_array_equal(cleaned, _reference_dust(*args, 0.3, 800, 0.3, 600))
  sizes = np.bincount(cleaned.ravel().astype(np.int64))[1:]
  assert sizes.size > 0 and sizes.min() >= 600
  before = np.unique(result.segmentation).size
  assert sizes.size < before - 1  # dust was merged away or removed
