"""The device side of sliding-window inference: tasks of windows in, blended blocks out.

:class:`WindowEngine` holds the model and the compiled functions; :class:`BlockStream` runs the
tasks of one volume (``jaxseg.inference.schedule``) in order:

* Windows. Each task's input *hull* (the box its windows read, ``[Hz, Hy, Hx, cin]`` float32,
  zero beyond it) goes to the device once. Windows of consecutive tasks are packed into full
  batches of ``batch_size`` (times the devices): each batch is cut out of one or more hulls on
  the device, run through the network and every test-time view, and weighted by the blending
  profile: ``[b, wz, wy, wx, C + 1]``, the weighted values and the weight itself as the last
  channel. Only the volume's last batch can be partly empty.
* Folds. Every task folds its windows in a fixed nest, whatever the batches: a row buffer ``U``
  ``[wz, wy, Ax, C + 1]`` sums the windows of a row of windows along x; each finished row is added
  into the plane buffer ``T`` ``[wz, Ay, Px, C + 1]`` at its y offset; each finished plane into the
  block's frame ``S`` ``[Az, Py, Px, C + 1]`` at its z offset (``A`` = ``Geometry.frame_shape``,
  ``P`` = ``Geometry.region_shape``). The partial sums past the block's far faces are cut out as
  carries: x ``[Oz, Oy, wz, wy, Cx, C + 1]`` (one per row; kept on the device for the next task),
  y ``[Oz, wz, Cy, Px, C + 1]`` (one per plane) and z ``[Cz, Py, Px, C + 1]``; the next block
  along that axis starts its buffers from them. Finally the block's region of ``S`` is divided by
  its weight channel, activated if the activation comes after blending, cast and returned as
  ``[C, bz, by, bx]``.

Nothing per window crosses the host-device link: hulls and carries go in, blocks and carries come
out. Shapes are fixed per volume geometry, so each function compiles once per geometry.

Many devices: the window batch is split over a 1-D ``('data',)`` mesh of local devices and the
outputs are gathered, so every device folds all windows into its copy of the buffers in the same
order. Every voxel sees the same sequence of additions on any mesh and any blocking, so the output
is bit for bit the one a single device writes with the volume as one block.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.inference import tta as tta_lib
from jaxseg.inference.geometry import Geometry, blend_weights
from jaxseg.inference.schedule import Task, TaskLayout, task_layout
from jaxseg.inference.settings import InferenceSettings
from jaxseg.training import sharding as sharding_lib

# PyTC divides by max(sum(w), 1e-6): voxels no window reaches (none, with every profile > 0)
# must not become NaN.
_MIN_WEIGHT = 1e-6

ApplyFn = Callable[[Any, jax.Array], jax.Array]
# A task's y and z carries in (numpy from a carry file, or the producer's device array), fetched
# when its fold starts.
CarriesIn = Callable[[], tuple[Any, Any]]


def activation_fn(name: str, temperature: float = 1.0) -> Callable[[jax.Array], jax.Array]:
  """``sigmoid``, ``scale_sigmoid`` (``sigmoid(x / temperature)``) or ``none`` (identity)."""
  if name == "sigmoid":
    return jax.nn.sigmoid
  if name == "scale_sigmoid":
    scale = 1.0 / float(temperature)
    return lambda x: jax.nn.sigmoid(x * scale)
  if name == "none":
    return lambda x: x
  raise ValueError(f"unknown activation {name!r}; expected sigmoid, scale_sigmoid or none")


def model_apply(model) -> tuple[ApplyFn, Any]:
  """Splits an NNX model into a pure ``apply(variables, x) -> float32 logits`` and its variables."""
  from flax import nnx

  graphdef, variables = nnx.split(model)

  def apply(variables, x):
    return nnx.merge(graphdef, variables)(x).astype(jnp.float32)

  return apply, variables


class Finished(NamedTuple):
  """A task whose windows are all folded (device arrays, still being computed).

  Attributes:
    task: the task.
    block: ``[C, bz, by, bx]`` in the output dtype, the full block shape (cut to the block by
      the writer); ``None`` unless ``task.write``.
    y_out, z_out: the carries ``task.y_out`` / ``task.z_out`` name (``None`` when not named).
  """

  task: Task
  block: jax.Array | None
  y_out: jax.Array | None
  z_out: jax.Array | None


class WindowEngine:
  """The model and the compiled window and fold functions, shared by the volumes of a run.

  Args:
    apply: ``apply(variables, x[b, z, y, x, cin]) -> logits[b, z, y, x, C]`` (pure, jittable).
    variables: the model's variables (any pytree; replicated on every device).
    settings: the resolved ``config.infer``.
    views: the test-time views (``tta.tta_views``); ``(tta.IDENTITY,)`` for none.
    sharding: the process-local ``('data',)`` mesh and its shardings
      (``sharding.create_sharding(n, local=True)``; default: every local device).
  """

  def __init__(
    self,
    apply: ApplyFn,
    variables: Any,
    settings: InferenceSettings,
    views: tuple = (tta_lib.IDENTITY,),
    sharding: sharding_lib.Sharding | None = None,
  ):
    self.settings = settings
    self.views = tuple(views)
    if sharding is None:
      sharding = sharding_lib.create_sharding(local=True)
    self.replicated = sharding.replicated
    self.batched = sharding.batch
    self.num_devices = sharding.num_devices
    self.batch_size = settings.batch_size * self.num_devices  # windows per call, all devices
    self.variables = jax.device_put(variables, self.replicated)
    self._apply = apply
    self._weights = jax.device_put(
      jnp.asarray(blend_weights(settings.window, settings.blending)), self.replicated
    )
    self._activation = activation_fn(settings.activation, settings.temperature)
    self._channels = np.asarray(settings.output_channels, np.int32)
    self._compiled: dict[tuple, Callable] = {}

  @property
  def num_channels(self) -> int:
    return len(self.settings.output_channels)

  def stream(self, geometry: Geometry, in_channels: int, on_finished) -> BlockStream:
    """A :class:`BlockStream` for one volume; ``on_finished(Finished)`` is called in task order
    as soon as a task's last operation is dispatched."""
    return BlockStream(self, geometry, in_channels, on_finished)

  def _cached(self, key: tuple, build: Callable[[], Any]) -> Any:
    """The compiled function (or set of them) ``key`` names, built on first use."""
    if key not in self._compiled:
      self._compiled[key] = build()
    return self._compiled[key]

  # -- windows -------------------------------------------------------------------------------------

  def _predict_windows(self, variables, windows: jax.Array) -> jax.Array:
    """``[b, z, y, x, cin]`` -> ``[b, z, y, x, C_out]`` float32, views ensembled."""
    s = self.settings
    activation = self._activation if s.activation_before_blend else None
    n_aff = len(s.offsets)

    def affinity_logits(x):
      # A model with local shape descriptors has them after the affinities: never written.
      y = self._apply(variables, x)
      return y[..., :n_aff] if y.shape[-1] > n_aff else y

    out = tta_lib.predict_with_tta(
      affinity_logits,
      windows,
      self.views,
      s.offsets,
      s.convention,
      s.tta["ensemble"],
      activation,
    )
    return out[..., self._channels]

  def gather_fn(self, hull_shape: tuple[int, int, int], cin: int) -> Callable:
    """``gather(batch, hull, starts[b, 3], take[b]) -> batch``: the slots ``take`` selects get
    the windows at ``starts`` of ``hull``; the others keep what they held."""
    window = self.settings.window

    def build():
      def gather(batch, hull, starts, take):
        def cut(start):
          return jax.lax.dynamic_slice(hull, (start[0], start[1], start[2], 0), (*window, cin))

        windows = jax.vmap(cut)(starts)
        return jnp.where(take[:, None, None, None, None], windows, batch)

      b, r = self.batched, self.replicated
      return jax.jit(gather, in_shardings=(b, r, b, b), out_shardings=b, donate_argnums=(0,))

    return self._cached(("gather", hull_shape, cin), build)

  def infer_fn(self) -> Callable:
    """``infer(variables, blend, batch) -> [b, wz, wy, wx, C + 1]``: the weighted outputs and the
    weight, gathered onto every device."""

    def build():
      def infer(variables, blend, batch):
        out = self._predict_windows(variables, batch)
        weight = jnp.broadcast_to(blend[None, ..., None], (*out.shape[:-1], 1))
        weighted = jnp.concatenate([out * blend[None, ..., None], weight], axis=-1)
        return jax.lax.with_sharding_constraint(weighted, self.replicated)

      r = self.replicated
      return jax.jit(infer, in_shardings=(r, r, self.batched), out_shardings=r)

    return self._cached(("infer",), build)

  # -- folds ---------------------------------------------------------------------------------------

  def fold_fns(self, geometry: Geometry) -> _FoldFns:
    """The fold functions of one geometry's buffer shapes."""
    s = self.settings
    key = (
      "fold",
      geometry.frame_shape,
      geometry.region_shape,
      geometry.carry_shape,
      geometry.own_shape,
      geometry.block_shape,
      self.batch_size,
    )
    return self._cached(key, lambda: _FoldFns(self, geometry, s))


