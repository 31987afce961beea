"""Sliding-window geometry for inference: window starts, blend weights, output blocks, padded reads.

Host side only (numpy; never imports jax). Owns the arithmetic that decides where the model looks
and how its windows are blended and streamed, so the device engine only sees fixed shapes:

* :func:`stride_for` / :func:`window_starts`: window starts along one axis (PyTC / BANIS rules);
* :func:`blend_weights`: the per-window blending weight, float32 ``[wz, wy, wx]``;
* :func:`plan_geometry` -> :class:`Geometry`: the padded volume, the crop back to the output, the
  window grid, and the output split into blocks (:class:`BlockPlan`). Each useful window (one
  that covers an output voxel) is owned by the one block its start lies in; per axis
  (:class:`AxisPlan`) a block has a frame that holds its own windows, its region and the partial
  sums it carries on to the next block, all within fixed sizes (``Geometry.frame_shape`` and
  friends) so the device compiles once per volume;
* :func:`read_padded`: one box ``[c, z, y, x]`` of the padded volume, read from a lazy
  :class:`~jaxseg.io.volume.Volume` (``[c,] z, y, x``) or a numpy array.

Coordinates: the *padded* volume is the volume padded by ``pad`` voxels on both sides of each
spatial axis (padded coord = volume coord + pad). Window starts and hulls are in padded coords.
The blended padded result is cropped by ``crop`` (``(lo, hi)`` voxels per axis) to the *output*;
output coord = padded coord - crop lo. Blocks tile the output.

Recipes (``docs/inference.md``, "Recipes"):

* SNEMI: pad (8, 128, 128) reflect -> 116 x 1280 x 1280, window 16 x 224 x 224, overlap 0.5 ->
  stride (8, 112, 112), snapped starts (z: 0, 8, ..., 96, 100), ``bump`` weights, crop_pad
  (7, 8, 127, 128, 127, 128) -> output 101 x 1025 x 1025.
* NISB: no padding, window 128^3, overlap 0.5 -> stride 64, snapped starts (0, 64, ..., N - 128),
  ``distance`` weights (1 at the faces, 64 at the centre).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from jaxseg.common.config_util import triple
from jaxseg.common.errors import ConfigError
from jaxseg.data.crop_io import PAD_MODES, padded_indices, read_mapped
from jaxseg.io.volume import Volume

BLEND_MODES = ("constant", "gaussian", "bump", "distance")

# Gaussian blending: sigma as a fraction of the window, and the floor that keeps weights positive
# (MONAI's default sigma_scale; the floor keeps sum(w) > 0 wherever a window reaches).
_GAUSSIAN_SIGMA_SCALE = 0.125
_GAUSSIAN_FLOOR = 1e-4
# The bump weight underflows float32 at the corners of large windows (exp(-56) per axis for 224);
# flooring at the smallest normal float32 keeps every weight positive (and out of denormals, which
# accelerators flush to zero) without changing any representable value of the formula.
_BUMP_FLOOR = float(np.finfo(np.float32).tiny)

Triple = tuple[int, int, int]


# ---------------------------------------------------------------------------------------------
# Windows along one axis.


def stride_for(window: Sequence[int], overlap: float | Sequence[float]) -> Triple:
  """Window stride per axis: ``max(1, round(w * (1 - overlap)))`` (Python rounding).

  Args:
    window: ``(wz, wy, wx)``.
    overlap: fraction of the window shared by neighbours, in ``[0, 1)``; one value or one per axis.

  Returns:
    ``(sz, sy, sx)``, e.g. ``(8, 112, 112)`` for a 16 x 224 x 224 window at overlap 0.5.

  Raises:
    ValueError: for a bad window or an overlap outside ``[0, 1)``.
  """
  window = triple(window, "stride_for: window", 1, scalar=True)
  overlaps = (overlap,) * 3 if np.ndim(overlap) == 0 else tuple(overlap)
  if len(overlaps) != 3 or not all(0.0 <= float(o) < 1.0 for o in overlaps):
    raise ValueError(f"overlap must be in [0, 1) (one value or 3), got {overlap!r}")
  return tuple(max(1, round(w * (1.0 - float(o)))) for w, o in zip(window, overlaps, strict=True))


def window_starts(size: int, window: int, stride: int, snap_to_edge: bool) -> np.ndarray:
  """Window starts along one axis of length ``size``: int64, 1-D, increasing, unique.

  With ``snap_to_edge`` (PyTC / BANIS): ``0, stride, 2 stride, ...`` while the window fits, plus
  ``size - window`` when the last of those does not end at ``size``; every window lies inside the
  axis, which needs ``window <= size``. Without it: ``0, stride, ...`` up to the first start whose
  window reaches ``size``; the last window may run past the axis (those voxels are read with the
  pad mode), and a window longer than the axis gives ``[0]``.

  Raises:
    ValueError: for non-positive sizes, or ``window > size`` with ``snap_to_edge``.
  """
  size, window, stride = int(size), int(window), int(stride)
  if size < 1 or window < 1 or stride < 1:
    raise ValueError(
      f"window_starts needs size, window and stride >= 1, got size={size}, window={window}, "
      f"stride={stride}"
    )
  if snap_to_edge:
    if window > size:
      raise ValueError(f"snap_to_edge windows must fit the axis: window {window} > size {size}")
    starts = np.arange(0, size - window + 1, stride, dtype=np.int64)
    if starts[-1] + window != size:
      starts = np.append(starts, np.int64(size - window))
    return starts
  # Smallest k with k * stride + window >= size: the first window reaching the end.
  last = max(0, -(-(size - window) // stride))
  return np.arange(last + 1, dtype=np.int64) * stride


# ---------------------------------------------------------------------------------------------
# Blend weights.


def blend_weights(window: Sequence[int], mode: str) -> np.ndarray:
  """The blending weight of one window, float32 ``[wz, wy, wx]``, every value > 0.

  Modes:
    constant: 1 everywhere (plain averaging).
    gaussian: product over axes of ``exp(-(i - (n - 1) / 2)^2 / (2 (0.125 n)^2))``, each axis
      peak-normalised (peak 1), floored at 1e-4.
    bump: DeepEM's bump map: per axis ``u = 2 (i + 1) / (n + 1) - 1``, ``k = exp(-1 / (1 - u^2))``,
      peak-normalised, product over axes (floored at the smallest normal float32, where the
      corners of large windows would underflow).
    distance: BANIS: the chessboard distance to the window face, ``min`` over axes of
      ``min(i + 1, n - i)``: 1 at the faces, 64 at the centre of 128 (not normalised).

  Raises:
    ValueError: for an unknown mode or a bad window.
  """
  window = triple(window, "blend_weights: window", 1, scalar=True)
  if mode not in BLEND_MODES:
    raise ValueError(f"blend mode must be one of {BLEND_MODES}, got {mode!r}")
  if mode == "constant":
    return np.ones(window, np.float32)
  if mode == "distance":
    out = None
    for axis, n in enumerate(window):
      i = np.arange(n)
      d = np.minimum(i + 1, n - i).reshape([-1 if a == axis else 1 for a in range(3)])
      out = d if out is None else np.minimum(out, d)
    return np.broadcast_to(out, window).astype(np.float32)
  profiles = []
  for n in window:
    i = np.arange(n, dtype=np.float64)
    if mode == "gaussian":
      sigma = _GAUSSIAN_SIGMA_SCALE * n
      p = np.exp(-((i - (n - 1) / 2.0) ** 2) / (2.0 * sigma**2))
    else:
      u = 2.0 * (i + 1.0) / (n + 1.0) - 1.0
      p = np.exp(-1.0 / (1.0 - u * u))
    profiles.append(p / p.max())
  out = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
  floor = _GAUSSIAN_FLOOR if mode == "gaussian" else _BUMP_FLOOR
  return np.maximum(out, floor).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Blocks of the output, the windows each one computes, and the partial sums carried between them.


class AxisPlan(NamedTuple):
  """The blocks along one axis: int64 arrays with one entry per block, in padded coords.

  Attributes:
    region_start, region_stop: the block's voxels ``[p0, p1)``.
    own_lo, own_hi: the range of window indices (into ``Geometry.starts[axis]``) that the block
      computes: every useful window that starts inside it; the first block also takes the
      windows starting in the cropped margin before the output.
    frame_start: where the block's accumulator frame begins: ``p0``, or the first own start when
      that is earlier (first block only).
    reach: how far (exclusive) the block's own windows, or the partial sums carried into it,
      reach: ``max(p1, last own window end, reach of the previous block)``.
    carry_in, carry_out: voxels of partial sums that come from the previous block / go on to the
      next one (``reach - p1``; 0 for the last block, which has none after it).
  """

  region_start: np.ndarray
  region_stop: np.ndarray
  own_lo: np.ndarray
  own_hi: np.ndarray
  frame_start: np.ndarray
  reach: np.ndarray
  carry_in: np.ndarray
  carry_out: np.ndarray


class BlockPlan(NamedTuple):
  """One block of the output: where it writes and which windows it computes.

  Attributes:
    index: ``(bz, by, bx)`` in the block grid.
    flat: C-order index of the block in the grid.
    out_start, out_stop: the box ``[start, stop)`` this block writes, in OUTPUT coords (the last
      block per axis is clipped to the output).
    region_start, region_stop: the same box in PADDED coords.
    frame_start: PADDED coords of the origin of the block's accumulator frame (see
      :class:`AxisPlan`); the frame is ``Geometry.frame_shape`` large.
    own: per axis, the ``(lo, hi)`` range of window indices the block computes: the windows it
      owns are the product of the three ranges (possibly empty).
    carry_in, carry_out: per axis, the voxels of partial sums that come in from the previous
      block / go out to the next one along that axis (0: nothing).
  """

  index: Triple
  flat: int
  out_start: Triple
  out_stop: Triple
  region_start: Triple
  region_stop: Triple
  frame_start: Triple
  own: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
  carry_in: Triple
  carry_out: Triple

  @property
  def crop_start(self) -> Triple:
    """Where the block's region begins in its frame."""
    return tuple(r - f for r, f in zip(self.region_start, self.frame_start, strict=True))

  @property
  def carry_start(self) -> Triple:
    """Where the partial sums carried out begin in the frame (the end of the region)."""
    return tuple(r - f for r, f in zip(self.region_stop, self.frame_start, strict=True))

  @property
  def num_windows(self) -> int:
    return int(np.prod([hi - lo for lo, hi in self.own]))


