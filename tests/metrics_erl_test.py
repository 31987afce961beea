"""Tests for ERL / NERL (jaxseg.metrics.erl): em_erl reference case and hand-built merge logic."""

import time

import numpy as np
import pytest
from conftest import SHARED_DATA, require_shared

from jaxseg.io.skeleton import SkeletonError, Skeletons, load_skeletons
from jaxseg.metrics import (
  erl_from_node_labels,
  expected_run_length,
  lookup_node_labels,
  segments_in_mask,
  voi,
)

DATA = SHARED_DATA
EM_ERL = DATA / "em_erl_testcase"


def _em_erl():
  require_shared(EM_ERL / "gt_graph.npz")
  h5py = pytest.importorskip("h5py")
  skeletons = load_skeletons(EM_ERL / "gt_graph.npz", resolution=(30, 30, 30))
  vols = {}
  for name in ("vol_gt", "vol_pred", "vol_no-mask"):
    with h5py.File(EM_ERL / f"{name}.h5") as f:
      vols[name] = f["main"][...]
  return skeletons, vols


@pytest.mark.realdata
def test_em_erl_funlib_values_and_published_figures():
  skeletons, vols = _em_erl()
  lengths = np.load(EM_ERL / "gt_graph.npz")["skeleton_len"]
  max_erl = np.sum(lengths**2) / np.sum(lengths)
  gt = expected_run_length(skeletons, vols["vol_gt"])
  assert gt.erl_nm == pytest.approx(max_erl, rel=1e-9)
  assert gt.erl_nm == pytest.approx(4166.8, abs=0.1)
  assert gt.nerl == pytest.approx(1.0)
  assert (gt.n_mergers, gt.voi_split, gt.voi_merge) == (0, 0.0, 0.0)
  pred = expected_run_length(skeletons, vols["vol_pred"])
  assert pred.erl_nm == pytest.approx(2952.016, abs=1e-3)
  assert pred.max_erl_nm == pytest.approx(max_erl, rel=1e-9)
  assert pred.nerl == pytest.approx(0.7085, abs=1e-4)
  assert pred.n_split_edges == 1 and pred.n_merged_edges == 0
  # em_erl's own published figures differ by up to ~3.5% from the funlib definition.
  assert gt.erl_nm == pytest.approx(4275, rel=0.04)
  assert pred.erl_nm == pytest.approx(3054, rel=0.04)
  # em_erl's no-merge mask: the axon merged into the masked dendrite loses its run.
  forbidden = segments_in_mask(vols["vol_pred"], vols["vol_no-mask"])
  masked = expected_run_length(skeletons, vols["vol_pred"], no_merge_segments=forbidden)
  assert masked.erl_nm == pytest.approx(1176, rel=0.04)
  assert masked.n_merged_edges > 0


@pytest.mark.realdata
def test_em_erl_lazy_volume_lookup_matches_numpy():
  skeletons, vols = _em_erl()
  io = pytest.importorskip("jaxseg.io")
  vol = io.open_volume(f"{EM_ERL / 'vol_pred.h5'}:main")
  direct = lookup_node_labels(vols["vol_pred"], skeletons.voxel_zyx)
  # Small blocks force many separate box reads.
  lazy = lookup_node_labels(vol, skeletons.voxel_zyx, block_shape=(7, 11, 13))
  np.testing.assert_array_equal(lazy, direct)
  assert expected_run_length(skeletons, vol).erl_nm == pytest.approx(2952.016, abs=1e-3)


def _two_chains(n=5, length=10.0):
  """Skeleton 1: nodes 0..n-1 along x at z=0; skeleton 2: nodes n..2n-1 along x at z=2."""
  ids = np.repeat([1, 2], n)
  voxels = np.zeros((2 * n, 3), np.int64)
  voxels[:n, 2] = np.arange(n)
  voxels[n:, 0] = 2
  voxels[n:, 2] = np.arange(n)
  edges = np.array([(i, i + 1) for i in range(n - 1)] + [(n + i, n + i + 1) for i in range(n - 1)])
  return Skeletons(ids, voxels, voxels * 10.0, edges, np.full(len(edges), length))


