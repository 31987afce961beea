"""The affinity mask: a uint8 ``[z, y, x]`` zarr, 1 = keep, built from a QC report.

Rules (``docs/quality.md``, "Mask"): sections outside ``[low_z, high_z)`` are dropped, and so are
pixels of the XY ring (``border_width`` wide) whose image is at or below ``bg_thresh`` (a dark
padded margin the net reads as one huge cell). The spec travels in the array's attributes
(``jaxseg_affinity_mask``: ``low_z``, ``high_z``, ``bg_thresh``, ``border_width``,
``source_image``, ``affinities``, ``shape``), so a mask says how it was made. The mask is an entry
of its folder's jaxseg manifest (:mod:`jaxseg.common.outputs`): the same spec is reused, a
different one is refused unless ``overwrite``, and a path jaxseg did not make is never replaced.

The mask is written one chunk-deep z slab at a time (only the ring strips of the image are read)
into ``<output>.partial``, renamed onto ``<output>`` when complete, so a killed build never leaves
a half mask. The decoder (``decode.affinity_mask_path``, ``jaxseg.decoding.affinity_io.open_mask``)
reads it box by box. Never imports JAX.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from jaxseg.common import outputs
from jaxseg.common.errors import InputError
from jaxseg.common.outputs import Decision, StageOutput, input_identity
from jaxseg.common.progress import progress
from jaxseg.io import Volume, VolumeError, block_chunks, create_zarr, open_volume
from jaxseg.quality.report import QcReport, read_report, stable_path
from jaxseg.quality.scan import image_box

MASK_ATTR = "jaxseg_affinity_mask"
# Chunks follow the decoder's default blocks (config.decode.block_shape), so a block read of the
# mask touches whole chunks.
DEFAULT_BLOCK_SHAPE = (256, 512, 512)


def _frontmatter(report_or_frontmatter) -> dict:
  if isinstance(report_or_frontmatter, QcReport):
    return report_or_frontmatter.frontmatter()
  if isinstance(report_or_frontmatter, Mapping):
    return dict(report_or_frontmatter)
  return read_report(report_or_frontmatter)


def mask_spec(
  report_or_frontmatter,
  *,
  image: str | os.PathLike | Volume | None = None,
  shape: Sequence[int] | None = None,
  where: str | os.PathLike | None = None,
) -> tuple[dict, Volume | None]:
  """The mask's spec and the image its ring rule reads (None when it needs none).

  Args:
    report_or_frontmatter: a :class:`QcReport`, its front matter (dict), or a ``report.md`` path.
    image: the image (default: the report's ``img``); ``[z, y, x]`` or ``[c, z, y, x]``.
    shape: the mask's ``(z, y, x)`` (default: the report's ``shape``, else the image's, else the
      affinities' (``out``)).
    where: what the messages name (default: the report's path when given one).

  Raises:
    InputError: a front matter without usable ``low_z`` / ``high_z`` / ``bg_thresh`` /
      ``border_width``, or one that contradicts ``shape`` (one line naming ``where``).
    VolumeError: an unreadable image or affinities, or shapes that disagree.
  """
  if where is None and isinstance(report_or_frontmatter, (str, os.PathLike)):
    where = report_or_frontmatter
  named = f"{os.fspath(where)}: " if where is not None else ""
  fm = _frontmatter(report_or_frontmatter)
  for key in ("low_z", "high_z", "bg_thresh", "border_width"):
    if key not in fm:
      raise InputError(f"{named}QC front matter lacks {key!r} (has {sorted(fm)})")
  low, high, width = int(fm["low_z"]), int(fm["high_z"]), int(fm["border_width"])
  bg_thresh = fm["bg_thresh"]
  image_spec = image if image is not None else fm.get("img")
  img = None
  if width > 0 and image_spec is not None:
    img = image_spec if isinstance(image_spec, Volume) else open_volume(os.fspath(image_spec))
  reported = fm.get("shape")
  if shape is None:
    if reported is not None:
      shape = reported[-3:]
    elif img is not None:
      shape = img.shape[-3:]
    elif fm.get("out"):
      shape = open_volume(os.fspath(fm["out"])).shape[-3:]
    else:
      raise InputError(
        f"{named}no mask shape: pass shape=, or a report with 'shape', 'img' or 'out'"
      )
  shape = tuple(int(n) for n in shape)
  if len(shape) != 3 or min(shape) < 1:
    raise InputError(f"{named}mask shape must be three positive sizes (z, y, x), not {shape}")
  if reported is not None and tuple(int(n) for n in reported[-3:]) != shape:
    raise VolumeError(
      f"{named}the QC report was made for (z, y, x) {tuple(reported[-3:])}, but the mask is {shape}"
    )
  if img is not None and tuple(img.shape[-3:]) != shape:
    raise VolumeError(f"{img.path}: image (z, y, x) {tuple(img.shape[-3:])} is not the mask's {shape}")  # fmt: skip
  # low == high is a QC that passed no section: a mask that keeps nothing.
  if not 0 <= low <= high <= shape[0]:
    raise InputError(
      f"{named}QC low_z {low} / high_z {high} must satisfy 0 <= low_z <= high_z <= {shape[0]} "
      "sections"
    )
  spec = {
    "low_z": low,
    "high_z": high,
    "bg_thresh": bg_thresh,
    "border_width": width,
    # The ring rule needs the image; without one (or without a ring) only z is masked.
    "source_image": None if img is None else stable_path(img.path),
    "affinities": stable_path(fm.get("out")) if fm.get("out") else None,
    "shape": list(shape),
  }
  return spec, img


def ring_strips(shape: Sequence[int], width: int) -> list[tuple[slice, slice]]:
  """``(rows, cols)`` boxes covering the XY ring of ``width`` pixels once each (empty ones left
  out)."""
  ny, nx = shape[-2:]
  top, bottom = min(width, ny), max(min(width, ny), ny - width)
  left, right = min(width, nx), max(min(width, nx), nx - width)
  boxes = [
    (slice(0, top), slice(0, nx)),
    (slice(bottom, ny), slice(0, nx)),
    (slice(top, bottom), slice(0, left)),
    (slice(top, bottom), slice(right, nx)),
  ]
  return [(r, c) for r, c in boxes if r.stop > r.start and c.stop > c.start]


@outputs.writes_outputs
def build_affinity_mask(
  report_or_frontmatter,
  output: str | os.PathLike,
  *,
  image: str | os.PathLike | Volume | None = None,
  shape: Sequence[int] | None = None,
  overwrite: bool = False,
  block_shape: Sequence[int] = DEFAULT_BLOCK_SHAPE,
  show_progress: bool = False,
  where: str | os.PathLike | None = None,
) -> Volume:
  """Builds (or reuses) the affinity mask of a QC report.

  Args:
    report_or_frontmatter: a :class:`QcReport`, its front matter (dict), or a ``report.md`` path.
    output: the mask array (``.../mask.zarr``).
    image: the image for the ring rule (default: the report's ``img``).
    shape: ``(z, y, x)`` (default: from the report, image or affinities).
    overwrite: replace an existing array that is not this mask.
    block_shape: the decoder's block shape; chunks divide it (``block_chunks``).
    show_progress: a progress bar over the slabs.
    where: what error messages name (default: the report's path when given one).

  Returns:
    The mask, opened for reading.

  Raises:
    OutputError: ``output`` holds a mask made differently and not ``overwrite``, or anything
      jaxseg did not make (even with ``overwrite``); nothing is touched then.
    VolumeError: bad inputs, as :func:`mask_spec`.
  """
  output = os.path.abspath(os.fspath(output))
  spec, img = mask_spec(report_or_frontmatter, image=image, shape=shape, where=where)
  shape = tuple(spec["shape"])
  folder, name = os.path.split(output.rstrip("/"))
  partial_name = name + ".partial"
  stage = StageOutput(
    folder,
    name=f"mask:{name}",
    stage="affinity mask",
    # The image's background decides the ring: an image changed in place makes another mask.
    fingerprint={"spec": spec, "inputs": {"image": input_identity(img.path) if img else None}},
    paths=[name, partial_name],
    inputs=[p for p in (spec["affinities"], img.path if img is not None else None) if p],
    what="mask output",
    shared=True,
  )
  if stage.open(overwrite=overwrite) is Decision.REUSE:
    return open_volume(output)
  stage.remove_own(name)  # killed between the rename and the manifest: build it again

  resolution = (1.0, 1.0, 1.0)
  if img is not None:
    resolution = img.resolution
  elif spec["affinities"] and os.path.exists(spec["affinities"]):
    resolution = open_volume(spec["affinities"]).resolution
  chunks = block_chunks([min(int(b), n) for b, n in zip(block_shape, shape, strict=True)])
  partial = os.path.join(folder, partial_name)
  stage.remove_own(partial_name)  # a build killed earlier
  out = create_zarr(
    partial,
    shape,
    np.uint8,
    chunks=chunks,
    resolution=resolution,
    source=spec["affinities"],
    attributes={MASK_ATTR: spec},
  )
  low, high = spec["low_z"], spec["high_z"]
  strips = ring_strips(shape, spec["border_width"]) if img is not None else []
  slabs = range(0, shape[0], chunks[0])
  for z0 in progress(slabs, total=len(slabs), desc="mask", unit="slab", disable=not show_progress):
    z1 = min(z0 + chunks[0], shape[0])
    block = np.zeros((z1 - z0, *shape[1:]), np.uint8)
    lo, hi = max(z0, low), min(z1, high)
    if lo < hi:
      keep = block[lo - z0 : hi - z0]
      keep[:] = 1
      for rows, cols in strips:
        background = image_box(img, (slice(lo, hi), rows, cols)) <= spec["bg_thresh"]
        keep[:, rows, cols][background] = 0
    out.write((z0, 0, 0), block)
  out.flush()
  os.replace(partial, output)
  stage.finish()
  return open_volume(output)
