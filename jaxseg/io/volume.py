"""Lazy volumes in canonical ``[c,] z, y, x`` order over every on-disk format jaxseg reads.

A :class:`Volume` wraps a format *backend* that reads boxes in the file's own axis order, plus the
declared on-disk ``axis_order`` (a permutation of ``zyx`` or ``czyx``, e.g. ``xyz`` for NISB or
``xyzc`` for neuroglancer precomputed). Indexing a volume with canonical slices maps them to
on-disk slices, reads only that box, and transposes the result, so the rest of jaxseg never sees
another axis order and never loads a whole volume by accident.

Backends:
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
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np
import tensorstore as ts
import tifffile
from PIL import Image

from jaxseg.io.errors import VolumeError

SUPPORTED_DTYPES = tuple(
    np.dtype(t)
    for t in (
        "bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
        "float16", "float32", "float64",
    )
)  # fmt: skip

_H5_PATTERN = re.compile(r"^(?P<file>.+?\.(?:h5|hdf5|hdf))(?::(?P<dataset>.*))?$", re.IGNORECASE)
_TIFF_SUFFIXES = (".tif", ".tiff")
_SLICE_SUFFIXES = (".png", ".tif", ".tiff")
_PRECOMPUTED_PREFIX = "precomputed://"


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


def _disk_axes(axis_order: str) -> tuple[int, ...]:
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
# Backends: each reads (and for tensorstore writes) boxes in on-disk order.


def _box(slices: Sequence[slice]) -> str:
  """``[0:8, 16:32]``: a box in on-disk order, for messages."""
  return "[" + ", ".join(f"{s.start}:{s.stop}" for s in slices) + "] (on-disk order)"


class _TensorStoreBackend:
  def __init__(self, store, where: str):
    self.store = store
    self.where = where
    self.shape = tuple(int(n) for n in store.shape)
    self.dtype = np.dtype(store.dtype.numpy_dtype)
    try:
      self.chunks = tuple(int(c) for c in store.chunk_layout.read_chunk.shape)
    except (TypeError, ValueError):
      self.chunks = None
    # Neuroglancer precomputed arrays have a non-zero-origin domain; read relative to it.
    self.origin = tuple(int(o) for o in store.domain.inclusive_min)

  def read(self, slices: Sequence[slice]) -> np.ndarray:
    key = tuple(slice(s.start + o, s.stop + o) for s, o in zip(slices, self.origin, strict=True))
    try:
      return np.asarray(self.store[key].read().result())
    except ValueError as e:
      # A corrupt or truncated chunk: tensorstore's message names the chunk file.
      raise VolumeError(f"{self.where}: cannot read {_box(slices)}: {e}") from e

  def write(self, slices: Sequence[slice], array: np.ndarray):
    key = tuple(slice(s.start + o, s.stop + o) for s, o in zip(slices, self.origin, strict=True))
    return self.store[key].write(array)


class _H5Backend:
  """An HDF5 dataset; the file is opened per read so that no handle outlives the call (a held
  read-only handle would block a later writer of the same file)."""

  def __init__(self, file: str, dataset: str):

    self.where = f"{file}:{dataset}"
    self._file, self._name = file, dataset
    with h5py.File(file, "r") as f:
      ds = f[dataset]
      self.shape = tuple(ds.shape)
      self.dtype = np.dtype(ds.dtype)
      self.chunks = ds.chunks
      self.attrs = {k: _plain(v) for k, v in ds.attrs.items()}

  def read(self, slices: Sequence[slice]) -> np.ndarray:

    try:
      with h5py.File(self._file, "r") as f:
        return np.asarray(f[self._name][tuple(slices)])
    except OSError as e:  # h5py: a corrupt chunk, a truncated or vanished file
      raise VolumeError(f"{self.where}: cannot read {_box(slices)}: {e}") from e


class _TiffBackend:
  """A multi-page TIFF read page by page (pages are z for a 3-D stack)."""

  def __init__(self, file: str):

    self.where = file
    try:
      self._tif = tifffile.TiffFile(file)
    except tifffile.TiffFileError as e:
      raise VolumeError(f"{file}: not a readable TIFF file ({e})") from None
    series = self._tif.series[0]
    self.shape = tuple(int(n) for n in series.shape)
    self.dtype = np.dtype(series.dtype)
    self.chunks = None
    self._paged = len(self.shape) == 3 and len(series.pages) == self.shape[0]

  def read(self, slices: Sequence[slice]) -> np.ndarray:
    if self._paged:
      z = slices[0]
      pages = range(z.start, z.stop)
      if not pages:
        return np.empty((0, *[s.stop - s.start for s in slices[1:]]), self.dtype)
      data = self._tif.asarray(key=pages)
      data = data.reshape(len(pages), *self.shape[1:])
      return data[(slice(None), *slices[1:])]
    return self._tif.asarray()[tuple(slices)]


class _SliceFolderBackend:
  """A folder of 2-D images, one per z slice, in natural sort order."""

  def __init__(self, folder: str, files: list[str]):
    self.where = folder
    self._files = files
    first = _read_image(files[0])
    if first.ndim != 2:
      raise VolumeError(f"{files[0]}: expected a 2-D grayscale slice, found shape {first.shape}")
    self.shape = (len(files), *first.shape)
    self.dtype = first.dtype
    self.chunks = (1, *first.shape)

  def read(self, slices: Sequence[slice]) -> np.ndarray:
    z, y, x = slices
    out = np.empty((z.stop - z.start, y.stop - y.start, x.stop - x.start), self.dtype)
    for i, f in enumerate(self._files[z.start : z.stop]):
      img = _read_image(f)
      if img.shape != self.shape[1:]:
        raise VolumeError(
          f"{f}: slice shape {img.shape} differs from the first slice's {self.shape[1:]}"
        )
      out[i] = img[y, x]
    return out


class _ZRangeBackend:
  """A read-only window of another backend: sections ``[z0, z1)`` along disk axis ``z_axis``."""

  def __init__(self, inner, z_axis: int, z0: int, z1: int):
    self.inner = inner
    self.z_axis = z_axis
    self.z0 = z0
    shape = list(inner.shape)
    shape[z_axis] = z1 - z0
    self.shape = tuple(shape)
    self.dtype = inner.dtype
    self.chunks = getattr(inner, "chunks", None)

  def read(self, slices: Sequence[slice]) -> np.ndarray:
    slices = list(slices)
    s = slices[self.z_axis]
    slices[self.z_axis] = slice(s.start + self.z0, s.stop + self.z0)
    return self.inner.read(slices)


def _read_image(path: str) -> np.ndarray:
  if path.lower().endswith(_TIFF_SUFFIXES):
    return tifffile.imread(path)

  with Image.open(path) as im:
    return np.asarray(im)


def _natural_key(name: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _plain(value):
  """h5py / numpy attribute values as plain JSON-able Python values."""
  if isinstance(value, bytes):
    return value.decode()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  return value


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
    self._to_disk = _disk_axes(self.axis_order)  # canonical axis i is disk axis _to_disk[i]
    self.shape = tuple(int(backend.shape[d]) for d in self._to_disk)
    self.dtype = np.dtype(backend.dtype)
    res = resolution if resolution is not None else self.attrs.get("resolution", (1, 1, 1))
    self.resolution = _check_triplet(res, "resolution", path)
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
      _ZRangeBackend(self._backend, z_axis, int(z0), int(z1)),
      path=f"{self.path}[z {z0}:{z1}]",
      axis_order=self.axis_order,
      resolution=self.resolution,
      attrs=self.attrs,
    )


class WritableVolume(Volume):
  """A tensorstore-backed volume that also accepts chunk-aligned box writes."""

  def __init__(self, backend: _TensorStoreBackend, **kwargs):
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


def _check_triplet(value, name: str, where: str) -> tuple[float, float, float]:
  try:
    values = tuple(float(v) for v in value)
  except TypeError:
    raise VolumeError(f"{where}: {name} must be three numbers (z, y, x), got {value!r}") from None
  if (
    len(values) != 3 or not all(np.isfinite(values)) or (name == "resolution" and min(values) <= 0)
  ):
    raise VolumeError(f"{where}: {name} must be three positive numbers (z, y, x), got {value!r}")
  return values


def _read_json(path: str) -> dict:
  """A metadata file's object; a corrupt one (a half-written ``.zattrs``) names the file."""
  with open(path) as f:
    try:
      meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise VolumeError(f"{path}: corrupt metadata, not valid JSON ({e})") from None
  if not isinstance(meta, dict):
    raise VolumeError(
      f"{path}: corrupt metadata, expected a JSON object, got {type(meta).__name__}"
    )
  return meta


