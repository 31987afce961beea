"""Quality control of predicted affinities (``python -m jaxseg.qc``) and the affinity mask.

``scan``: streams ``[C, z, y, x]`` affinities once (bounded memory) for per-section means, NaN /
Inf counts and min / max, decides the sections ``[low_z, high_z)`` worth decoding and checks the XY
border against the image's background. ``report``: what a scan found (:class:`QcReport`), written
as a markdown report (YAML front matter) with a PNG plot. ``mask``: the uint8 ``[z, y, x]``
keep-mask built from a report, which the decoder reads through ``decode.affinity_mask_path``.
``settings``: ``config.qc`` resolved. ``affinity_qc``: :func:`run_qc` does all of it in one call
and reuses a finished identical result. Never imports JAX.
"""

from jaxseg.quality.affinity_qc import QcResult, run_qc
from jaxseg.quality.mask import MASK_ATTR, build_affinity_mask, mask_spec
from jaxseg.quality.report import QcReport, read_report, write_report
from jaxseg.quality.scan import scan_affinities
from jaxseg.quality.settings import QcSettings, qc_settings

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
