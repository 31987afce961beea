"""Tests for jaxseg.decoding.graph_agglomeration: region-graph statistics and waterz's merging.

References: plain-Python statistics written from the rule text, and waterz itself (same
fragments, same affinities), on real SNEMI3D geometry (gala_snemi_mini).
"""

import contextlib
import dataclasses
import itertools
import math
import os
import sys

import numpy as np
import pytest
from conftest import SHARED_DATA, require_shared

from jaxseg.decoding import graph_agglomeration as ga
from jaxseg.metrics.rand import adapted_rand

HIS85 = "OneMinus<HistogramQuantileAffinity<RegionGraphType, 85, ScoreValue, 256>>"
HIS50_ALL = "OneMinus<HistogramQuantileAffinity<RegionGraphType, 50, ScoreValue, 256, false>>"
MEAN = "OneMinus<MeanAffinity<RegionGraphType, ScoreValue>>"
THRESHOLDS = [0.1, 0.3, 0.5, 0.6, 0.7, 0.9]


@contextlib.contextmanager
def _quiet_fd1():
  """Silences waterz's C++ std::cout (file descriptor 1)."""
  sys.stdout.flush()
  saved = os.dup(1)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 1)
  try:
    yield
  finally:
    sys.stdout.flush()
    os.dup2(saved, 1)
    os.close(saved)
    os.close(devnull)


def _waterz(aff, fragments, thresholds, function, queue, region_graph=True):
  """waterz.agglomerate on the given fragments: [(segmentation, (u, v, score) or None)]."""
  waterz = pytest.importorskip("waterz")
  out = []
  with _quiet_fd1():
    for item in waterz.agglomerate(
      aff,
      list(thresholds),
      fragments=np.array(fragments, np.uint64, copy=True),  # waterz overwrites it
      scoring_function=function,
      discretize_queue=queue,
      return_region_graph=region_graph,
    ):
      if region_graph:
        seg, rg = item
        graph = (
          np.array([e["u"] for e in rg], np.uint64),
          np.array([e["v"] for e in rg], np.uint64),
          np.array([e["score"] for e in rg], np.float32),
        )
      else:
        seg, graph = item, None
      out.append((seg.copy(), graph))  # the same buffer comes back for every threshold
  return out


def _affinities_from_probability(prob, noise=0.0, seed=0):
  """waterz-convention affinities: min of the two voxels' values (+ clipped Gaussian noise)."""
  aff = np.zeros((3, *prob.shape), np.float32)
  aff[0, 1:] = np.minimum(prob[1:], prob[:-1])
  aff[1, :, 1:] = np.minimum(prob[:, 1:], prob[:, :-1])
  aff[2, :, :, 1:] = np.minimum(prob[:, :, 1:], prob[:, :, :-1])
  if noise:
    rng = np.random.default_rng(seed)
    aff = np.clip(aff + rng.normal(0, noise, aff.shape).astype(np.float32), 0, 1)
  return np.ascontiguousarray(aff, np.float32)


@pytest.fixture(scope="module")
def snemi():
  """(fragments uint64, probability float32) crop of gala_snemi_mini, [16, 96, 96]."""
  tifffile = pytest.importorskip("tifffile")
  root = require_shared(SHARED_DATA / "gala_snemi_mini")
  crop = np.s_[:16, :96, :96]
  fragments = tifffile.imread(root / "train-fragments.tif")[crop].astype(np.uint64)
  prob = tifffile.imread(root / "train-probabilities.tif")[crop].astype(np.float32) / 255
  return np.ascontiguousarray(fragments), prob


def _bin(a, bins):
  if not a > 0:
    return 0
  if a >= 1:
    return bins - 1
  return min(int(np.float32(a) * np.float32(bins)), bins - 1)


