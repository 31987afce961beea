"""The streamed block loop of batch prediction: hulls read ahead, tasks run, blocks written behind.

:func:`jaxseg.inference.predict_lib.predict_volumes` opens each input's outputs into a :class:`Job`
and hands the tasks of all inputs (``jaxseg.inference.schedule``) to a :class:`Streamer`, which
owns everything between the input volume and the files:

* Hulls. A reader thread fetches each task's padded input box from the image ``[c,] z, y, x``,
  checks it for NaN / Inf, normalises it with the input's own statistics and hands it on as
  ``[Hz, Hy, Hx, cin]`` float32, channels last, zero-filled to ``Geometry.hull_shape``.
* Compute. The input's :class:`~jaxseg.inference.engine.BlockStream` packs the windows of
  consecutive tasks into full batches and returns each finished task's block ``[C, bz, by, bx]``
  and its y ``[Oz, wz, Cy, Px, C + 1]`` / z ``[Cz, Py, Px, C + 1]`` carries (on the device).
* Carries. A y / z carry whose consumer comes at most ``_HAND_OVER`` tasks after its producer is
  handed over on the device; the others go through ``<name>.zarr/scratch/<key>.npy`` (written
  atomically), loaded ahead on their own thread once the producer has written them.
* Writes. A writer thread writes each finished task in order: its block into the affinities
  ``[C, z, y, x]``, its carries, then its mark in ``blocks_done`` ``[nbz, nby, nbx]`` uint8, then
  deletes the carries it consumed; a block counts as done only once all of that is durable.

It also writes the preview PNG (the middle z section beside up to three affinity channels) of a
finished input. Host memory is a few hulls, blocks and carries, whatever the size of the volume.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import os
import tempfile
import time
from typing import Any

import numpy as np
from PIL import Image

from jaxseg.common.files import atomic_output
from jaxseg.common.outputs import StageOutput
from jaxseg.common.progress import progress
from jaxseg.data.normalize import VolumeStats, normalize_image
from jaxseg.inference import engine as engine_lib
from jaxseg.inference import layout
from jaxseg.inference import schedule as schedule_lib
from jaxseg.inference.geometry import Geometry, read_padded
from jaxseg.inference.schedule import Task
from jaxseg.inference.settings import InferenceSettings
from jaxseg.io import VolumeError

_PREVIEW_MAX_SIDE = 1024
_PREVIEW_MIN_SIDE = 256
# Hulls read ahead of the device, and finished tasks whose writes may still be pending.
_READ_AHEAD = 2
_WRITES_IN_FLIGHT = 2
# A y / z carry whose consumer runs at most this many tasks after its producer is handed over on
# the device (the file may not be written yet); later consumers read the file, which the bound on
# writes in flight has made durable by then.
_HAND_OVER = _WRITES_IN_FLIGHT + 1


@dataclasses.dataclass
class Job:
  """The state of one input's prediction."""

  source: Any  # predict_lib.PredictInput: .name and the lazy .volume
  geometry: Geometry
  views: tuple
  stats: VolumeStats | None
  normalization: dict  # the normalisation settings (NormalizeSettings.record())
  group: str
  affinities: Any  # WritableVolume
  done: Any  # WritableVolume of uint8 [nbz, nby, nbx]
  tasks: list[Task]  # this process's tasks, in order (schedule.plan_tasks)
  skipped: int  # this process's blocks already done
  stage: StageOutput
  blocks_written: int = 0
  windows_computed: int = 0
  halo_windows: int = 0  # of windows_computed: windows of halo / rebuilt tasks (carries only)
  model_calls: int = 0
  started: float | None = None  # perf_counter when its first block was dispatched
  finished: float | None = None  # perf_counter when its last block was durable


def _read_hull(job: Job, task: Task, settings: InferenceSettings, data_config) -> np.ndarray | None:
  """The task's padded input hull, normalised, channels-last, zero-filled to the hull shape
  (``None`` for a task without windows)."""
  g = job.geometry
  layout_ = schedule_lib.task_layout(g, task)
  if layout_.hull_start is None:
    return None
  start, stop = layout_.hull_start, layout_.hull_stop
  raw = read_padded(job.source.volume, start, stop, g.pad, settings.pad_mode)
  if np.issubdtype(raw.dtype, np.floating) and not np.all(np.isfinite(raw)):
    raise VolumeError(
      f"{job.source.volume.path}: NaN or Inf in the image within the (padded) box "
      f"{tuple(start)}..{tuple(stop)} (z, y, x)"
    )
  values = normalize_image(raw, data_config, job.stats)
  hull = np.zeros((*g.hull_shape, values.shape[0]), np.float32)
  hz, hy, hx = values.shape[1:]
  hull[:hz, :hy, :hx] = np.moveaxis(values, 0, -1)
  return hull


