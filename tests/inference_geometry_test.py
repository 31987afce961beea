"""Tests for jaxseg.inference.geometry: window starts, blend weights, block plans, padded reads."""

from __future__ import annotations

import itertools
import sys

import numpy as np
import pytest
from scipy import ndimage

from jaxseg.inference import geometry
from jaxseg.inference.geometry import (
  BLEND_MODES,
  blend_weights,
  plan_geometry,
  read_padded,
  stride_for,
  window_starts,
)
from jaxseg.inference.schedule import plan_tasks, task_layout
from jaxseg.io import create_zarr, open_volume

# ---------------------------------------------------------------------------------------------
# Independent references.


def _starts_reference(size, window, stride, snap):
  """Starts by walking the axis one window at a time (no closed forms)."""
  starts = []
  s = 0
  if snap:
    while s + window <= size:
      starts.append(s)
      s += stride
    if starts[-1] + window != size:
      starts.append(size - window)
  else:
    while True:
      starts.append(s)
      if s + window >= size:
        break
      s += stride
  return starts


def _all_windows(g):
  """Every window start of the geometry, in padded coords, as a set of tuples."""
  return set(itertools.product(*(map(int, s) for s in g.starts)))


# ---------------------------------------------------------------------------------------------
# stride_for / window_starts.


def test_module_does_not_import_jax():
  # geometry is host-only; importing it (and its imports) must not pull jax in. Check in a fresh
  # interpreter since other tests may have imported jax already.
  import subprocess

  code = "import sys, jaxseg.inference.geometry; assert 'jax' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True)


def test_stride_for():
  assert stride_for((16, 224, 224), 0.5) == (8, 112, 112)
  assert stride_for((128, 128, 128), 0.5) == (64, 64, 64)
  assert stride_for((4, 10, 3), (0.0, 0.25, 0.9)) == (4, round(7.5), 1)
  with pytest.raises(ValueError, match="overlap"):
    stride_for((4, 4, 4), 1.0)
  with pytest.raises(ValueError, match="overlap"):
    stride_for((4, 4, 4), -0.1)


def test_window_starts_snemi_and_nisb_numbers():
  z = window_starts(116, 16, 8, True)
  assert z.dtype == np.int64
  assert z.tolist() == [*range(0, 97, 8), 100]
  assert window_starts(1280, 224, 112, True).tolist() == [*range(0, 1009, 112), 1056]
  assert window_starts(300, 128, 64, True).tolist() == [0, 64, 128, 172]
  assert window_starts(256, 128, 64, True).tolist() == [0, 64, 128]  # ends exactly: no extra
  assert window_starts(128, 128, 64, True).tolist() == [0]


@pytest.mark.parametrize("snap", [True, False])
def test_window_starts_match_reference_and_cover(snap):
  for size, window, stride in itertools.product(range(1, 40), range(1, 12), range(1, 13)):
    if snap and window > size:
      with pytest.raises(ValueError, match="snap_to_edge"):
        window_starts(size, window, stride, snap)
      continue
    got = window_starts(size, window, stride, snap)
    assert got.tolist() == _starts_reference(size, window, stride, snap), (size, window, stride)
    assert np.all(np.diff(got) > 0)
    covered = np.zeros(size + window, bool)
    for s in got:
      covered[s : s + window] = True
    # stride_for never gives a stride above the window; larger strides leave gaps by design.
    assert covered[:size].all() or stride > window
    if snap:
      assert got[-1] + window == size


def test_window_starts_no_snap_cases():
  assert window_starts(10, 16, 8, False).tolist() == [0]
  assert window_starts(300, 128, 64, False).tolist() == [0, 64, 128, 192]  # last runs past
  assert window_starts(256, 128, 64, False).tolist() == [0, 64, 128]
  with pytest.raises(ValueError):
    window_starts(0, 4, 2, False)


# ---------------------------------------------------------------------------------------------
# blend_weights.


def test_distance_weights():
  w = blend_weights((128, 128, 128), "distance")
  assert w.dtype == np.float32 and w.shape == (128, 128, 128)
  assert w[0, 64, 64] == 1 and w[127, 5, 70] == 1 and w[64, 64, 64] == 64 and w[63, 63, 63] == 64
  assert w.max() == 64 and w.min() == 1
  for shape in [(5, 7, 4), (1, 3, 8), (6, 6, 6)]:
    ref = ndimage.distance_transform_cdt(np.pad(np.ones(shape), 1), "chessboard")[1:-1, 1:-1, 1:-1]
    np.testing.assert_array_equal(blend_weights(shape, "distance"), ref.astype(np.float32))