def _reference_statistics(fragments, aff, lead=(0, 0, 0), bins=0):
  """Statistics straight from the rule text, one voxel pair at a time (plain Python)."""
  contacts = {}
  depth, height, width = fragments.shape
  for z, y, x in itertools.product(
    range(lead[0], depth), range(lead[1], height), range(lead[2], width)
  ):
    for c, step in enumerate(((1, 0, 0), (0, 1, 0), (0, 0, 1))):
      q = (z - step[0], y - step[1], x - step[2])
      if min(q) < 0:
        continue
      a, b = int(fragments[z, y, x]), int(fragments[q])
      if a == 0 or b == 0 or a == b:
        continue
      contacts.setdefault((min(a, b), max(a, b)), []).append(aff[c, z, y, x])
  rows = {}
  for key in sorted(contacts):
    values = contacts[key]
    mean = np.float32(0)
    for n, a in enumerate(values):  # waterz's float32 running mean, in scan order
      mean = (np.float32(a) + mean * np.float32(n)) / np.float32(n + 1)
    hist = None
    if bins:
      hist = {}
      for a in values:
        hist[_bin(a, bins)] = hist.get(_bin(a, bins), 0) + 1
      hist = dict(sorted(hist.items()))
    amax = max((a for a in values if not math.isnan(a)), default=-np.inf)
    rows[key] = (len(values), mean, np.float32(amax), hist)
  return rows


def _table_rows(table):
  rows = {}
  for i in range(table.num_edges):
    hist = None
    if table.hist_bins:
      lo, hi = table.hist_ptr[i], table.hist_ptr[i + 1]
      hist = dict(
        zip(table.hist_bin[lo:hi].tolist(), table.hist_count[lo:hi].tolist(), strict=True)
      )
    rows[(int(table.u[i]), int(table.v[i]))] = (
      int(table.count[i]),
      table.mean[i],
      table.aff_max[i],
      hist,
    )
  return rows


