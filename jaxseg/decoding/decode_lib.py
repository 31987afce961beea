"""Affinity zarr in, segmentation zarr out: the decoder behind ``python -m jaxseg.decode``.

Owns:
  * :func:`decode_array`: the whole-volume decoders on in-memory arrays (connected components,
    waterz with dust / branch merges, or the mutex watershed of ``mws.py`` on every channel),
    returning one ``[z, y, x]`` segmentation per threshold.
  * :func:`read_decoded`: the channels a decoder reads from its source: ``[3, z, y, x]``, or
    ``[C, z, y, x]`` with their offsets for the mutex watershed.
  * :func:`decode`: the file-level job: checks, whole-volume or blockwise (``blockwise.py``),
    output arrays, preview PNG and a ``decode.json`` summary. What already exists in the output
    folder is reused, resumed, refused or replaced by :mod:`jaxseg.common.outputs`.

Reading the affinities (:func:`open_affinities`: an affinity volume ``[C, z, y, x]`` and which
three stored channels are the decoded edges) and the mask is ``affinity_io``'s; naming and creating
the output arrays is ``segmentation_io``'s. Both are shared with ``blockwise``, which this module
calls; the names this module uses from them stay importable from here.

Output layout: ``<output>/segmentation`` (one threshold) or ``<output>/segmentation_t<thr>`` (one
per waterz threshold), each a ``[z, y, x]`` zarr in the smallest unsigned dtype that holds its ids,
with ``resolution``, ``source`` and the decode fingerprint in its attributes.

Never imports JAX.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import numpy as np
from absl import logging

from jaxseg.common import outputs
from jaxseg.common.files import write_json
from jaxseg.common.outputs import Decision, StageOutput, input_identity
from jaxseg.data.affinity import convert_convention
from jaxseg.decoding import cc, mws
from jaxseg.decoding.affinity_io import (
  AffinitySource,
  check_decoder_fits,
  long_range_crop,
  mask_affinities,
  open_affinities,
  open_mask,
)
from jaxseg.decoding.segmentation_io import create_output, output_names
from jaxseg.decoding.settings import DecodeSettings
from jaxseg.io import VolumeError
from jaxseg.io.volume import Volume

SUMMARY = "decode.json"
PREVIEW = "preview.png"
BLOCKWISE_SCRATCH = "_blockwise"
MASK_SPEC_ATTR = "jaxseg_affinity_mask"  # what jaxseg.quality.mask records in a mask it builds


# -- whole-volume decoding ------------------------------------------------------------------------


def decode_array(
  aff: np.ndarray,
  settings: DecodeSettings,
  *,
  distances: Sequence[int] = (1, 1, 1),
  offsets: Sequence[Sequence[int]] | None = None,
  convention: str | None = None,
  mask: np.ndarray | None = None,
  verbose: bool = False,
) -> list[tuple[float, np.ndarray]]:
  """Decodes in-memory affinities.

  Args:
    aff: ``[3, z, y, x]`` edges along z, y, x (float16/32/64); for ``mws`` ``[C, z, y, x]``,
      the channels of :func:`read_decoded`.
    settings: the decoder.
    distances: each channel's edge length (1, 1, 1 for nearest neighbours).
    offsets: ``mws`` only: the ``(dz, dy, dx)`` of each of the ``C`` channels.
    convention: storage convention (default ``settings.convention``).
    mask: optional ``[z, y, x]`` (non-zero = keep).
    verbose: let waterz print.

  Returns:
    ``[(threshold, segmentation [z, y, x])]``, one per threshold, ascending; segmentations in the
    smallest unsigned dtype, ids 1..K (0 = background).
  """
  convention = convention or settings.convention
  aff = np.asarray(aff)
  if settings.method == "mws":
    if offsets is None:
      raise ValueError("the mutex watershed needs each channel's offsets")
    seg = mws.mutex_watershed(
      mask_affinities(aff, mask), offsets, convention, settings.mws, min_size=settings.min_size
    )
    return [(settings.threshold, seg)]
  if aff.ndim != 4 or aff.shape[0] != 3:
    raise ValueError(f"affinities must be [3, z, y, x], got {aff.shape}")
  if settings.method == "cc":
    if tuple(distances) != (1, 1, 1):
      raise ValueError(
        f"connected components decode nearest-neighbour edges only, got distances {distances}"
      )
    if convention == "target":
      offsets = ((1, 0, 0), (0, 1, 0), (0, 0, 1))
      aff, _ = convert_convention(mask_affinities(aff, mask), offsets, "target", "source")
      mask = None
    seg = cc.decode_affinity_cc(aff, settings.threshold, mask=mask, min_size=settings.min_size)
    return [(settings.threshold, seg)]
  return _decode_waterz(aff, settings, distances, convention, mask, verbose)


def _decode_waterz(aff, settings, distances, convention, mask, verbose):
  from jaxseg.decoding import waterz_ops, waterz_post

  offsets = tuple(tuple(d if b == a else 0 for b in range(3)) for a, d in enumerate(distances))
  shape = aff.shape[1:]
  crop = long_range_crop(distances, convention)
  aff_w = waterz_ops.to_waterz_affinities(mask_affinities(aff, mask), offsets, convention)
  aff_w = np.ascontiguousarray(aff_w[(slice(None), *crop)])
  scoring, _ = waterz_ops.scoring_function(settings.merge_function)
  results = waterz_ops.agglomerate(
    aff_w,
    settings.thresholds,
    low=settings.aff_threshold_low,
    high=settings.aff_threshold_high,
    merge_function=scoring,
    discretize_queue=settings.discretize_queue,
    verbose=verbose,
  )
  out = []
  for r in results:
    # Dust merge, branch merge, size filter and renumbering with one pass over the volume.
    seg = waterz_post.postprocess(
      r.segmentation,
      r.rg_u,
      r.rg_v,
      r.rg_score,
      threshold=r.threshold,
      z_affinity=aff_w[0],
      dust=settings.dust,
      branch_merge=settings.branch_merge,
      min_size=settings.min_size,
    )
    if seg.shape != tuple(shape):  # a long-range crop: the cut planes come back as background
      full = np.zeros(shape, seg.dtype)
      full[crop] = seg
      seg = full
    out.append((float(r.threshold), seg))
  return out


# -- the file-level job ---------------------------------------------------------------------------


def wants_blockwise(settings: DecodeSettings, shape: Sequence[int]) -> bool:
  """``auto``: blockwise exactly when the volume does not fit in one block. The mutex watershed
  is never blockwise (``decode.mws.max_voxels`` bounds it instead)."""
  if settings.method == "mws":
    return False
  if settings.blockwise != "auto":
    return settings.blockwise == "always"
  return any(s > b for s, b in zip(shape, settings.block_shape, strict=True))


def _job_fingerprint(
  settings: DecodeSettings, source: AffinitySource, blockwise: bool, mask: Volume | None = None
) -> dict:
  out = {
    **settings.fingerprint(),
    "affinities": os.path.abspath(source.volume.path),
    "shape": list(source.spatial_shape),
    "blockwise": blockwise,
  }
  if source.volume.axis_order != "czyx":
    # Only when not canonical, so decodes made before the key existed stay valid.
    out["axis_order"] = source.volume.axis_order
  if mask is not None:
    # The path alone would let a mask rebuilt in place (jaxseg.qc --overwrite) pass for the old
    # one; the spec that jaxseg.qc stores in its attributes names what it keeps.
    out["affinity_mask"] = mask.attrs.get(MASK_SPEC_ATTR, "")
  if blockwise:
    out["block_shape"] = list(settings.block_shape)
    if settings.method == "waterz":
      out["context"] = list(settings.context)
  return out


def write_preview(path: str, source: AffinitySource, segmentation: Volume) -> str:
  """A PNG of three z sections: the mean decoded affinity on top, the labels tinted below."""
  from jaxseg.io.preview import save_preview

  nz = source.spatial_shape[0]
  zs = sorted({min(nz - 1, max(0, int(nz * f))) for f in (0.25, 0.5, 0.75)})
  seg = np.stack([np.asarray(segmentation[z]) for z in zs])
  aff = np.stack([source.read((slice(z, z + 1),))[:, 0].astype(np.float32).mean(0) for z in zs])
  # Stretched: a young net's affinities can sit in a narrow band around 0.5.
  lo, hi = np.percentile(np.nan_to_num(aff), (1, 99))
  img = np.clip((np.nan_to_num(aff) - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
  return save_preview(path, img, seg)


@outputs.writes_outputs
def decode(
  settings: DecodeSettings,
  affinities: str,
  output: str,
  *,
  overwrite: bool = False,
  verbose: bool = False,
  show_progress: bool = True,
  axis_order: str | None = None,
) -> dict:
  """Decodes an affinity volume into ``output`` (a folder), whole-volume or blockwise.

  ``axis_order``: the affinities' on-disk order when the file names none (:func:`open_affinities`).

  Returns:
    The summary written to ``<output>/decode.json``: arrays, segment counts, timings.

  Raises:
    VolumeError: unreadable or inconsistent input or mask, or an output made differently.
    ValueError: settings the decoder cannot run.
  """
  start = time.perf_counter()
  source = open_affinities(affinities, settings, axis_order=axis_order)
  check_decoder_fits(source, settings)
  shape = source.spatial_shape
  mask = open_mask(settings.affinity_mask_path, shape) if settings.affinity_mask_path else None
  blockwise = wants_blockwise(settings, shape)
  fingerprint = _job_fingerprint(settings, source, blockwise, mask)
  names = output_names(settings)
  stage = decode_output(output, fingerprint, names, source, settings.affinity_mask_path)
  decision = stage.open(overwrite=overwrite)
  if decision is Decision.REUSE:
    with open(os.path.join(output, SUMMARY)) as f:
      return {**json.load(f), "already_done": True}
  if decision is Decision.REPLACE and stage.replaced_because:
    logging.warning("%s: redoing the decode (%s)", output, "; ".join(stage.replaced_because))
  watershed = _check_watershed(source, settings) if settings.method == "waterz" else None
  if not blockwise:
    # A whole-volume decode killed mid-write left partial arrays of its own: start them again.
    for name in (*names, SUMMARY):
      stage.remove_own(name)

  if blockwise:
    from jaxseg.decoding import blockwise as blockwise_lib

    arrays, counts, info = blockwise_lib.decode_blockwise(
      settings,
      source,
      mask,
      output,
      fingerprint,
      verbose=verbose,
      show_progress=show_progress,
    )
  else:
    aff, offsets = read_decoded(source, settings)
    if not np.isfinite(aff).all():
      raise VolumeError(f"{source.volume.path}: affinities contain NaN or Inf")
    results = decode_array(
      aff,
      settings,
      distances=source.distances,
      offsets=offsets,
      convention=source.convention,
      mask=None if mask is None else np.asarray(mask[:]),
      verbose=verbose,
    )
    arrays = [
      create_output(output, name, threshold, seg.dtype, source, settings, fingerprint)
      for name, (threshold, seg) in zip(output_names(settings), results, strict=True)
    ]
    for array, (_, seg) in zip(arrays, results, strict=True):
      array.write((0, 0, 0), seg).result()
    counts = [int(seg.max()) if seg.size else 0 for _, seg in results]
    info = {"blocks": 1}
  # The middle threshold's segmentation (the only one, usually).
  preview = write_preview(os.path.join(output, PREVIEW), source, arrays[len(arrays) // 2])
  summary = {
    "fingerprint": fingerprint,
    "complete": True,
    "affinities": source.volume.path,
    "arrays": [os.path.join(output, n) for n in names],
    "thresholds": list(settings.thresholds),
    "segments": counts,
    "shape": list(shape),
    "method": settings.method,
    "blockwise": blockwise,
    "seconds": round(time.perf_counter() - start, 3),
    "preview": preview,
    **info,
  }
  if watershed is not None:
    summary["watershed_estimate"] = watershed
  write_json(os.path.join(output, SUMMARY), summary)
  # Scratch goes only once the summary is written: a run killed before that resumes.
  stage.discard(BLOCKWISE_SCRATCH)
  stage.finish()
  return summary


def read_decoded(source: AffinitySource, settings: DecodeSettings):
  """The whole volume's decoded channels: ``([3, z, y, x], None)``, or for the mutex watershed
  ``([C, z, y, x], offsets)`` (:func:`jaxseg.decoding.mws.resolve_channels`), stored dtype."""
  if settings.method != "mws":
    return source.read(), None
  channels = mws.resolve_channels(source.volume, settings)
  return channels.read(source.volume), channels.offsets


def _check_watershed(source: AffinitySource, settings: DecodeSettings) -> dict:
  """Estimates, on a central box, how finely waterz's watershed will cut the volume, and warns
  before a decode whose watershed leaves fewer than ``MIN_VOXELS_PER_REGION`` voxels per region
  (``docs/decoding.md``, "Watershed thresholds")."""
  from jaxseg.decoding import waterz_ops

  sample = np.nan_to_num(source.read(waterz_ops.sample_box(source.spatial_shape)), copy=False)
  aff_w = waterz_ops.to_waterz_affinities(sample, source.offsets, source.convention)
  low, high = settings.aff_threshold_low, settings.aff_threshold_high
  estimate = waterz_ops.estimate_watershed(aff_w, low=low, high=high)
  if estimate["voxels_per_region"] < waterz_ops.MIN_VOXELS_PER_REGION:
    logging.warning(
      "%s: waterz's watershed would leave about one region per %.0f voxels (measured on a "
      "central box of %d voxels: %.1f%% of them have an affinity >= decode.aff_threshold_high=%g, "
      "the largest is %.3f), so agglomeration does nearly all the work: slow, and memory-hungry "
      "on large volumes. Lower decode.aff_threshold_high into the affinities' range (or tune "
      "it), or predict with an activation that reaches it.",
      source.volume.path,
      estimate["voxels_per_region"],
      estimate["voxels"],
      100 * estimate["share_above_high"],
      high,
      estimate["max_affinity"],
    )
  return estimate


def decode_output(
  output: str, fingerprint: dict, names: Sequence[str], source: AffinitySource, mask_path
) -> StageOutput:
  """The decode's entry in ``output``'s manifest: its arrays, preview, summary and scratch.

  The fingerprint gains the identity of the affinities and the mask (their files' sizes and
  times), so a re-prediction or a rebuilt mask in place is never decoded from the old result.
  """
  inputs = {"affinities": input_identity(source.volume.path)}
  if mask_path:
    inputs["mask"] = input_identity(mask_path)
  return StageOutput(
    output,
    name="decode",
    stage="decode",
    fingerprint={**fingerprint, "inputs": inputs},
    paths=[*names, PREVIEW, SUMMARY, BLOCKWISE_SCRATCH],
    inputs=[source.volume.path, *([mask_path] if mask_path else [])],
    what="--output folder",
  )