@dataclasses.dataclass(frozen=True, eq=False)
class Geometry:
  """The sliding-window plan of one volume (see :func:`plan_geometry`).

  Every window that covers an output voxel (a *useful* window) is owned by exactly one block:
  the block its start lies in, per axis. Blocks run in C order; each folds its own windows into
  a frame and hands the partial sums that spill past its far faces to the next block along each
  axis (``docs/inference.md``, "Streaming").

  Attributes:
    volume_shape: spatial shape ``(z, y, x)`` of the volume.
    pad: voxels padded on both sides of each axis.
    padded_shape: ``volume_shape + 2 pad``.
    crop: ``((z_lo, z_hi), (y_lo, y_hi), (x_lo, x_hi))``: voxels cropped from each side of the
      blended padded result; output coord = padded coord - lo.
    output_shape: ``padded_shape - lo - hi``.
    window: ``(wz, wy, wx)``.
    stride: ``(sz, sy, sx)``.
    snap_to_edge: whether the last window per axis is moved back to end at the padded edge.
    starts: per axis, the int64 window starts in padded coords (read-only arrays).
    useful: per axis, the ``(lo, hi)`` range of the starts whose windows cover output voxels.
    block_shape: the output block shape (clipped to ``output_shape``).
    grid: ``(nbz, nby, nbx)`` blocks per axis.
    axes: the :class:`AxisPlan` of each axis.
    frame_shape: per axis the largest frame a block needs: its own windows, its region and the
      partial sums it carries out, from its frame start.
    region_shape: per axis the largest ``crop_start + block_shape``: the part of a frame where
      sums are complete (partial sums are carried into this part of the next block's frame).
    carry_shape: per axis the widest carry between two blocks (0: nothing is carried).
    hull_shape: per axis the largest box of input that a block's own windows read.
    own_shape: per axis the most windows a block owns.
    num_blocks: blocks in the grid.
    num_windows: useful windows (each computed once).
  """

  volume_shape: Triple
  pad: Triple
  padded_shape: Triple
  crop: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
  output_shape: Triple
  window: Triple
  stride: Triple
  snap_to_edge: bool
  starts: tuple[np.ndarray, np.ndarray, np.ndarray]
  useful: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
  block_shape: Triple
  grid: Triple
  axes: tuple[AxisPlan, AxisPlan, AxisPlan]
  frame_shape: Triple
  region_shape: Triple
  carry_shape: Triple
  hull_shape: Triple
  own_shape: Triple
  num_blocks: int
  num_windows: int

  def block(self, flat_or_index: int | Sequence[int]) -> BlockPlan:
    """The plan of one block, by C-order flat index or by ``(bz, by, bx)``.

    Raises:
      IndexError: for a block outside the grid.
    """
    if isinstance(flat_or_index, (int, np.integer)):
      flat = int(flat_or_index)
      if not 0 <= flat < self.num_blocks:
        raise IndexError(f"block {flat} outside the {self.num_blocks} blocks of grid {self.grid}")
      index = tuple(int(i) for i in np.unravel_index(flat, self.grid))
    else:
      index = tuple(int(i) for i in flat_or_index)
      if len(index) != 3 or not all(0 <= i < n for i, n in zip(index, self.grid, strict=True)):
        raise IndexError(f"block {flat_or_index!r} outside the grid {self.grid}")
      flat = int(np.ravel_multi_index(index, self.grid))

    def per_axis(field: str) -> Triple:
      return tuple(int(getattr(a, field)[b]) for a, b in zip(self.axes, index, strict=True))

    region_start = per_axis("region_start")
    region_stop = per_axis("region_stop")
    return BlockPlan(
      index=index,
      flat=flat,
      out_start=tuple(r - c[0] for r, c in zip(region_start, self.crop, strict=True)),
      out_stop=tuple(r - c[0] for r, c in zip(region_stop, self.crop, strict=True)),
      region_start=region_start,
      region_stop=region_stop,
      frame_start=per_axis("frame_start"),
      own=tuple(zip(per_axis("own_lo"), per_axis("own_hi"), strict=True)),
      carry_in=per_axis("carry_in"),
      carry_out=per_axis("carry_out"),
    )

  def blocks(self) -> Iterator[BlockPlan]:
    """Every block in C order of the grid."""
    for flat in range(self.num_blocks):
      yield self.block(flat)

  def reaching(self, axis: int, b: int, limit: int) -> tuple[int, int]:
    """The range of block ``b``'s own windows along ``axis`` that end past ``limit`` (padded)."""
    a = self.axes[axis]
    lo, hi = int(a.own_lo[b]), int(a.own_hi[b])
    first = int(np.searchsorted(self.starts[axis], limit - self.window[axis], side="right"))
    return min(max(lo, first), hi), hi

  def chain_start(self, axis: int, b: int) -> int | None:
    """The first block along ``axis`` whose own windows reach into block ``b``: the carry into
    ``b`` is the fold of those blocks' windows, passed on block by block. ``None`` when nothing
    is carried into ``b``."""
    a = self.axes[axis]
    if a.carry_in[b] <= 0:
      return None
    for first in range(b):
      lo, hi = self.reaching(axis, first, int(a.region_start[b]))
      if hi > lo:
        return first
    raise AssertionError(f"axis {axis}: carry into block {b} without a window reaching it")


