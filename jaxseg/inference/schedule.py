"""Which windows one process computes, in which order, and how partial sums travel between blocks.

Host side only (numpy; never imports jax). :class:`~jaxseg.inference.geometry.Geometry` gives each
useful window to exactly one block; this module turns the blocks one process predicts into a list
of :class:`Task` s, run in order on the device (``engine.BlockStream``), with every window of the
volume computed once.

The sum behind a voxel is a fixed nest of folds over the windows covering it, whatever the
blocks: ``S = fold_z(T)``, ``T = fold_y(U)``, ``U = fold_x(window values)``, each a left fold in
increasing window start. A block folds its own windows; the partial folds that spill past its far
face along an axis are *carried* into the next block along that axis, which continues them:

* x, along a row of blocks, per row of windows ``(kz, ky)``: ``U`` partials. They stay on the
  device and go to the task right after (``x_in`` / ``x_out``).
* y, per plane of windows ``kz``: ``T`` partials, and z: ``S`` partials. They go through carry
  files, ``<name>.zarr/scratch/<key>.npy`` (:func:`carry_key`), written before the producing block
  is marked done and deleted once the consuming block is (a consumer close behind its producer
  takes them from the device instead).

Because the fold of every voxel is the same sequence of float additions for any block shape, the
output does not depend on the blocking, bit for bit.

Tasks that are not plain blocks recompute carries that are not at hand, always as the same bytes:

* *x halo*: before a block whose row predecessor did not run just before it (the first block of a
  resumed run), the predecessors' windows that reach into it, folded along x only.
* *z halo*: before the first slab of blocks of a process (many hosts split the volume into
  contiguous slabs of blocks along z), or a slab whose z carry files are missing, the previous
  slabs' windows that reach into it, over the whole slab.
* *rebuild*: a finished block whose y carry file is gone (a scratch folder deleted by hand) is
  computed again, without writing, with the rest of its slab.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from jaxseg.inference.geometry import BlockPlan, Geometry

Triple = tuple[int, int, int]
Ranges = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]

# Task kinds.
BLOCK = "block"  # a block predicted (written unless it was already done)
X_HALO = "x-halo"  # row predecessors' windows reaching into the next task, folded along x only
Z_HALO = "z-halo"  # previous slabs' windows reaching into a slab


def carry_key(axis: str, index: Triple, halo: int | None = None) -> str:
  """The name of the ``axis`` (``"y"`` or ``"z"``) carry out of block ``index``.

  ``y_0_1_2`` is block (0, 1, 2)'s y carry. The tasks of a z halo into slab ``halo`` fold only
  the windows reaching that slab, so their intermediate carries differ from a block's and are
  named after the slab too (``yh3_0_1_2``): every key of a plan has one producer.
  """
  tag = "" if halo is None else f"h{halo}"
  return f"{axis}{tag}_{index[0]}_{index[1]}_{index[2]}"


def slab_range(slabs: int, process_index: int, process_count: int) -> tuple[int, int]:
  """The contiguous slabs of blocks (along z) that process ``process_index`` predicts."""
  return slabs * process_index // process_count, slabs * (process_index + 1) // process_count


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
  """One block's windows folded on the device, and what its partial sums connect to.

  Attributes:
    block: the block.
    windows: per axis the ``(lo, hi)`` window indices computed: the block's own, or for halo
      tasks the part of them that reaches the consumer.
    kind: :data:`BLOCK`, :data:`X_HALO` or :data:`Z_HALO`.
    write: the task writes its output block and marks it done.
    x_only: only the x fold (an x halo): no planes, no output, no y / z carries.
    x_in, x_out: the x carry comes from the task just before / goes to the task just after.
    y_in, z_in: the key of the carry folded in (``None``: nothing carried in).
    y_out, z_out: the key of the carry this task produces (``None``: not needed by anyone).
    deletes: carry keys this task consumed, deleted once it is durable.
  """

  block: BlockPlan
  windows: Ranges
  kind: str
  write: bool
  x_only: bool = False
  x_in: bool = False
  x_out: bool = False
  y_in: str | None = None
  z_in: str | None = None
  y_out: str | None = None
  z_out: str | None = None
  deletes: tuple[str, ...] = ()

  @property
  def num_windows(self) -> int:
    return int(np.prod([hi - lo for lo, hi in self.windows]))


class TaskLayout(NamedTuple):
  """Where a task's windows lie, for the device.

  Attributes:
    hull_start, hull_stop: PADDED coords of the input box the windows read (``None`` without
      windows).
    starts: int32 ``[N, 3]``: window starts relative to ``hull_start``, C order of ``(kz, ky,
      kx)`` (the order the device folds them in).
    planes: per window plane ``kz``: ``(pz, z offset in the frame)``; ``pz`` indexes the block's
      own planes, which is how carries are stacked.
    rows: per window row ``ky``: ``(py, y offset in the frame)``.
    x_offsets: int32 ``[nx]``: x offset in the frame of each window of a row.
  """

  hull_start: Triple | None
  hull_stop: Triple | None
  starts: np.ndarray
  planes: tuple[tuple[int, int], ...]
  rows: tuple[tuple[int, int], ...]
  x_offsets: np.ndarray


def task_layout(g: Geometry, task: Task) -> TaskLayout:
  """The window positions of ``task`` in its hull and in its block's frame."""
  block = task.block
  per_axis = []
  for axis, (lo, hi) in enumerate(task.windows):
    starts = g.starts[axis][lo:hi].astype(np.int64)
    own_lo = block.own[axis][0]
    per_axis.append((starts, np.arange(lo, hi) - own_lo, starts - block.frame_start[axis]))
  if task.num_windows:
    hull_start = tuple(int(s[0]) for s, _, _ in per_axis)
    hull_stop = tuple(int(s[-1]) + w for (s, _, _), w in zip(per_axis, g.window, strict=True))
    relative = [s - h for (s, _, _), h in zip(per_axis, hull_start, strict=True)]
    grids = np.meshgrid(*relative, indexing="ij")
    starts = np.stack([a.reshape(-1) for a in grids], axis=1).astype(np.int32)
  else:
    hull_start = hull_stop = None
    starts = np.zeros((0, 3), np.int32)
  (_, pz, z_off), (_, py, y_off), (_, _, x_off) = per_axis
  return TaskLayout(
    hull_start=hull_start,
    hull_stop=hull_stop,
    starts=starts,
    planes=tuple(zip(pz.tolist(), z_off.tolist(), strict=True)),
    rows=tuple(zip(py.tolist(), y_off.tolist(), strict=True)),
    x_offsets=x_off.astype(np.int32),
  )