def _open_tensorstore(spec: dict, where: str, write: bool = False) -> _TensorStoreBackend:

  try:
    store = ts.open(spec, open=True, read=True, write=write).result()
  except ValueError as e:
    raise VolumeError(f"{where}: tensorstore could not open it: {e}") from e
  return _TensorStoreBackend(store, where)


def _precomputed_resolution_zyx(path: str) -> tuple[float, float, float] | None:
  info_path = os.path.join(path, "info")
  if not os.path.exists(info_path):
    return None
  scales = _read_json(info_path).get("scales") or []
  if not scales:
    return None
  try:
    x, y, z = scales[0]["resolution"]
  except (KeyError, TypeError, ValueError, IndexError):
    raise VolumeError(
      f"{info_path}: expected scales[0].resolution to be [x, y, z] nm, got {scales[0]!r}"
    ) from None
  return (z, y, x)


def _local_path(spec_path: str) -> str:
  return spec_path[len("file://") :] if spec_path.startswith("file://") else spec_path


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
    backend = _open_tensorstore(spec, json.dumps(spec)[:200])
    return WritableVolume(backend, path=json.dumps(spec)[:200], **layout)
  spec = os.fspath(spec)

  if spec.startswith(_PRECOMPUTED_PREFIX):
    url = spec[len(_PRECOMPUTED_PREFIX) :]
    local = _local_path(url)
    if url.startswith("file://") and not os.path.exists(os.path.join(local, "info")):
      raise VolumeError(f"{spec}: no neuroglancer precomputed 'info' file at {local}")
    backend = _open_tensorstore(
      {"driver": "neuroglancer_precomputed", "kvstore": url.rstrip("/") + "/"}, spec
    )
    if (
      backend.shape[-1] == 1
      and np.issubdtype(backend.dtype, np.integer)
      and (axis_order is None or len(axis_order) == 3)
    ):
      # A single-channel label volume is a plain x, y, z segmentation: drop the channel axis.
      backend = _TensorStoreBackend(backend.store[..., 0], spec)
      axis_order = axis_order or "xyz"
    res = resolution or (_precomputed_resolution_zyx(local) if url.startswith("file://") else None)
    return WritableVolume(backend, path=spec, axis_order=axis_order or "xyzc", resolution=res)

  match = _H5_PATTERN.match(spec)
  if match:
    return _open_h5(match["file"], dataset or match["dataset"], layout)

  if not os.path.exists(spec):
    raise VolumeError(f"{spec}: no such file or folder")

  if os.path.isfile(spec):
    if spec.lower().endswith(_TIFF_SUFFIXES):
      backend = _TiffBackend(spec)
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
  backend = _H5Backend(file, dataset)
  return Volume(backend, path=f"{file}:{dataset}", attrs=backend.attrs, **layout)


