"""Tests for the thresholded connected-components decoder (jaxseg.decoding.cc).

References: NumPy's own ``aff > threshold`` for the edge bits, and a plain-Python breadth-first
flood fill written from the rule text (docs/decoding.md "Connected components") for the
labels; real GT affinities of the gala FIB-SEM crop for the round trip.
"""

import collections
import itertools

import numpy as np
import pytest
from conftest import SHARED_DATA, require_shared

from jaxseg.data.affinity import compute_affinities
from jaxseg.decoding import cc
from jaxseg.metrics.rand import adapted_rand

UNIT_OFFSETS = ((1, 0, 0), (0, 1, 0), (0, 0, 1))
SHAPES = [(3, 4, 5), (1, 6, 7), (5, 1, 1), (1, 1, 9), (4, 3, 1), (2, 2, 2), (6, 5, 4)]


# --------------------------------------------------------------------------------------------
# References.


def _reference_bits(aff, threshold, mask=None):
  """``hard = aff > threshold`` (NISB), bit c = channel c, masked voxels lose their 3 edges."""
  hard = aff > threshold
  bits = (hard[0] | (hard[1].astype(np.uint8) << 1) | (hard[2].astype(np.uint8) << 2)).astype(
    np.uint8
  )
  if mask is not None:
    bits[np.asarray(mask) == 0] = 0
  return bits


def _reference_labels(bits):
  """Flood fill from the rule text, one voxel at a time.

  A voxel seeds a component iff one of its own three forward edges is active (even pointing out of
  the array) or it carries bit 3; from a seed the fill follows active edges whose other end lies
  inside the array, forward (bit c of v) and backward (bit c of v - e_c). Seeds are visited in
  C-order scan, and each new component takes the next id.
  """
  shape = bits.shape
  labels = np.zeros(shape, np.int64)
  next_id = 0
  for seed in itertools.product(*map(range, shape)):
    if labels[seed] or not bits[seed] & 15:
      continue
    next_id += 1
    labels[seed] = next_id
    queue = collections.deque([seed])
    while queue:
      v = queue.popleft()
      for c in range(3):
        forward = list(v)
        forward[c] += 1
        forward = tuple(forward)
        if forward[c] < shape[c] and bits[v] >> c & 1 and not labels[forward]:
          labels[forward] = next_id
          queue.append(forward)
        backward = list(v)
        backward[c] -= 1
        backward = tuple(backward)
        if backward[c] >= 0 and bits[backward] >> c & 1 and not labels[backward]:
          labels[backward] = next_id
          queue.append(backward)
  return labels, next_id


def _random_bits(rng, shape, p_edge, p_bit3=0.05):
  edges = rng.random((3, *shape)) < p_edge
  bits = edges[0] | (edges[1].astype(np.uint8) << 1) | (edges[2].astype(np.uint8) << 2)
  return (bits | ((rng.random(shape) < p_bit3).astype(np.uint8) << 3)).astype(np.uint8)


def _special_values(dtype):
  """Values around every threshold the tests use, plus signed zeros, infinities and NaNs."""
  base = [0.0, -0.0, 0.1, 0.5, 0.7, 1.0, -0.5, -1.0, 1e-8, np.inf, -np.inf, np.nan, -np.nan]
  values = np.array(base, dtype)
  neighbours = [np.nextafter(values, np.array(np.inf, dtype)), np.nextafter(values, -values)]
  return np.concatenate([values, *neighbours])


# --------------------------------------------------------------------------------------------
# edge_bits.


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.1, 0.0, -0.0, -0.5, 1.0, np.inf, -np.inf, 1e6])
def test_edge_bits_equals_numpy_comparison(dtype, threshold):
  rng = np.random.default_rng(0)
  shape = (4, 5, 6)
  aff = rng.choice(_special_values(dtype), size=(3, *shape)).astype(dtype)
  aff[:, 0] = rng.random((3, *shape[1:]))  # plenty of ordinary values too
  mask = rng.random(shape) < 0.8
  with np.errstate(over="ignore"):
    expected = _reference_bits(aff, threshold)
    expected_masked = _reference_bits(aff, threshold, mask)
  np.testing.assert_array_equal(cc.edge_bits(aff, threshold), expected)
  np.testing.assert_array_equal(cc.edge_bits(aff, threshold, mask), expected_masked)


