"""Thresholded connected components: the NISB/BANIS affinity decoder.

Owns the decoder that turns three nearest-neighbour affinity channels into a segmentation by
thresholding every edge and labelling the 6-connected components of the active edges:

  * :func:`edge_bits`: ``[3, z, y, x]`` float affinities (channels z, y, x; ``'source'``
    convention, i.e. ``aff[c, v]`` is the edge ``v <-> v + e_c``) to a ``[z, y, x]`` uint8 volume
    whose bit ``c`` says that edge is active.
  * :func:`label_edge_bits`: that bit volume to labels ``1..K`` (uint32; uint64 only if
    ``K >= 2**32``), 0 = background.
  * :func:`decode_affinity_cc`: both, plus an optional size filter, in the smallest unsigned dtype.
  * :func:`component_first_index`, :func:`component_sizes`: per-id statistics of a labelling, for
    the blockwise decoder.

The rules are NISB's (``hard = aff[:3] > t``, then a flood fill), bit for bit:

  * A voxel is **foreground** iff one of its own three forward edges is active (even one that
    points out of the array), or the forward edge of a neighbour ``v - e_c`` inside the array into
    it is active, or bit 3 of its bit volume entry is set. Bit 3 is never set by :func:`edge_bits`;
    the blockwise decoder sets it on a block's leading faces for voxels reached by an active edge
    from the previous block. Bits 4-7 are ignored.
  * Voxels are **connected** through active edges whose two ends both lie inside the array. So a
    voxel whose only active edges point out of the array is a singleton (NISB's last plane).
  * Ids ``1..K`` follow the C-order scan position of each component's first (least linear index)
    voxel.

Threshold semantics are NumPy's ``aff > threshold`` with ``threshold`` a Python float (NEP 50;
NumPy scalars are converted with ``float`` first): the threshold is rounded to the affinity dtype
and the comparison is strict in that dtype, so NaN never passes. float16 is compared on its bit
patterns, never converted to float32.

The labeller is a two-pass union-find over *provisional* labels. Pass 1 scans z-slabs in parallel
(one thread per slab, ``numba.get_num_threads()`` of them; the numba kernels release the GIL):
every voxel takes the label of an active backward neighbour, merging labels when two differ, or
opens a new label if it is foreground by its own bits. Labels are linked larger-under-smaller and
opened in scan order, so every root is the label opened by its component's first voxel. Each
slab's labels live in their own index range of one equivalence table, so slabs never race. Pass 2
joins the slab-boundary planes serially; pass 3 turns roots into consecutive ids in root order
(= scan order) in one sweep; pass 4 writes the ids, again one thread per slab.

This module never imports JAX.
"""

from __future__ import annotations

import concurrent.futures
import itertools

import numba
import numpy as np

from jaxseg.common.union_find import union
from jaxseg.decoding import labels as labels_lib

# Below this many voxels one slab is faster than starting threads.
_PARALLEL_MIN_VOXELS = 1 << 16
_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


# --------------------------------------------------------------------------------------------
# Thresholding.


@numba.njit(cache=True, nogil=True)
def _bits_float(aff, threshold, mask, use_mask, out, z0, z1):
  height, width = out.shape[1], out.shape[2]
  for z in range(z0, z1):
    for y in range(height):
      if use_mask:
        for x in range(width):
          b = (
            np.uint8(aff[0, z, y, x] > threshold)
            | (np.uint8(aff[1, z, y, x] > threshold) << 1)
            | (np.uint8(aff[2, z, y, x] > threshold) << 2)
          )
          out[z, y, x] = b if mask[z, y, x] != 0 else np.uint8(0)
      else:
        for x in range(width):
          out[z, y, x] = (
            np.uint8(aff[0, z, y, x] > threshold)
            | (np.uint8(aff[1, z, y, x] > threshold) << 1)
            | (np.uint8(aff[2, z, y, x] > threshold) << 2)
          )


@numba.njit(cache=True, nogil=True, inline="always")
def _half_passes(h, lo0, n0, lo1, n1):
  # h is a float16 bit pattern; it passes iff it lies in [lo0, lo0 + n0) or [lo1, lo1 + n1).
  # Unsigned wrap-around turns each interval test into a single compare.
  return np.uint8((np.uint16(h - lo0) < n0) | (np.uint16(h - lo1) < n1))