def scratch_dir(job: Job) -> str:
  return os.path.join(job.group, layout.SCRATCH)


def _carry_path(job: Job, key: str) -> str:
  return os.path.join(scratch_dir(job), f"{key}.npy")


def _save_carry(job: Job, key: str, array) -> None:
  """Writes a carry file atomically. The temporary file has a unique name: a neighbouring
  process computing the same carry in a halo may write it at the same moment (same bytes)."""
  scratch = scratch_dir(job)
  os.makedirs(scratch, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f"{key}.", suffix=".tmp", dir=scratch)
  try:
    with os.fdopen(fd, "wb") as f:
      np.save(f, np.asarray(array))
    os.replace(tmp, _carry_path(job, key))
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _load_carry(job: Job, key: str, written: concurrent.futures.Future | None) -> np.ndarray:
  """A carry from its file, once its producer in this run (if any) has written it."""
  if written is not None:
    written.result()
  path = _carry_path(job, key)
  try:
    return np.load(path)
  except (OSError, ValueError) as e:
    raise VolumeError(
      f"{path}: cannot read this partial sum between blocks ({e}); delete the file and predict "
      "again: it is computed again from the blocks it comes from"
    ) from None


def _write_task(job: Job, finished, written: dict[str, concurrent.futures.Future]) -> None:
  """Writes a finished task (writer thread): its block, its carries, then its done mark; then
  deletes the carries it consumed. Carries are durable before the block counts as done."""
  task = finished.task
  keys = [k for k in (task.y_out, task.z_out) if k is not None]
  try:
    if finished.block is not None:
      block = task.block
      size = tuple(e - b for b, e in zip(block.out_start, block.out_stop, strict=True))
      values = np.asarray(finished.block)[:, : size[0], : size[1], : size[2]]
      job.affinities.write((0, *block.out_start), values).result()
    for key, array in ((task.y_out, finished.y_out), (task.z_out, finished.z_out)):
      if key is not None:
        _save_carry(job, key, array)
        if key in written:
          written[key].set_result(None)
    if task.write:
      job.done.write(tuple(task.block.index), np.ones((1, 1, 1), np.uint8)).result()
      job.finished = time.perf_counter()
    for key in task.deletes:
      with contextlib.suppress(FileNotFoundError):
        os.remove(_carry_path(job, key))
  except BaseException as e:
    for key in keys:
      if key in written and not written[key].done():
        written[key].set_exception(e)
    raise


def all_done(job: Job) -> bool:
  return bool(np.all(job.done.read() == 1))


