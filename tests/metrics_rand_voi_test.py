"""Tests for adapted Rand, VOI and the contingency table (jaxseg.metrics), against references."""

import collections
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse
from conftest import SHARED_DATA, require_shared

from jaxseg.metrics import (
  adapted_rand,
  adapted_rand_from_table,
  centered_crop,
  contingency_table,
  merge_contingency,
  voi,
)
from jaxseg.metrics import contingency as contingency_module

DATA = SHARED_DATA
GALA = DATA / "gala_fibsem_example"


@pytest.fixture(scope="module")
def gala():
  """(gt, watershed) of the gala FIB-SEM test crop, (50, 100, 200) int32."""
  require_shared(GALA / "test-gt.lzf.h5")
  h5py = pytest.importorskip("h5py")
  with h5py.File(GALA / "test-gt.lzf.h5") as f:
    gt = f["stack"][...]
  with h5py.File(GALA / "test-ws.lzf.h5") as f:
    ws = f["stack"][...]
  return gt, ws


def _perturbed(gt, ws):
  """A segmentation with splits (watershed), merges and predicted-0 voxels inside GT foreground."""
  seg = ws.copy()
  seg[(ws % 7) == 0] = ws[(ws % 7) == 0] // 7 * 7 + 1  # merge some superpixels
  seg[10:12] = 0  # unlabelled sections: c > 0 in the SNEMI formula
  return seg


def _snemi_reference(gt, seg):
  """The SNEMI3D adapted Rand formula (docs/metrics.md), evaluated with scipy.sparse.

  n counts every voxel; rows are GT > 0, column 0 (predicted background) is split off as c.
  """
  n = gt.size
  g = gt.ravel().astype(np.int64)
  s = seg.ravel().astype(np.int64)
  p = scipy.sparse.csr_matrix(
    (np.ones(n), (g, s)), shape=(int(g.max()) + 1, int(s.max()) + 1)
  ).tocsc()
  fg = p[1:, :]
  pij = fg[:, 1:]
  c = fg[:, 0].sum()
  a = np.asarray(fg.sum(axis=1)).ravel()
  b = np.asarray(pij.sum(axis=0)).ravel()
  sum_a = np.sum(a**2)
  sum_b = np.sum(b**2) + c / n
  sum_ab = pij.multiply(pij).sum() + c / n
  precision, recall = sum_ab / sum_b, sum_ab / sum_a
  return 1 - 2 * precision * recall / (precision + recall), precision, recall


@pytest.mark.realdata
def test_snemi_matches_direct_formula(gala):
  gt, ws = gala
  for seg in (ws, _perturbed(gt, ws)):
    got = adapted_rand(gt, seg)
    want = _snemi_reference(gt, seg)
    assert got.error == pytest.approx(want[0], rel=1e-12)
    assert got.precision == pytest.approx(want[1], rel=1e-12)
    assert got.recall == pytest.approx(want[2], rel=1e-12)


@pytest.mark.realdata
def test_pairs_matches_skimage(gala):
  skm = pytest.importorskip("skimage.metrics")
  gt, ws = gala
  for seg in (ws, _perturbed(gt, ws)):
    are, sk_prec, sk_rec = skm.adapted_rand_error(gt, seg)
    got = adapted_rand(gt, seg, method="pairs")
    assert got.error == pytest.approx(are, rel=1e-12)
    # skimage names them the other way round (its "prec" divides by GT pairs).
    assert got.recall == pytest.approx(sk_prec, rel=1e-12)
    assert got.precision == pytest.approx(sk_rec, rel=1e-12)


@pytest.mark.realdata
def test_voi_matches_skimage_in_split_merge_order(gala):
  skm = pytest.importorskip("skimage.metrics")
  gt, ws = gala
  for seg in (ws, _perturbed(gt, ws)):
    want_split, want_merge = skm.variation_of_information(gt, seg, ignore_labels=[0])
    got = voi(gt, seg)
    assert got.split == pytest.approx(want_split, rel=1e-10)
    assert got.merge == pytest.approx(want_merge, rel=1e-10)
  # The watershed over-segments: split must dominate, which pins the order down.
  assert voi(gt, ws).split > 5 * voi(gt, ws).merge