def _x_halo(g: Geometry, consumer: BlockPlan) -> list[Task]:
  """The row predecessors' windows that reach ``consumer``, folded along x into its x carry."""
  bz, by, bx = consumer.index
  first = g.chain_start(2, bx)
  limit = int(g.axes[2].region_start[bx])
  tasks = []
  for b in range(first, bx):
    block = g.block((bz, by, b))
    windows = (block.own[0], block.own[1], g.reaching(2, b, limit))
    tasks.append(Task(block, windows, X_HALO, write=False, x_only=True, x_in=b > first))
  return tasks


def _z_halo(g: Geometry, slab: int, consumers: set[Triple]) -> list[Task]:
  """The previous slabs' windows that reach ``slab``, over every row and column of blocks.

  Writes the z carries into the ``consumers`` (blocks of ``slab``) under their plain keys: they
  are the same bytes the previous slab's blocks carry.
  """
  first = g.chain_start(0, slab)
  limit = int(g.axes[0].region_start[slab])
  _, nby, nbx = g.grid
  tasks = []
  for h in range(first, slab):
    planes = g.reaching(0, h, limit)
    for by in range(nby):
      for bx in range(nbx):
        block = g.block((h, by, bx))
        cin, cout = block.carry_in, block.carry_out
        y_in = carry_key("y", (h, by - 1, bx), halo=slab) if cin[1] > 0 else None
        z_in = carry_key("z", (h - 1, by, bx), halo=slab) if h > first else None
        if h < slab - 1:
          z_out = carry_key("z", (h, by, bx), halo=slab)
        else:
          z_out = carry_key("z", (h, by, bx)) if (slab, by, bx) in consumers else None
        task = Task(
          block,
          (planes, block.own[1], block.own[2]),
          Z_HALO,
          write=False,
          x_in=cin[2] > 0,
          y_in=y_in,
          z_in=z_in,
          y_out=carry_key("y", (h, by, bx), halo=slab) if cout[1] > 0 else None,
          z_out=z_out,
          deletes=tuple(k for k in (y_in, z_in) if k is not None),
        )
        tasks.append(task)
  return tasks


