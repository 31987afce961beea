"""Volume I/O: every on-disk format seen as a lazy array in canonical ``[c,] z, y, x`` order.

Formats (read): zarr v2, zarr v3, N5 and neuroglancer precomputed (through tensorstore), HDF5
(``file.h5:dataset``), multi-page TIFF stacks and folders of PNG/TIFF slices. Each volume declares
its on-disk axis order (``zyx`` by default, ``xyz`` for NISB; with a channel axis ``czyx``,
``xyzc``, ...) and its resolution in nm (z, y, x). The code only ever sees canonical order; the
transpose is lazy, so reading a box touches only the chunks under it.

Outputs are chunked, compressed zarr written through tensorstore with chunk-aligned writes and
metadata (resolution, axis order, offset, source) in the attributes.

Modules: ``backends`` (one reader per format, on-disk order), ``volume`` (:class:`Volume`,
:func:`open_volume`), ``zarr_writer`` (:func:`create_zarr`, :func:`reopen_zarr`,
:func:`block_chunks`), ``volume_writer`` (:func:`write_volume`).

Public API::

  vol = open_volume("train-gt.lzf.h5:stack")              # or a dict / tensorstore spec
  vol.shape, vol.dtype, vol.resolution, vol.axis_order      # canonical shape, on-disk order
  block = vol[0:16, 100:228, 100:228]                      # numpy array, canonical order
  out = create_zarr("aff.zarr", shape=(3, 64, 256, 256), dtype="float16",
                    chunks=(3, 32, 128, 128), resolution=(20, 9, 9))
  out.write((0, 0, 0, 0), block)                            # chunk-aligned box write
  write_volume("seg.zarr", seg, resolution=(30, 6, 6))      # whole-array convenience (any format)
"""

from jaxseg.io.errors import VolumeError
from jaxseg.io.volume import Volume, WritableVolume, open_volume, read_volume
from jaxseg.io.volume_writer import write_volume
from jaxseg.io.zarr_writer import block_chunks, create_zarr, reopen_zarr

__all__ = [
  "Volume",
  "VolumeError",
  "WritableVolume",
  "block_chunks",
  "create_zarr",
  "open_volume",
  "read_volume",
  "reopen_zarr",
  "write_volume",
]