def test_edge_bits_nan_threshold_passes_nothing():
  aff = np.ones((3, 2, 2, 2), np.float16)
  assert not cc.edge_bits(aff, np.nan).any()
  assert not cc.edge_bits(aff.astype(np.float32), np.nan).any()


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_edge_bits_every_float16_pattern(dtype):
  # All 65536 float16 values against thresholds that are and are not float16-representable.
  aff = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(dtype).reshape(1, 4, 128, 128)
  aff = np.concatenate([aff, aff[:, :, ::-1], aff[:, ::-1]])
  for threshold in (0.5, 0.66, float(np.float16(0.66)), -3.3, 65504.0, 7e4, 1e-7):
    with np.errstate(over="ignore"):
      expected = _reference_bits(aff, threshold)
    np.testing.assert_array_equal(cc.edge_bits(aff, threshold), expected, err_msg=str(threshold))


@pytest.mark.parametrize("mask_dtype", [bool, np.uint8])
def test_edge_bits_mask_clears_stored_edges_only(mask_dtype):
  rng = np.random.default_rng(1)
  aff = rng.random((3, 3, 4, 5)).astype(np.float32)
  mask = (rng.random((3, 4, 5)) < 0.7).astype(mask_dtype)
  bits = cc.edge_bits(aff, 0.4, mask)
  np.testing.assert_array_equal(bits, _reference_bits(aff, 0.4, mask))
  assert not bits[mask == 0].any()
  # PyTC's mask: an unmasked voxel keeps its edge into a masked neighbour.
  aff = np.zeros((3, 1, 1, 3), np.float32)
  aff[2, 0, 0, :2] = 1.0  # x-edges 0-1 and 1-2
  bits = cc.edge_bits(aff, 0.5, np.array([[[1, 0, 1]]], mask_dtype))
  np.testing.assert_array_equal(bits, [[[4, 0, 0]]])
  np.testing.assert_array_equal(cc.label_edge_bits(bits)[0], [[[1, 1, 0]]])


def test_edge_bits_strided_input():
  rng = np.random.default_rng(2)
  full = rng.random((3, 8, 9, 10))
  for dtype in (np.float16, np.float32):
    view = full.astype(dtype)[:, 1:7:2, ::-1, 2:9]
    np.testing.assert_array_equal(cc.edge_bits(view, 0.3), _reference_bits(view, 0.3))


def test_edge_bits_rejects_bad_input():
  with pytest.raises(ValueError, match=r"\[3, z, y, x\]"):
    cc.edge_bits(np.zeros((6, 2, 2, 2), np.float32), 0.5)
  with pytest.raises(TypeError, match="float16"):
    cc.edge_bits(np.zeros((3, 2, 2, 2), np.uint8), 0.5)
  with pytest.raises(ValueError, match="mask shape"):
    cc.edge_bits(np.zeros((3, 2, 2, 2), np.float32), 0.5, np.ones((2, 2, 3), bool))


# --------------------------------------------------------------------------------------------
# label_edge_bits.


def test_label_edge_bits_equals_flood_fill_on_random_volumes():
  rng = np.random.default_rng(3)
  shapes = SHAPES + [tuple(rng.integers(1, 8, 3)) for _ in range(60)]
  for trial, shape in enumerate(shapes):
    bits = _random_bits(rng, shape, p_edge=rng.uniform(0.05, 0.9), p_bit3=0.05 * (trial % 2))
    expected, count = _reference_labels(bits)
    # Every z-slab split, so the joins across slab boundaries are exercised on tiny volumes.
    for num_slabs in sorted({1, 2, 3, shape[0]}):
      labels, got_count = cc.label_edge_bits(bits, num_slabs=num_slabs)
      assert labels.dtype == np.uint32
      assert got_count == count, (shape, num_slabs)
      np.testing.assert_array_equal(labels, expected, err_msg=f"{shape} {num_slabs}")


def test_label_edge_bits_foreground_rules():
  # An x-edge from voxel 0 to 1, and voxel 2's x-edge leaving the array: a singleton.
  np.testing.assert_array_equal(
    cc.label_edge_bits(np.array([[[4, 0, 4]]], np.uint8))[0], [[[1, 1, 2]]]
  )
  # Bit 3 alone makes a foreground voxel; bits 4-7 are ignored.
  labels, count = cc.label_edge_bits(np.array([[[16, 8, 0, 8]]], np.uint8))
  np.testing.assert_array_equal(labels, [[[0, 1, 0, 2]]])
  assert count == 2
  # Bit 3 joins nothing by itself, but an edge into the voxel still does.
  np.testing.assert_array_equal(cc.label_edge_bits(np.array([[[4, 8]]], np.uint8))[0], [[[1, 1]]])
  # A voxel reached only by a backward edge is foreground; the z-edge of the last plane is not an
  # edge into anything, its voxel is a singleton.
  bits = np.array([[[1]], [[0]], [[1]]], np.uint8)
  np.testing.assert_array_equal(cc.label_edge_bits(bits, num_slabs=2)[0], [[[1]], [[1]], [[2]]])
  # Nothing active: all background.
  labels, count = cc.label_edge_bits(np.zeros((2, 3, 4), np.uint8))
  assert count == 0 and not labels.any()