def test_perfect_and_split():
  sk = _two_chains()
  labels = np.repeat([5, 6], 5)
  r = erl_from_node_labels(sk, labels)
  assert r.erl_nm == pytest.approx(40.0) and r.max_erl_nm == pytest.approx(40.0)
  assert r.nerl == pytest.approx(1.0)
  # Split skeleton 1 after node 1: runs 10 and 20 of its 40 nm.
  labels = np.array([5, 5, 7, 7, 7, 6, 6, 6, 6, 6])
  r = erl_from_node_labels(sk, labels)
  assert r.erl_nm == pytest.approx((10**2 + 20**2 + 40**2) / 80)
  assert r.n_split_edges == 1 and r.n_correct_edges == 7
  # Same segment in two separate runs: c_{s,k} sums per segment id, not per run.
  labels = np.array([5, 5, 7, 5, 5, 6, 6, 6, 6, 6])
  r = erl_from_node_labels(sk, labels)
  assert r.erl_nm == pytest.approx((20**2 + 40**2) / 80)


def test_merge_zeroes_both_skeletons_and_threshold_tolerates_small_contacts():
  sk = _two_chains()
  merged = np.repeat([5, 5], 5)
  r = erl_from_node_labels(sk, merged)
  assert r.erl_nm == 0.0 and r.n_mergers == 2 and r.n_non0_mergers == 2
  assert r.n_merging_segments == 1 and r.n_merged_edges == 8
  # One node of skeleton 2 touching skeleton 1's segment is already a merge at threshold 1 ...
  touch = np.array([5, 5, 5, 5, 5, 5, 6, 6, 6, 6])
  r1 = erl_from_node_labels(sk, touch)
  assert r1.n_mergers == 2
  assert r1.erl_nm == pytest.approx(30**2 / 80)  # only skeleton 2's 6-run (3 edges) survives
  # ... but tolerated at threshold 2; the contact edge itself is still a split.
  r2 = erl_from_node_labels(sk, touch, merge_threshold=2)
  assert r2.n_mergers == 0
  assert r2.erl_nm == pytest.approx((40**2 + 30**2) / 80)
  with pytest.raises(ValueError, match="merge_threshold"):
    erl_from_node_labels(sk, touch, merge_threshold=0)


def test_background_nodes_and_segment_zero_mergers():
  sk = _two_chains()
  labels = np.array([5, 5, 0, 5, 5, 0, 6, 6, 6, 6])
  r = erl_from_node_labels(sk, labels)
  assert r.n_omitted_edges == 3
  # Omitted edges break nothing else: skeleton 1 keeps 20 nm in segment 5 (summed per id).
  assert r.erl_nm == pytest.approx((20**2 + 30**2) / 80)
  # Background on both skeletons counts as a funlib "merger" of segment 0 only.
  assert r.n_mergers == 2 and r.n_non0_mergers == 0 and r.n_merging_segments == 0
  # Node VOI: skeleton id vs predicted id, predicted 0 is an ordinary label.
  want = voi(sk.skeleton_ids, labels)
  assert (r.voi_split, r.voi_merge) == pytest.approx((want.split, want.merge))
  assert r.voi_merge > 0  # segment 0 holds nodes of both skeletons


def test_label_dtypes_and_no_merge_segments():
  sk = _two_chains()
  big = np.repeat(np.array([2**64 - 1, 2**63 + 1], np.uint64), 5)
  assert erl_from_node_labels(sk, big).nerl == pytest.approx(1.0)
  neg = np.repeat(np.array([-5, 6], np.int64), 5)
  assert erl_from_node_labels(sk, neg).nerl == pytest.approx(1.0)
  r = erl_from_node_labels(sk, np.repeat([5, 6], 5), no_merge_segments=[6, 0])
  assert r.erl_nm == pytest.approx(40**2 / 80)


def test_expected_run_length_on_volume_and_bounds_error():
  sk = _two_chains()
  seg = np.zeros((3, 1, 5), np.uint32)
  seg[0] = 5
  seg[2] = 6
  r = expected_run_length(sk, seg)
  assert r.nerl == pytest.approx(1.0)
  with pytest.raises(SkeletonError, match=r"outside seg\.h5 of shape \(z, y, x\) \(2, 1, 5\)"):
    expected_run_length(sk, seg[:2], volume_name="seg.h5")


def test_one_million_nodes_is_fast():
  rng = np.random.default_rng(0)
  n = 1_000_000
  ids = np.repeat(np.arange(1, 1001), 1000)
  voxels = rng.integers(0, 64, (n, 3))
  edges = np.stack([np.arange(n - 1), np.arange(1, n)], 1)
  edges = edges[ids[edges[:, 0]] == ids[edges[:, 1]]]
  sk = Skeletons(ids, voxels, voxels * 10.0, edges, np.ones(len(edges)))
  seg = rng.integers(0, 500, (64, 64, 64)).astype(np.uint64)
  start = time.perf_counter()
  r = expected_run_length(sk, seg)
  assert time.perf_counter() - start < 5.0
  assert r.n_nodes == n and 0 <= r.nerl < 0.01