def test_bump_weights_formula():
  shape = (16, 24, 9)
  w = blend_weights(shape, "bump")
  assert w.dtype == np.float32 and w.shape == shape
  # Per-axis peaks for even n lie off u = 0, so each axis is normalised by its own max.
  ref = np.ones(shape)
  for axis, n in enumerate(shape):
    u = 2 * (np.arange(n) + 1) / (n + 1) - 1
    k = np.exp(-1 / (1 - u * u))
    ref *= (k / k.max()).reshape([-1 if a == axis else 1 for a in range(3)])
  np.testing.assert_allclose(w, ref, rtol=1e-6)
  # By hand, n = 3: u = -1/2, 0, 1/2 -> exp(-4/3) / exp(-1) = exp(-1/3) at both ends.
  edge = np.exp(-1 / 3)
  np.testing.assert_allclose(blend_weights((3, 1, 1), "bump")[:, 0, 0], [edge, 1, edge], rtol=1e-6)
  assert w.max() == pytest.approx(1.0)
  # Symmetric, peaked in the middle; positive even where float32 would underflow.
  np.testing.assert_array_equal(w, w[::-1, ::-1, ::-1])
  big = blend_weights((16, 224, 224), "bump")
  assert big.min() > 0 and np.isfinite(big).all()
  assert big[8, 111, 111] > 0.9


def test_gaussian_and_constant_weights():
  for shape in [(8, 9, 10), (1, 5, 6)]:
    w = blend_weights(shape, "gaussian")
    assert w.dtype == np.float32 and w.shape == shape
    assert w.max() == pytest.approx(1.0) and w.min() > 0
    np.testing.assert_allclose(w, w[::-1, ::-1, ::-1], rtol=1e-6)
    ref = np.ones(shape)
    for axis, n in enumerate(shape):
      g = np.exp(-((np.arange(n) - (n - 1) / 2) ** 2) / (2 * (n / 8) ** 2))
      ref *= (g / g.max()).reshape([-1 if a == axis else 1 for a in range(3)])
    np.testing.assert_allclose(w, np.maximum(ref, 1e-4), rtol=1e-5)
  # Floored at the corners (one axis alone bottoms out near exp(-8), the product far below).
  assert blend_weights((64, 64, 64), "gaussian").min() == pytest.approx(1e-4)
  np.testing.assert_array_equal(blend_weights((2, 3, 4), "constant"), np.ones((2, 3, 4)))
  for mode in BLEND_MODES:
    assert blend_weights((3, 4, 5), mode).min() > 0
  with pytest.raises(ValueError, match="blend mode"):
    blend_weights((3, 4, 5), "hann")


# ---------------------------------------------------------------------------------------------
# plan_geometry.


def _useful(g):
  """The windows (padded starts) that cover at least one output voxel."""
  lo = np.array([c[0] for c in g.crop])
  hi = lo + g.output_shape
  wnd = np.array(g.window)
  return {w for w in _all_windows(g) if np.all(np.array(w) < hi) and np.all(w + wnd > lo)}