def test_voi_semantics():
  gt = np.ones((2, 4, 4), np.uint8)
  halves = np.ones_like(gt)
  halves[:, :, 2:] = 2
  assert voi(gt, halves).split == pytest.approx(1.0)  # one bit: which half
  assert voi(gt, halves).merge == pytest.approx(0.0)
  assert voi(halves, gt).merge == pytest.approx(1.0)
  assert voi(halves, gt).split == pytest.approx(0.0)


def test_perfect_and_relabelled_segmentation():
  rng = np.random.default_rng(0)
  gt = rng.integers(0, 6, (4, 8, 8)).astype(np.int32)
  seg = (gt.astype(np.uint64) * 1000 + 2**63).astype(np.uint64)
  seg[gt == 0] = 0
  for method in ("snemi", "pairs"):
    r = adapted_rand(gt, gt, method=method)
    assert (r.error, r.precision, r.recall) == pytest.approx((0.0, 1.0, 1.0))
    assert adapted_rand(gt, seg, method=method).error == pytest.approx(0.0)
  assert voi(gt, seg).total == pytest.approx(0.0, abs=1e-12)


def test_all_zero_prediction():
  gt = np.zeros((2, 6, 6), np.int64)
  gt[:, :3] = 1
  gt[:, 3:] = 2
  seg = np.zeros_like(gt)
  snemi = adapted_rand(gt, seg)
  # Predicted 0 inside GT = singletons: precision 1, recall ~ 0, error ~ 1.
  assert snemi.precision == pytest.approx(1.0)
  assert snemi.recall < 1e-3
  assert snemi.error > 0.99
  # Pair counting sees one big predicted segment: a pure merge.
  pairs = adapted_rand(gt, seg, method="pairs")
  assert pairs.recall == pytest.approx(1.0)
  assert pairs.precision == pytest.approx((2 * 36 * 35) / (72 * 71))
  assert voi(gt, seg).merge == pytest.approx(1.0)


def test_empty_gt_gives_nan():
  gt = np.zeros((2, 3, 3), np.uint8)
  r = adapted_rand(gt, np.ones_like(gt))
  assert np.isnan(r.error)
  assert voi(gt, np.ones_like(gt)).total == 0.0


def test_dtypes_big_uint64_and_negative_int64():
  rng = np.random.default_rng(1)
  base = rng.integers(0, 5, (3, 10, 10))
  seg_base = (base + rng.integers(0, 2, base.shape)) % 5
  ref = adapted_rand(base.astype(np.int32), seg_base.astype(np.int32), method="pairs")
  ref_voi = voi(base.astype(np.int32), seg_base.astype(np.int32))
  # uint64 ids above 2**63, with 0 kept as 0.
  big = np.where(base > 0, base.astype(np.uint64) + np.uint64(2**63 + 12345), np.uint64(0))
  seg_big = seg_base.astype(np.uint64) * np.uint64(2**61) + np.uint64(7)
  got = adapted_rand(big, seg_big, method="pairs")
  assert got.error == pytest.approx(ref.error, rel=1e-12)
  assert voi(big, seg_big).split == pytest.approx(ref_voi.split, rel=1e-12)
  # int64 with -1 = unlabelled in GT behaves exactly like 0.
  neg = np.where(base > 0, base, -1).astype(np.int64)
  assert adapted_rand(neg, seg_base, method="pairs").error == pytest.approx(ref.error, rel=1e-12)
  assert adapted_rand(neg, seg_base).error == pytest.approx(
    adapted_rand(base, seg_base).error, rel=1e-12
  )
  table = contingency_table(neg, seg_base.astype(np.int8) - 1)
  assert table.gt_ids.dtype == np.int64 and table.gt_ids.min() > 0
  assert table.seg_ids.min() == -1  # negative predictions are ordinary labels
  assert table.n_ignored == int((base == 0).sum())
  big_table = contingency_table(big, seg_big)
  assert big_table.gt_ids.dtype == np.uint64 and big_table.gt_ids.max() > 2**63