def _open_folder(path: str, layout: dict) -> Volume:
  entries = set(os.listdir(path))
  if ".zarray" in entries:
    attrs = _read_json(os.path.join(path, ".zattrs")) if ".zattrs" in entries else {}
    backend = _open_tensorstore({"driver": "zarr", "kvstore": _file_kvstore(path)}, path)
    return WritableVolume(backend, path=path, attrs=attrs, **layout)
  if "zarr.json" in entries:
    meta = _read_json(os.path.join(path, "zarr.json"))
    if meta.get("node_type") == "group":
      raise _group_error(path)
    backend = _open_tensorstore({"driver": "zarr3", "kvstore": _file_kvstore(path)}, path)
    return WritableVolume(backend, path=path, attrs=meta.get("attributes", {}), **layout)
  if ".zgroup" in entries:
    raise _group_error(path)
  if "attributes.json" in entries:
    meta = _read_json(os.path.join(path, "attributes.json"))
    if "dimensions" not in meta:
      raise _group_error(path)
    backend = _open_tensorstore({"driver": "n5", "kvstore": _file_kvstore(path)}, path)
    attrs = {
      k: v
      for k, v in meta.items()
      if k not in ("dimensions", "blockSize", "dataType", "compression")
    }
    return WritableVolume(backend, path=path, attrs=attrs, **layout)
  if "info" in entries:
    return open_volume(_PRECOMPUTED_PREFIX + "file://" + os.path.abspath(path), **layout)
  slices = sorted((e for e in entries if e.lower().endswith(_SLICE_SUFFIXES)), key=_natural_key)
  if slices:
    backend = _SliceFolderBackend(path, [os.path.join(path, s) for s in slices])
    return Volume(backend, path=path, **layout)
  raise VolumeError(
    f"{path}: not a volume; expected a zarr / N5 array folder, a neuroglancer precomputed "
    "folder (with 'info') or a folder of PNG/TIFF slices"
  )