@numba.njit(cache=True, nogil=True)
def _bits_half(aff, intervals, mask, use_mask, out, z0, z1):
  lo0, n0, lo1, n1 = intervals[0], intervals[1], intervals[2], intervals[3]
  height, width = out.shape[1], out.shape[2]
  for z in range(z0, z1):
    for y in range(height):
      if use_mask:
        for x in range(width):
          b = (
            _half_passes(aff[0, z, y, x], lo0, n0, lo1, n1)
            | (_half_passes(aff[1, z, y, x], lo0, n0, lo1, n1) << 1)
            | (_half_passes(aff[2, z, y, x], lo0, n0, lo1, n1) << 2)
          )
          out[z, y, x] = b if mask[z, y, x] != 0 else np.uint8(0)
      else:
        for x in range(width):
          out[z, y, x] = (
            _half_passes(aff[0, z, y, x], lo0, n0, lo1, n1)
            | (_half_passes(aff[1, z, y, x], lo0, n0, lo1, n1) << 1)
            | (_half_passes(aff[2, z, y, x], lo0, n0, lo1, n1) << 2)
          )


def _half_intervals(threshold: float) -> tuple[int, int, int, int]:
  """The float16 bit patterns with ``pattern > threshold`` as at most two intervals.

  NumPy itself decides every one of the 65536 patterns, so the kernel reproduces
  ``aff > threshold`` exactly (rounding of the threshold, signed zeros, infinities, NaNs).

  Returns:
    ``(lo0, n0, lo1, n1)``: the passing patterns are ``[lo0, lo0 + n0)`` and ``[lo1, lo1 + n1)``.
  """
  patterns = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
  with np.errstate(over="ignore", invalid="ignore"):
    passes = patterns > threshold
  edges = np.flatnonzero(np.diff(np.concatenate([[0], passes.astype(np.int8), [0]])))
  starts, stops = edges[0::2], edges[1::2]
  # Float order is monotone in the pattern within each sign, so the passing set is one run of
  # non-negative patterns and at most one run of negative ones.
  if starts.size > 2:
    raise AssertionError(f"float16 threshold {threshold} gives {starts.size} pattern runs")
  runs = [(int(a), int(b - a)) for a, b in zip(starts, stops, strict=True)]
  runs += [(0, 0)] * (2 - len(runs))
  return runs[0][0], runs[0][1], runs[1][0], runs[1][1]


def edge_bits(aff: np.ndarray, threshold: float, mask: np.ndarray | None = None) -> np.ndarray:
  """Thresholds three nearest-neighbour affinity channels into a bit volume.

  Args:
    aff: ``[3, z, y, x]`` float16/32/64 affinities, channels z, y, x, ``'source'`` convention
      (``aff[c, v]`` is the edge ``v <-> v + e_c``). Any strides.
    threshold: an edge is active iff ``aff > threshold`` in NumPy's sense for a Python float (the
      threshold is rounded to ``aff.dtype``; NaN never passes).
    mask: optional ``[z, y, x]`` bool/integer, nonzero = keep. A masked voxel's three stored edges
      are cleared; an unmasked neighbour's edge into it is kept (PyTC's affinity mask).

  Returns:
    ``[z, y, x]`` uint8: bit ``c`` (c = 0, 1, 2) is the edge ``v <-> v + e_c``. Edges leaving the
    array keep their bits (they make their voxel foreground, see :func:`label_edge_bits`).
  """
  aff = np.asarray(aff)
  if aff.ndim != 4 or aff.shape[0] != 3:
    raise ValueError(f"aff must be [3, z, y, x], got shape {aff.shape}")
  if aff.dtype not in _FLOAT_DTYPES:
    raise TypeError(f"aff must be float16, float32 or float64, got {aff.dtype}")
  threshold = float(threshold)
  shape = aff.shape[1:]
  out = np.empty(shape, np.uint8)
  if mask is None:
    use_mask, mask = False, np.ones((1, 1, 1), np.uint8)
  else:
    mask = np.asarray(mask)
    if mask.shape != shape:
      raise ValueError(f"mask shape {mask.shape} differs from the affinity volume {shape}")
    use_mask = True
    if mask.dtype == np.bool_:
      mask = mask.view(np.uint8)
  if out.size == 0:
    return out
  bounds = _slab_bounds(shape[0], out.size, None)
  if aff.dtype == np.float16:
    intervals = np.array(_half_intervals(threshold), np.uint16)
    _run_slabs(_bits_half, bounds, aff.view(np.uint16), intervals, mask, use_mask, out)
  else:
    with np.errstate(over="ignore"):
      typed_threshold = aff.dtype.type(threshold)
    _run_slabs(_bits_float, bounds, aff, typed_threshold, mask, use_mask, out)
  return out


# --------------------------------------------------------------------------------------------
# Labelling.


