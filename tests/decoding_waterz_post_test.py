"""Tests for jaxseg.decoding.waterz_post: bit-for-bit the sequential SNEMI post-processing.

The reference is the pipeline the decoder ran before: ``dust.dust_merge`` ->
``branch_merge.branch_merge`` -> ``labels.relabel_sequential`` on whole volumes. Inputs: many
small random segmentations and region graphs, and waterz itself on a generated Voronoi volume and
on real SNEMI3D-derived probabilities.
"""

import dataclasses

import numba
import numpy as np
import pytest

from jaxseg.data.affinity import compute_affinities
from jaxseg.decoding import branch_merge, branch_overlaps, dust, labels, waterz_post
from jaxseg.decoding.settings import BranchMergeSettings, DustSettings

UNIT_ZYX = ((1, 0, 0), (0, 1, 0), (0, 0, 1))
SNEMI_BRANCH = BranchMergeSettings(
  iou_threshold=0.5,
  size_ratio=(0.5, 2.0),
  best_buddy=True,
  one_sided_threshold=0.8,
  one_sided_min_size=100,
  affinity_threshold=0.0,
)


def _sequential(
  seg, rg_u, rg_v, rg_score, *, threshold, z_affinity, dust_settings, branch, min_size
):
  """The decoder's former per-threshold loop, stage after stage on whole volumes."""
  if dust_settings is not None:
    seg = dust.dust_merge(
      seg,
      rg_u,
      rg_v,
      rg_score,
      threshold=threshold,
      size=dust_settings.size,
      affinity=dust_settings.affinity,
      remove_size=dust_settings.remove_size,
    )
  if branch is not None:
    seg = branch_merge.branch_merge(seg, z_affinity, **branch.as_kwargs())
  return labels.relabel_sequential(seg, min_size=min_size)[0]


def _check(seg, rg_u, rg_v, rg_score, **kwargs):
  """Asserts postprocess == the sequential pipeline (values and dtype); returns the result."""
  want = _sequential(seg, rg_u, rg_v, rg_score, **kwargs)
  got = waterz_post.postprocess(
    seg,
    rg_u,
    rg_v,
    rg_score,
    threshold=kwargs["threshold"],
    z_affinity=kwargs["z_affinity"],
    dust=kwargs["dust_settings"],
    branch_merge=kwargs["branch"],
    min_size=kwargs["min_size"],
  )
  assert got.dtype == want.dtype
  np.testing.assert_array_equal(got, want)
  return got