def _group_error(path: str) -> VolumeError:
  children = sorted(
    e for e in os.listdir(path) if os.path.isdir(os.path.join(path, e)) and not e.startswith(".")
  )
  names = ", ".join(os.path.join(path, c) for c in children) or "none"
  return VolumeError(f"{path}: is a group, not an array; name one of its arrays: {names}")


def _file_kvstore(path: str) -> dict:
  return {"driver": "file", "path": os.path.abspath(path)}


def read_volume(spec, **kwargs) -> np.ndarray:
  """Reads a whole volume into memory (canonical order). Small volumes only."""
  return open_volume(spec, **kwargs).read()


# ---------------------------------------------------------------------------------------------
# Creating and writing.


# Chunks of streamed outputs are at most this many voxels per axis (128^3 x 3 channels of float16
# is 12 MB: big enough for fast sequential reads, small enough for the decoder's blocks).
MAX_BLOCK_CHUNK = 128


def block_chunks(block_shape: Sequence[int]) -> tuple[int, ...]:
  """Per axis, the largest divisor of the block edge that is at most :data:`MAX_BLOCK_CHUNK`.

  Blocks are whole numbers of chunks, so two blocks never write into one chunk.
  """
  return tuple(
    next(c for c in range(min(int(b), MAX_BLOCK_CHUNK), 0, -1) if int(b) % c == 0)
    for b in block_shape
  )


def _default_chunks(shape: Sequence[int]) -> tuple[int, ...]:
  spatial = tuple(min(n, 64) for n in shape[-3:])
  return (shape[0], *spatial) if len(shape) == 4 else spatial


def _metadata_attrs(axis_order: str, resolution, offset, source, attributes) -> dict:
  attrs = dict(attributes or {})
  attrs.update(
    {
      "axis_order": axis_order,
      "resolution": [float(r) for r in resolution],
      "offset": [int(o) for o in offset],
    }
  )
  if source is not None:
    attrs["source"] = source if isinstance(source, (str, int, float, list, dict)) else str(source)
  return attrs


def _ensure_parent_group(path: str, zarr_format: int) -> None:
  """Makes ``data.zarr`` a zarr group when creating ``data.zarr/img``."""
  parent = os.path.dirname(os.path.abspath(path))
  if not parent.lower().endswith((".zarr", ".zarr3")):
    return
  os.makedirs(parent, exist_ok=True)
  if zarr_format == 2 and not os.path.exists(os.path.join(parent, ".zgroup")):
    with open(os.path.join(parent, ".zgroup"), "w") as f:
      json.dump({"zarr_format": 2}, f)
  elif zarr_format == 3 and not os.path.exists(os.path.join(parent, "zarr.json")):
    with open(os.path.join(parent, "zarr.json"), "w") as f:
      json.dump({"zarr_format": 3, "node_type": "group", "attributes": {}}, f)


def _exists_as_array(path: str) -> bool:
  return any(
    os.path.exists(os.path.join(path, m))
    for m in (".zarray", "zarr.json", "attributes.json", "info")
  )