@numba.njit(cache=True, nogil=True)
def _scan_slab(bits, prov, eq, z0, z1):
  """Pass 1 on planes ``[z0, z1)``: provisional labels, returns how many were opened.

  Labels of this slab are ``z0 * plane + 1 ...``: a slab cannot open more labels than it has
  voxels, so the ranges of different slabs never overlap.
  """
  height, width = bits.shape[1], bits.shape[2]
  base = z0 * height * width
  nxt = base + 1
  for z in range(z0, z1):
    for y in range(height):
      left_bits = np.uint8(0)
      left_label = prov.dtype.type(0)
      for x in range(width):
        b = bits[z, y, x]
        label = left_label if (x > 0 and (left_bits & 4)) else 0
        if y > 0 and (bits[z, y - 1, x] & 2):
          up = prov[z, y - 1, x]
          if label == 0:
            label = up
          elif up != label:
            label = union(eq, label, up)
        if z > z0 and (bits[z - 1, y, x] & 1):
          back = prov[z - 1, y, x]
          if label == 0:
            label = back
          elif back != label:
            label = union(eq, label, back)
        if label == 0 and (b & 15):
          label = nxt
          eq[nxt] = nxt
          nxt += 1
        prov[z, y, x] = label
        left_bits = b
        left_label = label
  return nxt - base - 1


@numba.njit(cache=True, nogil=True)
def _join_and_number(bits, prov, eq, bounds, counts):
  """Passes 2 and 3: joins slabs across their boundary planes, then numbers the roots.

  Returns the number of components; afterwards ``eq[label]`` is the final id of ``label``.
  """
  height, width = bits.shape[1], bits.shape[2]
  plane = height * width
  for s in range(1, bounds.shape[0] - 1):
    z = bounds[s]
    for y in range(height):
      for x in range(width):
        if bits[z - 1, y, x] & 1:
          back = prov[z - 1, y, x]  # nonzero: its own forward bit makes it foreground
          here = prov[z, y, x]
          if here == 0:
            # Foreground only through this edge, so a leaf of the component behind it.
            prov[z, y, x] = back
          else:
            union(eq, back, here)
  # Every link points to a smaller label and labels are visited in increasing order, so a
  # non-root's parent already holds its final id when the label is reached.
  next_id = 0
  for s in range(bounds.shape[0] - 1):
    base = bounds[s] * plane
    for label in range(base + 1, base + 1 + counts[s]):
      parent = eq[label]
      if parent == label:
        next_id += 1
        eq[label] = next_id
      else:
        eq[label] = eq[parent]
  eq[0] = 0
  return next_id


@numba.njit(cache=True, nogil=True)
def _write_ids(prov, eq, out, z0, z1):
  height, width = prov.shape[1], prov.shape[2]
  for z in range(z0, z1):
    for y in range(height):
      for x in range(width):
        out[z, y, x] = eq[prov[z, y, x]]


def _slab_bounds(depth: int, size: int, num_slabs: int | None) -> np.ndarray:
  """``[S + 1]`` plane bounds of S z-slabs: one per numba thread, one for small volumes."""
  if num_slabs is None:
    num_slabs = numba.get_num_threads() if size >= _PARALLEL_MIN_VOXELS else 1
  num_slabs = max(1, min(num_slabs, depth))
  return np.linspace(0, depth, num_slabs + 1).round().astype(np.int64)


def _run_slabs(kernel, bounds: np.ndarray, *args) -> list:
  """Runs ``kernel(*args, z0, z1)`` on every slab, in threads (the kernels release the GIL).

  Threads over serial kernels rather than ``numba.prange``: same speed here, a fraction of the
  compile time.
  """
  spans = [(int(z0), int(z1)) for z0, z1 in itertools.pairwise(bounds)]
  if len(spans) == 1:
    return [kernel(*args, *spans[0])]
  with concurrent.futures.ThreadPoolExecutor(len(spans)) as pool:
    return list(pool.map(lambda span: kernel(*args, *span), spans))


def _label(bits: np.ndarray, num_slabs: int | None, smallest: bool) -> tuple[np.ndarray, int]:
  """Labels ``bits``; ids in the smallest unsigned dtype if ``smallest``, else uint32/uint64."""
  bits = np.ascontiguousarray(bits)
  if bits.ndim != 3:
    raise ValueError(f"bits must be [z, y, x], got shape {bits.shape}")
  if bits.dtype != np.uint8:
    raise TypeError(f"bits must be uint8, got {bits.dtype}")
  if bits.size == 0:
    return np.zeros(bits.shape, np.uint8 if smallest else np.uint32), 0
  # Provisional labels never exceed the voxel count, nor do final ids.
  prov_dtype = np.int32 if bits.size < 2**31 - 1 else np.int64
  prov = np.empty(bits.shape, prov_dtype)
  # Only the label ranges that the slabs open are ever written; np.empty leaves the rest of this
  # table unmapped.
  eq = np.empty(bits.size + 1, prov_dtype)
  bounds = _slab_bounds(bits.shape[0], bits.size, num_slabs)
  counts = np.array(_run_slabs(_scan_slab, bounds, bits, prov, eq), np.int64)
  count = int(_join_and_number(bits, prov, eq, bounds, counts))
  if smallest:
    out_dtype = labels_lib.smallest_uint_dtype(count)
  else:
    out_dtype = np.dtype(np.uint32 if count < 2**32 else np.uint64)
  if out_dtype.itemsize == prov.itemsize:
    out = prov.view(out_dtype)  # ids fit both dtypes: rewrite in place
  else:
    out = np.empty(bits.shape, out_dtype)  # a narrower dtype also means fewer bytes to write
  _run_slabs(_write_ids, bounds, prov, eq, out)
  return out, count


