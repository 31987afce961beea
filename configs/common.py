"""Pieces shared by several recipes (loaded by path with ``load_sibling``, not a recipe itself)."""

import ml_collections


def qc_defaults(enabled: bool) -> ml_collections.ConfigDict:
  """Affinity QC parameters (``pytc_spec.md`` section 7), identical in every PyTC recipe."""
  qc = ml_collections.ConfigDict()
  qc.enabled = enabled
  qc.z_stride = 10  # sample every 10th z slice
  qc.k_edge = 20  # samples excluded at each end when computing the interior mean
  qc.refine_window = 30  # low_z / high_z are searched within 30 slices of each end
  qc.drift_thresh = 0.05  # a slice is bad when a channel mean drops below interior - 0.05
  qc.border_width = 32  # XY ring (pixels) checked for background
  qc.bg_thresh = 30  # image intensity at or below this is background
  qc.n_z_border = 8  # z samples for the XY-border diagnostic
  return qc