def create_zarr(
  path: str | os.PathLike,
  shape: Sequence[int],
  dtype,
  *,
  chunks: Sequence[int] | None = None,
  axis_order: str | None = None,
  resolution: Sequence[float] = (1.0, 1.0, 1.0),
  offset: Sequence[int] = (0, 0, 0),
  source: Any = None,
  zarr_format: int = 2,
  compression: str | None = "blosc-lz4",
  attributes: dict | None = None,
  overwrite: bool = False,
  fill_value=0,
) -> WritableVolume:
  """Creates a chunked, compressed zarr array through tensorstore.

  Args:
    path: the array folder; ``x.zarr/name`` makes ``x.zarr`` a group holding ``name``.
    shape: canonical shape ``(z, y, x)`` or ``(c, z, y, x)``.
    dtype: numpy dtype.
    chunks: canonical chunk shape (default: all channels, up to 64 per spatial axis).
    axis_order: on-disk order (default canonical); NISB uses ``"xyz"`` / ``"xyzc"``.
    resolution: nm per voxel (z, y, x), stored in the attributes.
    offset: voxel offset (z, y, x) of this array in a larger frame, stored in the attributes.
    source: what the array was made from (stored in the attributes).
    zarr_format: 2 or 3.
    compression: ``"blosc-lz4"`` (fast, the default), ``"zstd"``, ``"gzip"`` or ``None``.
    attributes: extra attributes to store.
    overwrite: replace an existing array; otherwise an existing array is an error, so nothing
      written earlier is ever lost by accident.
    fill_value: the value of chunks never written.

  Returns:
    A :class:`WritableVolume`.
  """

  path = os.fspath(path)
  shape = tuple(int(n) for n in shape)
  ndim = len(shape)
  dtype = np.dtype(dtype)
  if dtype not in SUPPORTED_DTYPES:
    raise VolumeError(f"{path}: unsupported dtype {dtype}")
  if ndim not in (3, 4) or min(shape) < 1:
    raise VolumeError(f"{path}: expected a 3-D or 4-D shape of positive sizes, got {shape}")
  order = check_axis_order(axis_order or canonical_order(ndim), ndim, path)
  chunks = tuple(int(c) for c in (chunks or _default_chunks(shape)))
  if len(chunks) != ndim or min(chunks) < 1:
    raise VolumeError(f"{path}: chunk shape {chunks} does not fit shape {shape}")
  chunks = tuple(min(c, n) for c, n in zip(chunks, shape, strict=True))
  to_disk = _disk_axes(order)
  disk_shape = [0] * ndim
  disk_chunks = [0] * ndim
  for canon_axis, disk_axis in enumerate(to_disk):
    disk_shape[disk_axis] = shape[canon_axis]
    disk_chunks[disk_axis] = chunks[canon_axis]
  resolution = _check_triplet(resolution, "resolution", path)
  attrs = _metadata_attrs(order, resolution, offset, source, attributes)

  if os.path.exists(path):
    if not overwrite:
      if _exists_as_array(path):
        raise VolumeError(
          f"{path}: an array already exists here; pass overwrite=True to replace it"
        )
      if os.listdir(path):
        raise VolumeError(f"{path}: folder exists and is not empty; refusing to write into it")
    else:
      shutil.rmtree(path)
  _ensure_parent_group(path, zarr_format)

  kvstore = _file_kvstore(path)
  fill = np.asarray(fill_value, dtype=dtype).item()
  if zarr_format == 2:
    compressor = {
      "blosc-lz4": {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1},
      "zstd": {"id": "blosc", "cname": "zstd", "clevel": 3, "shuffle": 1},
      "gzip": {"id": "zlib", "level": 5},
      None: None,
    }
    if compression not in compressor:
      raise VolumeError(f"{path}: unknown compression {compression!r}")
    spec = {
        "driver": "zarr",
        "kvstore": kvstore,
        "metadata": {
            "shape": disk_shape, "chunks": disk_chunks, "dtype": dtype.str,
            "compressor": compressor[compression], "fill_value": fill, "order": "C",
        },
    }  # fmt: skip
  elif zarr_format == 3:
    codecs = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if compression == "blosc-lz4":
      codecs.append(
        {
          "name": "blosc",
          "configuration": {
            "cname": "lz4",
            "clevel": 5,
            "shuffle": "shuffle",
            "typesize": dtype.itemsize,
          },
        }
      )
    elif compression in ("zstd", "gzip"):
      codecs.append({"name": compression, "configuration": {"level": 3}})
    elif compression is not None:
      raise VolumeError(f"{path}: unknown compression {compression!r}")
    spec = {
        "driver": "zarr3",
        "kvstore": kvstore,
        "metadata": {
            "shape": disk_shape, "data_type": _zarr3_dtype(dtype),
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": disk_chunks}},
            "codecs": codecs, "fill_value": fill, "attributes": attrs,
        },
    }  # fmt: skip
  else:
    raise VolumeError(f"{path}: zarr_format must be 2 or 3, got {zarr_format}")
  store = ts.open(spec, create=True).result()
  if zarr_format == 2:
    with open(os.path.join(path, ".zattrs"), "w") as f:
      json.dump(attrs, f, indent=2)
  return WritableVolume(
    _TensorStoreBackend(store, path),
    path=path,
    axis_order=order,
    resolution=resolution,
    attrs=attrs,
  )


