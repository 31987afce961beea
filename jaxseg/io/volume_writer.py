"""Whole in-memory arrays written in any supported format: :func:`write_volume`.

Takes a canonical ``[c,] z, y, x`` numpy array and writes it as zarr v2 / v3 (through
:func:`jaxseg.io.zarr_writer.create_zarr`), N5, HDF5 (``file.h5:dataset``), a multi-page TIFF,
neuroglancer precomputed or a folder of PNG slices, in any on-disk ``axis_order``, with the
metadata attributes of :mod:`jaxseg.io.volume` where the format has attributes. Meant for small
volumes (tests, examples, ground truth); streamed outputs use :func:`create_zarr`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np
import tensorstore as ts
import tifffile
from PIL import Image

from jaxseg.io.backends import H5_PATTERN, PRECOMPUTED_PREFIX, file_kvstore, local_path, read_json
from jaxseg.io.errors import VolumeError
from jaxseg.io.volume import (
  Volume,
  canonical_order,
  check_axis_order,
  check_triplet,
  disk_axes,
  open_volume,
)
from jaxseg.io.zarr_writer import create_zarr, default_chunks, metadata_attrs


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

  to_disk = disk_axes(order)
  disk_array = np.transpose(array, np.argsort(to_disk))
  resolution = check_triplet(resolution, "resolution", path)
  attrs = metadata_attrs(order, resolution, offset, source, attributes)

  if fmt == "h5":
    match = H5_PATTERN.match(path)
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
    chunk = chunks or default_chunks(array.shape)
    disk_chunks = [int(chunk[list(to_disk).index(d)]) for d in range(ndim)]
    store = ts.open({
        "driver": "n5", "kvstore": file_kvstore(path),
        "metadata": {"dimensions": list(disk_array.shape), "blockSize": disk_chunks,
                     "dataType": array.dtype.name, "compression": {"type": "gzip"}},
    }, create=True).result()  # fmt: skip
    store.write(disk_array).result()
    meta_path = os.path.join(path, "attributes.json")
    meta = read_json(meta_path)
    meta.update(attrs)
    with open(meta_path, "w") as f:
      json.dump(meta, f)
    return open_volume(path)
  if fmt == "precomputed":
    return _write_precomputed(path, array, order, resolution, chunks)
  raise VolumeError(f"{path}: unknown output format {fmt!r}")


def _guess_format(path: str) -> str:
  lower = path.lower()
  if lower.startswith(PRECOMPUTED_PREFIX):
    return "precomputed"
  if H5_PATTERN.match(path):
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
    local_path(path[len(PRECOMPUTED_PREFIX) :]) if path.startswith(PRECOMPUTED_PREFIX) else path
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
    path[len(PRECOMPUTED_PREFIX) :]
    if path.startswith(PRECOMPUTED_PREFIX)
    else ("file://" + os.path.abspath(path))
  )
  canon = array if array.ndim == 4 else array[None]
  xyzc = np.transpose(canon, (3, 2, 1, 0))
  z, y, x = resolution
  chunk = chunks[-3:] if chunks else default_chunks(array.shape)[-3:]
  seg_type = np.issubdtype(array.dtype, np.integer) and array.dtype.itemsize >= 4
  store = ts.open({
      "driver": "neuroglancer_precomputed", "kvstore": url.rstrip("/") + "/",
      "multiscale_metadata": {"type": "segmentation" if seg_type else "image",
                              "data_type": array.dtype.name, "num_channels": canon.shape[0]},
      "scale_metadata": {"size": list(xyzc.shape[:3]), "resolution": [x, y, z],
                         "encoding": "raw", "chunk_size": [chunk[2], chunk[1], chunk[0]]},
  }, create=True).result()  # fmt: skip
  store.write(xyzc).result()
  opened = open_volume(PRECOMPUTED_PREFIX + url)
  del order  # precomputed is always stored x, y, z, channel
  return opened