def test_label_edge_bits_ids_follow_first_voxel():
  # A U-shaped component whose arms meet late in the scan keeps the id of its first voxel.
  bits = np.zeros((1, 3, 5), np.uint8)
  bits[0, 0, 0] = bits[0, 1, 0] = 2  # left arm down
  bits[0, 0, 2] = 4  # a second component, starts at x = 2
  bits[0, 0, 4] = bits[0, 1, 4] = 2  # right arm down, first voxel after the second component
  bits[0, 2, 0:4] = 4  # bottom row joins the arms
  labels, count = cc.label_edge_bits(bits)
  assert count == 2
  assert labels[0, 0, 0] == labels[0, 0, 4] == labels[0, 2, 2] == 1
  assert labels[0, 0, 2] == labels[0, 0, 3] == 2


def test_label_edge_bits_parallel_slabs_on_a_larger_volume():
  rng = np.random.default_rng(4)
  bits = _random_bits(rng, (48, 40, 36), p_edge=0.45)
  serial, count = cc.label_edge_bits(bits, num_slabs=1)
  for num_slabs in (None, 2, 5, 48):
    labels, got = cc.label_edge_bits(bits, num_slabs=num_slabs)
    assert got == count
    np.testing.assert_array_equal(labels, serial)
  # Ids in scan order: first voxels strictly increase, and sizes add up.
  first = cc.component_first_index(serial, count)
  assert (np.diff(first) > 0).all()
  np.testing.assert_array_equal(serial.ravel()[first], np.arange(1, count + 1))
  sizes = cc.component_sizes(serial, count)
  np.testing.assert_array_equal(sizes, np.bincount(serial.ravel(), minlength=count + 1)[1:])


def test_label_edge_bits_rejects_bad_input():
  with pytest.raises(TypeError, match="uint8"):
    cc.label_edge_bits(np.zeros((2, 2, 2), np.int32))
  with pytest.raises(ValueError, match=r"\[z, y, x\]"):
    cc.label_edge_bits(np.zeros((2, 2), np.uint8))
  labels, count = cc.label_edge_bits(np.zeros((0, 3, 4), np.uint8))
  assert labels.shape == (0, 3, 4) and count == 0


def test_component_statistics():
  labels = np.array([[[0, 2, 2], [1, 0, 3]], [[3, 1, 0], [0, 0, 0]]], np.uint16)
  np.testing.assert_array_equal(cc.component_first_index(labels, 4), [3, 1, 5, -1])
  np.testing.assert_array_equal(cc.component_sizes(labels, 4), [2, 2, 2, 0])
  with pytest.raises(ValueError, match="exceed"):
    cc.component_sizes(labels, 2)
  with pytest.raises(ValueError, match="exceed"):
    cc.component_first_index(labels, 2)
  with pytest.raises(TypeError, match="unsigned"):
    cc.component_sizes(labels.astype(np.int32), 4)


# --------------------------------------------------------------------------------------------
# decode_affinity_cc.


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_decode_equals_flood_fill(dtype):
  rng = np.random.default_rng(5)
  for trial in range(40):
    shape = SHAPES[trial % len(SHAPES)] if trial < 14 else tuple(rng.integers(1, 7, 3))
    aff = rng.random((3, *shape)).astype(dtype)
    threshold = float(rng.choice([0.3, 0.5, 0.66, 0.8]))
    mask = rng.random(shape) < 0.8 if trial % 3 == 0 else None
    expected, _ = _reference_labels(_reference_bits(aff, threshold, mask))
    labels = cc.decode_affinity_cc(aff, threshold, mask)
    assert labels.dtype == np.uint8  # smallest dtype for these counts
    np.testing.assert_array_equal(labels, expected, err_msg=f"{shape} {threshold}")