def reopen_zarr(path: str | os.PathLike) -> WritableVolume:
  """Opens an existing zarr v2 / v3 array for reading *and writing* (resuming a run).

  :func:`open_volume` opens read-only, so that reading never risks a file; a run that continues
  filling an array it created earlier reopens it with this.

  Raises:
    VolumeError: no zarr array at ``path``.
  """
  path = os.fspath(path)
  if os.path.exists(os.path.join(path, ".zarray")):
    attrs_file = os.path.join(path, ".zattrs")
    attrs = _read_json(attrs_file) if os.path.exists(attrs_file) else {}
    driver = "zarr"
  elif os.path.exists(os.path.join(path, "zarr.json")):
    meta = _read_json(os.path.join(path, "zarr.json"))
    if meta.get("node_type") == "group":
      raise _group_error(path)
    attrs, driver = meta.get("attributes", {}), "zarr3"
  else:
    raise VolumeError(f"{path}: no zarr array here to reopen")
  backend = _open_tensorstore({"driver": driver, "kvstore": _file_kvstore(path)}, path, write=True)
  return WritableVolume(backend, path=path, attrs=attrs)


def _zarr3_dtype(dtype: np.dtype) -> str:
  return "bool" if dtype == np.bool_ else dtype.name


def write_volume(
  path: str | os.PathLike,
  array: np.ndarray,
  *,
  format: str | None = None,
  axis_order: str | None = None,
  resolution: Sequence[float] = (1.0, 1.0, 1.0),
  chunks: Sequence[int] | None = None,
  offset: Sequence[int] = (0, 0, 0),
  source: Any = None,
  attributes: dict | None = None,
  overwrite: bool = False,
) -> Volume:
  """Writes a whole in-memory array (canonical order) in any supported format.

  The format comes from ``format`` or the path: ``.zarr`` (zarr v2), ``.zarr3`` or
  ``format="zarr3"``, ``.n5``, ``file.h5:dataset``, ``.tif``, ``precomputed://file:///...`` or
  ``format="precomputed"``, ``format="png"`` (a folder of 8/16-bit slices, 3-D only).

  Returns:
    The written volume, reopened for reading.
  """
  array = np.asarray(array)
  path = os.fspath(path)
  ndim = array.ndim
  order = check_axis_order(axis_order or canonical_order(ndim), ndim, path)
  fmt = format or _guess_format(path)
  if fmt in ("zarr", "zarr3"):
    out = create_zarr(
      path,
      array.shape,
      array.dtype,
      chunks=chunks,
      axis_order=order,
      resolution=resolution,
      offset=offset,
      source=source,
      zarr_format=3 if fmt == "zarr3" else 2,
      attributes=attributes,
      overwrite=overwrite,
    )
    out.write((0,) * ndim, array, check_alignment=False)
    out.flush()
    return open_volume(path)

  to_disk = _disk_axes(order)
  disk_array = np.transpose(array, np.argsort(to_disk))
  resolution = _check_triplet(resolution, "resolution", path)
  attrs = _metadata_attrs(order, resolution, offset, source, attributes)

  if fmt == "h5":
    match = _H5_PATTERN.match(path)
    file, dataset = match["file"], match["dataset"] or "main"
    with h5py.File(file, "a") as f:
      if dataset in f:
        if not overwrite:
          raise VolumeError(f"{file}: dataset {dataset!r} exists; pass overwrite=True")
        del f[dataset]
      ds = f.create_dataset(
        dataset, data=disk_array, compression="gzip", compression_opts=4, chunks=True
      )
      for k, v in attrs.items():
        ds.attrs[k] = json.dumps(v) if isinstance(v, dict) else v
    return open_volume(f"{file}:{dataset}")

  _refuse_existing(path, overwrite)
  if fmt == "tif":
    tifffile.imwrite(
      path, disk_array, compression="zlib", metadata={"axes": order.upper().replace("C", "C")}
    )
    return open_volume(path, axis_order=order, resolution=resolution)
  if fmt == "png":
    if ndim != 3 or order != "zyx" or array.dtype not in (np.uint8, np.uint16):
      raise VolumeError(f"{path}: PNG slices hold 3-D zyx uint8/uint16 volumes only")
    os.makedirs(path, exist_ok=True)
    digits = max(4, len(str(array.shape[0])))
    for z, plane in enumerate(array):
      Image.fromarray(plane).save(os.path.join(path, f"{z:0{digits}d}.png"))
    return open_volume(path, resolution=resolution)
  if fmt == "n5":
    chunk = chunks or _default_chunks(array.shape)
    disk_chunks = [int(chunk[list(to_disk).index(d)]) for d in range(ndim)]
    store = ts.open({
        "driver": "n5", "kvstore": _file_kvstore(path),
        "metadata": {"dimensions": list(disk_array.shape), "blockSize": disk_chunks,
                     "dataType": array.dtype.name, "compression": {"type": "gzip"}},
    }, create=True).result()  # fmt: skip
    store.write(disk_array).result()
    meta_path = os.path.join(path, "attributes.json")
    meta = _read_json(meta_path)
    meta.update(attrs)
    with open(meta_path, "w") as f:
      json.dump(meta, f)
    return open_volume(path)
  if fmt == "precomputed":
    return _write_precomputed(path, array, order, resolution, chunks)
  raise VolumeError(f"{path}: unknown output format {fmt!r}")