def _axis_plan(
  starts: np.ndarray, window: int, crop_lo: int, output: int, block: int
) -> tuple[AxisPlan, tuple[int, int], dict[str, int]]:
  """Ownership, frames and carries of the blocks along one axis, and the axis's sizes."""
  count = -(-output // block)
  p0 = crop_lo + np.arange(count, dtype=np.int64) * block
  p1 = np.minimum(p0 + block, crop_lo + output)
  # Useful windows cover an output voxel: start < output end and end > output start.
  u0 = int(np.searchsorted(starts, crop_lo - window, side="right"))
  u1 = int(np.searchsorted(starts, crop_lo + output, side="left"))
  # A window belongs to the block its start lies in (the first block takes those before it).
  lo = np.maximum(u0, np.searchsorted(starts, p0, side="left"))
  hi = np.minimum(u1, np.searchsorted(starts, p1, side="left"))
  lo[0], hi[-1] = u0, u1
  hi = np.maximum(lo, hi)
  own = hi > lo
  first = np.where(own, starts[np.minimum(lo, len(starts) - 1)], p0)
  last_end = np.where(own, starts[np.maximum(hi - 1, 0)] + window, p1)
  f0 = np.minimum(p0, first)
  reach = np.maximum.accumulate(np.maximum(p1, last_end))
  carry_out = reach - p1
  carry_out[-1] = 0
  carry_in = np.concatenate([[0], carry_out[:-1]]).astype(np.int64)
  carry = int(carry_out.max())
  region = int((p0 - f0 + block).max())
  sizes = {
    "carry": carry,
    "region": region,
    "frame": int(max((reach - f0).max(), (p1 - f0 + carry).max(), region)),
    "hull": int(np.where(own, last_end - first, 0).max()),
    "own": int((hi - lo).max()),
  }
  plan = AxisPlan(p0, p1, lo, hi, f0, reach, carry_in, carry_out)
  for array in plan:
    array.setflags(write=False)
  return plan, (u0, u1), sizes


def plan_geometry(
  volume_shape: Sequence[int],
  *,
  window: Sequence[int],
  overlap: float | Sequence[float],
  snap_to_edge: bool,
  pad: int | Sequence[int],
  crop_pad: Sequence[int] | None,
  block_shape: Sequence[int] | None,
  where: str = "volume",
) -> Geometry:
  """Plans the windows, the crop back to the output and the output blocks of one volume.

  Args:
    volume_shape: ``(z, y, x)`` (or ``(c, z, y, x)``; the channel axis is ignored).
    window: ``(wz, wy, wx)``.
    overlap: in ``[0, 1)``, one value or per axis; stride = :func:`stride_for`.
    snap_to_edge: see :func:`window_starts`; windows then must fit the padded volume.
    pad: voxels padded on both sides of each axis (an int or 3 ints).
    crop_pad: ``()`` / ``None``: crop exactly ``pad`` (the output is the volume's own support);
      else 6 ints ``(z0, z1, y0, y1, x0, x1)`` cropped from the padded, blended result (SNEMI:
      ``(7, 8, 127, 128, 127, 128)``).
    block_shape: output block shape (clipped to the output); ``None``: one block.
    where: names the volume in error messages.

  Returns:
    A :class:`Geometry`.

  Raises:
    ValueError: naming ``where`` and the numbers, for a window larger than the padded volume
      (with ``snap_to_edge``), a non-positive output, bad lengths or negative values, or a block
      shape < 1.
  """
  shape = tuple(volume_shape)
  if len(shape) not in (3, 4):
    raise ValueError(f"{where}: volume shape must be (z, y, x) or (c, z, y, x), got {shape}")
  volume = triple(shape[-3:], f"{where}: volume shape", 1, scalar=True)
  window = triple(window, f"{where}: window", 1, scalar=True)
  pad = triple(pad, f"{where}: pad", 0, scalar=True)
  try:
    stride = stride_for(window, overlap)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
  padded = tuple(n + 2 * p for n, p in zip(volume, pad, strict=True))
  if snap_to_edge and any(w > n for w, n in zip(window, padded, strict=True)):
    raise ConfigError(
      f"{where}: window {window} is larger than the padded volume {padded} (volume {volume} + 2 "
      f"x pad {pad}); with snap_to_edge every window must fit: use a smaller window or more pad"
    )
  if crop_pad is None or len(crop_pad) == 0:
    crop = tuple((p, p) for p in pad)
  else:
    values = tuple(crop_pad)
    if len(values) != 6 or any(int(v) != v or v < 0 for v in values):
      raise ValueError(
        f"{where}: crop_pad must be empty or 6 non-negative ints (z0, z1, y0, y1, x0, x1), got "
        f"{crop_pad!r}"
      )
    crop = tuple((int(values[2 * a]), int(values[2 * a + 1])) for a in range(3))
  output = tuple(n - lo - hi for n, (lo, hi) in zip(padded, crop, strict=True))
  if min(output) < 1:
    raise ConfigError(
      f"{where}: cropping {crop} ((lo, hi) per axis) from the padded volume {padded} leaves the "
      f"output {output}; every axis needs at least 1 voxel"
    )
  if block_shape is None:
    block = output
  else:
    block = triple(block_shape, f"{where}: block_shape", 1, scalar=True)
    block = tuple(min(b, n) for b, n in zip(block, output, strict=True))
  starts = tuple(
    window_starts(n, w, s, snap_to_edge) for n, w, s in zip(padded, window, stride, strict=True)
  )
  for s in starts:
    s.setflags(write=False)
  axes, useful, sizes = zip(
    *(_axis_plan(starts[a], window[a], crop[a][0], output[a], block[a]) for a in range(3)),
    strict=True,
  )
  grid = tuple(len(a.region_start) for a in axes)
  return Geometry(
    volume_shape=volume,
    pad=pad,
    padded_shape=padded,
    crop=crop,
    output_shape=output,
    window=window,
    stride=stride,
    snap_to_edge=bool(snap_to_edge),
    starts=starts,
    useful=tuple(useful),
    block_shape=block,
    grid=grid,
    axes=tuple(axes),
    frame_shape=tuple(s["frame"] for s in sizes),
    region_shape=tuple(s["region"] for s in sizes),
    carry_shape=tuple(s["carry"] for s in sizes),
    hull_shape=tuple(s["hull"] for s in sizes),
    own_shape=tuple(s["own"] for s in sizes),
    num_blocks=int(np.prod(grid)),
    num_windows=int(np.prod([hi - lo for lo, hi in useful])),
  )


# ---------------------------------------------------------------------------------------------
# Reading.


def read_padded(
  volume: Volume | np.ndarray,
  start: Sequence[int],
  stop: Sequence[int],
  pad: int | Sequence[int],
  pad_mode: str,
) -> np.ndarray:
  """Reads the box ``[start, stop)`` (PADDED coords) of the volume padded by ``pad``.

  Padding follows ``np.pad`` with ``pad_mode`` (``"reflect"``, ``"symmetric"``, ``"edge"``, or
  ``"constant"`` with 0); the box may also extend beyond the padded volume (same rule, as if the
  pad were larger). Only one bounding box is read from the volume.

  Args:
    volume: a :class:`Volume` or numpy array, ``[c,] z, y, x``.
    start, stop: the box, 3 ints each, ``stop > start``.
    pad: voxels padded on both sides of each axis (an int or 3 ints).
    pad_mode: one of ``PAD_MODES``.

  Returns:
    ``[c, z, y, x]`` in the volume's dtype (a channel axis of 1 added for 3-D volumes).

  Raises:
    ValueError: for a bad box, pad or pad mode, or a volume that is not 3-D / 4-D.
  """
  where = getattr(volume, "path", "array")
  if pad_mode not in PAD_MODES:
    raise ValueError(f"{where}: pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
  shape = tuple(volume.shape)
  if len(shape) not in (3, 4):
    raise ValueError(f"{where}: expected a 3-D (z, y, x) or 4-D (c, z, y, x) volume, got {shape}")
  start = tuple(int(s) for s in start)
  stop = tuple(int(s) for s in stop)
  if len(start) != 3 or len(stop) != 3 or any(e <= s for s, e in zip(start, stop, strict=True)):
    raise ValueError(f"{where}: bad box {start}..{stop}; need 3 ints each with stop > start")
  pad = triple(pad, f"{where}: pad", 0, scalar=True)
  spatial = shape[-3:]
  lead = (slice(None),) * (len(shape) - 3)
  # Volume coords of the box.
  lo = tuple(s - p for s, p in zip(start, pad, strict=True))
  hi = tuple(e - p for e, p in zip(stop, pad, strict=True))
  if pad_mode == "constant":
    # Read only the part inside the volume and leave zeros around it.
    out = np.zeros((*shape[:-3], *(e - s for s, e in zip(lo, hi, strict=True))), volume.dtype)
    inner_lo = tuple(max(0, s) for s in lo)
    inner_hi = tuple(min(n, e) for n, e in zip(spatial, hi, strict=True))
    if all(a < b for a, b in zip(inner_lo, inner_hi, strict=True)):
      src = tuple(slice(a, b) for a, b in zip(inner_lo, inner_hi, strict=True))
      dst = tuple(slice(a - s, b - s) for a, b, s in zip(inner_lo, inner_hi, lo, strict=True))
      out[(*lead, *dst)] = np.asarray(volume[(*lead, *src)])
  else:
    axes = [
      padded_indices(np.arange(s, e), n, pad_mode)[0]
      for s, e, n in zip(lo, hi, spatial, strict=True)
    ]
    out = read_mapped(volume, lead, 0, axes)
  out = np.ascontiguousarray(out)
  return out[None] if out.ndim == 3 else out
