"""Tests for jaxseg.decoding.waterz_ops: names, affinity layout, stdout silencing, agglomeration."""

import itertools
import os
import sys

import numpy as np
import pytest

from jaxseg.data.affinity import compute_affinities
from jaxseg.decoding import waterz_ops
from jaxseg.metrics.rand import adapted_rand

waterz = pytest.importorskip("waterz")

UNIT_ZYX = ((1, 0, 0), (0, 1, 0), (0, 0, 1))


def _snemi_labels(shared_data, crop=(slice(None),) * 3):
  tifffile = pytest.importorskip("tifffile")
  return tifffile.imread(shared_data / "gala_snemi_mini" / "train-labels.tif")[crop].astype(
    np.int32
  )


def _noisy_affinities(labels, sigma=0.2, seed=0):
  aff, _ = compute_affinities(labels, UNIT_ZYX, "target")
  noise = np.random.default_rng(seed).normal(0.0, sigma, aff.shape)
  return np.clip(aff + noise, 0.0, 1.0).astype(np.float32)


def _same_partition(x, y):
  """Whether two label volumes are equal up to renaming (0 must map to 0)."""
  pairs = np.unique(np.stack([x.ravel(), y.ravel()]).astype(np.int64), axis=1)
  return (
    np.unique(pairs[0]).size == pairs.shape[1]
    and np.unique(pairs[1]).size == pairs.shape[1]
    and np.all((pairs[0] == 0) == (pairs[1] == 0))
  )


def _coarsens(fine, coarse):
  """Every non-zero segment of ``fine`` lies inside one segment of ``coarse``."""
  pairs = np.unique(np.stack([fine.ravel(), coarse.ravel()]).astype(np.int64), axis=1)
  pairs = pairs[:, pairs[0] > 0]
  return np.unique(pairs[0]).size == pairs.shape[1] and np.all(pairs[1] > 0)


@pytest.mark.parametrize(
  "name, function, queue",
  [
    (
      "aff85_his256",
      "OneMinus<HistogramQuantileAffinity<RegionGraphType, 85, ScoreValue, 256>>",
      256,
    ),
    ("aff50", "OneMinus<QuantileAffinity<RegionGraphType, 50, ScoreValue>>", 0),
    ("aff75_his0", "OneMinus<QuantileAffinity<RegionGraphType, 75, ScoreValue>>", 0),
    ("max10", "OneMinus<MeanMaxKAffinity<RegionGraphType, 10, ScoreValue>>", 0),
    ("mean", "OneMinus<MeanAffinity<RegionGraphType, ScoreValue>>", 0),
    ("mean_aff", "OneMinus<MeanAffinity<RegionGraphType, ScoreValue>>", 0),
    (
      "OneMinus<MinAffinity<RegionGraphType, ScoreValue>>",
      "OneMinus<MinAffinity<RegionGraphType, ScoreValue>>",
      0,
    ),
  ],
)
def test_scoring_function_names(name, function, queue):
  assert waterz_ops.scoring_function(name) == (function, queue)


def test_scoring_function_queue_override_and_errors():
  assert waterz_ops.scoring_function("aff85_his256", 0)[1] == 0
  assert waterz_ops.scoring_function("mean", 256)[1] == 256
  for bad in ("aff85_his", "mean85", "max0", "OneMinus<Mean", "median"):
    with pytest.raises(ValueError, match="known forms"):
      waterz_ops.scoring_function(bad)
  with pytest.raises(ValueError, match="percentile"):
    waterz_ops.scoring_function("aff100_his256")
  with pytest.raises(ValueError, match="discretize_queue"):
    waterz_ops.scoring_function("mean", 70000)


def test_normalized_names_match_waterz_prebuilt_keys():
  from waterz import _codegen

  for name in ("aff85_his256", "aff10_his256", "mean", "aff50"):
    function, _ = waterz_ops.scoring_function(name)
    assert waterz_ops.normalize_scoring_function(function) == _codegen.normalize(function)
  # The SNEMI recipe and mean ship prebuilt; other percentiles need a compiler.
  assert waterz_ops.is_prebuilt(*waterz_ops.scoring_function("aff85_his256"))
  assert waterz_ops.is_prebuilt(*waterz_ops.scoring_function("mean"))
  assert not waterz_ops.is_prebuilt(*waterz_ops.scoring_function("aff87_his256"))


