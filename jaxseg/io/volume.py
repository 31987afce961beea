"""Lazy volumes in canonical ``[c,] z, y, x`` order over every on-disk format jaxseg reads.

A :class:`Volume` wraps a format *backend* that reads boxes in the file's own axis order, plus the
declared on-disk ``axis_order`` (a permutation of ``zyx`` or ``czyx``, e.g. ``xyz`` for NISB or
``xyzc`` for neuroglancer precomputed). Indexing a volume with canonical slices maps them to
on-disk slices, reads only that box, and transposes the result, so the rest of jaxseg never sees
another axis order and never loads a whole volume by accident.

Backends (``jaxseg.io.backends``):
  * tensorstore: zarr v2, zarr v3, N5, neuroglancer precomputed (and any tensorstore spec dict);
    the only writable one.
  * HDF5 (``file.h5:dataset``) through h5py; a file with a single dataset needs no name.
  * TIFF stacks through tifffile (page by page).
  * Folders of 2-D PNG/TIFF slices (one file per z, natural sort order).

Metadata conventions for what jaxseg writes (zarr ``.zattrs`` / ``zarr.json`` attributes, N5
``attributes.json``, HDF5 attributes):
  * ``axis_order``: the on-disk axis order, e.g. ``"czyx"``.
  * ``resolution``: nm per voxel in canonical (z, y, x) order.
  * ``offset``: voxel offset of the array origin in a larger frame, canonical (z, y, x).
  * ``source``: what the array was made from (free text or a spec).
When a file carries these, :func:`open_volume` uses them; explicit arguments win.

Writing lives in ``jaxseg.io.zarr_writer`` (chunked zarr outputs) and ``jaxseg.io.volume_writer``
(whole arrays in any format).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np

from jaxseg.io.backends import (
  H5_PATTERN,
  PRECOMPUTED_PREFIX,
  SLICE_SUFFIXES,
  TIFF_SUFFIXES,
  H5Backend,
  SliceFolderBackend,
  TensorStoreBackend,
  TiffBackend,
  ZRangeBackend,
  file_kvstore,
  group_error,
  local_path,
  natural_key,
  open_tensorstore,
  precomputed_resolution_zyx,
  read_json,
)
from jaxseg.io.errors import VolumeError

SUPPORTED_DTYPES = tuple(
    np.dtype(t)
    for t in (
        "bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
        "float16", "float32", "float64",
    )
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Axis orders.


def canonical_order(ndim: int) -> str:
  """The canonical axis order for a volume of ``ndim`` axes: ``zyx`` or ``czyx``."""
  if ndim == 3:
    return "zyx"
  if ndim == 4:
    return "czyx"
  raise ValueError(f"volumes have 3 (z, y, x) or 4 (c, z, y, x) axes, not {ndim}")


def check_axis_order(axis_order: str, ndim: int, where: str) -> str:
  """Validates an on-disk axis order string against the array rank; returns it lowercased."""
  order = axis_order.lower()
  expected = canonical_order(ndim) if ndim in (3, 4) else None
  if expected is None:
    raise VolumeError(
      f"{where}: expected a 3-D (z, y, x) or 4-D (c, z, y, x) array, found {ndim} axes"
    )
  if sorted(order) != sorted(expected):
    raise VolumeError(
      f"{where}: axis_order {axis_order!r} does not fit a {ndim}-D array; expected a "
      f"permutation of {expected!r} (e.g. {'xyz' if ndim == 3 else 'xyzc'!r} for NISB)"
    )
  return order


def disk_axes(axis_order: str) -> tuple[int, ...]:
  """For each canonical axis, the on-disk axis that holds it."""
  canon = canonical_order(len(axis_order))
  return tuple(axis_order.index(a) for a in canon)


def _normalize_key(key: Any, shape: Sequence[int], where: str) -> tuple[list[slice], list[int]]:
  """Turns a numpy-style key into unit-step slices; returns them and the axes indexed by ints."""
  if not isinstance(key, tuple):
    key = (key,)
  if any(k is Ellipsis for k in key):
    i = next(i for i, k in enumerate(key) if k is Ellipsis)
    fill = len(shape) - (len(key) - 1)
    key = key[:i] + (slice(None),) * fill + key[i + 1 :]
  if len(key) > len(shape):
    raise IndexError(f"{where}: too many indices ({len(key)}) for a {len(shape)}-D volume")
  key = key + (slice(None),) * (len(shape) - len(key))
  slices, dropped = [], []
  for axis, (k, n) in enumerate(zip(key, shape, strict=True)):
    if isinstance(k, (int, np.integer)):
      i = int(k) + n if k < 0 else int(k)
      if not 0 <= i < n:
        raise IndexError(f"{where}: index {k} out of range for axis {axis} of size {n}")
      slices.append(slice(i, i + 1))
      dropped.append(axis)
    elif isinstance(k, slice):
      start, stop, step = k.indices(n)
      if step != 1:
        raise IndexError(f"{where}: strided reads are not supported (step {step})")
      slices.append(slice(start, max(start, stop)))
    else:
      raise IndexError(f"{where}: unsupported index {k!r}; use ints and unit-step slices")
  return slices, dropped


# ---------------------------------------------------------------------------------------------
# The volume.


class Volume:
  """A lazily read volume in canonical ``[c,] z, y, x`` order.

  Attributes:
    path: where the data lives (for messages).
    shape: canonical shape, ``(z, y, x)`` or ``(c, z, y, x)``.
    dtype: numpy dtype.
    axis_order: the on-disk axis order (e.g. ``"xyz"``).
    resolution: nm per voxel, ``(z, y, x)``.
    attrs: the file's attributes (a dict; empty when the format has none).
  """

  def __init__(
    self,
    backend,
    *,
    path: str,
    axis_order: str | None = None,
    resolution: Sequence[float] | None = None,
    attrs: dict | None = None,
    default_axis_order: str | None = None,
  ):
    self._backend = backend
    self.path = path
    self.attrs = dict(attrs or {})
    ndim = len(backend.shape)
    if ndim not in (3, 4):
      raise VolumeError(
        f"{path}: expected a 3-D (z, y, x) or 4-D (c, z, y, x) array, found shape "
        f"{tuple(backend.shape)}"
      )
    if backend.dtype not in SUPPORTED_DTYPES:
      raise VolumeError(
        f"{path}: unsupported dtype {backend.dtype}; expected one of "
        f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}"
      )
    # Explicit order, else the file's own attribute, else the caller's default for files that
    # name none (NISB zarr is x-first), else canonical.
    order = (
      axis_order or self.attrs.get("axis_order") or default_axis_order or canonical_order(ndim)
    )
    self.axis_order = check_axis_order(str(order), ndim, path)
    self._to_disk = disk_axes(self.axis_order)  # canonical axis i is disk axis _to_disk[i]
    self.shape = tuple(int(backend.shape[d]) for d in self._to_disk)
    self.dtype = np.dtype(backend.dtype)
    res = resolution if resolution is not None else self.attrs.get("resolution", (1, 1, 1))
    self.resolution = check_triplet(res, "resolution", path)
    disk_chunks = getattr(backend, "chunks", None)
    self.chunks = (
      tuple(int(disk_chunks[d]) for d in self._to_disk) if disk_chunks is not None else None
    )

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def has_channels(self) -> bool:
    return self.ndim == 4

  @property
  def spatial_shape(self) -> tuple[int, int, int]:
    return self.shape[-3:]

  def __repr__(self) -> str:
    return (
      f"Volume({self.path!r}, shape={self.shape}, dtype={self.dtype}, "
      f"axis_order={self.axis_order!r}, resolution={self.resolution})"
    )

  def _disk_slices(self, key) -> tuple[list[slice], list[int], list[slice]]:
    slices, dropped = _normalize_key(key, self.shape, self.path)
    disk = [slice(0, 0)] * self.ndim
    for canon_axis, disk_axis in enumerate(self._to_disk):
      disk[disk_axis] = slices[canon_axis]
    return disk, dropped, slices

  def __getitem__(self, key) -> np.ndarray:
    disk, dropped, _ = self._disk_slices(key)
    data = self._backend.read(disk)
    # C order in canonical axes: downstream kernels (numba, jax) want contiguous arrays, and for
    # a canonical-order file this is no copy at all.
    data = np.ascontiguousarray(np.transpose(data, self._to_disk))
    if dropped:
      data = data.reshape([n for i, n in enumerate(data.shape) if i not in dropped])
    return data

  def read(self, key=None) -> np.ndarray:
    """Reads a box (numpy-style key over canonical axes), or the whole volume."""
    return self[...] if key is None else self[key]

  def __array__(self, dtype=None, copy=None):
    data = self.read()
    return data if dtype is None else data.astype(dtype)

  def z_window(self, z0: int, z1: int) -> Volume:
    """A lazy read-only view of sections ``[z0, z1)`` (e.g. a held-out validation range).

    The view's index 0 is this volume's ``z0``; its ``path`` names the range.
    """
    depth = self.spatial_shape[0]
    if not 0 <= z0 < z1 <= depth:
      raise VolumeError(f"{self.path}: z range [{z0}, {z1}) is outside its {depth} sections")
    z_axis = self._to_disk[self.ndim - 3]
    return Volume(
      ZRangeBackend(self._backend, z_axis, int(z0), int(z1)),
      path=f"{self.path}[z {z0}:{z1}]",
      axis_order=self.axis_order,
      resolution=self.resolution,
      attrs=self.attrs,
    )


class WritableVolume(Volume):
  """A tensorstore-backed volume that also accepts chunk-aligned box writes."""

  def __init__(self, backend: TensorStoreBackend, **kwargs):
    super().__init__(backend, **kwargs)
    self._pending = []

  def write(self, start: Sequence[int], array: np.ndarray, *, check_alignment: bool = True):
    """Writes ``array`` (canonical order) at canonical offset ``start``.

    Writes are asynchronous; :meth:`flush` waits for them. Boxes must be chunk-aligned (start on
    a chunk boundary, end on one or at the volume's end) so that two writers never share a chunk.

    Returns:
      The tensorstore write future.
    """
    array = np.asarray(array)
    if array.ndim != self.ndim:
      raise VolumeError(
        f"{self.path}: cannot write a {array.ndim}-D block into a {self.ndim}-D volume {self.shape}"
      )
    start = tuple(int(s) for s in start)
    stop = tuple(s + n for s, n in zip(start, array.shape, strict=True))
    if any(s < 0 or e > n for s, e, n in zip(start, stop, self.shape, strict=True)):
      raise VolumeError(
        f"{self.path}: block {start}..{stop} lies outside the volume shape {self.shape}"
      )
    if check_alignment and self.chunks is not None:
      for axis, (s, e, c, n) in enumerate(zip(start, stop, self.chunks, self.shape, strict=True)):
        if s % c or (e % c and e != n):
          raise VolumeError(
            f"{self.path}: block {start}..{stop} is not aligned to the chunk shape "
            f"{self.chunks} on axis {axis}; unaligned writes would race on shared chunks"
          )
    if array.dtype != self.dtype:
      array = array.astype(self.dtype)
    disk, _, _ = self._disk_slices(tuple(slice(s, e) for s, e in zip(start, stop, strict=True)))
    inverse = np.argsort(self._to_disk)
    future = self._backend.write(disk, np.transpose(array, inverse))
    self._pending.append(future)
    if len(self._pending) > 64:  # bound memory held by in-flight writes
      self._drain(32)
    return future

  def _drain(self, keep: int) -> None:
    while len(self._pending) > keep:
      self._pending.pop(0).result()

  def flush(self) -> None:
    """Waits until every write issued so far is durable."""
    self._drain(0)


# ---------------------------------------------------------------------------------------------
# Opening.


def check_triplet(value, name: str, where: str) -> tuple[float, float, float]:
  try:
    values = tuple(float(v) for v in value)
  except TypeError:
    raise VolumeError(f"{where}: {name} must be three numbers (z, y, x), got {value!r}") from None
  if (
    len(values) != 3 or not all(np.isfinite(values)) or (name == "resolution" and min(values) <= 0)
  ):
    raise VolumeError(f"{where}: {name} must be three positive numbers (z, y, x), got {value!r}")
  return values


def open_volume(
  spec: str | os.PathLike | dict,
  *,
  axis_order: str | None = None,
  resolution: Sequence[float] | None = None,
  dataset: str | None = None,
  default_axis_order: str | None = None,
) -> Volume:
  """Opens a volume lazily, by path or tensorstore spec.

  Args:
    spec: one of
      * ``"file.h5:dataset"`` (or ``dataset=``); a file with one dataset needs no name;
      * a zarr v2 / v3 or N5 array folder, e.g. ``"data.zarr/seg"``;
      * ``"precomputed://file:///abs/path"`` or a neuroglancer precomputed folder (with ``info``);
      * ``"stack.tif"``: a multi-page TIFF;
      * a folder of PNG / TIFF slices (one per z);
      * a tensorstore spec dict.
    axis_order: on-disk order (``"zyx"``, ``"xyz"``, ``"czyx"``, ``"xyzc"``, ...). Default: the
      file's ``axis_order`` attribute, else canonical (precomputed is always ``xyzc``).
    resolution: nm per voxel (z, y, x). Default: the file's ``resolution`` attribute, else 1.
    dataset: the HDF5 dataset, instead of the ``:dataset`` suffix.
    default_axis_order: the order to assume when neither ``axis_order`` nor the file names one
      (``"xyz"`` for NISB arrays, which carry no attributes).

  Returns:
    A :class:`Volume`; a :class:`WritableVolume` for tensorstore formats.

  Raises:
    VolumeError: missing file or dataset, a group where an array was expected, wrong rank,
      unsupported dtype; the message names the file and what was expected.
  """
  layout = {
    "axis_order": axis_order,
    "resolution": resolution,
    "default_axis_order": default_axis_order,
  }
  if isinstance(spec, dict):
    backend = open_tensorstore(spec, json.dumps(spec)[:200])
    return WritableVolume(backend, path=json.dumps(spec)[:200], **layout)
  spec = os.fspath(spec)

  if spec.startswith(PRECOMPUTED_PREFIX):
    url = spec[len(PRECOMPUTED_PREFIX) :]
    local = local_path(url)
    if url.startswith("file://") and not os.path.exists(os.path.join(local, "info")):
      raise VolumeError(f"{spec}: no neuroglancer precomputed 'info' file at {local}")
    backend = open_tensorstore(
      {"driver": "neuroglancer_precomputed", "kvstore": url.rstrip("/") + "/"}, spec
    )
    if (
      backend.shape[-1] == 1
      and np.issubdtype(backend.dtype, np.integer)
      and (axis_order is None or len(axis_order) == 3)
    ):
      # A single-channel label volume is a plain x, y, z segmentation: drop the channel axis.
      backend = TensorStoreBackend(backend.store[..., 0], spec)
      axis_order = axis_order or "xyz"
    res = resolution or (precomputed_resolution_zyx(local) if url.startswith("file://") else None)
    return WritableVolume(backend, path=spec, axis_order=axis_order or "xyzc", resolution=res)

  match = H5_PATTERN.match(spec)
  if match:
    return _open_h5(match["file"], dataset or match["dataset"], layout)

  if not os.path.exists(spec):
    raise VolumeError(f"{spec}: no such file or folder")

  if os.path.isfile(spec):
    if spec.lower().endswith(TIFF_SUFFIXES):
      backend = TiffBackend(spec)
      return Volume(backend, path=spec, **layout)
    raise VolumeError(
      f"{spec}: unknown file type; expected .h5/.hdf5[:dataset], .tif/.tiff, or a zarr / N5 / "
      "precomputed folder"
    )

  return _open_folder(spec, layout)


def _open_h5(file: str, dataset: str | None, layout: dict) -> Volume:

  if not os.path.isfile(file):
    raise VolumeError(f"{file}: no such HDF5 file")
  try:
    f = h5py.File(file, "r")
  except OSError as e:
    if e.errno is not None:
      raise  # a real system error (no permission): the CLI explains those by errno
    # h5py's own failures carry no errno: "file signature not found" (not HDF5), truncated.
    raise VolumeError(f"{file}: not a readable HDF5 file ({e})") from None
  with f:
    names = []
    f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    if not dataset:
      if len(names) != 1:
        raise VolumeError(
          f"{file}: name a dataset as '{file}:NAME'; the file holds {names or 'no datasets'}"
        )
      dataset = names[0]
    if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
      raise VolumeError(f"{file}: no dataset {dataset!r}; the file holds {names}")
  backend = H5Backend(file, dataset)
  return Volume(backend, path=f"{file}:{dataset}", attrs=backend.attrs, **layout)


def _open_folder(path: str, layout: dict) -> Volume:
  entries = set(os.listdir(path))
  if ".zarray" in entries:
    attrs = read_json(os.path.join(path, ".zattrs")) if ".zattrs" in entries else {}
    backend = open_tensorstore({"driver": "zarr", "kvstore": file_kvstore(path)}, path)
    return WritableVolume(backend, path=path, attrs=attrs, **layout)
  if "zarr.json" in entries:
    meta = read_json(os.path.join(path, "zarr.json"))
    if meta.get("node_type") == "group":
      raise group_error(path)
    backend = open_tensorstore({"driver": "zarr3", "kvstore": file_kvstore(path)}, path)
    return WritableVolume(backend, path=path, attrs=meta.get("attributes", {}), **layout)
  if ".zgroup" in entries:
    raise group_error(path)
  if "attributes.json" in entries:
    meta = read_json(os.path.join(path, "attributes.json"))
    if "dimensions" not in meta:
      raise group_error(path)
    backend = open_tensorstore({"driver": "n5", "kvstore": file_kvstore(path)}, path)
    attrs = {
      k: v
      for k, v in meta.items()
      if k not in ("dimensions", "blockSize", "dataType", "compression")
    }
    return WritableVolume(backend, path=path, attrs=attrs, **layout)
  if "info" in entries:
    return open_volume(PRECOMPUTED_PREFIX + "file://" + os.path.abspath(path), **layout)
  slices = sorted((e for e in entries if e.lower().endswith(SLICE_SUFFIXES)), key=natural_key)
  if slices:
    backend = SliceFolderBackend(path, [os.path.join(path, s) for s in slices])
    return Volume(backend, path=path, **layout)
  raise VolumeError(
    f"{path}: not a volume; expected a zarr / N5 array folder, a neuroglancer precomputed "
    "folder (with 'info') or a folder of PNG/TIFF slices"
  )


def read_volume(spec, **kwargs) -> np.ndarray:
  """Reads a whole volume into memory (canonical order). Small volumes only."""
  return open_volume(spec, **kwargs).read()