class _FoldFns:
  """The jitted fold steps for one geometry (see the module docstring for the buffers)."""

  def __init__(self, engine: WindowEngine, g: Geometry, settings: InferenceSettings):
    k = engine.num_channels + 1
    w = tuple(g.window)
    frame, region, carry, own = g.frame_shape, g.region_shape, g.carry_shape, g.own_shape
    self.k = k
    self.row_shape = (*w[:2], frame[2], k)
    self.plane_shape = (w[0], frame[1], region[2], k)
    self.frame_shape = (frame[0], *region[1:], k)
    self.x_shape = (own[0], own[1], w[0], w[1], carry[2], k)
    self.y_shape = (own[0], w[0], carry[1], region[2], k)
    self.z_shape = (carry[0], region[1], region[2], k)
    self.replicated = r = engine.replicated
    after = None if settings.activation_before_blend else engine._activation
    dtype = jnp.dtype(settings.output_dtype)
    channels = engine.num_channels
    block_shape = tuple(g.block_shape)
    row_shape, plane_shape, frame_shape = self.row_shape, self.plane_shape, self.frame_shape

    def jit(fn, donate=()):
      return jax.jit(fn, out_shardings=r, donate_argnums=donate)

    def zeros_with(shape, part, at):
      return jax.lax.dynamic_update_slice(jnp.zeros(shape, jnp.float32), part, at)

    def row_start(x, pz, py):
      part = jax.lax.dynamic_slice(x, (pz, py, 0, 0, 0, 0), (1, 1, *x.shape[2:]))[0, 0]
      return zeros_with(row_shape, part, (0, 0, 0, 0))

    def row_add(u, out, first, count, x_offsets):
      def add(i, u):
        x = x_offsets[i]
        region = jax.lax.dynamic_slice(u, (0, 0, x, 0), out.shape[1:])
        value = jax.lax.dynamic_index_in_dim(out, first + i, keepdims=False)
        return jax.lax.dynamic_update_slice(u, region + value, (0, 0, x, 0))

      return jax.lax.fori_loop(0, count, add, u)

    def row_end(t, u, x, y_off, pz, py, x_cut):
      # The finished row (complete over the block's region along x) joins its plane.
      if t is not None:
        region = jax.lax.dynamic_slice(t, (0, y_off, 0, 0), (*w[:2], *t.shape[2:]))
        t = jax.lax.dynamic_update_slice(t, region + u[:, :, : t.shape[2]], (0, y_off, 0, 0))
      if x is not None:
        part = jax.lax.dynamic_slice(u, (0, 0, x_cut, 0), (*w[:2], *x.shape[4:]))
        x = jax.lax.dynamic_update_slice(x, part[None, None], (pz, py, 0, 0, 0, 0))
      return t, x

    def plane_start(y, pz):
      part = jax.lax.dynamic_slice(y, (pz, 0, 0, 0, 0), (1, *y.shape[1:]))[0]
      return zeros_with(plane_shape, part, (0, 0, 0, 0))

    def plane_end(s, t, y, z_off, pz, y_cut):
      region = jax.lax.dynamic_slice(s, (z_off, 0, 0, 0), (w[0], *s.shape[1:]))
      s = jax.lax.dynamic_update_slice(s, region + t[:, : s.shape[1]], (z_off, 0, 0, 0))
      if y is not None:
        part = jax.lax.dynamic_slice(t, (0, y_cut, 0, 0), y.shape[1:])
        y = jax.lax.dynamic_update_slice(y, part[None], (pz, 0, 0, 0, 0))
      return s, y

    def frame_start(z):
      return zeros_with(frame_shape, z, (0, 0, 0, 0))

    def block_out(s, crop_start):
      values = jax.lax.dynamic_slice(s, (*crop_start, 0), (*block_shape, k))
      blended = values[..., :channels] / jnp.maximum(values[..., channels:], _MIN_WEIGHT)
      if after is not None:
        blended = after(blended)
      return jnp.moveaxis(blended, -1, 0).astype(dtype)

    def carry_out(s, z_cut):
      return jax.lax.dynamic_slice(s, (z_cut, 0, 0, 0), self.z_shape)

    self.row_start = jit(row_start)
    self.row_add = jit(row_add, donate=(0,))
    self.row_end = jit(row_end, donate=(0, 2))
    self.plane_start = jit(plane_start)
    self.plane_end = jit(plane_end, donate=(0, 2))
    self.frame_start = jit(frame_start)
    self.block_out = jit(block_out)
    self.carry_out = jit(carry_out)

  def zeros(self, shape) -> jax.Array:
    return jnp.zeros(shape, jnp.float32, device=self.replicated)