def test_to_waterz_affinities_conventions_and_channel_orders():
  labels = np.random.default_rng(1).integers(0, 3, (4, 5, 6)).astype(np.int32)
  want, _ = compute_affinities(labels, UNIT_ZYX, "target")
  xyz = ((0, 0, 1), (0, 1, 0), (1, 0, 0))
  for offsets in (UNIT_ZYX, xyz):
    for convention in ("source", "target"):
      aff, _ = compute_affinities(labels, offsets, convention)
      got = waterz_ops.to_waterz_affinities(aff.astype(np.float64), offsets, convention)
      assert got.dtype == np.float32 and got.flags.c_contiguous
      np.testing.assert_array_equal(got, want)
  # Negative offsets describe the same edges, stored at the other end.
  negative = ((0, 0, -1), (-1, 0, 0), (0, -1, 0))
  for convention in ("source", "target"):
    aff, _ = compute_affinities(labels, negative, convention)
    np.testing.assert_array_equal(waterz_ops.to_waterz_affinities(aff, negative, convention), want)


def test_to_waterz_affinities_long_range_is_read_as_unit_edges():
  labels = np.random.default_rng(2).integers(0, 3, (6, 7, 8)).astype(np.int32)
  long_xyz = ((0, 0, 3), (0, 3, 0), (2, 0, 0))
  target, _ = compute_affinities(labels, long_xyz, "target")
  source, _ = compute_affinities(labels, long_xyz, "source")
  got_t = waterz_ops.to_waterz_affinities(target, long_xyz, "target")
  got_s = waterz_ops.to_waterz_affinities(source, long_xyz, "source")
  np.testing.assert_array_equal(got_t, got_s)
  # out[c, p] is the long edge ending at p: z channel at (z, y, x) links z - 2 and z.
  z, y, x = 4, 3, 5
  assert got_t[0, z, y, x] == float(labels[z, y, x] == labels[z - 2, y, x] > 0)
  assert got_t[2, z, y, x] == float(labels[z, y, x] == labels[z, y, x - 3] > 0)
  with pytest.raises(ValueError, match="axis"):
    waterz_ops.to_waterz_affinities(target, ((0, 1, 1), (0, 1, 0), (1, 0, 0)), "target")
  with pytest.raises(ValueError, match="once each"):
    waterz_ops.to_waterz_affinities(target, ((0, 0, 1), (0, 0, 2), (1, 0, 0)), "target")


def test_quiet_stdout_silences_file_descriptor_one(capfd):
  print("before", flush=False)
  with waterz_ops.quiet_stdout():
    os.write(1, b"from C++\n")
    print("python inside")
  print("after")
  out = capfd.readouterr().out
  assert "before" in out and "after" in out
  assert "from C++" not in out and "python inside" not in out
  with pytest.raises(RuntimeError), waterz_ops.quiet_stdout():
    raise RuntimeError("restored on errors too")
  os.write(1, b"visible again\n")
  with waterz_ops.quiet_stdout(verbose=True):
    os.write(1, b"verbose\n")
  out = capfd.readouterr().out
  assert "visible again" in out and "verbose" in out
  assert sys.stdout is not None


def test_agglomerate_is_silent_unless_verbose(capfd):
  labels = np.zeros((4, 8, 8), np.int32)
  labels[:, :, :4], labels[:, :, 4:] = 1, 2
  aff, _ = compute_affinities(labels, UNIT_ZYX, "target")
  waterz_ops.agglomerate(aff, [0.5], low=0.1, high=0.999, merge_function="mean")
  assert capfd.readouterr().out == ""
  waterz_ops.agglomerate(aff, [0.5], low=0.1, high=0.999, merge_function="mean", verbose=True)
  assert "merging until" in capfd.readouterr().out


@pytest.mark.realdata
def test_gt_affinities_give_back_the_labels(shared_data):
  labels = _snemi_labels(shared_data)
  aff, _ = compute_affinities(labels, UNIT_ZYX, "target")
  (result,) = waterz_ops.agglomerate(aff, 0.5, low=0.1, high=0.999, merge_function="aff85_his256")
  assert result.segmentation.dtype == np.uint64 and result.segmentation.shape == labels.shape
  # Binary affinities: waterz's fragments are the 6-connected components of each label, and
  # nothing merges across a 0-affinity contact. Voxels with no same-label neighbour stay 0.
  cc3d = pytest.importorskip("cc3d")
  components = cc3d.connected_components(labels, connectivity=6).astype(np.int64)
  sizes = np.bincount(components.ravel())
  components[sizes[components] == 1] = 0
  assert _same_partition(result.segmentation, components)
  error = adapted_rand(labels, result.segmentation).error
  assert error < 0.01  # 0.0044: the crop splits some labels into pieces, and singletons are 0
  assert result.rg_score.dtype == np.float32 and np.all(result.rg_score >= 0.5)
  assert result.rg_u.size == result.rg_v.size == result.rg_score.size > 0