def label_edge_bits(bits: np.ndarray, *, num_slabs: int | None = None) -> tuple[np.ndarray, int]:
  """Connected components of the active edges of a bit volume.

  Args:
    bits: ``[z, y, x]`` uint8 from :func:`edge_bits`: bit ``c`` (c = 0, 1, 2) is the edge
      ``v <-> v + e_c``; bit 3 marks a voxel foreground by an active edge from outside the array.
    num_slabs: z-slabs scanned in parallel (default: numba's thread count, 1 for small volumes).
      The result does not depend on it.

  Returns:
    ``(labels, K)``: ``[z, y, x]`` uint32 (uint64 only if ``K >= 2**32``), ids ``1..K`` in scan
    order of each component's first voxel, 0 = background (see the module docstring for the rule).
  """
  return _label(bits, num_slabs, smallest=False)


def decode_affinity_cc(
  aff: np.ndarray,
  threshold: float,
  mask: np.ndarray | None = None,
  min_size: int = 0,
) -> np.ndarray:
  """Decodes ``[3, z, y, x]`` affinities by thresholded connected components (NISB's decoder).

  Args:
    aff: ``[3, z, y, x]`` float16/32/64, channels z, y, x, ``'source'`` convention.
    threshold: edges with ``aff > threshold`` are active (see :func:`edge_bits`).
    mask: optional ``[z, y, x]`` keep-mask applied to the stored edges (see :func:`edge_bits`).
    min_size: segments with fewer voxels become background; the rest are renumbered ``1..K``
      keeping their scan order. 0 (NISB's default) keeps everything.

  Returns:
    ``[z, y, x]`` labels in the smallest unsigned dtype that holds ``K``.
  """
  bits = edge_bits(aff, threshold, mask)
  if min_size <= 1:
    return _label(bits, None, smallest=True)[0]
  labels, count = _label(bits, None, smallest=False)
  keep = component_sizes(labels, count) >= min_size
  new_ids = np.cumsum(keep) * keep  # survivors keep their scan order
  dtype = labels_lib.smallest_uint_dtype(int(keep.sum()))
  lut = np.concatenate([[0], new_ids]).astype(dtype)
  out = np.empty(labels.shape, dtype)
  _apply_lut(labels.reshape(-1), lut, out.reshape(-1))
  return out


# --------------------------------------------------------------------------------------------
# Per-id statistics.


@numba.njit(cache=True, nogil=True)
def _apply_lut(flat, lut, out):
  for i in range(flat.shape[0]):
    out[i] = lut[flat[i]]


@numba.njit(cache=True, nogil=True)
def _first_index(flat, first):
  count = first.shape[0]
  for i in range(flat.shape[0]):
    label = flat[i]
    if label > count:
      return False
    if label != 0 and first[label - 1] < 0:
      first[label - 1] = i
  return True


@numba.njit(cache=True, nogil=True)
def _sizes(flat, sizes):
  count = sizes.shape[0] - 1
  for i in range(flat.shape[0]):
    label = flat[i]
    if label > count:
      return False
    sizes[label] += 1
  return True


def _flat_ids(labels: np.ndarray) -> np.ndarray:
  flat = np.ascontiguousarray(labels).reshape(-1)
  if not np.issubdtype(flat.dtype, np.unsignedinteger):
    raise TypeError(f"labels must be unsigned integers, got {flat.dtype}")
  return flat


def component_first_index(labels: np.ndarray, count: int) -> np.ndarray:
  """Linear (C-order) index of each id's first voxel, in one pass.

  Args:
    labels: unsigned labels ``0..count`` of any shape.
    count: K.

  Returns:
    ``[K]`` int64; entry ``k`` is for id ``k + 1``, -1 where the id does not occur.
  """
  first = np.full(count, -1, np.int64)
  if not _first_index(_flat_ids(labels), first):
    raise ValueError(f"labels exceed count={count}")
  return first


def component_sizes(labels: np.ndarray, count: int) -> np.ndarray:
  """Voxel count of each id, in one pass.

  Args:
    labels: unsigned labels ``0..count`` of any shape.
    count: K.

  Returns:
    ``[K]`` int64; entry ``k`` is for id ``k + 1``.
  """
  sizes = np.zeros(count + 1, np.int64)
  if not _sizes(_flat_ids(labels), sizes):
    raise ValueError(f"labels exceed count={count}")
  return sizes[1:]
