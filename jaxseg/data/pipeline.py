"""Training data: random crops read on the host, targets made on the device.

Host side (numpy, threads; no jax): :class:`TrainData` reads random crops of ``read_shape`` =
``config.data.patch_size`` + target context from the lazy volumes of one split
(``jaxseg.io.datasets.dataset_volumes``) and returns host batches

* ``image``: float32 ``[b, Zr, Yr, Xr, c]``, normalised (``c`` = image channels);
* ``labels``: int32 ``[b, Zr, Yr, Xr]`` (0 background, -1 unlabeled: padding, or outside an
  entry's ``mask``; > 0 ids).

A batch is a pure function of ``(config.seed, step, process_index)``, so a resumed run sees exactly
the batches it would have seen. :meth:`TrainData.iterate` prefetches batches on background threads
(threads suit tensorstore reads, which release the GIL).

Device side (jax, jittable): :func:`make_device_transform` returns ``transform(key, image,
labels)`` that, per sample (vmapped), augments (training only), erodes the labels, computes the
affinity targets and masks and cuts the context off, returning float32 ``image`` ``[b, Z, Y, X,
c]``, ``target`` and ``mask`` ``[b, Z, Y, X, n_aff]`` with ``(Z, Y, X)`` = ``data.patch_size``,
and, when ``target.lsd.enabled``, the augmented, eroded int32 ``labels`` ``[b, Z, Y, X]`` of the
patch, from which the train step computes the local shape descriptors (``jaxseg.data.lsd``).

Recipes (``docs/recipes.md``, "Data"; ``docs/targets_and_losses.md``):

* NISB (``banis6``): read 138^3 (patch 128^3 + 10 trailing context per axis), divide by 255, no
  padding; every edge of the final crop has its partner, so the mask is 1 except at -1 labels.
* SNEMI (``aff12``): no target context (edges leaving the crop are masked). The volume is padded
  by ``data.pad_size`` (reflect) and crops are sampled in padded coordinates; only the needed box
  is read and the padding is made by index reflection. Labels in the padding are -1 (unlabeled;
  ``data.pad_labels="unlabeled"``) rather than PyTC's mirrored labels (``"reflect"``, ``:pytc``).
  Min-max normalisation uses per-volume statistics (:func:`normalization_stats`), the same ones
  inference uses, instead of PyTC's per-crop statistics (``normalize_scope="crop"``, ``:pytc``).

Inference normalises with :func:`normalization_stats` and :func:`normalize_image`, so training and
test images go through the same mapping (computed for each volume from its own statistics; see
``jaxseg.data.normalize`` for the ``zscore`` and ``percentile`` modes).

This module owns the crop reader (:class:`TrainData`, :class:`BatchIterator`) and the device
transform. Normalisation and volume statistics live in ``jaxseg.data.normalize``, the target
settings and read shape in ``jaxseg.data.targets``, and padding by index mapping, bounding-box
reads and int32 labels in ``jaxseg.data.crop_io``.

Public API::

  data = TrainData(config, "train", jax.process_index(), jax.process_count())
  data.read_shape                       # (Zr, Yr, Xr) = patch + context, e.g. (138, 138, 138)
  data.batch(step, b)                   # {"image": [b, Zr, Yr, Xr, c], "labels": [b, Zr, Yr, Xr]}
  data.crops(step, b)                   # the Crop(volume, start) positions batch(step, b) reads
  with data.iterate(start_step, b) as it:          # (step, batch), prefetched on threads
    ...
  val = TrainData(config, "val")
  for batch in val.eval_batches(b, n): ...         # the same crops at every call
  transform = make_device_transform(config, data.read_shape, train=True)   # jit it
  out = transform(key, batch["image"], batch["labels"])   # image / target / mask, channels last
  stats = normalize.normalization_stats(volume, config.data)   # once per volume and process
  x = normalize.normalize_image(raw, config.data, stats)
  targets.target_settings(config), targets.read_shape_for(config)
  crop_io.labels_to_int32(labels), crop_io.padded_indices(...), crop_io.read_mapped(...)

Config fields read: ``seed``; ``data.patch_size``, ``data.normalize`` (``"divide_255"`` |
``"minmax"`` | ``"zscore"`` | ``"percentile"``), ``data.normalize_scope`` (``"volume"`` |
``"crop"``; default ``"volume"``), ``data.normalize_percentiles`` (default ``(1.0, 99.0)``),
``data.pad_size`` / ``data.pad_mode`` (``"reflect"``, ``"symmetric"``, ``"edge"``, ``"constant"``) /
``data.pad_labels`` (``"unlabeled"``: -1; ``"reflect"``: padded like the image), ``data.in_memory``,
``data.prefetch``, ``data.aug`` (device side); ``target.preset``, ``target.convention``,
``target.target_context``, ``target.erosion``, ``target.erosion_plane``,
``target.relabel_connected_components`` (must be False), ``target.lsd.enabled`` (deliver the
patch labels); ``model.in_channels`` (checked). Absent
optional fields mean: no padding, not in memory, prefetch 2, no augmentation.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxseg.common.errors import ConfigError, InputError
from jaxseg.data.affinity import compute_affinities, crop_context
from jaxseg.data.crop_io import PAD_MODES, labels_to_int32, padded_indices, read_mapped
from jaxseg.data.erosion import erode_labels
from jaxseg.data.normalize import (
  VolumeStats,
  normalization_stats,
  normalize_image,
  normalize_settings,
)
from jaxseg.data.targets import lsd_settings, patch_size_for, read_shape_for, target_settings
from jaxseg.io.datasets import LabeledVolume, dataset_volumes
from jaxseg.io.volume import WritableVolume

PAD_LABELS = ("unlabeled", "reflect")

# Tags mixed into the seed so training and evaluation crops are independent random streams.
_TRAIN_STREAM = 0
_EVAL_STREAM = 1


# ---------------------------------------------------------------------------------------------
# Host side.


class Crop(NamedTuple):
  """One sampled crop.

  Attributes:
    volume: index into :attr:`TrainData.volumes`.
    start: ``(z, y, x)`` of the crop's first voxel in the *padded* coordinates of that volume's
      usable region: volume voxel = ``start - pad + (z_range[0], 0, 0)``.
  """

  volume: int
  start: tuple[int, int, int]


@dataclasses.dataclass
class _Source:
  """A volume prepared for reading: lazy or in-memory arrays, usable z range, statistics."""

  name: str
  image: Any  # Volume or ndarray, canonical [c,] z, y, x
  labels: Any  # Volume or ndarray [z, y, x]
  z0: int  # first usable section in `image` / `labels`
  shape: tuple[int, int, int]  # usable spatial shape
  channels: int
  stats: VolumeStats | None
  lock: threading.Lock | None  # serialises reads of readers that are not thread-safe
  mask: Any = None  # Volume or ndarray [z, y, x], 1 = labelled; voxels outside read as -1


class TrainData:
  """Random training crops from the volumes of one split, as pure functions of the step.

  Sampling: a volume uniformly at random, then a position uniformly at random among the crops of
  ``read_shape`` that fit the volume's usable region (its ``z_range``) grown by ``data.pad_size``.
  Only the box under the crop is read; padding is made by mapping indices back into the volume.

  ``batch(step, b)`` depends only on ``(config.seed, step, process_index)`` (and ``b``): each
  process of a multi-host run draws its own per-process batch, and a resumed run reproduces the
  batches of the original run exactly.

  Attributes:
    read_shape: ``(Zr, Yr, Xr)``, ``data.patch_size`` + the target context.
    patch_size: ``data.patch_size``.
    context: ``((lead, trail),) * 3`` read around the patch.
    pad: ``data.pad_size`` (zeros without it).
    channels: image channels ``c``.
    volumes: the split's :class:`LabeledVolume` entries.
  """

  def __init__(
    self,
    config,
    split: str = "train",
    process_index: int = 0,
    process_count: int = 1,
    *,
    volumes: Sequence[LabeledVolume] | None = None,
  ):
    """Opens the split and checks it against the config.

    Args:
      config: the full config (``seed``, ``data``, ``target``, ``model.in_channels``).
      split: ``"train"``, ``"val"`` or ``"test"``.
      process_index: this process (``jax.process_index()``).
      process_count: processes in the run (``jax.process_count()``).
      volumes: use these volumes instead of the split's (tests, custom datasets).

    Raises:
      ValueError: the split has no volumes; a volume has no labels, an empty usable axis, a
        usable shape (padded) smaller than ``read_shape``, or a channel count other than
        ``model.in_channels``; an unsupported ``data`` / ``target`` setting. Messages name the
        volume and the shapes.
    """
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
    self.config = config
    self.split = split
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    self.seed = int(config.seed)
    data = config.data
    self.target = target_settings(config)
    self.patch_size = patch_size_for(config)
    self.context = self.target.context
    self.read_shape = read_shape_for(config)
    self.prefetch = int(data.prefetch)
    self._normalize = normalize_settings(data)
    pad = data.get("pad_size", None)
    self.pad = tuple(int(p) for p in pad) if pad is not None else (0, 0, 0)
    if len(self.pad) != 3 or min(self.pad) < 0:
      raise ConfigError(f"data.pad_size must be 3 non-negative ints (z, y, x), got {pad}")
    self.pad_mode = data.get("pad_mode", "reflect")
    if self.pad_mode not in PAD_MODES:
      raise ConfigError(f"data.pad_mode must be one of {PAD_MODES}, got {self.pad_mode!r}")
    self.pad_labels = data.get("pad_labels", "unlabeled")
    if self.pad_labels not in PAD_LABELS:
      raise ConfigError(f"data.pad_labels must be one of {PAD_LABELS}, got {self.pad_labels!r}")

    if volumes is None:
      volumes = dataset_volumes(data, split)
    self.volumes = list(volumes)
    if not self.volumes:
      raise ConfigError(
        f"split {split!r} has no volumes (layout {data.get('layout')!r}, root "
        f"{data.get('root')!r}); check the {split}_seeds / {split}_files / val_sections settings"
      )
    in_channels = config.get("model", {}).get("in_channels", None)
    in_memory = bool(data.in_memory)
    self._sources = [self._prepare(v, in_channels, in_memory) for v in self.volumes]
    self.channels = self._sources[0].channels

  # -- setup -------------------------------------------------------------------------------------

  def _prepare(self, vol: LabeledVolume, in_channels, in_memory: bool) -> _Source:
    where = f"{self.split} volume {vol.name!r} ({vol.image.path})"
    if vol.labels is None:
      raise InputError(f"{where}: has no labels; training and validation crops need labels")
    shape = tuple(int(n) for n in vol.spatial_shape)
    z0 = vol.z_range[0] if vol.z_range is not None else 0
    full_z = vol.image.shape[-3]
    if vol.z_range is not None and not 0 <= z0 <= vol.z_range[1] <= full_z:
      raise InputError(f"{where}: z_range {vol.z_range} lies outside its {full_z} sections")
    if min(shape) == 0:
      raise InputError(f"{where}: usable shape {shape} (z, y, x) has an empty axis")
    padded = tuple(n + 2 * p for n, p in zip(shape, self.pad, strict=True))
    if any(r > n for r, n in zip(self.read_shape, padded, strict=True)):
      raise InputError(
        f"{where}: crop of read_shape {self.read_shape} (patch {self.patch_size} + context "
        f"{self.context}) does not fit the usable shape {shape} padded by {self.pad} = {padded}"
      )
    channels = vol.image.shape[0] if vol.image.ndim == 4 else 1
    if in_channels is not None and channels != int(in_channels):
      raise InputError(
        f"{where}: image has {channels} channel(s) (shape {vol.image.shape}) but "
        f"model.in_channels is {in_channels}"
      )
    # Of the whole file (every split of it shares the mapping), once per file and process.
    stats = normalization_stats(vol.image, self.config.data)
    image, labels, mask = vol.image, vol.labels, vol.mask
    if in_memory:
      # Small volumes (SNEMI) are read once, like PyTC's cached dataset: crops then cost a
      # memory copy instead of decoding whole TIFF pages for every crop.
      lead = (slice(None),) * (image.ndim - 3)
      image = image[(*lead, slice(z0, z0 + shape[0]))]
      labels = labels[z0 : z0 + shape[0]]
      mask = mask[z0 : z0 + shape[0]] if mask is not None else None
      z0 = 0
    # Tensorstore and numpy reads are thread-safe; TIFF / HDF5 / slice readers share file
    # handles, so the prefetch threads take turns on them.
    arrays = [a for a in (image, labels, mask) if a is not None]
    threadsafe = all(isinstance(a, (np.ndarray, WritableVolume)) for a in arrays)
    lock = None if threadsafe else threading.Lock()
    return _Source(vol.name, image, labels, z0, shape, channels, stats, lock, mask)

  # -- sampling ----------------------------------------------------------------------------------

  def _rng(self, stream: int, index: int) -> np.random.Generator:
    if index < 0:
      raise ValueError(f"step / batch index must be >= 0, got {index}")
    seq = np.random.SeedSequence([self.seed, stream, index, self.process_index])
    return np.random.Generator(np.random.PCG64(seq))

  def _sample(self, rng: np.random.Generator, batch_size: int) -> list[Crop]:
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    crops = []
    for _ in range(batch_size):
      v = int(rng.integers(len(self._sources)))
      shape = self._sources[v].shape
      start = tuple(
        int(rng.integers(0, n + 2 * p - r + 1))
        for n, p, r in zip(shape, self.pad, self.read_shape, strict=True)
      )
      crops.append(Crop(v, start))
    return crops

  def crops(self, step: int, batch_size: int) -> list[Crop]:
    """The crops of training batch ``step`` (what :meth:`batch` reads)."""
    return self._sample(self._rng(_TRAIN_STREAM, step), batch_size)

  def eval_crops(self, index: int, batch_size: int) -> list[Crop]:
    """The crops of evaluation batch ``index`` (what :meth:`eval_batches` reads)."""
    return self._sample(self._rng(_EVAL_STREAM, index), batch_size)

  # -- reading -----------------------------------------------------------------------------------

  def read_crop(self, crop: Crop) -> tuple[np.ndarray, np.ndarray]:
    """Reads one crop.

    Returns:
      ``(image, labels)``: float32 ``[Zr, Yr, Xr, c]`` normalised, int32 ``[Zr, Yr, Xr]``.
    """
    image = np.empty((*self.read_shape, self.channels), np.float32)
    labels = np.empty(self.read_shape, np.int32)
    self._read_into(crop, image, labels)
    return image, labels

  def _read_into(self, crop: Crop, image_out: np.ndarray, labels_out: np.ndarray) -> None:
    """Reads ``crop`` into ``image_out`` ``[Zr, Yr, Xr, c]`` and ``labels_out`` ``[Zr, Yr, Xr]``
    (slots of the batch arrays, so a crop is copied once after the read)."""
    src = self._sources[crop.volume]
    mapped = [
      padded_indices(np.arange(s - p, s - p + r), n, self.pad_mode)
      for s, p, r, n in zip(crop.start, self.pad, self.read_shape, src.shape, strict=True)
    ]
    axes = [m[0] for m in mapped]
    inside = [m[1] for m in mapped]
    outside = None
    if not all(i.all() for i in inside):
      outside = ~(inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :])
    lead = (slice(None),) * (src.image.ndim - 3)
    with src.lock or contextlib.nullcontext():
      image = read_mapped(src.image, lead, src.z0, axes)
      labels = read_mapped(src.labels, (), src.z0, axes)
      mask = None if src.mask is None else read_mapped(src.mask, (), src.z0, axes)
    if image.ndim == 3:
      image = image[None]
    if outside is not None and self.pad_mode == "constant":
      image = np.where(outside, np.zeros((), image.dtype), image)
    normalize_image(np.moveaxis(image, 0, -1), self.config.data, src.stats, out=image_out)
    labels_to_int32(labels, f"{src.name} labels", out=labels_out)
    if mask is not None:
      labels_out[mask == 0] = -1  # outside the labelled region: no target, no loss
    if outside is not None:
      if self.pad_labels == "unlabeled":
        labels_out[outside] = -1
      elif self.pad_mode == "constant":
        labels_out[outside] = 0

  def _read_batch(self, crops: Sequence[Crop]) -> dict[str, np.ndarray]:
    image = np.empty((len(crops), *self.read_shape, self.channels), np.float32)
    labels = np.empty((len(crops), *self.read_shape), np.int32)
    for i, crop in enumerate(crops):
      self._read_into(crop, image[i], labels[i])
    return {"image": image, "labels": labels}

  def batch(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
    """Training batch ``step``: ``{"image": float32 [b, Zr, Yr, Xr, c], "labels": int32 [b, Zr,
    Yr, Xr]}``, a pure function of ``(config.seed, step, process_index, batch_size)``."""
    return self._read_batch(self.crops(step, batch_size))

  def eval_batch(self, index: int, batch_size: int) -> dict[str, np.ndarray]:
    """Evaluation batch ``index`` (fixed crops; see :meth:`eval_batches`)."""
    return self._read_batch(self.eval_crops(index, batch_size))

  def iterate(
    self, start_step: int, batch_size: int, stop_step: int | None = None
  ) -> BatchIterator:
    """Yields ``(step, batch(step, batch_size))`` for ``step = start_step, start_step + 1, ...``
    up to ``stop_step`` (exclusive; None: forever).

    Batches are read ``data.prefetch`` ahead on background threads (0: on the caller's thread).
    Close the iterator (or use it as a context manager) to stop the threads; an exception raised
    while reading a batch is raised by ``next`` for that step. ``batch_size`` is per process.
    """
    steps = itertools.count(int(start_step)) if stop_step is None else range(start_step, stop_step)
    return BatchIterator(lambda step: self.batch(step, batch_size), steps, self.prefetch)

  def eval_batches(self, batch_size: int, n_batches: int) -> BatchIterator:
    """Yields ``n_batches`` evaluation batches (no ``step`` index), prefetched like
    :meth:`iterate`; use it on ``TrainData(config, "val")`` and call the device transform with
    ``train=False`` (no augmentation).

    The crops are the SAME at every call (a fixed seed per batch index), so the validation loss
    of successive evaluations measures the model, not the draw of crops. PyTC reseeds its
    validation crops every epoch, which adds sampling noise to the metric used to select
    checkpoints.
    """
    return BatchIterator(
      lambda i: self.eval_batch(i, batch_size),
      range(int(n_batches)),
      self.prefetch,
      yield_key=False,
    )


class BatchIterator(Iterator):
  """Computes ``make(k)`` for the keys in order, ``prefetch`` ahead on background threads.

  Yields ``(key, batch)`` (or just ``batch`` with ``yield_key=False``). An exception raised by
  ``make`` is raised by ``next`` for that key, after which the iterator is closed. ``close()``
  (also on ``with`` exit) cancels pending work and joins the threads.
  """

  def __init__(
    self,
    make: Callable[[int], Any],
    keys: Iterable[int],
    prefetch: int,
    *,
    yield_key: bool = True,
  ):
    self._make = make
    self._keys = iter(keys)
    self._prefetch = max(0, int(prefetch))
    self._yield_key = yield_key
    self._pending: collections.deque = collections.deque()
    self._closed = False
    self._executor = (
      concurrent.futures.ThreadPoolExecutor(self._prefetch, thread_name_prefix="jaxseg-data")
      if self._prefetch
      else None
    )
    self._fill()

  def _fill(self) -> None:
    while self._executor is not None and len(self._pending) < self._prefetch:
      key = next(self._keys, None)
      if key is None:
        return
      self._pending.append((key, self._executor.submit(self._make, key)))

  def __next__(self):
    if self._closed:
      raise StopIteration
    if self._executor is None:
      key = next(self._keys, None)
      if key is None:
        self._closed = True
        raise StopIteration
      try:
        value = self._make(key)
      except BaseException:
        self._closed = True
        raise
    else:
      if not self._pending:
        self.close()
        raise StopIteration
      key, future = self._pending.popleft()
      try:
        value = future.result()
      except BaseException:
        self.close()
        raise
      self._fill()
    return (key, value) if self._yield_key else value

  def close(self) -> None:
    """Cancels batches not started, waits for running ones, stops the threads. Idempotent."""
    if self._closed and self._executor is None:
      return
    self._closed = True
    for _, future in self._pending:
      future.cancel()
    self._pending.clear()
    if self._executor is not None:
      self._executor.shutdown(wait=True, cancel_futures=True)
      self._executor = None

  def __enter__(self) -> BatchIterator:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    if getattr(self, "_executor", None) is not None:
      self._executor.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# Device side.


def make_device_transform(config, read_shape: Sequence[int], *, train: bool):
  """Builds the jittable per-batch transform from host crops to model inputs and targets.

  Per sample (vmapped over the batch): augment (``train`` only, ``data.aug``), erode the labels
  (``target.erosion`` in ``target.erosion_plane``), compute affinities and masks
  (``target.preset`` / ``target.convention``) on the whole read crop, then cut the context off
  image, targets and masks.

  Args:
    config: the full config.
    read_shape: ``(Zr, Yr, Xr)`` of the host crops (``TrainData.read_shape``).
    train: augment (training) or not (evaluation).

  Returns:
    ``transform(key, image, labels) -> {"image", "target", "mask"}``: ``key`` a jax PRNG key
    (ignored, may be None, when not augmenting), ``image`` float32 ``[b, Zr, Yr, Xr, c]``,
    ``labels`` int32 ``[b, Zr, Yr, Xr]``; outputs float32 ``[b, Z, Y, X, c]`` and ``[b, Z, Y, X,
    n_aff]`` with ``(Z, Y, X)`` = ``data.patch_size``. With ``target.lsd.enabled`` also
    ``"labels"``: the augmented, eroded labels of the patch, int32 ``[b, Z, Y, X]``.

  Raises:
    ValueError: ``read_shape`` is not patch + context.
  """
  import jax
  import jax.numpy as jnp

  settings = target_settings(config)
  read_shape = tuple(int(n) for n in read_shape)
  expected = read_shape_for(config)
  if read_shape != expected:
    raise ValueError(
      f"read_shape {read_shape} is not data.patch_size {patch_size_for(config)} + target context "
      f"{settings.context} = {expected}"
    )
  aug_config = config.data.get("aug", None)
  aug_name = aug_config.get("name", "none") if aug_config is not None else "none"
  augment = None
  if train and aug_name != "none":
    # Imported here: only augmenting needs it.
    from jaxseg.data.augment import make_augment

    augment = make_augment(aug_config, read_shape)
  context = settings.context
  crop = tuple(slice(lead, n - trail) for n, (lead, trail) in zip(read_shape, context, strict=True))
  with_labels = lsd_settings(config) is not None

  def one(key, image, labels):
    if augment is not None:
      image, labels = augment(key, image, labels)
    labels = erode_labels(labels, settings.erosion, settings.erosion_plane)
    affinity, mask = compute_affinities(labels, settings.offsets, settings.convention)
    affinity = jnp.moveaxis(crop_context(affinity, context), 0, -1)
    mask = jnp.moveaxis(crop_context(mask, context), 0, -1)
    out = {"image": image[crop], "target": affinity, "mask": mask}
    if with_labels:
      out["labels"] = labels[crop]
    return out

  def transform(key, image, labels):
    image = jnp.asarray(image, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    if image.ndim != 5 or image.shape[1:4] != read_shape:
      raise ValueError(
        f"image must be [b, {', '.join(map(str, read_shape))}, c], got {image.shape}"
      )
    if labels.shape != image.shape[:4]:
      raise ValueError(
        f"labels must be {image.shape[:4]} (image {image.shape}), got {labels.shape}"
      )
    if augment is None:
      return jax.vmap(lambda x, y: one(None, x, y))(image, labels)
    keys = jax.random.split(key, image.shape[0])
    return jax.vmap(one)(keys, image, labels)

  return transform
