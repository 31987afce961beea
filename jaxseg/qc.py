r"""Affinity QC: ``python -m jaxseg.qc --affinities=SPEC --output=DIR [--image=SPEC]``.

A thin entry point over :func:`jaxseg.quality.run_qc`. Streams the affinities once (bounded
memory), finds the sections ``[low_z, high_z)`` worth decoding (PyTC's rule, ``docs/quality.md``,
"Section rules"), counts NaN / Inf, checks the XY border against the image's background, and writes
``DIR/report.md`` (YAML front matter), ``DIR/means.png`` and the affinity mask ``DIR/mask.zarr``
(uint8 ``[z, y, x]``, 1 = keep) for ``--config.decode.affinity_mask_path``. Examples::

  python -m jaxseg.qc --config=configs/demo.py \
      --affinities=runs/demo/predictions/seed101.zarr/affinities --output=runs/demo/qc/seed101
  python -m jaxseg.qc --config=configs/liconn.py --affinities=pred/seed6.zarr \
      --image=datasets/nisb/liconn/test/seed6/data.zarr/img --output=qc/seed6
  python -m jaxseg.qc --affinities=pytc_pred.h5:main --axis_order=cxyz --nomask --output=qc/x
  python -m jaxseg.qc --mask_from_report=qc/seed6/report.md --overwrite

``--config`` is optional: without it PyTC's QC numbers apply (``configs/common.py``,
``qc_defaults``). Without ``--image``, the image named by the affinities' ``source`` attribute
(which ``jaxseg.predict`` writes) is used when it exists; ``--image=`` skips the border check.
A finished identical QC in ``DIR`` is reused.

``--mask_from_report=REPORT`` (PyTC's ``build_aff_mask.py --report``) rebuilds only the mask from
a report's front matter (``low_z``, ``high_z``, ``bg_thresh``, ``border_width``, ``img``; edited
by hand, say), never reading the affinities; ``--affinities``, ``--axis_order`` and ``--nomask``
are refused there. It writes ``--output`` (``NAME.zarr``, or ``DIR/mask.zarr``), by default
``mask.zarr`` beside the report when jaxseg made that folder; a mask made from other values is
replaced only with ``--overwrite`` (``docs/quality.md``, "Rebuilding the mask from a report").
This process never imports JAX.
"""

from __future__ import annotations

import os

from absl import app, flags

from jaxseg.common import cli, config_util

_CONFIG = config_util.define_config_flag(required=False)
_AFFINITIES = flags.DEFINE_string(
  "affinities",
  None,
  "Affinity array ([C, z, y, x] float: zarr / N5 / 'file.h5:dataset'), or a jaxseg.predict "
  "output folder holding 'affinities'. Required unless --mask_from_report.",
)
_IMAGE = flags.DEFINE_string(
  "image",
  None,
  "Image ([z, y, x] or [c, z, y, x]) for the XY-border check and the mask's ring rule. Default: "
  "the affinities' 'source' attribute when it names an existing volume (with --mask_from_report: "
  "the report's img); '' to skip.",
)
_OUTPUT = flags.DEFINE_string(
  "output",
  None,
  "Output folder (required unless --mask_from_report). With --mask_from_report: the mask array "
  "(a name ending in .zarr) or a folder to hold 'mask.zarr'; default: 'mask.zarr' beside the "
  "report.",
)
_MASK_FROM_REPORT = flags.DEFINE_string(
  "mask_from_report",
  None,
  "A QC report.md (possibly edited): rebuild its affinity mask from the front matter (low_z, "
  "high_z, bg_thresh, border_width, img) without reading the affinities.",
)
_MASK = flags.DEFINE_bool("mask", True, "Also build the affinity mask (DIR/mask.zarr).")
_OVERWRITE = flags.DEFINE_bool(
  "overwrite", False, "Replace a QC made here with other inputs or settings instead of refusing."
)
_AXIS_ORDER = flags.DEFINE_string(
  "axis_order", None, "On-disk axis order of --affinities when the file names none ('cxyz': PyTC)."
)
_IMAGE_AXIS_ORDER = flags.DEFINE_string(
  "image_axis_order", None, "On-disk axis order of --image when the file names none ('xyzc')."
)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")


