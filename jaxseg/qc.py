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

``--config`` is optional: without it PyTC's QC numbers apply (``configs/common.py``,
``qc_defaults``). Without ``--image``, the image named by the affinities' ``source`` attribute
(which ``jaxseg.predict`` writes) is used when it exists; ``--image=`` skips the border check.
A finished identical QC in ``DIR`` is reused. This process never imports JAX.
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
  "output folder holding 'affinities'.",
  required=True,
)
_IMAGE = flags.DEFINE_string(
  "image",
  None,
  "Image ([z, y, x] or [c, z, y, x]) for the XY-border check and the mask's ring rule. Default: "
  "the affinities' 'source' attribute when it names an existing volume; '' to skip.",
)
_OUTPUT = flags.DEFINE_string("output", None, "Output folder.", required=True)
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


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
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
  # A NISB cube's img is (x, y, z, c) on disk and says so nowhere (as jaxseg.predict assumes).
  nisb = image_spec is not None and image_spec.rstrip("/").endswith("data.zarr/img")
  image = (
    None
    if image_spec is None
    else open_volume(
      image_spec,
      axis_order=_IMAGE_AXIS_ORDER.value,
      default_axis_order="xyzc" if nisb else None,
    )
  )
  result = run_qc(
    _CONFIG.value,
    affinities,
    _OUTPUT.value,
    image=image,
    build_mask=_MASK.value,
    show_progress=_PROGRESS.value,
    overwrite=_OVERWRITE.value,
  )
  print("\n".join(_summary_lines(result)))


def run() -> None:
  """Console-script entry point (``jaxseg-qc``)."""
  cli.run_main("jaxseg.qc", main)


if __name__ == "__main__":
  run()