def _strided_plane(volume, lead: tuple, z: int, step: int) -> np.ndarray:
  """``volume[lead, z, ::step, ::step]`` read in bands of rows, so memory follows the preview."""
  ny = volume.shape[-2]
  band = step * max(1, 64 // step)  # rows per read, a multiple of the step
  parts = [
    np.asarray(volume[(*lead, z, slice(y, min(ny, y + band)))])[..., ::step, ::step]
    for y in range(0, ny, band)
  ]
  return np.concatenate(parts, axis=-2)


def write_preview(job: Job, settings: InferenceSettings, data_config, path: str) -> None:
  """Middle z section of the image beside up to three affinity channels, as one PNG."""
  volume = job.source.volume
  z = volume.shape[-3] // 2
  step = max(1, -(-max(volume.shape[-2:]) // _PREVIEW_MAX_SIDE))
  lead = (slice(0, 1),) if volume.has_channels else ()
  raw = _strided_plane(volume, lead, z, step).astype(np.float32)
  image = np.asarray(normalize_image(raw, data_config, job.stats)).reshape(raw.shape[-2:])
  channels = min(3, job.affinities.shape[0])
  affinity = _strided_plane(job.affinities, (slice(0, channels),), z, step).astype(np.float32)
  zoom = max(1, _PREVIEW_MIN_SIDE // max(image.shape))  # small demo sections: bigger pixels
  image = image.repeat(zoom, 0).repeat(zoom, 1)
  affinity = affinity.repeat(zoom, 1).repeat(zoom, 2)
  lo, hi = float(image.min()), float(image.max())
  tiles = [(image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)]
  if settings.activation == "none":  # logits: squash for display only
    affinity = 1.0 / (1.0 + np.exp(-affinity))
  tiles += [np.clip(a, 0, 1) for a in affinity]
  border = 4
  h, w = image.shape
  grid = np.ones((h, len(tiles) * (w + border) - border), np.float32)
  for i, tile in enumerate(tiles):
    grid[:, i * (w + border) : i * (w + border) + w] = tile
  with atomic_output(path) as tmp:
    Image.fromarray((grid * 255 + 0.5).astype(np.uint8)).save(tmp)


class Streamer:
  """Runs the tasks of ``work`` in order (grouped by input): reads ahead, computes, writes behind.

  Each input gets its own :class:`~jaxseg.inference.engine.BlockStream`, which packs the windows
  of consecutive tasks into full batches. Finished tasks go to the writer thread in order. The y
  and z carries they produce reach a consumer on the device when it comes at most
  ``_HAND_OVER`` tasks later, else through the carry file, loaded ahead on its own thread once
  the producer (if it runs here) has written it.
  """

  def __init__(self, work: list[tuple[Job, Task]], engines, settings, data_config):
    self.work = work
    self.engines = engines
    self.settings = settings
    self.data_config = data_config
    self.index = {id(task): i for i, (_, task) in enumerate(work)}
    self.producer: dict[tuple[int, str], int] = {}  # (job, carry key) -> producing task
    self.consumer: dict[tuple[int, str], int] = {}
    for i, (job, task) in enumerate(work):
      for key in (task.y_out, task.z_out):
        if key is not None:
          self.producer[id(job), key] = i
      for key in (task.y_in, task.z_in):
        if key is not None:
          self.consumer[id(job), key] = i
    # Resolved by the writer once the carry file is durable.
    self.written = {k: concurrent.futures.Future() for k in self.producer}
    self.handed: dict[tuple[int, str], Any] = {}  # device carries kept for a close consumer
    self.writes: collections.deque = collections.deque()
    self.job: Job | None = None
    self.stream: engine_lib.BlockStream | None = None

  def _hands_over(self, job: Job, key: str) -> bool:
    producer = self.producer.get((id(job), key))
    consumer = self.consumer.get((id(job), key))
    return producer is not None and consumer is not None and consumer - producer <= _HAND_OVER

  def run(self, show_progress: bool) -> None:
    with (
      concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="read") as reader,
      concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="carry") as carrier,
      concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="write") as writer,
    ):
      self.carrier, self.writer = carrier, writer
      try:
        self._run(reader, show_progress)
      finally:
        # Nothing may wait for a carry that will never be written (an error, an interrupt).
        for future in self.written.values():
          if not future.done():
            future.set_exception(RuntimeError("prediction stopped before this carry was written"))

  def _run(self, reader, show_progress: bool) -> None:
    work = self.work
    reads = collections.deque()

    def read(i: int) -> None:
      job, task = work[i]
      reads.append(reader.submit(_read_hull, job, task, self.settings, self.data_config))

    for i in range(min(_READ_AHEAD, len(work))):
      read(i)
    bar = progress(
      range(len(work)), total=len(work), desc="predict", unit="task", disable=not show_progress
    )
    for i in bar:
      job, task = work[i]
      if self.job is not job:
        self._close()
        self.job = job
        cin = job.source.volume.shape[0] if job.source.volume.has_channels else 1
        self.stream = self.engines[job.views].stream(job.geometry, cin, self._finished)
        if job.started is None:
          job.started = time.perf_counter()
      hull = reads.popleft().result()
      if i + _READ_AHEAD < len(work):
        read(i + _READ_AHEAD)
      if task.kind != schedule_lib.BLOCK or not task.write:
        job.halo_windows += task.num_windows
      self.stream.push(task, hull, self._carries_in(job, task))
      del hull
    self._close()
    while self.writes:
      self.writes.popleft().result()

  def _close(self) -> None:
    """Runs the last batch of the current input's stream and records its counts."""
    if self.stream is None:
      return
    self.stream.close()
    self.job.windows_computed += self.stream.windows
    self.job.model_calls += self.stream.model_calls
    self.stream = None

  def _finished(self, finished) -> None:
    """A task's last step is dispatched: keep close carries on the device, queue the write."""
    job, task = self.job, finished.task
    for key, array in ((task.y_out, finished.y_out), (task.z_out, finished.z_out)):
      if key is not None and self._hands_over(job, key):
        self.handed[id(job), key] = array
    written = {k: self.written[id(job), k] for k in (task.y_out, task.z_out) if k is not None}
    self.writes.append(self.writer.submit(_write_task, job, finished, written))
    job.blocks_written += int(task.write)
    while len(self.writes) > _WRITES_IN_FLIGHT:  # bounds the blocks held on host and device
      self.writes.popleft().result()

  def _carries_in(self, job: Job, task: Task):
    """The getter of a task's y / z carries: handed over, or loaded ahead from their files."""
    sources = []
    for key in (task.y_in, task.z_in):
      if key is None or self._hands_over(job, key):
        sources.append(key)
      else:
        wait = self.written.get((id(job), key))
        sources.append(self.carrier.submit(_load_carry, job, key, wait))

    def get():
      out = []
      for source in sources:
        if isinstance(source, str):
          out.append(self.handed.pop((id(job), source)))
        else:
          out.append(None if source is None else source.result())
      return tuple(out)

    return get