def _random_segmentation(rng, dtype=np.uint64):
  """A small blocky volume with ragged edges (partial overlaps between slices)."""
  shape = tuple(int(s) for s in rng.integers(1, 9, 3))
  n = int(rng.integers(1, 12))
  coarse = rng.integers(0, n + 1, (shape[0], shape[1] // 3 + 1, shape[2] // 3 + 1))
  seg = np.kron(coarse, np.ones((1, 3, 3), np.int64))[:, : shape[1], : shape[2]]
  noise = rng.random(shape) < 0.15
  seg[noise] = rng.integers(0, n + 1, int(noise.sum()))
  return seg.astype(dtype)


def _random_settings(rng):
  dust_settings = None
  if rng.random() < 0.7:
    dust_settings = DustSettings(
      size=int(rng.integers(1, 40)),
      affinity=float(rng.choice([0.0, 0.3, 0.6])),
      remove_size=int(rng.integers(0, 10)),
    )
  branch = None
  if rng.random() < 0.7:
    ratio = [(0.0, np.inf), (0.5, 2.0), (0.8, 1.25)][int(rng.integers(3))]
    branch = BranchMergeSettings(
      iou_threshold=float(rng.choice([0.3, 0.5, 0.7])),
      size_ratio=ratio,
      best_buddy=bool(rng.random() < 0.5),
      one_sided_threshold=float(rng.choice([0.0, 0.6, 0.8])),
      one_sided_min_size=int(rng.choice([1, 4, 12])),
      affinity_threshold=float(rng.choice([0.0, 0.0, 0.4, 0.5])),  # the gate half the time
    )
  return dust_settings, branch, int(rng.choice([0, 1, 2, 5, 20]))


@pytest.mark.parametrize("seed", range(6))
def test_random_volumes_and_graphs_match_the_sequential_pipeline(seed):
  rng = np.random.default_rng(seed)
  changed = {"dust": 0, "branch": 0}
  for trial in range(60):
    seg = _random_segmentation(rng)
    if trial % 7 == 0:  # sparse ids: the np.unique path instead of dense tables
      seg = seg.astype(np.uint64) * np.uint64(2**40 + 7)
    # Edges between present ids, plus absent ids and 0 (skipped); scores with many ties.
    pool = np.concatenate([np.unique(seg), [0, 12345]]).astype(np.uint64)
    n_edges = int(rng.integers(0, 30))
    rg_u, rg_v = rng.choice(pool, n_edges), rng.choice(pool, n_edges)
    rg_score = rng.choice(np.linspace(0, 1, 11).astype(np.float32), n_edges)
    threshold = float(rng.choice([0.0, 0.2, 0.5]))
    z_affinity = rng.random(seg.shape).astype(np.float32)
    dust_settings, branch, min_size = _random_settings(rng)
    out = _check(
      seg,
      rg_u,
      rg_v,
      rg_score,
      threshold=threshold,
      z_affinity=z_affinity,
      dust_settings=dust_settings,
      branch=branch,
      min_size=min_size,
    )
    n_in = np.unique(seg[seg > 0]).size
    if dust_settings is not None and np.unique(out[out > 0]).size < n_in:
      changed["dust"] += 1
    if branch is not None and dust_settings is None and min_size < 2 and out.max() < n_in:
      changed["branch"] += 1
  # The cases exercise the merges, so equality is not the trivial "nothing happened".
  assert changed["dust"] >= 5 and changed["branch"] >= 2, changed


def test_each_stage_alone_and_none():
  rng = np.random.default_rng(11)
  seg = _random_segmentation(rng)
  while seg.shape[0] < 3 or np.unique(seg).size < 5:
    seg = _random_segmentation(rng)
  ids = np.unique(seg[seg > 0]).astype(np.uint64)
  rg = (ids[:-1], ids[1:], np.full(ids.size - 1, 0.4, np.float32))
  z_affinity = rng.random(seg.shape).astype(np.float32)
  small_dust = DustSettings(size=30, affinity=0.3, remove_size=5)
  branch = dataclasses.replace(SNEMI_BRANCH, one_sided_min_size=2)
  for dust_settings, branch_settings in [(None, None), (small_dust, None), (None, branch)]:
    for min_size in (0, 10):
      kwargs = dict(dust_settings=dust_settings, branch=branch_settings, min_size=min_size)
      _check(seg, *rg, threshold=0.3, z_affinity=z_affinity, **kwargs)
  # Neither stage and no size filter: the scan-order relabelling alone.
  out = waterz_post.postprocess(
    seg, None, None, None, threshold=0.5, z_affinity=None, dust=None, branch_merge=None
  )
  np.testing.assert_array_equal(out, labels.relabel_sequential(seg)[0])


def test_empty_and_all_background_volumes():
  for seg in (np.zeros((0, 4, 4), np.uint64), np.zeros((2, 3, 3), np.uint64)):
    out = waterz_post.postprocess(
      seg,
      np.zeros(0, np.uint64),
      np.zeros(0, np.uint64),
      np.zeros(0, np.float32),
      threshold=0.5,
      z_affinity=np.zeros(seg.shape, np.float32),
      dust=DustSettings(800, 0.3, 600),
      branch_merge=SNEMI_BRANCH,
      min_size=3,
    )
    assert out.shape == seg.shape and out.dtype == np.uint8 and not out.any()


def test_threaded_chunks_give_the_same_result(monkeypatch):
  rng = np.random.default_rng(5)
  seg = np.kron(rng.integers(0, 40, (6, 6, 6)), np.ones((1, 4, 4), np.int64)).astype(np.uint64)
  z_affinity = rng.random(seg.shape).astype(np.float32)
  ids = np.unique(seg[seg > 0])
  rg = (ids[:-1], ids[1:], rng.random(ids.size - 1).astype(np.float32))
  gate = dataclasses.replace(SNEMI_BRANCH, one_sided_min_size=4, affinity_threshold=0.45)
  kwargs = dict(threshold=0.0, z_affinity=z_affinity, dust=DustSettings(40, 0.3, 10))
  serial = waterz_post.postprocess(seg, *rg, **kwargs, branch_merge=gate, min_size=20)
  serial_table = branch_overlaps.slice_overlaps(seg, z_affinity)
  # Chunks of 1 voxel and 3 threads: the slabs / chunks code paths run even on one core.
  monkeypatch.setattr(branch_overlaps, "MIN_VOXELS_PER_THREAD", 1)
  monkeypatch.setattr(numba, "get_num_threads", lambda: 3)
  threaded = waterz_post.postprocess(seg, *rg, **kwargs, branch_merge=gate, min_size=20)
  np.testing.assert_array_equal(threaded, serial)
  threaded_table = branch_overlaps.slice_overlaps(seg, z_affinity)
  for field in ("z", "a", "b", "ov", "aff_sum", "area_z", "area_id", "area"):
    np.testing.assert_array_equal(getattr(threaded_table, field), getattr(serial_table, field))
  for got, want in zip(branch_overlaps.id_ranges(seg, 2), _plain_ranges(seg, 2), strict=True):
    np.testing.assert_array_equal(got, want)


def _plain_ranges(seg, z0):
  ids = np.unique(seg[seg > 0])
  first = [z0 + min(z for z in range(seg.shape[0]) if (seg[z] == i).any()) for i in ids]
  last = [z0 + max(z for z in range(seg.shape[0]) if (seg[z] == i).any()) for i in ids]
  return ids, np.array(first), np.array(last)


def test_overlaps_through_a_lut_equal_those_of_the_mapped_volume():
  rng = np.random.default_rng(3)
  for _ in range(30):
    seg = _random_segmentation(rng)
    lut = rng.integers(0, 5, int(seg.max()) + 1).astype(np.uint64)  # lut[0] may be non-zero
    z_affinity = rng.random(seg.shape).astype(np.float32)
    context = bool(rng.random() < 0.3) and seg.shape[0] > 1
    got = branch_overlaps.slice_overlaps(seg, z_affinity, 4, context, lut=lut)
    want = branch_overlaps.slice_overlaps(lut[seg], z_affinity, 4, context)  # uint64
    for field in ("z", "a", "b", "ov", "aff_sum", "area_z", "area_id", "area"):
      np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    if not context:
      for x, y in zip(branch_overlaps.area_ranges(got), _plain_ranges(lut[seg], 4), strict=True):
        np.testing.assert_array_equal(x, y)
  with pytest.raises(ValueError, match="lut"):
    branch_overlaps.slice_overlaps(np.full((2, 2, 2), 7, np.uint64), lut=np.arange(5))


def test_aff_sum_adds_pixels_one_by_one_in_c_order():
  # Affinities over many magnitudes, so the sum's rounding depends on the order of additions.
  rng = np.random.default_rng(0)
  seg = np.stack([np.ones((16, 16), np.uint64), rng.integers(2, 4, (16, 16)).astype(np.uint64)])
  z_affinity = (rng.random(seg.shape) * 10.0 ** rng.integers(-30, 1, seg.shape)).astype(np.float32)
  table = branch_overlaps.slice_overlaps(seg, z_affinity)
  for row in range(table.num_rows):
    total = 0.0  # Python floats: float64, one addition at a time
    for y, x in zip(*np.nonzero(seg[1] == table.b[row]), strict=True):  # C order
      total += float(z_affinity[1, y, x])
    assert table.aff_sum[row] == total


def _voronoi_labels(shape, n_seeds, seed):
  """Nearest-seed labels (z counted 2x), ids 1..n_seeds; no data needed."""
  rng = np.random.default_rng(seed)
  seeds = rng.random((n_seeds, 3)) * np.array(shape)
  grid = np.stack(np.meshgrid(*[np.arange(s) + 0.5 for s in shape], indexing="ij"), -1)
  distance = (((grid[..., None, :] - seeds) * np.array([2.0, 1.0, 1.0])) ** 2).sum(-1)
  return (distance.argmin(-1) + 1).astype(np.int32)


def _waterz_cases(aff, thresholds):
  """Checks every settings combination on waterz's results for ``aff`` (waterz layout)."""
  pytest.importorskip("waterz")
  from jaxseg.decoding import waterz_ops

  results = waterz_ops.agglomerate(
    aff, thresholds, low=0.1, high=0.999, merge_function="aff85_his256"
  )
  snemi_dust = DustSettings(size=800, affinity=0.3, remove_size=600)
  small_dust = DustSettings(size=150, affinity=0.3, remove_size=40)
  gate = dataclasses.replace(SNEMI_BRANCH, affinity_threshold=0.6)
  merged = 0
  for r in results:
    rg = (r.rg_u, r.rg_v, r.rg_score)
    for dust_settings, branch, min_size in [
      (snemi_dust, SNEMI_BRANCH, 0),  # the SNEMI decode
      (small_dust, SNEMI_BRANCH, 0),
      (small_dust, gate, 0),
      (None, SNEMI_BRANCH, 0),
      (small_dust, None, 0),
      (None, None, 50),
      (small_dust, gate, 200),
    ]:
      out = _check(
        r.segmentation,
        *rg,
        threshold=r.threshold,
        z_affinity=aff[0],
        dust_settings=dust_settings,
        branch=branch,
        min_size=min_size,
      )
      merged += int(out.max()) < np.unique(r.segmentation).size - 1
  assert merged > 0  # post-processing did change waterz's output


def test_waterz_on_a_voronoi_volume():
  gt = _voronoi_labels((12, 40, 40), 40, seed=1)
  aff, _ = compute_affinities(gt, UNIT_ZYX, "target")
  noise = np.random.default_rng(2).normal(0.0, 0.25, aff.shape)
  _waterz_cases(np.clip(aff + noise, 0.0, 1.0).astype(np.float32), [0.3, 0.6])


@pytest.mark.realdata
def test_waterz_on_snemi_probabilities(shared_data):
  tifffile = pytest.importorskip("tifffile")
  path = shared_data / "gala_snemi_mini" / "train-probabilities.tif"
  p = tifffile.imread(path)[:12, :80, :80].astype(np.float32) / 255.0  # membranes dark
  aff = np.zeros((3, *p.shape), np.float32)  # waterz layout: edge p - e_c <-> p stored at p
  aff[0, 1:] = np.minimum(p[1:], p[:-1])
  aff[1, :, 1:] = np.minimum(p[:, 1:], p[:, :-1])
  aff[2, :, :, 1:] = np.minimum(p[:, :, 1:], p[:, :, :-1])
  _waterz_cases(aff, [0.3, 0.5])


def test_bad_inputs():
  seg = np.ones((2, 3, 3), np.uint64)
  kwargs = dict(threshold=0.5, z_affinity=None, branch_merge=None)
  with pytest.raises(ValueError, match="region graph"):
    waterz_post.postprocess(seg, None, None, None, dust=DustSettings(800, 0.3, 600), **kwargs)
  with pytest.raises(ValueError, match=r"\[z, y, x\]"):
    waterz_post.postprocess(seg[0], None, None, None, dust=None, **kwargs)
  with pytest.raises(TypeError, match="integer"):
    waterz_post.postprocess(seg * 1.0, None, None, None, dust=None, **kwargs)
  with pytest.raises(ValueError, match="non-negative"):
    waterz_post.postprocess(-seg.astype(np.int64), None, None, None, dust=None, **kwargs)