def _image_spec(affinities) -> tuple[str | None, str]:
  """The image to use and where it came from."""
  if _IMAGE.value is not None:
    return (_IMAGE.value or None), "--image"
  source = affinities.attrs.get("source")
  if isinstance(source, str) and source and os.path.exists(source):
    return source, "the affinities' source attribute; --image= skips it"
  return None, ""


def _summary_lines(result) -> list[str]:
  scan = result.scan
  depth = scan.depth
  lines = [
    f"QC of {scan.affinities} {tuple(scan.shape)} {scan.dtype}"
    + (" (reused a finished QC)" if result.reused else f" in {scan.seconds:.2f} s"),
    (
      f"keep z [{result.low_z}, {result.high_z}) of {depth}: drops {result.low_z} at the start, "
      f"{depth - result.high_z} at the end"
      if result.high_z > result.low_z
      else f"keeps nothing of {depth} sections: no section passed QC"
    ),
    f"NaN {result.nan_count}, Inf {result.inf_count}",
  ]
  for c, ch in enumerate(scan.channels):
    offset = f" {tuple(scan.offsets[c])}" if scan.offsets else ""
    mean, cut = scan.interior_mean[c], scan.cutoff[c]
    lo, hi = scan.min[c], scan.max[c]
    lines.append(
      f"  channel {ch}{offset}: interior mean "
      + ("n/a" if mean is None else f"{mean:.4f}, cutoff {cut:.4f}")
      + ("" if lo is None else f", range [{lo:.4f}, {hi:.4f}]")
    )
  b = scan.border
  if b is not None:
    ring = b["ring_background_mean"]
    inner = b["interior_background_mean"]
    lines.append(
      f"XY border ({scan.settings.border_width} px ring, image <= {scan.settings.bg_thresh:g}, "
      f"z = {', '.join(map(str, b['z']))}): background {b['ring_background']} of "
      f"{b['ring_voxels']} ring pixels, {b['interior_background']} of {b['interior_voxels']} "
      "interior; mean affinity there "
      + ("n/a" if ring is None else ", ".join(f"{v:.3f}" for v in ring))
      + " (ring) vs "
      + ("n/a" if inner is None else ", ".join(f"{v:.3f}" for v in inner))
      + " (interior)"
    )
  lines += [f"warning: {w}" for w in result.warnings]
  lines += [f"report {result.report}", f"plot {result.plot}"]
  if result.mask:
    lines.append(
      f"mask {result.mask} (decode with --config.decode.affinity_mask_path={result.mask})"
    )
  return lines


def _open_image(spec: str | None):
  """``spec`` opened as the image, or None; a NISB cube's img is (x, y, z, c) on disk and says so
  nowhere (as jaxseg.predict assumes)."""
  if spec is None:
    return None
  from jaxseg.io import open_volume

  nisb = spec.rstrip("/").endswith("data.zarr/img")
  return open_volume(
    spec, axis_order=_IMAGE_AXIS_ORDER.value, default_axis_order="xyzc" if nisb else None
  )


def _scan() -> None:
  """The QC proper: scan the affinities, write the report, plot and mask."""
  missing = [f"--{f.name}" for f in (_AFFINITIES, _OUTPUT) if f.value is None]
  if missing:
    raise app.UsageError(
      f"missing required flag(s): {', '.join(missing)} (or --mask_from_report=REPORT to rebuild "
      "a mask from a QC report); --helpshort lists the flags",
      exitcode=cli.USAGE_STATUS,
    )
  cli.check_output_folder(_OUTPUT.value)
  from jaxseg.io import open_volume
  from jaxseg.quality import run_qc
  from jaxseg.quality.scan import open_affinity_volume

  # The user's mistakes (input, settings, a full disk) raise JaxsegError: one line via cli.
  spec = _AFFINITIES.value
  if os.path.isdir(spec) and os.path.isdir(os.path.join(spec, "affinities")):
    spec = os.path.join(spec, "affinities")
  affinities = open_affinity_volume(open_volume(spec, axis_order=_AXIS_ORDER.value))
  image_spec, origin = _image_spec(affinities)
  if image_spec is not None and origin != "--image":
    print(f"image {image_spec} ({origin})")
  result = run_qc(
    _CONFIG.value,
    affinities,
    _OUTPUT.value,
    image=_open_image(image_spec),
    build_mask=_MASK.value,
    show_progress=_PROGRESS.value,
    overwrite=_OVERWRITE.value,
  )
  print("\n".join(_summary_lines(result)))


