"""Tests for jaxseg.inference.schedule: each window once, the same sums for any blocking.

A numpy model of the device fold (``_Simulator``: the engine's folds and carries, float32, in the
engine's order) runs the planned tasks with a random float32 "window output" per window, so the
plans are checked bit for bit on many geometries, process splits and interruptions without JAX.
The engine itself is checked against the same guarantees in ``inference_predict_lib_test.py``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from jaxseg.inference import schedule
from jaxseg.inference.geometry import plan_geometry
from jaxseg.inference.schedule import plan_tasks, task_layout

K = 3  # channels of the fake window output (the last one plays the weight sum)


def _geometry(volume, window, block, overlap=0.5, pad=0, crop_pad=None, snap=True):
  return plan_geometry(
    volume,
    window=window,
    overlap=overlap,
    snap_to_edge=snap,
    pad=pad,
    crop_pad=crop_pad,
    block_shape=block,
  )


class _Simulator:
  """Runs tasks like ``engine.BlockStream`` does, in numpy float32, keeping carry "files"."""

  def __init__(self, g, seed=0):
    self.g = g
    self.files: dict[str, np.ndarray] = {}
    self.done = np.zeros(g.grid, bool)
    self.out = np.full((*g.output_shape, K), np.nan, np.float32)
    self.computed: list[tuple[int, int, int]] = []
    self._seed = seed
    self._x = None

  def value(self, k) -> np.ndarray:
    """The window's float32 output; magnitudes spread over decades, so any reordering of a sum
    changes its low bits somewhere."""
    rng = np.random.default_rng([self._seed, *k])
    scale = 10.0 ** rng.integers(-3, 4, K)
    return (rng.random((*self.g.window, K)) * scale).astype(np.float32)

  def run(self, tasks, stop_after_writes=None) -> None:
    g = self.g
    w, frame, region, carry, own = (
      g.window, g.frame_shape, g.region_shape, g.carry_shape, g.own_shape
    )  # fmt: skip
    if self._x is None:
      self._x = np.zeros((own[0], own[1], w[0], w[1], carry[2], K), np.float32)
    writes = 0
    for task in tasks:
      lay = task_layout(g, task)
      block = task.block
      xlo = task.windows[2][0]
      own_lo = [lo for lo, _ in block.own]
      cz, cy, cx = block.carry_start
      if not task.x_only:
        s = np.zeros((frame[0], region[1], region[2], K), np.float32)
        if task.z_in:
          s[: carry[0]] = self.files[task.z_in]
        y_out = np.zeros((own[0], w[0], carry[1], region[2], K), np.float32)
      for pz, z_off in lay.planes:
        if not task.x_only:
          t = np.zeros((w[0], frame[1], region[2], K), np.float32)
          if task.y_in:
            t[:, : carry[1]] = self.files[task.y_in][pz]
        for py, y_off in lay.rows:
          u = np.zeros((w[0], w[1], frame[2], K), np.float32)
          if task.x_in:
            u[:, :, : carry[2]] = self._x[pz, py]
          for i, x_off in enumerate(lay.x_offsets):
            k = (own_lo[0] + pz, own_lo[1] + py, xlo + i)
            self.computed.append(k)
            u[:, :, x_off : x_off + w[2]] += self.value(k)
          if not task.x_only:
            t[:, y_off : y_off + w[1]] += u[:, :, : region[2]]
          if task.x_out:
            self._x[pz, py] = u[:, :, cx : cx + carry[2]]
        if not task.x_only:
          s[z_off : z_off + w[0]] += t[:, : region[1]]
          y_out[pz] = t[:, cy : cy + carry[1]]
      if task.x_only:
        continue
      if task.y_out:
        self.files[task.y_out] = y_out
      if task.z_out:
        self.files[task.z_out] = s[cz : cz + carry[0]].copy()
      if task.write:
        start, stop = np.array(block.out_start), np.array(block.out_stop)
        crop = np.array(block.crop_start)
        box = tuple(slice(a, a + n) for a, n in zip(crop, stop - start, strict=True))
        self.out[tuple(slice(a, b) for a, b in zip(start, stop, strict=True))] = s[box]
        self.done[block.index] = True
      for key in task.deletes:
        self.files.pop(key, None)
      if task.write:
        writes += 1
        if stop_after_writes is not None and writes == stop_after_writes:
          return

  def plan(self, **kwargs):
    tasks = plan_tasks(self.g, self.done, carry_exists=lambda key: key in self.files, **kwargs)
    _check_links(tasks, set(self.files))
    return tasks


def _check_links(tasks, on_disk):
  """Every carry a task takes was made just before (x), earlier in the plan or is on disk (y, z);
  every key has one producer."""
  produced = set()
  for i, task in enumerate(tasks):
    if task.x_in:
      before = tasks[i - 1]
      assert i > 0 and before.x_out
      bz, by, bx = task.block.index
      assert before.block.index == (bz, by, bx - 1)
    for key in (task.y_in, task.z_in):
      assert key is None or key in produced or key in on_disk, key
    for key in (task.y_out, task.z_out):
      if key is not None:
        assert key not in produced, key
        produced.add(key)


def _flat_reference(g, sim):
  """Every voxel's sum, from the nest of folds (z outermost), computed voxel-block by
  voxel-block independently of any blocking; also the flat C-order fold, which differs."""
  w = np.array(g.window)
  lo = np.array([c[0] for c in g.crop])
  ranges = [range(a, b) for a, b in g.useful]
  out = np.zeros((*g.output_shape, K), np.float32)
  flat = np.zeros_like(out)
  # Per axis: which windows cover each output coordinate, as a list of indices.
  covering = []
  for axis in range(3):
    per = []
    for c in range(g.output_shape[axis]):
      p = c + lo[axis]
      per.append([k for k in ranges[axis] if g.starts[axis][k] <= p < g.starts[axis][k] + w[axis]])
    covering.append(per)
  values = {k: sim.value(k) for k in itertools.product(*ranges)}
  for z, y, x in itertools.product(*(range(n) for n in g.output_shape)):
    p = np.array([z, y, x]) + lo
    total = np.zeros(K, np.float32)
    for kz in covering[0][z]:
      plane = np.zeros(K, np.float32)
      for ky in covering[1][y]:
        row = np.zeros(K, np.float32)
        for kx in covering[2][x]:
          k = (kz, ky, kx)
          rel = p - [g.starts[a][k[a]] for a in range(3)]
          row = row + values[k][tuple(rel)]
          flat[z, y, x] = flat[z, y, x] + values[k][tuple(rel)]
        plane = plane + row
      total = total + plane
    out[z, y, x] = total
  return out, flat


GEOMETRIES = [
  # volume, window, overlap, pad, crop_pad, snap
  ((13, 20, 18), (4, 4, 4), 0.5, 0, None, True),
  ((9, 21, 19), (4, 8, 8), 0.5, (2, 4, 4), (2, 2, 4, 4, 4, 4), True),
  ((20, 33, 17), (4, 8, 6), 0.5, (2, 4, 3), None, False),
  ((9, 30, 30), (4, 8, 8), 0.25, 0, (1, 2, 0, 3, 4, 0), True),
  ((10, 12, 11), (5, 6, 5), (0.6, 0.5, 0.0), (1, 0, 2), None, True),
]
BLOCKS = [None, (4, 4, 4), (2, 3, 5), (5, 8, 7), (3, 16, 2), (1, 1, 64)]


@pytest.mark.parametrize("case", range(len(GEOMETRIES)))
def test_each_window_once_and_the_same_bytes_for_any_block_shape(case):
  volume, window, overlap, pad, crop_pad, snap = GEOMETRIES[case]
  whole = _geometry(volume, window, None, overlap, pad, crop_pad, snap)
  reference = _Simulator(whole)
  reference.run(reference.plan())
  want, flat = _flat_reference(whole, reference)
  np.testing.assert_array_equal(reference.out, want)
  assert not np.array_equal(flat, want)  # the order of the sum shows in the bits
  useful = set(itertools.product(*(range(a, b) for a, b in whole.useful)))
  assert sorted(reference.computed) == sorted(useful)
  for block in BLOCKS:
    g = _geometry(volume, window, block, overlap, pad, crop_pad, snap)
    sim = _Simulator(g)
    tasks = sim.plan()
    assert all(t.kind == schedule.BLOCK and t.write for t in tasks)
    assert len(tasks) == g.num_blocks and g.num_windows == len(useful)
    sim.run(tasks)
    assert sorted(sim.computed) == sorted(useful), block  # each window exactly once
    np.testing.assert_array_equal(sim.out, want, err_msg=f"block {block}")
    assert not sim.files  # every carry consumed and deleted


@pytest.mark.parametrize("stop", [1, 2, 5, 9, 13])
def test_a_killed_run_resumes_to_the_same_bytes(stop):
  g = _geometry((9, 21, 19), (4, 8, 8), (2, 3, 5), pad=(2, 4, 4))
  whole = _Simulator(g)
  whole.run(whole.plan())
  sim = _Simulator(g)
  sim.run(sim.plan(), stop_after_writes=stop)
  assert sim.done.sum() == stop
  sim._x = None  # the device state is lost with the process
  again = sim.plan()
  if (
    np.unravel_index(stop, g.grid)[2] > 0 and g.axes[2].carry_in[np.unravel_index(stop, g.grid)[2]]
  ):
    assert again[0].kind == schedule.X_HALO  # the x carry is recomputed from the row predecessor
  assert all(t.write for t in again if t.kind == schedule.BLOCK)
  sim.run(again)
  assert sim.done.all()
  np.testing.assert_array_equal(sim.out, whole.out)
  assert not sim.files
  halo = sum(t.num_windows for t in again if t.kind != schedule.BLOCK)
  assert len(sim.computed) == g.num_windows + halo


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 2, 0)])
def test_processes_split_slabs_and_compute_halos_for_what_is_missing(order):
  g = _geometry((20, 16, 12), (4, 8, 8), (3, 8, 4), pad=(2, 0, 0))
  whole = _Simulator(g)
  whole.run(whole.plan())
  sim = _Simulator(g)
  halo = []
  for p in order:
    tasks = sim.plan(process_index=p, process_count=3)
    z0, z1 = schedule.slab_range(g.grid[0], p, 3)
    written = [t.block.index[0] for t in tasks if t.write]
    assert set(written) == set(range(z0, z1))
    halo += [t for t in tasks if t.kind == schedule.Z_HALO]
    sim._x = None
    sim.run(tasks)
  np.testing.assert_array_equal(sim.out, whole.out)
  assert not sim.files
  if order == (0, 1, 2):
    assert not halo  # each process found the previous one's z carries on disk
  else:
    assert halo and len(sim.computed) == g.num_windows + sum(t.num_windows for t in halo)
    assert sum(t.num_windows for t in halo) < g.num_windows / 3


def test_a_lost_y_carry_rebuilds_its_slab():
  g = _geometry((12, 16, 16), (4, 4, 4), (4, 8, 8))
  whole = _Simulator(g)
  whole.run(whole.plan())
  sim = _Simulator(g)
  sim.run(sim.plan(), stop_after_writes=7)  # slab 1, row 1, column 1 is next
  lost = [k for k in sim.files if k.startswith("y_")]
  assert lost
  for key in lost:
    del sim.files[key]
  sim._x = None
  tasks = sim.plan()
  rebuilt = [t for t in tasks if t.kind == schedule.BLOCK and not t.write]
  assert [t.block.index for t in rebuilt] == [(1, 0, 0), (1, 0, 1), (1, 1, 0)]
  sim.run(tasks)
  np.testing.assert_array_equal(sim.out, whole.out)


def test_nisb_plan_computes_each_window_once_in_full_batches():
  g = _geometry((1024, 1024, 1024), (128, 128, 128), (512, 512, 512))
  tasks = plan_tasks(g, np.zeros(g.grid, bool))
  assert g.num_windows == 15**3 and sum(t.num_windows for t in tasks) == g.num_windows
  assert math.ceil(sum(t.num_windows for t in tasks) / 8) == math.ceil(15**3 / 8)
  # One window of 128 straddles each face: 64 voxels carried, 8 planes / 8 x 8 rows per block.
  assert g.carry_shape == (64, 64, 64) and g.own_shape == (8, 8, 8)
  assert g.frame_shape == (576, 576, 576) and g.region_shape == (512, 512, 512)
  assert g.hull_shape == (576, 576, 576)


def test_task_layout_orders_windows_in_c_order_within_the_hull():
  g = _geometry((9, 21, 19), (4, 8, 8), (2, 3, 5), pad=(2, 4, 4))
  for task in plan_tasks(g, np.zeros(g.grid, bool)):
    lay = task_layout(g, task)
    if not task.num_windows:
      assert lay.hull_start is None and lay.starts.shape == (0, 3)
      continue
    absolute = lay.starts + np.array(lay.hull_start)
    expected = list(
      itertools.product(*(g.starts[a][lo:hi].tolist() for a, (lo, hi) in enumerate(task.windows)))
    )
    assert [tuple(v) for v in absolute.tolist()] == expected
    assert np.all(lay.starts + g.window <= g.hull_shape)
    assert all(0 <= off <= g.frame_shape[0] - g.window[0] for _, off in lay.planes)
    assert np.all(lay.x_offsets + g.window[2] <= g.frame_shape[2])


def test_two_slabs_missing_their_z_carries_get_a_halo_each():
  """Slabs 0 and 2 finished (by other processes), every carry file lost: slabs 1 and 3 each get
  a z halo, with keys of their own, and the output is the same."""
  g = _geometry((30, 16, 12), (8, 8, 8), (3, 8, 8), overlap=0.75, pad=(2, 0, 0))
  assert g.grid[0] == 10 and g.chain_start(0, 3) < 2  # windows reach over more than one slab
  whole = _Simulator(g)
  whole.run(whole.plan())
  sim = _Simulator(g)
  finished = np.zeros(g.grid, bool)
  finished[[0, 2]] = True
  for block in g.blocks():
    if finished[block.index]:
      box = tuple(slice(a, b) for a, b in zip(block.out_start, block.out_stop, strict=True))
      sim.out[box] = whole.out[box]
  sim.done = finished.copy()
  tasks = sim.plan()
  halo = [t for t in tasks if t.kind == schedule.Z_HALO]
  # Into slab 1: slab 0's reaching planes. Into slab 3: slabs 0, 1 and 2's, chained through keys
  # of their own; the last slab of each chain writes the plain keys its consumers read.
  assert [t.block.index[0] for t in halo] == [0] * 4 + [0] * 4 + [1] * 4 + [2] * 4
  assert {t.z_out.split("_")[0] for t in halo} == {"z", "zh3"}
  sim.run(tasks)
  np.testing.assert_array_equal(sim.out, whole.out)
  assert not sim.files
