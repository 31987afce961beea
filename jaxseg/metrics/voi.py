"""Variation of information (split / merge conditional entropies, bits) between label arrays.

Owns :func:`voi` (two label arrays of equal shape: [z, y, x] voxels or [N] skeleton nodes) and
:func:`voi_from_table`. GT labels <= 0 are ignored; predicted 0 is an ordinary label.

With X = GT and Y = prediction over the counted elements (p_ij = joint frequency):

- ``split = H(Y|X) = -Σ p_ij log2(p_ij / p_i)``: over-segmentation (one GT segment, many predicted).
- ``merge = H(X|Y) = -Σ p_ij log2(p_ij / p_j)``: under-segmentation.

``skimage.metrics.variation_of_information(gt, seg, ignore_labels=[0])`` returns the same two
numbers in the same (split, merge) order: its code returns ``[H(image1|image0), H(image0|image1)]``
(its docstring states the other order).

This module never imports JAX.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxseg.metrics.contingency import Contingency, contingency_table


@dataclasses.dataclass(frozen=True)
class Voi:
  """VOI split and merge in bits; ``total = split + merge``. Zero for empty GT foreground."""

  split: float
  merge: float

  @property
  def total(self) -> float:
    return self.split + self.merge


def voi_from_table(table: Contingency) -> Voi:
  """VOI from a contingency table built with ``ignore_gt_nonpositive=True``.

  Args:
    table: the (gt, seg) table.

  Returns:
    Split and merge entropies in bits.
  """
  n = float(table.counts.sum())
  if n == 0:
    return Voi(0.0, 0.0)
  p = table.counts.astype(np.float64) / n
  _, gt_index = np.unique(table.gt_ids, return_inverse=True)
  _, seg_index = np.unique(table.seg_ids, return_inverse=True)
  p_gt = np.bincount(gt_index, weights=p)[gt_index]
  p_seg = np.bincount(seg_index, weights=p)[seg_index]
  # Entries are all > 0, so the logs are finite; clip tiny negative rounding to 0.
  split = max(0.0, float(-np.sum(p * np.log2(p / p_gt))))
  merge = max(0.0, float(-np.sum(p * np.log2(p / p_seg))))
  return Voi(split=split, merge=merge)


def voi(gt: np.ndarray, seg: np.ndarray) -> Voi:
  """Variation of information of a segmentation against GT (GT <= 0 ignored).

  Args:
    gt: GT labels, any integer dtype and shape.
    seg: predicted labels, same shape.

  Returns:
    Split and merge entropies in bits.
  """
  return voi_from_table(contingency_table(gt, seg))