def _mask_output(report: str) -> str:
  """Where ``--mask_from_report`` writes: ``--output`` (an array ``*.zarr``, else a folder that
  gets ``mask.zarr``), by default beside the report.

  Never the report's ``out``: in jaxseg's reports that names the affinities, an input (PyTC's
  tutorial keeps its mask's path there).
  """
  from jaxseg.common import outputs
  from jaxseg.common.errors import OutputError
  from jaxseg.quality.affinity_qc import MASK_NAME

  output = _OUTPUT.value
  if output:
    if output.rstrip("/").lower().endswith(".zarr"):
      cli.check_output_folder(os.path.dirname(os.path.abspath(output)))
      return output.rstrip("/")
    cli.check_output_folder(output)
    if not outputs.is_jaxseg_folder(output):  # a named NAME.zarr may sit among the user's files
      raise OutputError(
        f"--output={output}: this folder holds files jaxseg did not make; jaxseg never writes into "
        "them: choose another folder, or name the mask itself (--output=DIR/NAME.zarr)"
      )
    return os.path.join(output, MASK_NAME)
  folder = os.path.dirname(os.path.abspath(report))
  if not outputs.is_jaxseg_folder(folder):
    raise app.UsageError(
      f"--mask_from_report={report}: its folder {folder} was not made by jaxseg, so the mask is "
      "not put there by default; name it with --output=DIR or --output=NAME.zarr",
      exitcode=cli.USAGE_STATUS,
    )
  return os.path.join(folder, MASK_NAME)


def _rebuild_mask() -> None:
  """``--mask_from_report``: the mask of an (edited) report, the affinities never read."""
  # Flags that only make sense for a scan: refused rather than silently ignored.
  scan_only = [
    name
    for name, given in (
      ("--affinities", _AFFINITIES.value is not None),
      ("--axis_order", _AXIS_ORDER.value is not None),
      ("--nomask", not _MASK.value),
    )
    if given
  ]
  if scan_only:
    raise app.UsageError(
      f"--mask_from_report rebuilds the mask from the report alone; drop {', '.join(scan_only)} "
      "(a new scan is --affinities=... --output=DIR without --mask_from_report)",
      exitcode=cli.USAGE_STATUS,
    )
  from jaxseg.quality import build_affinity_mask, read_report
  from jaxseg.quality import mask as mask_lib

  report = _MASK_FROM_REPORT.value
  if not report:
    raise app.UsageError(
      "--mask_from_report is empty; name a QC report.md", exitcode=cli.USAGE_STATUS
    )
  front = read_report(report)  # missing file or keys, bad values: one line naming the file
  output = _mask_output(report)
  if _IMAGE.value is not None:  # --image= : no image, only the z range is masked
    image = _open_image(_IMAGE.value or None)
    front = {**front, "img": None if image is None else image.path}
  else:
    image = _open_image(front.get("img") or None) if front["border_width"] > 0 else None
  # As jaxseg.qc's own mask: chunks that divide the decoder's blocks (run_qc does the same).
  decode = getattr(_CONFIG.value, "decode", None)
  block_shape = tuple(getattr(decode, "block_shape", None) or mask_lib.DEFAULT_BLOCK_SHAPE)
  mask = build_affinity_mask(
    front,
    output,
    image=image,
    block_shape=block_shape,
    overwrite=_OVERWRITE.value,
    show_progress=_PROGRESS.value,
    where=report,
  )
  spec = mask.attrs[mask_lib.MASK_ATTR]
  ring = (
    f"ring {spec['border_width']} px where {spec['source_image']} <= {spec['bg_thresh']:g}"
    if spec["source_image"]
    else "no ring rule (no image)"
  )
  print(
    f"mask {mask.path} {tuple(mask.shape)} from {report}: keep z [{spec['low_z']}, "
    f"{spec['high_z']}), {ring}"
  )
  print(f"decode with --config.decode.affinity_mask_path={mask.path}")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _MASK_FROM_REPORT.value is not None:
    _rebuild_mask()
  else:
    _scan()


def run() -> None:
  """Console-script entry point (``jaxseg-qc``)."""
  cli.run_main("jaxseg.qc", main)


if __name__ == "__main__":
  run()