def test_contingency_matches_counter():
  rng = np.random.default_rng(2)
  gt = rng.integers(-2, 6, 5000).astype(np.int16)
  seg = rng.integers(0, 9, 5000).astype(np.uint32)
  table = contingency_table(gt, seg)
  want = collections.Counter((int(a), int(b)) for a, b in zip(gt, seg, strict=True) if a > 0)
  got = {
    (int(a), int(b)): int(c)
    for a, b, c in zip(table.gt_ids, table.seg_ids, table.counts, strict=True)
  }
  assert got == want
  assert table.n_total == 5000 and table.n_ignored == int((gt <= 0).sum())
  everything = contingency_table(gt, seg, ignore_gt_nonpositive=False)
  assert everything.counts.sum() == 5000 and everything.n_ignored == 0
  # Tables of parts add up to the table of the whole.
  merged = merge_contingency(
    [contingency_table(gt[:1234], seg[:1234]), contingency_table(gt[1234:], seg[1234:])]
  )
  got = {
    (int(a), int(b)): int(c)
    for a, b, c in zip(merged.gt_ids, merged.seg_ids, merged.counts, strict=True)
  }
  assert got == want and merged.n_ignored == table.n_ignored


def test_threaded_count_equals_serial(monkeypatch):
  rng = np.random.default_rng(3)
  gt = np.repeat(rng.integers(0, 300, 4000), 25).astype(np.uint64)
  seg = (gt * 3 + rng.integers(0, 2, gt.size).astype(np.uint64)).astype(np.uint64)
  serial = contingency_table(gt, seg, num_threads=1)
  monkeypatch.setattr(contingency_module, "_PARALLEL_MIN_SIZE", 10)
  threaded = contingency_table(gt, seg, num_threads=3)

  def key(t):
    return sorted(zip(t.gt_ids.tolist(), t.seg_ids.tolist(), t.counts.tolist(), strict=True))

  assert key(serial) == key(threaded)
  assert serial.n_ignored == threaded.n_ignored


def test_contingency_errors():
  with pytest.raises(ValueError, match="shapes differ"):
    contingency_table(np.zeros((2, 2), int), np.zeros((2, 3), int))
  with pytest.raises(TypeError, match="integers"):
    contingency_table(np.zeros(3, float), np.zeros(3, int))
  empty = contingency_table(np.zeros(0, np.int32), np.zeros(0, np.int32))
  assert empty.counts.size == 0 and empty.n_total == 0
  with pytest.raises(ValueError, match="method"):
    adapted_rand_from_table(empty, method="nope")


def test_centered_crop():
  assert centered_crop((100, 1024, 1024), 0.33) == (slice(25, 75), slice(97, 928), slice(97, 928))
  assert centered_crop((10, 20, 30), 1.0) == (slice(0, 10), slice(0, 20), slice(0, 30))
  crop = centered_crop((3, 10, 20, 30), 0.33)
  assert crop[0] == slice(0, 3)
  kept = np.prod([s.stop - s.start for s in centered_crop((200, 400, 400), 0.2)])
  assert kept / (200 * 400 * 400) == pytest.approx(0.2, rel=0.02)
  # A fraction above the z fraction keeps more z instead of growing y / x past full size.
  z, y, _ = centered_crop((10, 10, 10), 0.8)
  assert (z.stop - z.start, y.stop - y.start) == (8, 10)
  with pytest.raises(ValueError):
    centered_crop((10, 10, 10), 0.0)


@pytest.mark.realdata
def test_crop_changes_only_the_scored_region(gala):
  gt, ws = gala
  crop = centered_crop(gt.shape, 0.33)
  assert adapted_rand(gt, ws, crop_fraction=0.33).error == pytest.approx(
    adapted_rand(gt[crop], ws[crop]).error
  )


def test_metrics_do_not_import_jax():
  code = (
    "import sys, jaxseg.metrics, jaxseg.io.skeleton\n"
    "bad = [m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'flax'))]\n"
    "assert not bad, bad\n"
  )
  subprocess.run([sys.executable, "-c", code], check=True)