def _blockwise_table(fragments, aff, block, function):
  """Edge tables of blocks (with one leading context plane where a block has a predecessor)."""
  tables = []
  for start in itertools.product(
    *(range(0, n, b) for n, b in zip(fragments.shape, block, strict=True))
  ):
    lo = [max(0, s - 1) for s in start]
    hi = [min(n, s + b) for s, b, n in zip(start, block, fragments.shape, strict=True)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    lead = [s - a for s, a in zip(start, lo, strict=True)]
    tables.append(ga.edge_statistics(fragments[box], aff[(slice(None), *box)], function, lead))
  return ga.reduce_edges(tables[::-1])  # table order must not matter (but for mean rounding)


# -- parsing --------------------------------------------------------------------------------------


def test_parse_merge_function_forms():
  assert ga.parse_merge_function(MEAN) == ga.MergeFunction("mean")
  assert ga.parse_merge_function(
    " OneMinus< EdgeStatisticValue<RegionGraphType,\n MeanAffinityProvider<RegionGraphType, "
    "ScoreValue> > >"
  ) == ga.MergeFunction("mean")
  his = ga.parse_merge_function(HIS85.replace(" ", ""))
  assert his == ga.MergeFunction("histogram_quantile", 85, 256, True)
  assert not his.needs_histograms
  assert ga.parse_merge_function(his.to_string()) == his
  every = ga.parse_merge_function(HIS50_ALL)
  assert every == ga.MergeFunction("histogram_quantile", 50, 256, False)
  assert every.needs_histograms
  assert ga.parse_merge_function(every) is every
  for unsupported in (
    "OneMinus<QuantileAffinity<RegionGraphType, 85, ScoreValue>>",
    "OneMinus<MeanMaxKAffinity<RegionGraphType, 5, ScoreValue>>",
    "MinSize<RegionGraphType>",
  ):
    with pytest.raises(NotImplementedError, match="MeanAffinity"):
      ga.parse_merge_function(unsupported)


def test_parse_waterz_ops_strings():
  waterz_ops = pytest.importorskip("jaxseg.decoding.waterz_ops")
  function, _ = waterz_ops.scoring_function("aff85_his256")
  assert ga.parse_merge_function(function) == ga.MergeFunction("histogram_quantile", 85, 256)
  function, _ = waterz_ops.scoring_function("mean")
  assert ga.parse_merge_function(function) == ga.MergeFunction("mean")


# -- edge statistics ------------------------------------------------------------------------------


@pytest.mark.parametrize("lead", [(0, 0, 0), (1, 0, 2), (2, 3, 1)])
def test_edge_statistics_match_plain_reference(lead):
  rng = np.random.default_rng(sum(lead))
  fragments = rng.integers(0, 6, (5, 7, 8)).astype(np.uint64) * 3  # ids 0, 3, ..., 15
  fragments[2, 3:6, 2:7] = 2**63 + 5  # an id above 2**63
  aff = rng.random((3, *fragments.shape), dtype=np.float32)
  aff[0, 1, 1, 1] = 1.0  # the last bin
  aff[1, 2, 2, 2] = np.nan  # NaN goes to bin 0 and is skipped by the maximum
  aff[2, 3, 3, 3] = -0.5
  table = ga.edge_statistics(fragments, aff, HIS50_ALL, lead)
  reference = _reference_statistics(fragments, aff, lead, bins=256)
  got = _table_rows(table)
  assert list(got) == list(reference)  # rows sorted by (u, v), unique
  for key, (count, mean, amax, hist) in reference.items():
    count_, mean_, amax_, hist_ = got[key]
    assert count_ == count
    assert mean_ == mean or (np.isnan(mean_) and np.isnan(mean))  # float32, bit for bit
    assert amax_ == amax
    assert hist_ == hist
  assert table.u.dtype == np.uint64 and np.all(table.u < table.v)


def test_edge_statistics_without_histograms_and_small_dtypes():
  fragments = np.array([[[1, 1, 2], [0, 2, 2], [3, 3, 0]]], np.uint8)
  aff = np.full((3, 1, 3, 3), 0.25, np.float32)
  aff[2, 0, 0, 2] = 0.75  # the 1-2 pair along x
  table = ga.edge_statistics(fragments, aff)
  assert table.hist_ptr is None and table.hist_bins == 0
  assert table.u.tolist() == [1, 2] and table.v.tolist() == [2, 3]
  assert table.count.tolist() == [2, 1]
  assert table.aff_max.tolist() == [0.75, 0.25]
  assert table.mean.tolist() == [0.5, 0.25]


@pytest.mark.realdata
def test_blockwise_tables_reduce_to_the_whole_volume(snemi):
  fragments, prob = snemi
  aff = _affinities_from_probability(prob, noise=0.1)
  whole = ga.edge_statistics(fragments, aff, HIS50_ALL)
  joined = _blockwise_table(fragments, aff, (6, 40, 48), HIS50_ALL)
  for name in ("u", "v", "count", "aff_max", "hist_ptr", "hist_bin", "hist_count"):
    np.testing.assert_array_equal(getattr(joined, name), getattr(whole, name), err_msg=name)
  # Means of edges cut by a block face join partial float32 running means: last bits differ.
  np.testing.assert_allclose(joined.mean, whole.mean, rtol=2e-5)
  assert np.mean(joined.mean == whole.mean) > 0.5


def test_edge_statistics_rejects_bad_inputs():
  fragments = np.ones((2, 3, 4), np.uint64)
  with pytest.raises(ValueError, match="does not match"):
    ga.edge_statistics(fragments, np.zeros((3, 2, 3, 3), np.float32))
  with pytest.raises(ValueError, match="lead"):
    ga.edge_statistics(fragments, np.zeros((3, 2, 3, 4), np.float32), lead=(0, -1, 0))
  with pytest.raises(ValueError, match="non-negative"):
    ga.edge_statistics(-fragments.astype(np.int64), np.zeros((3, 2, 3, 4), np.float32))
  with pytest.raises(ValueError, match="bins"):
    table = ga.edge_statistics(fragments, np.zeros((3, 2, 3, 4), np.float32))
    ga.reduce_edges([table, dataclasses.replace(table, hist_bins=256)])


# -- agglomeration --------------------------------------------------------------------------------


def test_hand_built_chain_mean():
  # Fragments 1 | 2 | 3 along x; mean affinity 1-2 = 0.9, 2-3 = 0.4, 1-3 do not touch.
  fragments = np.array([[[1, 1, 2, 2, 3, 3]]], np.uint64)
  aff = np.zeros((3, *fragments.shape), np.float32)
  aff[2, 0, 0, 2] = 0.9
  aff[2, 0, 0, 4] = 0.4
  results = ga.agglomerate_fragments(fragments, aff, [0.5, 0.05, 0.7], MEAN, 0)
  assert [r.threshold for r in results] == [0.05, 0.5, 0.7]
  np.testing.assert_array_equal(results[0].segmentation, fragments)  # 1 - 0.9 = 0.1 >= 0.05
  assert results[0].rg_u.tolist() == [1, 2] and results[0].rg_v.tolist() == [2, 3]
  np.testing.assert_array_equal(results[1].segmentation, [[[1, 1, 1, 1, 3, 3]]])
  assert results[1].rg_u.tolist() == [1] and results[1].rg_v.tolist() == [3]
  assert results[1].rg_score.tolist() == [np.float32(1 - np.float32(0.4))]
  np.testing.assert_array_equal(results[2].segmentation, np.ones_like(fragments))
  assert results[2].rg_u.size == 0


def test_parallel_edges_join_their_histograms():
  # 1 and 3 merge first (score 0); 2 touches both, so its two edges become one whose statistics
  # join (histograms add, means weight by count) and whose score is recomputed when it is popped.
  fragments = np.array([[[2, 2, 2], [1, 3, 3], [1, 1, 3]]], np.uint64)
  aff = np.zeros((3, *fragments.shape), np.float32)
  aff[2, 0, 1, 1] = 1.0  # 1-3
  aff[2, 0, 2, 2] = 1.0  # 1-3
  aff[1, 0, 1, 0] = 0.2  # 1-2
  aff[1, 0, 1, 1] = 0.8  # 3-2
  aff[1, 0, 1, 2] = 0.7  # 3-2
  for function, queue in itertools.product((HIS85, HIS50_ALL, MEAN), (0, 256)):
    ours = ga.agglomerate_fragments(
      fragments, aff, THRESHOLDS, function, queue, requeue_on_extract=True
    )
    theirs = _waterz(aff, fragments, THRESHOLDS, function, queue)
    for mine, (seg, (u, v, score)) in zip(ours, theirs, strict=True):
      np.testing.assert_array_equal(mine.segmentation, seg)
      np.testing.assert_array_equal(mine.rg_u, u)
      np.testing.assert_array_equal(mine.rg_v, v)
      np.testing.assert_array_equal(mine.rg_score, score)


@pytest.mark.realdata
@pytest.mark.parametrize(
  ("function", "queue", "noise", "region_graph"),
  [
    (HIS85, 256, 0.0, True),  # quantised affinities: many exact ties
    (HIS85, 256, 0.1, True),
    (HIS85, 0, 0.0, True),
    (HIS85, 256, 0.1, False),
    (HIS50_ALL, 256, 0.1, True),
    (HIS50_ALL, 0, 0.0, True),
    (MEAN, 0, 0.0, True),
    (MEAN, 256, 0.1, True),
    (MEAN, 0, 0.1, False),
  ],
)
def test_matches_waterz_whole_volume(snemi, function, queue, noise, region_graph):
  fragments, prob = snemi
  aff = _affinities_from_probability(prob, noise)
  ours = ga.agglomerate_fragments(
    fragments, aff, THRESHOLDS, function, queue, requeue_on_extract=region_graph
  )
  theirs = _waterz(aff, fragments, THRESHOLDS, function, queue, region_graph)
  segment_counts = []
  for mine, (seg, graph) in zip(ours, theirs, strict=True):
    np.testing.assert_array_equal(mine.segmentation, seg)  # ids included, bit for bit
    if graph is not None:
      np.testing.assert_array_equal(mine.rg_u, graph[0])
      np.testing.assert_array_equal(mine.rg_v, graph[1])
      np.testing.assert_array_equal(mine.rg_score, graph[2])
    segment_counts.append(np.unique(seg).size)
  assert segment_counts[0] > segment_counts[-1]  # the thresholds really merge something


@pytest.mark.realdata
@pytest.mark.parametrize(("function", "queue"), [(HIS85, 256), (MEAN, 0)])
def test_default_equals_one_waterz_call_per_threshold(snemi, function, queue):
  fragments, prob = snemi
  aff = _affinities_from_probability(prob, noise=0.05)
  ours = ga.agglomerate_fragments(fragments, aff, THRESHOLDS[1:4], function, queue)
  for mine in ours:
    [(seg, (u, v, score))] = _waterz(aff, fragments, [mine.threshold], function, queue)
    np.testing.assert_array_equal(mine.segmentation, seg)
    np.testing.assert_array_equal(mine.rg_u, u)
    np.testing.assert_array_equal(mine.rg_v, v)
    np.testing.assert_array_equal(mine.rg_score, score)


@pytest.mark.realdata
def test_region_graph_extraction_changes_waterz_results(snemi):
  """waterz's getRegionGraph re-queues stale edges: later thresholds merge less."""
  fragments, prob = snemi
  aff = _affinities_from_probability(prob)
  requeued = ga.agglomerate_fragments(
    fragments, aff, THRESHOLDS, HIS85, 256, requeue_on_extract=True
  )
  plain = ga.agglomerate_fragments(fragments, aff, THRESHOLDS, HIS85, 256)
  np.testing.assert_array_equal(requeued[0].segmentation, plain[0].segmentation)
  assert any(
    not np.array_equal(a.segmentation, b.segmentation) for a, b in zip(requeued, plain, strict=True)
  )


@pytest.mark.realdata
@pytest.mark.parametrize("function", [HIS85, HIS50_ALL, MEAN])
def test_blockwise_statistics_reproduce_waterz(snemi, function):
  fragments, prob = snemi
  aff = _affinities_from_probability(prob, noise=0.1)
  node_ids = np.unique(fragments)
  node_ids = node_ids[node_ids > 0]
  table = _blockwise_table(fragments, aff, (6, 40, 48), function)
  levels = ga.agglomerate_graph(node_ids, table, THRESHOLDS, function, 256)
  theirs = _waterz(aff, fragments, THRESHOLDS, function, 256, region_graph=False)
  for level, (seg, _) in zip(levels, theirs, strict=True):
    ours = node_ids[level.roots][np.searchsorted(node_ids, fragments)]
    ours[fragments == 0] = 0
    if function != MEAN:
      np.testing.assert_array_equal(ours, seg)  # histograms join exactly across blocks
    else:
      # Cross-block means can differ from waterz's whole-volume running mean in the last float32
      # bits (see the module docstring), which may reorder near-ties.
      assert adapted_rand(seg.astype(np.int64), ours.astype(np.int64)).error < 1e-3


def test_isolated_nodes_empty_graph_and_duplicate_thresholds():
  node_ids = np.array([4, 9, 11], np.uint64)
  empty = ga.edge_statistics(np.zeros((1, 2, 2), np.uint64), np.zeros((3, 1, 2, 2), np.float32))
  levels = ga.agglomerate_graph(node_ids, empty, [0.5, 0.5], HIS85, 256)
  assert len(levels) == 2
  for level in levels:
    assert level.roots.tolist() == [0, 1, 2] and level.rg_u.size == 0
  table = ga.EdgeTable(
    u=np.array([9], np.uint64),
    v=np.array([11], np.uint64),
    count=np.array([3]),
    mean=np.array([0.8], np.float32),
    aff_max=np.array([0.9], np.float32),
  )
  levels = ga.agglomerate_graph(node_ids, table, [0.1, 0.3, 0.3], MEAN, 0)
  assert [lv.roots.tolist() for lv in levels] == [[0, 1, 2], [0, 1, 1], [0, 1, 1]]
  assert levels[0].rg_u.tolist() == [9] and levels[0].rg_v.tolist() == [11]


def test_agglomerate_graph_rejects_bad_inputs():
  table = ga.EdgeTable(
    u=np.array([2, 1], np.uint64),
    v=np.array([3, 3], np.uint64),
    count=np.ones(2, np.int64),
    mean=np.ones(2, np.float32),
    aff_max=np.ones(2, np.float32),
  )
  nodes = np.array([1, 2, 3], np.uint64)
  with pytest.raises(ValueError, match="sorted"):
    ga.agglomerate_graph(nodes, table, [0.5], MEAN, 0)
  good = ga.reduce_edges([table])
  assert good.u.tolist() == [1, 2]
  with pytest.raises(ValueError, match="node_ids"):
    ga.agglomerate_graph(np.array([1, 2], np.uint64), good, [0.5], MEAN, 0)
  with pytest.raises(ValueError, match="sorted"):
    ga.agglomerate_graph(nodes[::-1], good, [0.5], MEAN, 0)
  with pytest.raises(ValueError, match="discretize_queue"):
    ga.agglomerate_graph(nodes, good, [0.5], MEAN, 70000)
  with pytest.raises(ValueError, match="histograms"):
    ga.agglomerate_graph(nodes, good, [0.5], HIS50_ALL, 256)
  with pytest.raises(NotImplementedError):
    ga.agglomerate_graph(nodes, good, [0.5], "OneMinus<MaxAffinity<RegionGraphType, X>>", 0)