@pytest.mark.realdata
def test_noisy_affinities_merge_monotonically_and_match_single_runs(shared_data):
  labels = _snemi_labels(shared_data, (slice(0, 16), slice(0, 96), slice(0, 96)))
  aff = _noisy_affinities(labels)
  thresholds = [0.7, 0.1, 0.5, 0.3, 0.9]
  results = waterz_ops.agglomerate(
    aff, thresholds, low=0.1, high=0.999, merge_function="aff85_his256"
  )
  assert [r.threshold for r in results] == sorted(thresholds)
  counts = [np.unique(r.segmentation).size for r in results]
  assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
  for fine, coarse in itertools.pairwise(results):
    assert _coarsens(fine.segmentation, coarse.segmentation)
  # Each result equals a separate single-threshold run. (waterz's own multi-threshold pass with
  # region graphs would not: extracting a graph re-queues stale edges and stops later merging
  # early; agglomerate works around that.)
  for result in results:
    (alone,) = waterz_ops.agglomerate(
      aff, [result.threshold], low=0.1, high=0.999, merge_function="aff85_his256"
    )
    np.testing.assert_array_equal(alone.segmentation, result.segmentation)
    np.testing.assert_array_equal(alone.rg_score, result.rg_score)
  # Without region graphs, waterz's own incremental pass gives the same segmentations.
  fast = waterz_ops.agglomerate(
    aff, thresholds, low=0.1, high=0.999, merge_function="aff85_his256", region_graphs=False
  )
  for quick, result in zip(fast, results, strict=True):
    np.testing.assert_array_equal(quick.segmentation, result.segmentation)
    assert quick.rg_u is None and quick.rg_score is None


@pytest.mark.realdata
def test_given_fragments_are_not_modified(shared_data):
  tifffile = pytest.importorskip("tifffile")
  crop = (slice(0, 8), slice(0, 64), slice(0, 64))
  fragments = tifffile.imread(shared_data / "gala_snemi_mini" / "train-fragments.tif")[crop]
  labels = _snemi_labels(shared_data, crop)
  aff = _noisy_affinities(labels, sigma=0.1, seed=3)
  before = fragments.copy()
  results = waterz_ops.agglomerate(
    aff, [0.3, 0.6], low=0.1, high=0.999, merge_function="mean", fragments=fragments
  )
  np.testing.assert_array_equal(fragments, before)
  # waterz itself, one call per threshold (see test_noisy_affinities_... for why).
  reference = [
    next(
      waterz.agglomerate(
        aff,
        [threshold],
        fragments=before.astype(np.uint64),
        return_region_graph=True,
        scoring_function="OneMinus<MeanAffinity<RegionGraphType, ScoreValue>>",
      )
    )
    for threshold in (0.3, 0.6)
  ]
  for result, (seg, rg) in zip(results, reference, strict=True):
    np.testing.assert_array_equal(result.segmentation, seg)
    assert _coarsens(before.astype(np.int64), result.segmentation)
    np.testing.assert_array_equal(result.rg_u, [e["u"] for e in rg])
    np.testing.assert_array_equal(result.rg_score, np.float32([e["score"] for e in rg]))


def test_uncompilable_function_fails_early_with_install_hint(monkeypatch):
  from waterz import _codegen

  monkeypatch.setattr(_codegen, "include_dirs", lambda: [])
  monkeypatch.setattr(waterz_ops, "SYSTEM_INCLUDE_DIRS", ())

  def no_call(*args, **kwargs):
    raise AssertionError("waterz must not be called")

  monkeypatch.setattr(waterz, "agglomerate", no_call)
  aff = np.zeros((3, 2, 3, 4), np.float32)
  with pytest.raises(RuntimeError, match="libboost-dev") as error:
    waterz_ops.agglomerate(aff, [0.5], low=0.1, high=0.9, merge_function="aff87_his256")
  assert "HistogramQuantileAffinity<RegionGraphType, 87" in str(error.value)
  assert "Boost" in str(error.value)
  # A prebuilt variant needs none of it.
  waterz_ops.check_compilable(*waterz_ops.scoring_function("aff85_his256"))
  monkeypatch.setattr(waterz_ops.shutil, "which", lambda name: None)
  with pytest.raises(RuntimeError, match="compiler"):
    waterz_ops.check_compilable(*waterz_ops.scoring_function("max10"))