def _guess_format(path: str) -> str:
  lower = path.lower()
  if lower.startswith(_PRECOMPUTED_PREFIX):
    return "precomputed"
  if _H5_PATTERN.match(path):
    return "h5"
  for suffix, fmt in (
    (".zarr3", "zarr3"),
    (".zarr", "zarr"),
    (".n5", "n5"),
    (".tif", "tif"),
    (".tiff", "tif"),
  ):
    if lower.rstrip("/").endswith(suffix):
      return fmt
  if os.path.dirname(lower).endswith(".zarr"):
    return "zarr"
  raise VolumeError(
    f"{path}: cannot tell the output format from the name; use .zarr, .zarr3, .n5, "
    ".h5:dataset, .tif, precomputed://..., or pass format="
  )


def _refuse_existing(path: str, overwrite: bool) -> None:
  local = (
    _local_path(path[len(_PRECOMPUTED_PREFIX) :]) if path.startswith(_PRECOMPUTED_PREFIX) else path
  )
  if os.path.exists(local):
    if not overwrite:
      raise VolumeError(f"{local}: already exists; pass overwrite=True to replace it")
    if os.path.isdir(local):
      shutil.rmtree(local)
    else:
      os.remove(local)


def _write_precomputed(path: str, array: np.ndarray, order: str, resolution, chunks) -> Volume:

  url = (
    path[len(_PRECOMPUTED_PREFIX) :]
    if path.startswith(_PRECOMPUTED_PREFIX)
    else ("file://" + os.path.abspath(path))
  )
  canon = array if array.ndim == 4 else array[None]
  xyzc = np.transpose(canon, (3, 2, 1, 0))
  z, y, x = resolution
  chunk = chunks[-3:] if chunks else _default_chunks(array.shape)[-3:]
  seg_type = np.issubdtype(array.dtype, np.integer) and array.dtype.itemsize >= 4
  store = ts.open({
      "driver": "neuroglancer_precomputed", "kvstore": url.rstrip("/") + "/",
      "multiscale_metadata": {"type": "segmentation" if seg_type else "image",
                              "data_type": array.dtype.name, "num_channels": canon.shape[0]},
      "scale_metadata": {"size": list(xyzc.shape[:3]), "resolution": [x, y, z],
                         "encoding": "raw", "chunk_size": [chunk[2], chunk[1], chunk[0]]},
  }, create=True).result()  # fmt: skip
  store.write(xyzc).result()
  opened = open_volume(_PRECOMPUTED_PREFIX + url)
  del order  # precomputed is always stored x, y, z, channel
  return opened
