"""Quality control of predicted affinities (``python -m jaxseg.qc``) and the affinity mask.

``affinity_qc``: streams ``[C, z, y, x]`` affinities once (bounded memory) for per-section means,
NaN / Inf counts and min / max, decides the sections ``[low_z, high_z)`` worth decoding, checks the
XY border against the image's background, and writes a markdown report (YAML front matter) with a
PNG plot. ``mask``: the uint8 ``[z, y, x]`` keep-mask built from a report, which the decoder reads
through ``decode.affinity_mask_path``. :func:`run_qc` does all of it in one call and reuses a
finished identical result. Never imports JAX.
"""

from jaxseg.quality.affinity_qc import (
  QcReport,
  QcResult,
  QcSettings,
  qc_settings,
  read_report,
  run_qc,
  scan_affinities,
  write_report,
)
from jaxseg.quality.mask import MASK_ATTR, build_affinity_mask, mask_spec

__all__ = [
  "MASK_ATTR",
  "QcReport",
  "QcResult",
  "QcSettings",
  "build_affinity_mask",
  "mask_spec",
  "qc_settings",
  "read_report",
  "run_qc",
  "scan_affinities",
  "write_report",
]
