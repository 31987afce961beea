"""The block helpers both blockwise drivers share (``blockwise`` for connected components and the
schedule, ``blockwise_waterz`` for the waterz stages).

Owns :class:`BlockJob` (what a worker needs for any block; picklable: paths, not open volumes), the
per-process cache of opened volumes (:func:`cached_volume`), :func:`read_affinities` (a box of the
decoded channels as ``[3, z, y, x]``, masked), a daisy block's write box and name, the scratch
``.npz`` files and their fragment ids (uint64, global linear index of a fragment's first voxel
+ 1), and the face planes a block hands to the next one (``[y, x]``, ``[z, x]`` or ``[z, y]``
uint64 fragment planes). Imports neither driver. Never imports JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os

import numpy as np

from jaxseg.common.files import atomic_output
from jaxseg.decoding.affinity_io import mask_affinities, read_channels
from jaxseg.decoding.settings import DecodeSettings
from jaxseg.io import VolumeError, open_volume, reopen_zarr


@dataclasses.dataclass(frozen=True)
class BlockJob:
  """What a worker needs to process any block (picklable: paths, not open volumes)."""

  settings: DecodeSettings
  affinities: str
  positions: tuple[int, int, int]
  distances: tuple[int, int, int]
  convention: str
  mask: str
  shape: tuple[int, int, int]
  scratch: str
  outputs: tuple[str, ...] = ()
  axis_order: str | None = None  # of the affinities (a PyTC file's "cxyz" may be in no attribute)


@functools.lru_cache(maxsize=16)
def cached_volume(path: str, writable: bool = False, axis_order: str | None = None):
  """``path`` opened once per worker process (for writing: ``reopen_zarr``) for all its blocks."""
  return reopen_zarr(path) if writable else open_volume(path, axis_order=axis_order)


def read_affinities(job: BlockJob, start, stop) -> np.ndarray:
  """``[3, z, y, x]`` (z, y, x edges) of a box clipped to the volume; masked voxels zeroed."""
  box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
  volume = cached_volume(job.affinities, axis_order=job.axis_order)
  aff = read_channels(volume, job.positions, box)
  if not np.isfinite(aff).all():
    raise VolumeError(f"{job.affinities}: NaN or Inf in the box {start} - {stop}")
  if job.mask:
    aff = mask_affinities(aff, np.asarray(cached_volume(job.mask)[box]))
  return aff


def block_box(block, shape):
  """The block's write box ``(start, stop)`` in volume voxels."""
  start = tuple(int(v) for v in block.write_roi.offset)
  stop = tuple(
    min(s + int(n), m) for s, n, m in zip(start, block.write_roi.shape, shape, strict=True)
  )
  return start, stop


def block_name(start) -> str:
  """The block's file name stem in the scratch folders: its start voxel, ``z_y_x``."""
  return "_".join(str(v) for v in start)


def save_npz(path: str, **arrays) -> None:
  """Writes a block's scratch ``.npz`` atomically: a killed worker never leaves half a file."""
  with atomic_output(path) as tmp, open(tmp, "wb") as f:
    np.savez(f, **arrays)


def global_ids(first_local: np.ndarray, start, block_shape, shape) -> np.ndarray:
  """Global linear index + 1 of voxels given by their linear index inside a block box."""
  local = np.unravel_index(first_local, block_shape)
  coords = [c + s for c, s in zip(local, start, strict=True)]
  return np.ravel_multi_index(coords, shape).astype(np.uint64) + np.uint64(1)


def last_planes(fragments: np.ndarray, stop, shape) -> dict:
  """``{"last_<axis>": plane}`` of a block's last plane on each axis that has a next block.

  Saved in the block's ``.npz`` for the next block's face work, so that it never decodes this
  block's whole scratch chunk for one plane.
  """
  out = {}
  for axis in range(3):
    if stop[axis] < shape[axis]:
      plane = [slice(None)] * 3
      plane[axis] = -1
      out[f"last_{axis}"] = np.ascontiguousarray(fragments[tuple(plane)])
  return out


def previous_last_plane(job: BlockJob, start, axis: int) -> np.ndarray:
  """The last plane on ``axis`` of the block before this one, from its ``.npz``."""
  previous = list(start)
  previous[axis] -= job.settings.block_shape[axis]
  with np.load(os.path.join(job.scratch, "fragments_npz", block_name(previous) + ".npz")) as f:
    return f[f"last_{axis}"]


def with_leading_planes(job: BlockJob, start, stop, lead) -> np.ndarray:
  """The block's fragments with the previous blocks' last planes before it (``lead`` per axis).

  Only the three face planes are filled in the leading region (its edges and corner stay 0):
  every voxel pair with its higher voxel in the block has its lower voxel in the block or in one
  of those planes.
  """
  box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
  core = np.asarray(cached_volume(os.path.join(job.scratch, "fragments"))[box])
  out = np.zeros([n + ld for n, ld in zip(core.shape, lead, strict=True)], core.dtype)
  lz, ly, lx = lead
  out[lz:, ly:, lx:] = core
  for axis in range(3):
    if lead[axis]:
      plane = [slice(lz, None), slice(ly, None), slice(lx, None)]
      plane[axis] = 0
      out[tuple(plane)] = previous_last_plane(job, start, axis)
  return out


def load_nodes(scratch: str) -> tuple[np.ndarray, np.ndarray]:
  """Every block's fragment ids and sizes (voxels), sorted by id."""
  ids, sizes = [], []
  for path in sorted(glob.glob(os.path.join(scratch, "fragments_npz", "*.npz"))):
    with np.load(path) as f:
      ids.append(f["ids"])
      sizes.append(f["sizes"])
  ids = np.concatenate(ids) if ids else np.zeros(0, np.uint64)
  sizes = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
  order = np.argsort(ids, kind="stable")
  return ids[order], sizes[order]