class BlockStream:
  """Runs one volume's tasks: windows packed into full batches, folds in task order.

  Call :meth:`push` for every task in order, then :meth:`close`; each task's :class:`Finished`
  goes to ``on_finished`` as soon as its last step is dispatched, in task order (a task's fold
  may wait for windows of later tasks to fill a batch).
  """

  def __init__(self, engine: WindowEngine, g: Geometry, in_channels: int, on_finished):
    self.engine = engine
    self.geometry = g
    self.cin = int(in_channels)
    self.on_finished = on_finished
    self.fns = engine.fold_fns(g)
    self.model_calls = 0
    self.windows = 0
    self._gather = engine.gather_fn(tuple(g.hull_shape), self.cin)
    self._infer = engine.infer_fn()
    self._pending: collections.deque = collections.deque()  # [hull, starts, next] per task
    self._num_pending = 0
    self._folds: collections.deque = collections.deque()
    self._fold: Iterator | None = None
    self._batch: tuple[jax.Array, int] | None = None  # the outputs being folded, and their count
    self._cursor = 0  # the first slot of the batch not yet folded
    self._x: jax.Array | None = None  # the x carries, [Oz, Oy, wz, wy, Cx, C + 1]
    self._input: jax.Array | None = None  # the batch buffer, reused

  def push(self, task: Task, hull: np.ndarray | None, carries: CarriesIn) -> None:
    """Queues ``task``: its hull (``Geometry.hull_shape`` + ``(cin,)`` float32; ``None``
    without windows) and the getter of its y / z carries in (called when its fold starts)."""
    layout = task_layout(self.geometry, task)
    self._folds.append((task, layout, carries))
    if task.num_windows:
      if hull is None or hull.shape != (*self.geometry.hull_shape, self.cin):
        raise ValueError(f"task {task.block.index}: hull of shape {getattr(hull, 'shape', None)}")
      device_hull = jax.device_put(hull, self.engine.replicated)
      self._pending.append([device_hull, layout.starts, 0])
      self._num_pending += len(layout.starts)
    self._advance()
    while self._num_pending >= self.engine.batch_size:
      self._run_batch()

  def close(self) -> None:
    """Runs the last (partly filled) batch and finishes every queued task."""
    while self._num_pending:
      self._run_batch()
    self._advance()
    if self._fold is not None or self._folds:
      raise RuntimeError("tasks left unfinished: a fold waits for windows that were not queued")

  # -- batches ---------------------------------------------------------------------------------

  def _run_batch(self) -> None:
    b = self.engine.batch_size
    if self._input is None:
      shape = (b, *self.engine.settings.window, self.cin)
      self._input = jax.device_put(np.zeros(shape, np.float32), self.engine.batched)
    filled = 0
    while filled < b and self._pending:
      entry = self._pending[0]
      hull, starts, first = entry
      count = min(b - filled, len(starts) - first)
      slots = np.zeros((b, 3), np.int32)
      slots[filled : filled + count] = starts[first : first + count]
      take = np.zeros((b,), bool)
      take[filled : filled + count] = True
      self._input = self._gather(self._input, hull, slots, take)
      entry[2] += count
      filled += count
      if entry[2] == len(starts):
        self._pending.popleft()  # the hull is no longer referenced here
    self._num_pending -= filled
    out = self._infer(self.engine.variables, self.engine._weights, self._input)
    self.model_calls += 1
    self.windows += filled
    self._batch, self._cursor = (out, filled), 0
    self._advance()
    if self._cursor != filled:
      raise RuntimeError(f"{filled - self._cursor} windows of a batch were not folded")
    self._batch = None

  # -- folds -----------------------------------------------------------------------------------

  def _advance(self) -> None:
    """Runs the folds in order as far as the windows at hand allow."""
    while True:
      if self._fold is None:
        if not self._folds:
          return
        self._fold = self._run_task(*self._folds.popleft())
      try:
        next(self._fold)
      except StopIteration as stop:
        self._fold = None
        self.on_finished(stop.value)
        continue
      return  # the fold waits for windows

  def _windows(self) -> Iterator[None]:
    """Yields until the current batch has unfolded windows."""
    while self._batch is None or self._cursor >= self._batch[1]:
      yield

  def _run_task(self, task: Task, layout: TaskLayout, carries: CarriesIn):
    """The fold of one task, a generator: yields whenever it waits for windows."""
    f, b = self.fns, self.engine.batch_size
    block = task.block
    cut = block.carry_start
    planes = not task.x_only
    x = self._x  # read by row_start, written in place by row_end (a row's slot after its read)
    if task.x_in and x is None:
      raise RuntimeError(f"task {block.index}: no x carry from the task before")
    if task.x_out and x is None:
      x = f.zeros(f.x_shape)
    y_in = z_in = None
    if planes and (task.y_in or task.z_in):
      y_in, z_in = carries()
    if planes:
      s = f.frame_start(self._put(z_in)) if task.z_in else f.zeros(f.frame_shape)
      y_out = f.zeros(f.y_shape) if task.y_out else None
      if task.y_in:
        y_in = self._put(y_in)
    nx = len(layout.x_offsets)
    for pz, z_off in layout.planes:
      t = None
      if planes:
        t = f.plane_start(y_in, pz) if task.y_in else f.zeros(f.plane_shape)
      for py, y_off in layout.rows:
        u = f.row_start(x, pz, py) if task.x_in else f.zeros(f.row_shape)
        done = 0
        while done < nx:
          yield from self._windows()
          out, count = self._batch
          take = min(nx - done, count - self._cursor)
          offsets = np.zeros((b,), np.int32)
          offsets[:take] = layout.x_offsets[done : done + take]
          u = f.row_add(u, out, self._cursor, take, offsets)
          self._cursor += take
          done += take
        if planes or task.x_out:
          t, x_new = f.row_end(t, u, x if task.x_out else None, y_off, pz, py, cut[2])
          if task.x_out:
            x = x_new
      if planes:
        s, y_out = f.plane_end(s, t, y_out, z_off, pz, cut[1])
    if task.x_out:
      self._x = x
    if not planes:
      return Finished(task, None, None, None)
    crop = np.asarray(block.crop_start, np.int32)
    return Finished(
      task,
      f.block_out(s, crop) if task.write else None,
      y_out,
      f.carry_out(s, cut[0]) if task.z_out else None,
    )

  def _put(self, array):
    """A carry in: a numpy array from a file goes to every device; a device array stays."""
    if isinstance(array, jax.Array):
      return array
    return jax.device_put(np.asarray(array, np.float32), self.engine.replicated)
