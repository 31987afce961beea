"""Reading one crop on the host: padding by index mapping, one bounding-box read, int32 labels.

Owns the numpy pieces (no jax) that the training crop reader (``jaxseg.data.pipeline``) and
inference share: :func:`padded_indices` maps indices of an axis padded as ``np.pad`` pads
(``data.pad_mode``) back into the axis, :func:`read_mapped` reads the outer product
``source[lead, z0 + axes[0], axes[1], axes[2]]`` of a lazy or in-memory ``[c,] z, y, x`` volume
through one bounding box, and :func:`labels_to_int32` turns label ids of any integer dtype into
int32, keeping 0 (background) and -1 (unlabeled).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxseg.common.errors import InputError

PAD_MODES = ("reflect", "symmetric", "edge", "constant")
_INT32_MAX = np.iinfo(np.int32).max
# int32 holds every value of these, so labels of these dtypes are cast without looking at them.
_SMALL_LABEL_DTYPES = tuple(
  np.dtype(t) for t in ("bool", "int8", "int16", "int32", "uint8", "uint16")
)


def labels_to_int32(labels: np.ndarray, where: str = "labels", *, out=None) -> np.ndarray:
  """Label ids as int32, keeping 0 (background) and -1 (unlabeled).

  Ids that fit int32 are cast; otherwise (e.g. uint64 ids) the positive ids of this array are
  renumbered 1..n in increasing order. Only equality of ids matters for the targets, so a crop's
  renumbering changes nothing downstream.

  Args:
    labels: integer (or bool) ids, any shape.
    where: names the source in error messages.
    out: optional int32 array of ``labels``' shape to write into.

  Raises:
    ValueError: negative ids other than -1.
  """
  labels = np.asarray(labels)
  if out is None:
    out = np.empty(labels.shape, np.int32)
  if labels.dtype in _SMALL_LABEL_DTYPES or labels.size == 0:
    np.copyto(out, labels, casting="unsafe")
    return out
  lo, hi = labels.min(), labels.max()
  signed = np.issubdtype(labels.dtype, np.signedinteger)
  if signed and lo < -1:
    raise InputError(
      f"{where}: negative label {int(lo)}; labels are 0 (background), -1 (unlabeled) or > 0 ids"
    )
  if hi <= _INT32_MAX:
    np.copyto(out, labels, casting="unsafe")
    return out
  ids, inverse = np.unique(labels, return_inverse=True)
  positive = ids > 0
  new_ids = np.zeros(ids.shape, np.int32)
  new_ids[positive] = np.arange(1, int(positive.sum()) + 1, dtype=np.int32)
  if signed:
    new_ids[ids == -1] = -1
  np.take(new_ids, inverse.reshape(labels.shape), out=out)
  return out


# ---------------------------------------------------------------------------------------------
# Padding by index mapping.


def padded_indices(index: np.ndarray, size: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
  """Maps indices of a padded axis (``-pad <= index < size + pad``) to indices of the axis.

  Matches ``np.pad`` for ``mode`` ``"reflect"`` (mirror, edge not repeated), ``"symmetric"``
  (edge repeated), ``"edge"`` and ``"constant"``, also for pads longer than the axis.

  Returns:
    ``(source, inside)``: ``source`` in ``[0, size)`` for every index; ``inside`` is True where
    ``index`` lies within the axis (outside, ``"constant"`` fills instead of reading ``source``).
  """
  index = np.asarray(index, np.int64)
  inside = (index >= 0) & (index < size)
  if mode == "reflect":
    if size == 1:
      source = np.zeros_like(index)
    else:
      period = 2 * (size - 1)
      source = np.mod(index, period)
      source = np.where(source >= size, period - source, source)
  elif mode == "symmetric":
    period = 2 * size
    source = np.mod(index, period)
    source = np.where(source >= size, period - 1 - source, source)
  elif mode in ("edge", "constant"):
    source = np.clip(index, 0, size - 1)
  else:
    raise ValueError(f"data.pad_mode must be one of {PAD_MODES}, got {mode!r}")
  return source, inside


def read_mapped(source, lead: tuple, z0: int, axes: Sequence[np.ndarray]) -> np.ndarray:
  """Reads ``source[lead, z0 + axes[0], axes[1], axes[2]]`` (outer product) via one bounding box."""
  boxes = tuple(slice(int(a.min()), int(a.max()) + 1) for a in axes)
  key = (*lead, slice(boxes[0].start + z0, boxes[0].stop + z0), boxes[1], boxes[2])
  block = np.asarray(source[key])
  contiguous = all(
    len(a) == b.stop - b.start and np.array_equal(a, np.arange(b.start, b.stop))
    for a, b in zip(axes, boxes, strict=True)
  )
  if contiguous:
    return block
  local = [a - b.start for a, b in zip(axes, boxes, strict=True)]
  return block[(Ellipsis, *np.ix_(*local))]