def test_decode_min_size_keeps_scan_order():
  rng = np.random.default_rng(6)
  aff = rng.random((3, 6, 7, 8)).astype(np.float32)
  expected, count = _reference_labels(_reference_bits(aff, 0.6))
  sizes = np.bincount(expected.ravel(), minlength=count + 1)
  for min_size in (2, 3, 5, 10**6):
    kept = np.flatnonzero(sizes >= min_size)
    kept = kept[kept > 0]
    lut = np.zeros(count + 1, np.int64)
    lut[kept] = np.arange(1, kept.size + 1)
    labels = cc.decode_affinity_cc(aff, 0.6, min_size=min_size)
    np.testing.assert_array_equal(labels, lut[expected], err_msg=str(min_size))
    assert labels.dtype == np.uint8


def test_decode_dtype_grows_with_count():
  # A checkerboard of x-edges: every pair of voxels is its own component (> 255 of them).
  aff = np.zeros((3, 4, 16, 16), np.float32)
  aff[2, :, :, 0::2] = 1.0
  labels = cc.decode_affinity_cc(aff, 0.5)
  assert labels.dtype == np.uint16
  assert labels.max() == 4 * 16 * 8
  np.testing.assert_array_equal(labels[0, 0, :4], [1, 1, 2, 2])


@pytest.fixture(scope="module")
def gala_gt():
  """GT of the gala FIB-SEM test crop, (50, 100, 200) int32, 0 = boundary."""
  h5py = pytest.importorskip("h5py")
  path = require_shared(SHARED_DATA / "gala_fibsem_example" / "test-gt.lzf.h5")
  with h5py.File(path) as f:
    return f["stack"][...]


def _same_partition(a, b):
  """True iff two label arrays (same shape) are equal up to renaming."""
  pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
  return pairs.shape[1] == np.unique(a).size == np.unique(b).size


@pytest.mark.realdata
def test_gt_affinities_decode_to_gt(gala_gt):
  cc3d = pytest.importorskip("cc3d")
  gt = gala_gt
  aff, _ = compute_affinities(gt, UNIT_OFFSETS, "source")
  labels = cc.decode_affinity_cc(aff, 0.5)
  # Foreground = GT voxels with a face neighbour of the same id (isolated voxels are background).
  same_neighbour = np.zeros(gt.shape, bool)
  for axis in range(3):
    lo = [slice(None)] * 3
    hi = [slice(None)] * 3
    lo[axis], hi[axis] = slice(0, -1), slice(1, None)
    edge = (gt[tuple(lo)] == gt[tuple(hi)]) & (gt[tuple(lo)] > 0)
    same_neighbour[tuple(lo)] |= edge
    same_neighbour[tuple(hi)] |= edge
  np.testing.assert_array_equal(labels > 0, same_neighbour)
  # On it, the partition is GT's split into 6-connected pieces (cc3d on the multi-label GT).
  pieces = cc3d.connected_components(gt, connectivity=6)
  assert _same_partition(labels[same_neighbour], pieces[same_neighbour])
  assert adapted_rand(gt, labels).error < 1e-3


@pytest.mark.realdata
def test_noisy_affinities_behave_monotonically(gala_gt):
  gt = gala_gt[:16, :64, :64]
  aff, _ = compute_affinities(gt, UNIT_OFFSETS, "source")
  rng = np.random.default_rng(7)
  noisy = np.clip(aff + rng.normal(0.0, 0.2, aff.shape), 0.0, 1.0).astype(np.float16)
  thresholds = [0.2, 0.4, 0.6, 0.8, 0.9, 0.95]
  results = [cc.decode_affinity_cc(noisy, t) for t in thresholds]
  for lower, higher in itertools.pairwise(results):
    # Exact: fewer active edges, so the foreground shrinks and every component at the higher
    # threshold lies inside one component at the lower threshold.
    assert not (higher > 0)[lower == 0].any()
    fg = higher > 0
    pairs = np.unique(np.stack([higher[fg], lower[fg]]), axis=1)
    assert pairs.shape[1] == np.unique(higher[fg]).size
  # Noise specks come and go, but the large segments only split as the threshold rises.
  large = [int((np.bincount(r.ravel())[1:] >= 20).sum()) for r in results]
  assert large == sorted(large) and large[0] < large[2]
  # Low thresholds merge (precision), high ones split (recall); 0.6 is nearly exact.
  errors = [adapted_rand(gt, r) for r in results]
  precision = [e.precision for e in errors]
  recall = [e.recall for e in errors]
  assert precision == sorted(precision) and precision[0] < 0.5
  assert recall == sorted(recall, reverse=True) and recall[-1] < 0.99
  assert errors[2].error < 1e-3