def _check_plan(g):
  """Checks every block of ``g`` against brute force over all windows."""
  useful = _useful(g)
  lo = np.array([c[0] for c in g.crop])
  wnd = np.array(g.window)
  tiled = np.zeros(g.output_shape, np.int32)
  owners = {}
  reach = {}  # per axis and block: the furthest end of the windows owned up to that block
  for flat, plan in enumerate(g.blocks()):
    assert plan.flat == flat and plan.index == tuple(np.unravel_index(flat, g.grid))
    assert g.block(plan.index).out_start == plan.out_start
    start, stop = np.array(plan.out_start), np.array(plan.out_stop)
    np.testing.assert_array_equal(
      stop - start,
      np.minimum(g.block_shape, np.array(g.output_shape) - start),
    )
    np.testing.assert_array_equal(start, np.array(plan.index) * g.block_shape)
    tiled[tuple(slice(a, b) for a, b in zip(start, stop, strict=True))] += 1
    p0, p1 = start + lo, stop + lo
    assert plan.region_start == tuple(p0) and plan.region_stop == tuple(p1)
    # A useful window belongs to the block its start lies in (the first block per axis also
    # takes those starting before the output).
    first = np.array(plan.index) == 0
    expected = sorted(
      w for w in useful if np.all((np.array(w) >= p0) | first) and np.all(np.array(w) < p1)
    )
    own = sorted(
      itertools.product(*(g.starts[a][lo_:hi_].tolist() for a, (lo_, hi_) in enumerate(plan.own)))
    )
    assert own == expected and plan.num_windows == len(expected)
    for w in own:
      owners.setdefault(w, []).append(plan.index)
    f0 = np.array(plan.frame_start)
    assert np.all(f0 <= p0) and np.all(np.array(plan.crop_start) == p0 - f0)
    assert np.all(np.array(plan.crop_start) + g.block_shape <= g.region_shape)
    assert np.all(np.array(plan.carry_start) + g.carry_shape <= g.frame_shape)
    if own:
      starts = np.array(own)
      assert np.all(starts >= f0) and np.all(starts.max(0) + wnd <= f0 + g.frame_shape)
      assert np.all(starts.max(0) + wnd - starts.min(0) <= g.hull_shape)
    for axis, (a, b) in enumerate(plan.own):
      assert b - a <= g.own_shape[axis]
      ends = [int(g.starts[axis][k]) + g.window[axis] for k in range(a, b)]
      key = (axis, plan.index[axis])
      previous = reach.get((axis, plan.index[axis] - 1), 0)
      reach[key] = max([previous, int(p1[axis]), *ends])
      last = plan.index[axis] == g.grid[axis] - 1
      assert plan.carry_out[axis] == (0 if last else reach[key] - p1[axis])
      assert plan.carry_in[axis] == (max(0, previous - p0[axis]) if plan.index[axis] else 0)
      assert plan.carry_out[axis] <= g.carry_shape[axis]
  assert np.all(tiled == 1)
  assert g.num_blocks == int(np.prod(g.grid)) == flat + 1
  assert sorted(owners) == sorted(useful) and all(len(v) == 1 for v in owners.values())
  assert g.num_windows == len(useful)


def _coverage(g):
  covered = np.zeros(np.array(g.padded_shape) + g.window, bool)
  for w in _all_windows(g):
    covered[tuple(slice(s, s + n) for s, n in zip(w, g.window, strict=True))] = True
  return covered[tuple(slice(0, n) for n in g.padded_shape)]


@pytest.mark.parametrize(
  "volume, window, overlap, snap, pad, crop_pad, block",
  [
    ((20, 33, 17), (4, 8, 6), 0.5, True, (2, 4, 3), None, (7, 10, 5)),
    ((20, 33, 17), (4, 8, 6), 0.5, False, (2, 4, 3), (), (7, 10, 5)),
    ((9, 30, 30), (4, 8, 8), 0.25, True, 0, (1, 2, 0, 3, 4, 0), (4, 16, 64)),
    ((3, 10, 12), (5, 16, 16), (0.5, 0.5, 0.0), False, (0, 1, 2), None, (2, 3, 4)),
    ((1, 40, 40), (1, 13, 11), 0.5, True, 0, None, (1, 8, 9)),
  ],
)
def test_plan_geometry_blocks_brute_force(volume, window, overlap, snap, pad, crop_pad, block):
  g = plan_geometry(
    volume,
    window=window,
    overlap=overlap,
    snap_to_edge=snap,
    pad=pad,
    crop_pad=crop_pad,
    block_shape=block,
    where="test",
  )
  pad3 = (pad,) * 3 if isinstance(pad, int) else pad
  assert g.padded_shape == tuple(n + 2 * p for n, p in zip(volume, pad3, strict=True))
  assert g.stride == stride_for(window, overlap)
  assert _coverage(g).all()
  for axis in range(3):
    np.testing.assert_array_equal(
      g.starts[axis],
      _starts_reference(g.padded_shape[axis], window[axis], g.stride[axis], snap),
    )
  if not crop_pad:
    assert g.crop == tuple((p, p) for p in pad3)
    assert g.output_shape == tuple(volume)
  _check_plan(g)


