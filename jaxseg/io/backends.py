"""Format backends: each reads boxes of one on-disk format in the file's own axis order.

A backend has ``shape``, ``dtype`` and ``chunks`` (or None) in on-disk order, a ``where`` string
for messages, and ``read(slices) -> np.ndarray`` for a list of unit-step slices, one per on-disk
axis. :class:`jaxseg.io.volume.Volume` wraps a backend and maps canonical ``[c,] z, y, x`` keys to
it; nothing else in jaxseg uses a backend directly.

Backends:
  * tensorstore: zarr v2, zarr v3, N5, neuroglancer precomputed (and any tensorstore spec dict);
    the only writable one (``write(slices, array)``).
  * HDF5 (``file.h5:dataset``) through h5py.
  * TIFF stacks through tifffile (page by page).
  * Folders of 2-D PNG/TIFF slices (one file per z, natural sort order).
  * A z window of any of these (a held-out section range).

Also owns the on-disk metadata helpers shared by the readers and the writers: format patterns,
JSON metadata files, tensorstore opening and file kvstores.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import h5py
import numpy as np
import tensorstore as ts
import tifffile
from PIL import Image

from jaxseg.common import files as common_files
from jaxseg.io.errors import VolumeError

H5_PATTERN = re.compile(r"^(?P<file>.+?\.(?:h5|hdf5|hdf))(?::(?P<dataset>.*))?$", re.IGNORECASE)
TIFF_SUFFIXES = (".tif", ".tiff")
SLICE_SUFFIXES = (".png", ".tif", ".tiff")
PRECOMPUTED_PREFIX = "precomputed://"


def _box(slices: Sequence[slice]) -> str:
  """``[0:8, 16:32]``: a box in on-disk order, for messages."""
  return "[" + ", ".join(f"{s.start}:{s.stop}" for s in slices) + "] (on-disk order)"


class TensorStoreBackend:
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


class H5Backend:
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


class TiffBackend:
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


class SliceFolderBackend:
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


class ZRangeBackend:
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
  if path.lower().endswith(TIFF_SUFFIXES):
    return tifffile.imread(path)

  with Image.open(path) as im:
    return np.asarray(im)


def natural_key(name: str):
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
# On-disk metadata and tensorstore.


def read_json(path: str) -> dict:
  """A metadata file's object; a corrupt one (a half-written ``.zattrs``) names the file."""
  meta = common_files.read_json(path, what="metadata", error=VolumeError)
  if not isinstance(meta, dict):
    raise VolumeError(
      f"{path}: corrupt metadata, expected a JSON object, got {type(meta).__name__}"
    )
  return meta


def open_tensorstore(spec: dict, where: str, write: bool = False) -> TensorStoreBackend:

  try:
    store = ts.open(spec, open=True, read=True, write=write).result()
  except ValueError as e:
    raise VolumeError(f"{where}: tensorstore could not open it: {e}") from e
  return TensorStoreBackend(store, where)


def precomputed_resolution_zyx(path: str) -> tuple[float, float, float] | None:
  info_path = os.path.join(path, "info")
  if not os.path.exists(info_path):
    return None
  scales = read_json(info_path).get("scales") or []
  if not scales:
    return None
  try:
    x, y, z = scales[0]["resolution"]
  except (KeyError, TypeError, ValueError, IndexError):
    raise VolumeError(
      f"{info_path}: expected scales[0].resolution to be [x, y, z] nm, got {scales[0]!r}"
    ) from None
  return (z, y, x)


def local_path(spec_path: str) -> str:
  return spec_path[len("file://") :] if spec_path.startswith("file://") else spec_path


def group_error(path: str) -> VolumeError:
  children = sorted(
    e for e in os.listdir(path) if os.path.isdir(os.path.join(path, e)) and not e.startswith(".")
  )
  names = ", ".join(os.path.join(path, c) for c in children) or "none"
  return VolumeError(f"{path}: is a group, not an array; name one of its arrays: {names}")


def file_kvstore(path: str) -> dict:
  return {"driver": "file", "path": os.path.abspath(path)}
