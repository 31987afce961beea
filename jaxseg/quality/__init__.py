"""Quality control of predicted affinities (``python -m jaxseg.qc``) and the affinity mask.

``scan``: streams ``[C, z, y, x]`` affinities once (bounded memory) for per-section means, NaN /
Inf counts and min / max, decides the sections ``[low_z, high_z)`` worth decoding and checks the XY
border against the image's background. ``report``: what a scan found (:class:`QcReport`), written
as a markdown report (YAML front matter) with a PNG plot. ``mask``: the uint8 ``[z, y, x]``
keep-mask built from a report, which the decoder reads through ``decode.affinity_mask_path``.
``settings``: ``config.qc`` resolved. ``affinity_qc``: :func:`run_qc` does all of it in one call
and reuses a finished identical result. Never imports JAX.
"""

from jaxseg.common.lazy import lazy_exports

# Where each public name lives, loaded on first use: importing the light ``jaxseg.quality.settings``
# (as every recipe does for its defaults) does not pull in the volume I/O stack.
_EXPORTS = {
  "MASK_ATTR": "mask",
  "QcReport": "report",
  "QcResult": "affinity_qc",
  "QcSettings": "settings",
  "build_affinity_mask": "mask",
  "mask_spec": "mask",
  "qc_settings": "settings",
  "read_report": "report",
  "run_qc": "affinity_qc",
  "scan_affinities": "scan",
  "write_report": "report",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