def plan_tasks(
  g: Geometry,
  done: np.ndarray,
  *,
  process_index: int = 0,
  process_count: int = 1,
  carry_exists: Callable[[str], bool] = lambda key: False,
) -> list[Task]:
  """The tasks of process ``process_index``: its slabs' unfinished blocks, in C order, and halos.

  Args:
    g: the volume's geometry.
    done: bool / uint8 ``[nbz, nby, nbx]``: blocks already durable.
    process_index, process_count: this process's share: slabs :func:`slab_range`.
    carry_exists: whether a carry file (by key) is on disk: finished blocks' carries, or carries a
      neighbouring process wrote.

  Returns:
    The tasks, in the order they must run. Every useful window of the process's unfinished blocks
    is computed once, plus the halo windows of the carries that are not at hand.
  """
  done = np.asarray(done).astype(bool)
  z0, z1 = slab_range(g.grid[0], process_index, process_count)
  _, nby, nbx = g.grid
  order = [(bz, by, bx) for bz in range(z0, z1) for by in range(nby) for bx in range(nbx)]
  todo = {ix for ix in order if not done[ix]}
  if not todo:
    return []
  blocks = {ix: g.block(ix) for ix in order}
  # A y carry comes from the same slab; if its finished producer's file is gone, the slab runs
  # again from its start (finished blocks without writing).
  rebuild = set()
  for ix in order:
    bz, by, bx = ix
    if ix in todo and blocks[ix].carry_in[1] > 0:
      producer = (bz, by - 1, bx)
      if producer not in todo and not carry_exists(carry_key("y", producer)):
        rebuild.add(bz)
  run = [ix for ix in order if ix in todo or ix[0] in rebuild]
  in_run = set(run)

  def waits_for_z(ix: Triple) -> bool:
    bz, by, bx = ix
    if blocks[ix].carry_in[0] <= 0:
      return False
    producer = (bz - 1, by, bx)
    return producer not in in_run and not carry_exists(carry_key("z", producer))

  tasks: list[Task] = []
  last: tuple[Triple, str] | None = None  # the last task's block and kind (the x hand-over)
  slabs_seen = set()
  for ix in run:
    bz, by, bx = ix
    block = blocks[ix]
    if bz not in slabs_seen:
      slabs_seen.add(bz)
      consumers = {c for c in run if c[0] == bz and waits_for_z(c)}
      if consumers:
        tasks.extend(_z_halo(g, bz, consumers))
        last = (tasks[-1].block.index, Z_HALO)
    cin, cout = block.carry_in, block.carry_out
    if cin[2] > 0 and last not in (((bz, by, bx - 1), BLOCK), ((bz, by, bx - 1), X_HALO)):
      tasks.extend(_x_halo(g, block))
      last = (tasks[-1].block.index, X_HALO)
    y_in = carry_key("y", (bz, by - 1, bx)) if cin[1] > 0 else None
    z_in = carry_key("z", (bz - 1, by, bx)) if cin[0] > 0 else None
    # Carries go out to blocks still to do (the z consumer may be another process's).
    y_out = carry_key("y", ix) if cout[1] > 0 and (bz, by + 1, bx) in in_run else None
    z_next = (bz + 1, by, bx)
    z_out = None
    if cout[0] > 0 and (not done[z_next] or z_next in in_run):
      z_out = carry_key("z", ix)
    tasks.append(
      Task(
        block,
        block.own,
        BLOCK,
        write=ix in todo,
        x_in=cin[2] > 0,
        y_in=y_in,
        z_in=z_in,
        y_out=y_out,
        z_out=z_out,
        deletes=tuple(k for k in (y_in, z_in) if k is not None),
      )
    )
    last = (ix, BLOCK)
  # The x carry goes out only where the next task takes it.
  return [
    dataclasses.replace(t, x_out=i + 1 < len(tasks) and tasks[i + 1].x_in)
    for i, t in enumerate(tasks)
  ]


def producers(tasks: list[Task]) -> dict[str, int]:
  """For each carry key produced by ``tasks``, the position of the (last) task producing it."""
  out = {}
  for i, task in enumerate(tasks):
    for key in (task.y_out, task.z_out):
      if key is not None:
        out[key] = i
  return out
