"""The decoders' output arrays: their names under the output folder and how they are created.

Owns :func:`output_names` (``segmentation``, or ``segmentation_t<thr>`` per waterz threshold) and
:func:`create_output`: a ``[z, y, x]`` zarr in the given unsigned dtype, chunked to divide the
decode blocks, with ``resolution``, ``source`` and the decode fingerprint (:data:`ATTR_KEY`) in its
attributes. Shared by the whole-volume decoder (``decode_lib``) and the blockwise one
(``blockwise``). Never imports JAX.
"""

from __future__ import annotations

import os

from jaxseg.decoding.affinity_io import AffinitySource
from jaxseg.decoding.settings import DecodeSettings
from jaxseg.io import block_chunks, create_zarr

ATTR_KEY = "jaxseg_decode"


def output_names(settings: DecodeSettings) -> list[str]:
  """Array names under the output folder, one per threshold."""
  if len(settings.thresholds) == 1:
    return ["segmentation"]
  return [f"segmentation_t{t:g}" for t in settings.thresholds]


def create_output(output, name, threshold, dtype, source: AffinitySource, settings, fingerprint):
  """Creates one output array ``<output>/<name>`` (refuses to replace an existing one)."""
  shape = source.spatial_shape
  return create_zarr(
    os.path.join(output, name),
    shape,
    dtype,
    chunks=block_chunks([min(b, n) for b, n in zip(settings.block_shape, shape, strict=True)]),
    resolution=source.volume.resolution,
    source=source.volume.path,
    attributes={ATTR_KEY: {**fingerprint, "threshold": threshold}},
  )
