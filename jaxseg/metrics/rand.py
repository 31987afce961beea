"""Adapted Rand error (SNEMI3D and pair-counting definitions) and the SNEMI3D centred crop.

Owns :func:`adapted_rand`, :func:`adapted_rand_from_table` and :func:`centered_crop`. Inputs are
two label volumes of equal shape ([z, y, x], any integer dtype) or a precomputed
:class:`~jaxseg.metrics.contingency.Contingency`. GT labels <= 0 (background, NISB's -1) are
ignored in both definitions.

Definitions, with p_ij the number of GT-foreground voxels in GT segment i and predicted segment j:

- ``method="snemi"`` (default; SNEMI3D challenge / PyTC ``adapted_rand``): j ranges over predicted
  labels > 0 only. a_i = size of GT segment i (voxels predicted 0 included), b_j = size of
  predicted segment j inside GT foreground, c = GT-foreground voxels predicted 0, n = **all**
  voxels of the (cropped) volume, GT background included (as in the SNEMI3D evaluator). Then
  ``sumAB = Σp_ij² + c/n``, ``sumA = Σa_i²``, ``sumB = Σb_j² + c/n``, precision = sumAB/sumB,
  recall = sumAB/sumA, error = 1 - 2PR/(P+R). The c/n term is the evaluator's stand-in for
  "predicted-0 voxels are singletons": each adds 1/n instead of 1, so an all-zero prediction gets
  precision 1 and recall ~0.
- ``method="pairs"`` (``skimage.metrics.adapted_rand_error``): plain pair counting over GT
  foreground, predicted 0 is an ordinary label. ``T = Σp_ij² - m``, ``A = Σa_i² - m``,
  ``B = Σb_j² - m`` with m = number of GT-foreground voxels; precision = T/B, recall = T/A, error =
  1 - 2T/(A+B). The error equals skimage's; skimage's own return values name precision and
  recall the other way round (its "prec" divides by the GT term).

This module never imports JAX.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from jaxseg.metrics.contingency import Contingency, contingency_table

ARAND_METHODS = ("snemi", "pairs")


@dataclasses.dataclass(frozen=True)
class AdaptedRand:
  """Adapted Rand error with its precision and recall (all NaN when GT has no foreground)."""

  error: float
  precision: float
  recall: float


def adapted_rand_from_table(table: Contingency, method: str = "snemi") -> AdaptedRand:
  """Adapted Rand error from a contingency table (see the module docstring for formulas).

  Args:
    table: from :func:`contingency_table` with ``ignore_gt_nonpositive=True``.
    method: ``"snemi"`` or ``"pairs"``.

  Returns:
    Error, precision and recall.
  """
  if method not in ARAND_METHODS:
    raise ValueError(f"unknown adapted Rand method {method!r}; use one of {ARAND_METHODS}")
  counts = table.counts.astype(np.float64)
  a2 = float(np.sum(table.gt_sizes() ** 2))
  if method == "snemi":
    pred0 = table.seg_ids == 0
    c = float(counts[pred0].sum())
    ratio = c / table.n_total if table.n_total else 0.0
    sum_ab = float(np.sum(counts[~pred0] ** 2)) + ratio
    sum_a = a2
    sum_b = float(np.sum(table.seg_sizes(exclude_zero=True) ** 2)) + ratio
  else:
    m = float(counts.sum())
    sum_ab = float(np.sum(counts**2)) - m
    sum_a = a2 - m
    sum_b = float(np.sum(table.seg_sizes() ** 2)) - m
  precision = _safe_div(sum_ab, sum_b)
  recall = _safe_div(sum_ab, sum_a)
  if math.isnan(precision) or math.isnan(recall):
    error = math.nan
  elif precision + recall == 0:
    error = 1.0
  else:
    error = 1.0 - 2.0 * precision * recall / (precision + recall)
  return AdaptedRand(error=error, precision=precision, recall=recall)


def _safe_div(a: float, b: float) -> float:
  return a / b if b > 0 else math.nan


def adapted_rand(
  gt: np.ndarray, seg: np.ndarray, method: str = "snemi", crop_fraction: float = 1.0
) -> AdaptedRand:
  """Adapted Rand error of a segmentation against GT.

  Args:
    gt: [z, y, x] GT labels (<= 0 ignored), any integer dtype.
    seg: [z, y, x] predicted labels, same shape.
    method: ``"snemi"`` (SNEMI3D evaluator) or ``"pairs"`` (skimage); see the module docstring.
    crop_fraction: score only the centred crop holding this fraction of the voxels (see
      :func:`centered_crop`); 1.0 scores everything.

  Returns:
    Error, precision and recall.
  """
  if gt.shape != seg.shape:
    raise ValueError(f"gt and seg shapes differ: {gt.shape} vs {seg.shape}")
  crop = centered_crop(gt.shape, crop_fraction)
  return adapted_rand_from_table(contingency_table(gt[crop], seg[crop]), method=method)


def centered_crop(
  shape: Sequence[int], fraction: float, z_fraction: float = 0.5
) -> tuple[slice, ...]:
  """Slices of the centred crop that keeps ``fraction`` of a [z, y, x] volume's voxels.

  Follows the SNEMI3D challenge evaluator: z keeps ``z_fraction`` of its extent (half), y and x
  each keep ``sqrt(fraction / z_fraction)`` of theirs (floored), and every crop starts at
  ``ceil((size - kept) / 2)``. For a 100x1024x1024 volume and ``fraction=0.33`` this gives z 25:75,
  y/x 97:928 (50x831x831), the evaluator's crop. When ``fraction > z_fraction`` z keeps ``fraction``
  of its extent and y/x are not cropped.

  Args:
    shape: volume shape; the last three axes are z, y, x (leading axes are never cropped).
    fraction: fraction of voxels to keep, in (0, 1]; >= 1 means no crop.
    z_fraction: fraction of z kept (0.5 in SNEMI3D).

  Returns:
    A tuple of slices, one per axis of ``shape``.
  """
  shape = tuple(int(s) for s in shape)
  if fraction >= 1.0:
    return tuple(slice(0, s) for s in shape)
  if not fraction > 0.0:  # Also rejects NaN.
    raise ValueError(f"crop fraction must be in (0, 1], got {fraction}")
  if len(shape) < 3:
    raise ValueError(f"centered_crop needs a [.., z, y, x] shape, got {shape}")
  zf = max(min(z_fraction, 1.0), fraction)
  yx = math.sqrt(fraction / zf)
  keep = [max(1, round(shape[-3] * zf))] + [max(1, math.floor(s * yx)) for s in shape[-2:]]
  lead = [slice(0, s) for s in shape[:-3]]
  crop = [
    slice((s - k + 1) // 2, (s - k + 1) // 2 + k) for s, k in zip(shape[-3:], keep, strict=True)
  ]
  return tuple(lead + crop)