def test_plan_geometry_snemi_numbers():
  g = plan_geometry(
    (100, 1024, 1024),
    window=(16, 224, 224),
    overlap=0.5,
    snap_to_edge=True,
    pad=(8, 128, 128),
    crop_pad=(7, 8, 127, 128, 127, 128),
    block_shape=(101, 512, 512),
  )
  assert g.padded_shape == (116, 1280, 1280)
  assert g.stride == (8, 112, 112)
  assert g.crop == ((7, 8), (127, 128), (127, 128))
  assert g.output_shape == (101, 1025, 1025)
  assert g.starts[0].tolist() == [*range(0, 97, 8), 100]
  assert g.starts[1].tolist() == [*range(0, 1009, 112), 1056]
  assert g.grid == (1, 3, 3) and g.num_windows == 14 * 11 * 11
  # Default crop: exactly the pad, giving the volume's own support.
  d = plan_geometry(
    (100, 1024, 1024),
    window=(16, 224, 224),
    overlap=0.5,
    snap_to_edge=True,
    pad=(8, 128, 128),
    crop_pad=None,
    block_shape=(100, 512, 512),
  )
  assert d.crop == ((8, 8), (128, 128), (128, 128)) and d.output_shape == (100, 1024, 1024)
  first = d.block(0)
  assert first.out_start == (0, 0, 0) and first.out_stop == (100, 512, 512)
  # Region [128, 640) in y: it owns the windows starting before 640 (0..560, 6 of them), whose
  # last one reaches 784: 144 voxels of partial sums go on to the next block.
  assert first.own == ((0, 14), (0, 6), (0, 6)) and first.frame_start == (0, 0, 0)
  assert first.crop_start == (8, 128, 128) and first.carry_out == (0, 144, 144)
  last = d.block((0, 1, 1))
  assert last.out_start == (0, 512, 512) and last.out_stop == (100, 1024, 1024)
  assert last.own == ((0, 14), (6, 11), (6, 11)) and last.frame_start == (0, 640, 640)
  assert last.carry_in == (0, 144, 144) and last.carry_out == (0, 0, 0)
  assert d.frame_shape == (116, 784, 784) and d.region_shape == (108, 640, 640)
  assert d.carry_shape == (0, 144, 144) and d.hull_shape == (116, 784, 784)
  assert d.own_shape == (14, 6, 6)


def test_plan_geometry_nisb_numbers():
  g = plan_geometry(
    (300, 256, 200),
    window=(128, 128, 128),
    overlap=0.5,
    snap_to_edge=True,
    pad=0,
    crop_pad=(),
    block_shape=None,
  )
  assert g.starts[0].tolist() == [0, 64, 128, 172]
  assert g.starts[1].tolist() == [0, 64, 128]
  assert g.starts[2].tolist() == [0, 64, 72]
  assert g.grid == (1, 1, 1) and g.block_shape == g.output_shape == (300, 256, 200)
  assert g.frame_shape == g.region_shape == g.hull_shape == (300, 256, 200)
  assert g.carry_shape == (0, 0, 0) and g.block(0).num_windows == 4 * 3 * 3


def test_plan_geometry_block_shape_clipped_and_bad_index():
  g = plan_geometry(
    (6, 6, 6), window=(4, 4, 4), overlap=0.5, snap_to_edge=True, pad=0, crop_pad=None,
    block_shape=(100, 4, 100),
  )  # fmt: skip
  assert g.block_shape == (6, 4, 6) and g.grid == (1, 2, 1)
  with pytest.raises(IndexError):
    g.block(2)
  with pytest.raises(IndexError):
    g.block((0, 2, 0))


def test_plan_geometry_errors():
  kwargs = dict(overlap=0.5, snap_to_edge=True, pad=(1, 2, 2), crop_pad=None, block_shape=(4,) * 3)
  with pytest.raises(ValueError, match=r"myvol.*\(6, 16, 8\).*\(4, 12, 12\)"):
    plan_geometry((2, 8, 8), window=(6, 16, 8), where="myvol", **kwargs)
  # Not snapped: a window larger than the padded volume is fine (read with the pad mode).
  g = plan_geometry((2, 8, 8), window=(6, 16, 8), where="myvol", **{**kwargs, "snap_to_edge": 0})
  assert g.starts[0].tolist() == [0] and g.hull_shape == (6, 16, 12)
  bad = [
    dict(crop_pad=(1, 1, 1)),
    dict(crop_pad=(1, 1, 1, 1, 1, -1)),
    dict(crop_pad=(3, 3, 0, 0, 0, 0)),  # empty output along z
    dict(block_shape=(4, 0, 4)),
    dict(block_shape=(4, 4)),
    dict(pad=(1, -1, 0)),
  ]
  for change in bad:
    with pytest.raises(ValueError, match="myvol"):
      plan_geometry((4, 8, 8), window=(2, 2, 2), where="myvol", **{**kwargs, **change})
  with pytest.raises(ValueError, match="crop_pad"):
    plan_geometry((4, 8, 8), window=(2, 2, 2), where="v", **{**kwargs, "crop_pad": (1, 2)})
  with pytest.raises(ValueError, match="overlap"):
    plan_geometry((4, 8, 8), window=(2, 2, 2), **{**kwargs, "overlap": 1.0})


