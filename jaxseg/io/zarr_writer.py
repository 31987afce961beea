"""Chunked zarr outputs: :func:`create_zarr` (new arrays), :func:`reopen_zarr` (resuming a run).

Arrays are created through tensorstore, compressed, in canonical ``[c,] z, y, x`` shapes stored in
any on-disk ``axis_order``; the metadata attributes (``axis_order``, ``resolution``, ``offset``,
``source``) follow the conventions of :mod:`jaxseg.io.volume`. The result is a
:class:`~jaxseg.io.volume.WritableVolume` that takes chunk-aligned box writes.
:func:`block_chunks` picks chunk shapes that tile a streamed output's blocks.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from jaxseg.io.backends import (
  TensorStoreBackend,
  file_kvstore,
  group_error,
  open_tensorstore,
  read_json,
)
from jaxseg.io.errors import VolumeError
from jaxseg.io.volume import (
  SUPPORTED_DTYPES,
  WritableVolume,
  canonical_order,
  check_axis_order,
  check_triplet,
  disk_axes,
)

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


def default_chunks(shape: Sequence[int]) -> tuple[int, ...]:
  spatial = tuple(min(n, 64) for n in shape[-3:])
  return (shape[0], *spatial) if len(shape) == 4 else spatial


def metadata_attrs(axis_order: str, resolution, offset, source, attributes) -> dict:
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


def _check_layout(path: str, shape, dtype, chunks, axis_order):
  """Validated ``(shape, dtype, axis_order, chunks)``, chunks clipped to the shape."""
  shape = tuple(int(n) for n in shape)
  ndim = len(shape)
  dtype = np.dtype(dtype)
  if dtype not in SUPPORTED_DTYPES:
    raise VolumeError(f"{path}: unsupported dtype {dtype}")
  if ndim not in (3, 4) or min(shape) < 1:
    raise VolumeError(f"{path}: expected a 3-D or 4-D shape of positive sizes, got {shape}")
  order = check_axis_order(axis_order or canonical_order(ndim), ndim, path)
  chunks = tuple(int(c) for c in (chunks or default_chunks(shape)))
  if len(chunks) != ndim or min(chunks) < 1:
    raise VolumeError(f"{path}: chunk shape {chunks} does not fit shape {shape}")
  chunks = tuple(min(c, n) for c, n in zip(chunks, shape, strict=True))
  return shape, dtype, order, chunks


def _disk_layout(order: str, shape, chunks) -> tuple[list[int], list[int]]:
  """The shape and chunk shape in on-disk axis order."""
  ndim = len(shape)
  to_disk = disk_axes(order)
  disk_shape = [0] * ndim
  disk_chunks = [0] * ndim
  for canon_axis, disk_axis in enumerate(to_disk):
    disk_shape[disk_axis] = shape[canon_axis]
    disk_chunks[disk_axis] = chunks[canon_axis]
  return disk_shape, disk_chunks


def _clear_destination(path: str, overwrite: bool, zarr_format: int) -> None:
  """Refuses (or, with ``overwrite``, removes) what is at ``path``; makes the parent group."""
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


def _zarr2_spec(path, kvstore, disk_shape, disk_chunks, dtype, fill, compression) -> dict:
  compressor = {
    "blosc-lz4": {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1},
    "zstd": {"id": "blosc", "cname": "zstd", "clevel": 3, "shuffle": 1},
    "gzip": {"id": "zlib", "level": 5},
    None: None,
  }
  if compression not in compressor:
    raise VolumeError(f"{path}: unknown compression {compression!r}")
  return {
      "driver": "zarr",
      "kvstore": kvstore,
      "metadata": {
          "shape": disk_shape, "chunks": disk_chunks, "dtype": dtype.str,
          "compressor": compressor[compression], "fill_value": fill, "order": "C",
      },
  }  # fmt: skip


def _zarr3_spec(path, kvstore, disk_shape, disk_chunks, dtype, fill, compression, attrs) -> dict:
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
  return {
      "driver": "zarr3",
      "kvstore": kvstore,
      "metadata": {
          "shape": disk_shape, "data_type": _zarr3_dtype(dtype),
          "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": disk_chunks}},
          "codecs": codecs, "fill_value": fill, "attributes": attrs,
      },
  }  # fmt: skip


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
  shape, dtype, order, chunks = _check_layout(path, shape, dtype, chunks, axis_order)
  disk_shape, disk_chunks = _disk_layout(order, shape, chunks)
  resolution = check_triplet(resolution, "resolution", path)
  attrs = metadata_attrs(order, resolution, offset, source, attributes)
  _clear_destination(path, overwrite, zarr_format)

  kvstore = file_kvstore(path)
  fill = np.asarray(fill_value, dtype=dtype).item()
  layout = (path, kvstore, disk_shape, disk_chunks, dtype, fill, compression)
  if zarr_format == 2:
    spec = _zarr2_spec(*layout)
  elif zarr_format == 3:
    spec = _zarr3_spec(*layout, attrs)
  else:
    raise VolumeError(f"{path}: zarr_format must be 2 or 3, got {zarr_format}")
  store = ts.open(spec, create=True).result()
  if zarr_format == 2:
    with open(os.path.join(path, ".zattrs"), "w") as f:
      json.dump(attrs, f, indent=2)
  return WritableVolume(
    TensorStoreBackend(store, path),
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
    attrs = read_json(attrs_file) if os.path.exists(attrs_file) else {}
    driver = "zarr"
  elif os.path.exists(os.path.join(path, "zarr.json")):
    meta = read_json(os.path.join(path, "zarr.json"))
    if meta.get("node_type") == "group":
      raise group_error(path)
    attrs, driver = meta.get("attributes", {}), "zarr3"
  else:
    raise VolumeError(f"{path}: no zarr array here to reopen")
  backend = open_tensorstore({"driver": driver, "kvstore": file_kvstore(path)}, path, write=True)
  return WritableVolume(backend, path=path, attrs=attrs)


def _zarr3_dtype(dtype: np.dtype) -> str:
  return "bool" if dtype == np.bool_ else dtype.name
