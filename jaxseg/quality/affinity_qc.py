"""Affinity QC as one job: scan, report and mask into a folder, reused when already done.

Owns :func:`run_qc` and :class:`QcResult`: scans ``[C, z, y, x]`` affinities
(:mod:`jaxseg.quality.scan`), writes ``report.md`` and its means plot (:mod:`jaxseg.quality.report`)
and the uint8 ``[z, y, x]`` affinity mask (:mod:`jaxseg.quality.mask`) into the QC folder, and
records the job in ``qc.json`` last, so a finished identical QC is reused and a killed one redone.
What ``jaxseg.qc``, ``jaxseg.run`` and the prediction cache call. The settings are
:mod:`jaxseg.quality.settings`. Never imports JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any

from jaxseg.common import outputs
from jaxseg.common.files import write_json
from jaxseg.common.outputs import Decision, StageOutput, input_identity
from jaxseg.io import Volume
from jaxseg.quality import mask as mask_lib
from jaxseg.quality.report import QcReport, plot_path, stable_path, write_report
from jaxseg.quality.scan import open_affinity_volume, open_image_volume, scan_affinities
from jaxseg.quality.settings import QcSettings, qc_settings

REPORT_NAME = "report.md"
SUMMARY_NAME = "qc.json"
MASK_NAME = "mask.zarr"


# -- the job --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QcResult:
  """What :func:`run_qc` made (or found).

  Attributes:
    scan: the :class:`QcReport`.
    report: path of ``report.md``.
    plot: path of the means PNG.
    mask: path of the affinity mask (uint8 ``[z, y, x]``, 1 = keep), or None.
    low_z, high_z: sections ``[low_z, high_z)`` kept.
    nan_count, inf_count: non-finite values in the whole volume.
    warnings: the scan's warnings.
    reused: True when a finished identical QC was found and nothing was recomputed.
    output_dir: the folder.
  """

  scan: QcReport
  report: str
  plot: str
  mask: str | None
  low_z: int
  high_z: int
  nan_count: int
  inf_count: int
  warnings: tuple[str, ...]
  reused: bool
  output_dir: str

  def summary(self) -> dict:
    """A JSON-ready summary (for the prediction cache and the run report)."""
    return {
      "low_z": self.low_z,
      "high_z": self.high_z,
      "depth": self.scan.depth,
      "nan_count": self.nan_count,
      "inf_count": self.inf_count,
      "interior_mean": self.scan.interior_mean,
      "report": self.report,
      "plot": self.plot,
      "mask": self.mask,
      "warnings": list(self.warnings),
      "reused": self.reused,
    }


def _job_fingerprint(volume: Volume, image: Volume | None, settings: QcSettings) -> dict:
  # The attributes change with every new prediction (predict records model step and settings).
  digest = hashlib.sha1(json.dumps(volume.attrs, sort_keys=True, default=str).encode()).hexdigest()
  return {
    "affinities": stable_path(volume.path),
    "shape": [int(n) for n in volume.shape],
    "attributes_sha1": digest[:16],
    "image": None if image is None else stable_path(image.path),
    "image_shape": None if image is None else [int(n) for n in image.shape],
    "settings": settings.fingerprint(),
  }


def _result(summary: dict, output_dir: str, reused: bool) -> QcResult:
  scan = QcReport.from_dict(summary["scan"])
  return QcResult(
    scan=scan,
    report=os.path.join(output_dir, REPORT_NAME),
    plot=plot_path(os.path.join(output_dir, REPORT_NAME)),
    mask=summary.get("mask"),
    low_z=scan.low_z,
    high_z=scan.high_z,
    nan_count=scan.total_nan,
    inf_count=scan.total_inf,
    warnings=tuple(scan.warnings),
    reused=reused,
    output_dir=output_dir,
  )


@outputs.writes_outputs
def run_qc(
  config: Any,
  affinities: str | os.PathLike | Volume,
  output_dir: str | os.PathLike,
  *,
  image: str | os.PathLike | Volume | None = None,
  build_mask: bool = True,
  show_progress: bool = False,
  overwrite: bool = False,
) -> QcResult:
  """Scans the affinities, writes ``report.md`` + ``means.png`` and ``mask.zarr`` into
  ``output_dir``, and records the job in ``qc.json`` (written last: a killed run is redone).

  Args:
    config: a config with a ``qc`` section (``decode.block_shape`` sets the mask's chunks), the
      section itself, or None for PyTC's defaults.
    affinities: ``[C, z, y, x]`` affinities (path, predict output folder or Volume).
    output_dir: the QC folder (``<cache>/<name>_qc`` in ``jaxseg.run``).
    image: the image for the XY-border check and the mask's ring rule, or None.
    build_mask: also build the affinity mask.
    show_progress: progress bars.
    overwrite: replace a QC made here with other inputs or settings instead of refusing.

  Returns:
    A :class:`QcResult`; ``reused`` when an identical finished QC was already there.

  Raises:
    VolumeError: bad inputs, or ``output_dir`` holds a QC made differently (without overwrite).
    ValueError: bad ``config.qc`` values.
  """
  settings = qc_settings(config)
  volume = open_affinity_volume(affinities)
  img = open_image_volume(image, volume.shape[1:])
  output_dir = os.fspath(output_dir)
  fingerprint = _job_fingerprint(volume, img, settings)
  summary_path = os.path.join(output_dir, SUMMARY_NAME)
  inputs = {
    "affinities": input_identity(volume.path),
    "image": None if img is None else input_identity(img.path),
  }
  stage = StageOutput(
    output_dir,
    name="qc",
    stage="qc",
    fingerprint={**fingerprint, "inputs": inputs},
    paths=[SUMMARY_NAME, REPORT_NAME, os.path.basename(plot_path(REPORT_NAME))],
    inputs=[volume.path, *([img.path] if img is not None else [])],
    what="--output folder",
  )
  decision = stage.open(overwrite=overwrite)
  block_shape = tuple(
    getattr(getattr(config, "decode", None), "block_shape", None) or mask_lib.DEFAULT_BLOCK_SHAPE
  )
  build = functools.partial(
    mask_lib.build_affinity_mask,
    output=os.path.join(output_dir, MASK_NAME),
    image=img,
    shape=volume.shape[1:],
    block_shape=block_shape,
    # The mask (its own entry in the folder) follows its QC: replaced when the QC is.
    overwrite=overwrite or decision is Decision.REPLACE,
    show_progress=show_progress,
  )
  if decision is Decision.REUSE:
    with open(summary_path) as f:
      saved = json.load(f)
    result = _result(saved, output_dir, reused=True)
    if not build_mask or (result.mask is not None and os.path.exists(result.mask)):
      return result
    # Finished without a mask: add it, the scan stands.
    stage.invalidate()
    mask = build(result.scan)
    saved["mask"] = mask.path
    write_json(summary_path, saved)
    stage.finish()
    return dataclasses.replace(result, mask=mask.path, reused=False)

  scan = scan_affinities(volume, settings, image=img, show_progress=show_progress)
  paths = write_report(scan, os.path.join(output_dir, REPORT_NAME))
  mask_path = None
  if build_mask:
    mask_path = build(scan).path
  saved = {
    "fingerprint": fingerprint,
    "complete": True,
    "scan": scan.to_dict(),
    "report": paths["report"],
    "plot": paths["plot"],
    "mask": mask_path,
  }
  write_json(summary_path, saved)
  stage.finish()
  return _result(saved, output_dir, reused=False)