# ---------------------------------------------------------------------------------------------
# read_padded.


_BOXES = [
  ((0, 0, 0), (5, 7, 6)),  # the padded volume's corner
  ((3, 2, 1), (9, 11, 12)),  # across borders
  ((-2, -3, 4), (4, 3, 20)),  # beyond the padded volume (non-snapped windows)
  ((10, 14, 13), (16, 18, 19)),  # beyond the far side
  ((20, 1, 1), (22, 3, 3)),  # entirely outside
]


def _reference(array, start, stop, pad, mode):
  """np.pad with a margin large enough for every box, then slice."""
  margin = 12
  spatial_pad = [(p + margin, p + margin) for p in pad]
  padded = np.pad(array, [(0, 0)] * (array.ndim - 3) + spatial_pad, mode=mode)
  box = tuple(slice(s + margin, e + margin) for s, e in zip(start, stop, strict=True))
  out = padded[(Ellipsis, *box)]
  return out[None] if out.ndim == 3 else out


@pytest.mark.parametrize("mode", ["reflect", "constant", "symmetric", "edge"])
@pytest.mark.parametrize("channels", [None, 2])
def test_read_padded_numpy(mode, channels):
  rng = np.random.default_rng(0)
  shape = (6, 9, 8) if channels is None else (channels, 6, 9, 8)
  array = rng.integers(0, 200, shape).astype(np.uint8)
  pad = (2, 3, 3)
  for start, stop in _BOXES:
    got = read_padded(array, start, stop, pad, mode)
    assert got.dtype == np.uint8 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, _reference(array, start, stop, pad, mode))


def test_read_padded_zarr_volume(tmp_path):
  rng = np.random.default_rng(1)
  for name, shape in [("a.zarr", (6, 9, 8)), ("b.zarr", (2, 6, 9, 8))]:
    array = rng.random(shape).astype(np.float32)
    out = create_zarr(tmp_path / name, shape, np.float32, chunks=(*shape[:-3], 4, 4, 4))
    out.write((0,) * len(shape), array, check_alignment=False)
    out.flush()
    volume = open_volume(tmp_path / name)
    for mode in ("reflect", "constant"):
      for start, stop in _BOXES:
        got = read_padded(volume, start, stop, (2, 3, 3), mode)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, _reference(array, start, stop, (2, 3, 3), mode))


def test_read_padded_errors():
  array = np.zeros((4, 4, 4), np.float32)
  with pytest.raises(ValueError, match="pad_mode"):
    read_padded(array, (0, 0, 0), (2, 2, 2), 1, "wrap")
  with pytest.raises(ValueError, match="box"):
    read_padded(array, (0, 0, 0), (2, 0, 2), 1, "reflect")
  with pytest.raises(ValueError, match="3-D"):
    read_padded(np.zeros((4, 4)), (0, 0, 0), (2, 2, 2), 1, "reflect")


def test_geometry_hulls_read_like_np_pad():
  # End to end: every window of a block, cut from the hull read_padded returns, equals the window
  # cut from the np.pad'ed volume.
  rng = np.random.default_rng(2)
  array = rng.random((5, 12, 10)).astype(np.float32)
  g = plan_geometry(
    array.shape, window=(4, 6, 6), overlap=0.5, snap_to_edge=False, pad=(1, 2, 2),
    crop_pad=None, block_shape=(3, 7, 5),
  )  # fmt: skip
  for task in plan_tasks(g, np.zeros(g.grid, bool)):
    lay = task_layout(g, task)
    if lay.hull_start is None:
      continue
    hull = read_padded(array, lay.hull_start, lay.hull_stop, g.pad, "reflect")[0]
    assert np.all(np.array(hull.shape) <= g.hull_shape)
    for rel in lay.starts:
      start = np.array(lay.hull_start) + rel
      stop = start + g.window
      cut = hull[tuple(slice(a, a + n) for a, n in zip(rel, g.window, strict=True))]
      np.testing.assert_array_equal(cut, _reference(array, start, stop, g.pad, "reflect")[0])


def test_geometry_is_immutable():
  g = plan_geometry(
    (4, 4, 4), window=(2, 2, 2), overlap=0.5, snap_to_edge=True, pad=0, crop_pad=None,
    block_shape=(2, 2, 2),
  )  # fmt: skip
  with pytest.raises(ValueError):
    g.starts[0][0] = 5
  with pytest.raises(AttributeError):
    g.window = (3, 3, 3)  # type: ignore[misc]
  assert geometry.BLEND_MODES == BLEND_MODES
