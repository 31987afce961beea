"""Affinity targets: channel presets, label -> affinity, context crops, storage conventions.

This module owns everything about what an affinity channel *means*:

- the offset presets (``AFF12`` for SNEMI/DeepEM, ``BANIS6`` for NISB/BANIS);
- turning a label volume ``[z, y, x]`` into affinity targets and loss masks ``[c, z, y, x]``;
- the extra context a crop needs so that every edge of the final crop has its partner;
- the one place where affinities move between the two storage conventions.

Shapes and axes: labels are ``[z, y, x]`` integer volumes (``0`` = background, ``-1`` = unlabeled,
positive = object id); affinities and masks are ``[c, z, y, x]``; offsets are ``(dz, dy, dx)``
tuples of Python ints. Everything works on numpy arrays and on jax arrays (including tracers under
``jax.jit``) with the same code; offsets and conventions are static Python values, so jit with
``static_argnums`` for them (and pass offsets as tuples of tuples, which are hashable).

This module never imports jax unless it is handed a jax array: the decoder, which runs without
jax, uses the presets and ``convert_convention``.

Edges and conventions
---------------------
Channel ``c`` with offset ``o`` describes the edge between voxels ``v`` and ``v + o``. The edge is
positive (1) iff both ends carry the same positive id; background edges, including bg-bg, are
valid negatives (0). The edge is *valid* (mask 1) iff both ends lie inside the array and neither
end is unlabeled (-1); background counts as labeled. Where the edge is stored is the convention:

- ``'source'`` (BANIS/NISB): the edge ``v -> v + o`` is stored at ``v``.
- ``'target'`` (DeepEM/SNEMI/waterz): it is stored at ``v + o``, i.e. ``aff[c, v]`` relates ``v``
  to ``v - o``.

Negative offsets are allowed in both conventions.

Presets
-------
``AFF12`` (``'aff12'``, SNEMI RSUNet, convention ``'target'``). PyTC's ``label_aff12`` offsets are
positional over array axes, and the SNEMI volume is ``[z, y, x]``, so they are z-y-x offsets
already; the channel order is PyTC's, so channels 0-2 run x, y, z:

==  ============  ======================================
ch  (dz, dy, dx)  meaning
==  ============  ======================================
0   (0, 0, 1)     x, 1 voxel
1   (0, 1, 0)     y, 1 voxel
2   (1, 0, 0)     z, 1 voxel
3   (2, 0, 0)     z, 2 voxels
4   (3, 0, 0)     z, 3 voxels
5   (4, 0, 0)     z, 4 voxels
6   (0, 0, 3)     x, 3 voxels
7   (0, 0, 9)     x, 9 voxels
8   (0, 0, 27)    x, 27 voxels
9   (0, 3, 0)     y, 3 voxels
10  (0, 9, 0)     y, 9 voxels
11  (0, 27, 0)    y, 27 voxels
==  ============  ======================================

``BANIS6`` (``'banis6'``, NISB/LICONN, convention ``'source'``). The NISB zarr is ``x, y, z`` on
disk and PyTC/BANIS use it untransposed with offsets ``1-0-0, 0-1-0, 0-0-1, 10-0-0, ...`` over
those axes, so their channel 0 is +x. jaxseg opens the zarr as ``[z, y, x]``; we keep PyTC's
*channel semantics* (same channel = same physical direction), written as z-y-x offsets:

==  ============  =====================  ===========================
ch  (dz, dy, dx)  meaning                PyTC/BANIS offset (x, y, z)
==  ============  =====================  ===========================
0   (0, 0, 1)     +x, 1 voxel            1-0-0
1   (0, 1, 0)     +y, 1 voxel            0-1-0
2   (1, 0, 0)     +z, 1 voxel            0-0-1
3   (0, 0, 10)    +x, 10 voxels          10-0-0
4   (0, 10, 0)    +y, 10 voxels          0-10-0
5   (10, 0, 0)    +z, 10 voxels          0-0-10
==  ============  =====================  ===========================

So a jaxseg ``banis6`` prediction transposed back to ``(c, x, y, z)`` is channel-for-channel what
PyTC and BANIS write.

Context
-------
``affinity_context(offsets, convention)`` gives, per axis, the ``(leading, trailing)`` voxels a
crop must carry so that every stored edge of the cropped region has its partner: ``banis6`` needs
``((0, 10), (0, 10), (0, 10))`` (NISB: read 138^3, compute, keep ``[0:128]^3``; PyTC writes this as
``target_context [0,0,0,10,10,10]``, leading triple then trailing triple). The same numbers are the
border of a full volume whose edges lack a partner (PyTC's ``compute_affinity_crop_pad``).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

Offset = tuple[int, int, int]
Offsets = tuple[Offset, ...]
Context = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]

CONVENTIONS = ("source", "target")


def array_namespace(x: Any):
  """Returns ``jax.numpy`` for jax arrays (and tracers), else ``numpy``.

  jax is looked up in ``sys.modules`` first, so numpy callers never pay for (or need) jax.
  """
  jax = sys.modules.get("jax")
  if jax is not None and isinstance(x, jax.Array):
    import jax.numpy as jnp  # Lazy: only reached when jax is already loaded.

    return jnp
  return np


def normalize_offsets(offsets: Sequence[Sequence[int]]) -> Offsets:
  """Returns offsets as a hashable tuple of ``(dz, dy, dx)`` int tuples, checking their shape.

  Raises:
    ValueError: if there are no offsets or one does not have exactly 3 integer entries.
  """
  result = []
  for o in offsets:
    o = tuple(o)
    if len(o) != 3 or not all(isinstance(d, int | np.integer) for d in o):
      raise ValueError(f"affinity offset must be 3 ints (dz, dy, dx), got {o!r}")
    result.append((int(o[0]), int(o[1]), int(o[2])))
  if not result:
    raise ValueError("need at least one affinity offset")
  return tuple(result)


def check_convention(convention: str) -> str:
  """Returns ``convention`` if it is ``'source'`` or ``'target'``, else raises ``ValueError``."""
  if convention not in CONVENTIONS:
    raise ValueError(f"affinity convention must be one of {CONVENTIONS}, got {convention!r}")
  return convention


@dataclasses.dataclass(frozen=True)
class AffinitySpec:
  """A named set of affinity channels.

  Attributes:
    name: preset name, as configs refer to it (``'aff12'``, ``'banis6'``).
    offsets: one ``(dz, dy, dx)`` per channel.
    convention: ``'source'`` (edge stored at v) or ``'target'`` (stored at v + offset).
    channels: one human-readable description per channel.
  """

  name: str
  offsets: Offsets
  convention: str
  channels: tuple[str, ...]

  def __post_init__(self):
    object.__setattr__(self, "offsets", normalize_offsets(self.offsets))
    check_convention(self.convention)
    if len(self.channels) != len(self.offsets):
      raise ValueError(
        f"{self.name}: {len(self.channels)} descriptions for {len(self.offsets)} offsets"
      )

  @property
  def num_channels(self) -> int:
    """Number of affinity channels ``c``."""
    return len(self.offsets)

  @property
  def context(self) -> Context:
    """``affinity_context(self.offsets, self.convention)``."""
    return affinity_context(self.offsets, self.convention)

  def channel_index(self, offset: Sequence[int]) -> int:
    """Returns the channel whose offset is ``offset`` (e.g. the decoder's nearest neighbours).

    Raises:
      ValueError: if no channel has that offset.
    """
    offset = tuple(int(d) for d in offset)
    if offset not in self.offsets:
      raise ValueError(f"{self.name} has no channel with offset {offset}; offsets: {self.offsets}")
    return self.offsets.index(offset)


AFF12 = AffinitySpec(
  name="aff12",
  offsets=(
    (0, 0, 1),
    (0, 1, 0),
    (1, 0, 0),
    (2, 0, 0),
    (3, 0, 0),
    (4, 0, 0),
    (0, 0, 3),
    (0, 0, 9),
    (0, 0, 27),
    (0, 3, 0),
    (0, 9, 0),
    (0, 27, 0),
  ),
  convention="target",
  channels=(
    "x, 1 voxel",
    "y, 1 voxel",
    "z, 1 voxel",
    "z, 2 voxels",
    "z, 3 voxels",
    "z, 4 voxels",
    "x, 3 voxels",
    "x, 9 voxels",
    "x, 27 voxels",
    "y, 3 voxels",
    "y, 9 voxels",
    "y, 27 voxels",
  ),
)

BANIS6 = AffinitySpec(
  name="banis6",
  offsets=((0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 0, 10), (0, 10, 0), (10, 0, 0)),
  convention="source",
  channels=(
    "+x, 1 voxel",
    "+y, 1 voxel",
    "+z, 1 voxel",
    "+x, 10 voxels",
    "+y, 10 voxels",
    "+z, 10 voxels",
  ),
)

PRESETS: dict[str, AffinitySpec] = {spec.name: spec for spec in (AFF12, BANIS6)}


def get_preset(name: str) -> AffinitySpec:
  """Returns the preset called ``name`` (``'aff12'`` or ``'banis6'``).

  Raises:
    ValueError: for an unknown name; the message lists the known ones.
  """
  try:
    return PRESETS[name]
  except KeyError:
    raise ValueError(f"unknown affinity preset {name!r}; known: {sorted(PRESETS)}") from None


def affinity_context(offsets: Sequence[Sequence[int]], convention: str) -> Context:
  """Context a crop needs so that every edge stored inside it has its partner inside too.

  Under ``'source'`` the partner of a stored voxel ``v`` is ``v + o``, so a positive offset needs
  trailing context and a negative one leading context; under ``'target'`` the partner is
  ``v - o`` and the sides swap.

  Args:
    offsets: ``(dz, dy, dx)`` per channel.
    convention: ``'source'`` or ``'target'``.

  Returns:
    ``((lead_z, trail_z), (lead_y, trail_y), (lead_x, trail_x))``, non-negative ints.
  """
  offsets = normalize_offsets(offsets)
  sign = 1 if check_convention(convention) == "source" else -1
  context = []
  for axis in range(3):
    partner = [sign * o[axis] for o in offsets]  # partner position relative to the stored voxel
    context.append((max(0, -min(partner)), max(0, max(partner))))
  return tuple(context)


def crop_context(array, context: Context):
  """Cuts ``context`` off the last three axes of ``array`` (``[..., z, y, x]``).

  Args:
    array: labels ``[z, y, x]``, affinities or masks ``[c, z, y, x]``, images; numpy or jax.
    context: ``((lead_z, trail_z), (lead_y, trail_y), (lead_x, trail_x))``.

  Returns:
    ``array[..., lz:nz - tz, ly:ny - ty, lx:nx - tx]`` (a view for numpy).
  """
  if array.ndim < 3:
    raise ValueError(f"need at least 3 axes [..., z, y, x], got shape {array.shape}")
  slices = []
  for n, (lead, trail) in zip(array.shape[-3:], context, strict=True):
    if lead < 0 or trail < 0 or lead + trail > n:
      raise ValueError(f"context {context} does not fit spatial shape {array.shape[-3:]}")
    slices.append(slice(lead, n - trail))
  return array[(Ellipsis, *slices)]


def _edge_slices(shape: Sequence[int], offset: Offset):
  """Slices selecting edge ends ``v`` and ``v + offset`` over all ``v`` with both inside.

  Returns ``None`` if no edge fits (``|offset| >= size`` along some axis).
  """
  lo, hi = [], []
  for n, d in zip(shape, offset, strict=True):
    if abs(d) >= n:
      return None
    lo.append(slice(max(0, -d), n - max(0, d)))
    hi.append(slice(max(0, d), n + min(0, d)))
  return tuple(lo), tuple(hi)


def _pad_back(xp, region, slices, shape):
  """Zero-pads ``region`` (which sits at ``slices`` of a ``shape`` volume) back to ``shape``."""
  return xp.pad(region, [(s.start, n - s.stop) for s, n in zip(slices, shape, strict=True)])


def compute_affinities(labels, offsets: Sequence[Sequence[int]], convention: str):
  """Affinity targets and loss masks of a label volume.

  Args:
    labels: ``[z, y, x]`` integer labels (0 background, -1 unlabeled, > 0 object id); numpy or jax.
      Unsigned dtypes simply cannot hold -1.
    offsets: ``(dz, dy, dx)`` per channel (static; tuples when jitted).
    convention: ``'source'`` (edge stored at v) or ``'target'`` (at v + offset).

  Returns:
    ``(affinity, mask)``, both ``[c, z, y, x]`` float32 (so they go straight into a loss; cast
    to bool where bits are wanted). ``affinity`` is 1 where both ends of the edge have the same
    positive id. ``mask`` is 1 where the partner is inside the array and neither end is -1.
  """
  xp = array_namespace(labels)
  offsets = normalize_offsets(offsets)
  store_at_source = check_convention(convention) == "source"
  if labels.ndim != 3:
    raise ValueError(f"labels must be [z, y, x], got shape {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise TypeError(f"labels must be integers, got {labels.dtype}")
  shape = labels.shape
  # -1 cannot occur in unsigned labels, and jax refuses to compare them with -1.
  signed = np.issubdtype(labels.dtype, np.signedinteger)

  affinity, mask = [], []
  for offset in offsets:
    slices = _edge_slices(shape, offset)
    if slices is None:
      affinity.append(xp.zeros(shape, bool))
      mask.append(xp.zeros(shape, bool))
      continue
    src, dst = labels[slices[0]], labels[slices[1]]
    edge = (src == dst) & (src > 0)
    valid = (src != -1) & (dst != -1) if signed else xp.ones(src.shape, bool)
    store = slices[0] if store_at_source else slices[1]
    affinity.append(_pad_back(xp, edge, store, shape))
    mask.append(_pad_back(xp, valid, store, shape))
  return xp.stack(affinity).astype(xp.float32), xp.stack(mask).astype(xp.float32)


def compute_affinities_with_context(
  labels_with_context,
  offsets: Sequence[Sequence[int]],
  convention: str,
  context: Context | None = None,
):
  """Affinities of a crop read with extra context, cut back to the crop.

  The NISB recipe: read ``128 + 10`` voxels per axis, augment and erode the whole block, call this
  with ``BANIS6`` (context ``((0, 10),) * 3``), and get ``[6, 128, 128, 128]`` targets whose mask
  is 1 everywhere except at edges touching -1 labels. Crop the image and labels the same way with
  ``crop_context(x, context)``.

  Args:
    labels_with_context: ``[z, y, x]`` labels of the crop plus its context.
    offsets: ``(dz, dy, dx)`` per channel.
    convention: ``'source'`` or ``'target'``.
    context: ``((lead, trail),) * 3`` carried by ``labels_with_context``; ``None`` means exactly
      ``affinity_context(offsets, convention)``. More context than needed is fine; less leaves
      mask 0 at the faces that lack partners.

  Returns:
    ``(affinity, mask)``, ``[c, z', y', x']`` float32 with the context removed.
  """
  if context is None:
    context = affinity_context(offsets, convention)
  affinity, mask = compute_affinities(labels_with_context, offsets, convention)
  return crop_context(affinity, context), crop_context(mask, context)


def shift_volume(array, shift: Sequence[int]):
  """Shifts the last three axes: ``out[..., v] = array[..., v - shift]``, vacated voxels 0.

  The primitive behind ``convert_convention``; also what re-anchors affinity channels after a
  flip (an edge with offset -t stored at v is the edge with offset t stored at v - t).

  Args:
    array: ``[..., z, y, x]``, numpy or jax.
    shift: ``(dz, dy, dx)`` ints (static).

  Returns:
    ``(shifted, valid)``: ``shifted`` has ``array``'s shape and dtype; ``valid`` is a bool
    ``[z, y, x]`` mask, False where the value was vacated (its source lay outside).
  """
  xp = array_namespace(array)
  (shift,) = normalize_offsets([shift])
  spatial = array.shape[-3:]
  slices = _edge_slices(spatial, shift)
  if slices is None:
    return xp.zeros_like(array), xp.zeros(spatial, bool)
  lead = (slice(None),) * (array.ndim - 3)
  kept, placed = slices  # values at kept positions land at placed = kept + shift
  moved = array[lead + kept]
  pad = [(0, 0)] * (array.ndim - 3) + [
    (s.start, n - s.stop) for s, n in zip(placed, spatial, strict=True)
  ]
  shifted = xp.pad(moved, pad)
  valid = _pad_back(xp, xp.ones(moved.shape[-3:], bool), placed, spatial)
  return shifted, valid


def convert_convention(affinity, offsets: Sequence[Sequence[int]], src: str, dst: str):
  """Moves affinities between the ``'source'`` and ``'target'`` storage conventions.

  The only place conventions are converted. Going source -> target moves each channel by
  ``+offset`` (the edge at v goes to v + offset); target -> source by ``-offset``. Edges whose
  storage voxel would leave the array are dropped: they had no partner inside, so they were
  invalid anyway. The vacated faces are filled with 0 and reported invalid.

  Args:
    affinity: ``[c, z, y, x]`` affinities or masks (any dtype; kept), numpy or jax.
    offsets: ``(dz, dy, dx)`` per channel (static).
    src: convention of ``affinity``.
    dst: wanted convention.

  Returns:
    ``(converted, valid)``: ``converted`` like ``affinity``; ``valid`` bool ``[c, z, y, x]``, False
    on vacated faces (exactly the voxels whose edge has no partner inside the array). If
    ``src == dst`` the input is returned unchanged with ``valid`` all True.
  """
  xp = array_namespace(affinity)
  offsets = normalize_offsets(offsets)
  check_convention(src)
  check_convention(dst)
  if affinity.ndim != 4 or affinity.shape[0] != len(offsets):
    raise ValueError(f"affinity must be [{len(offsets)}, z, y, x], got shape {affinity.shape}")
  if src == dst:
    return affinity, xp.ones(affinity.shape, bool)
  sign = 1 if src == "source" else -1
  converted, valid = [], []
  for c, offset in enumerate(offsets):
    moved, ok = shift_volume(affinity[c], tuple(sign * d for d in offset))
    converted.append(moved)
    valid.append(ok)
  return xp.stack(converted), xp.stack(valid)
