"""Trivial segmentations of a test volume, scored like the learned one, for the report.

A learned segmentation only means something next to what no learning gets. This module owns the
baselines the report (and the end-to-end test) compares against, each an unlearned ``[z, y, x]``
uint32 segmentation of the volume's spatial shape:

* ``one_segment``: every voxel has id 1 (all merges, no splits);
* ``per_voxel``: every voxel is its own segment (all splits, no merges);
* ``image_threshold``: 6-connected components of the image above its mean (EM membranes are
  dark, so a bright voxel is "inside a cell"): the naive unlearned segmenter.

Scoring goes through the same call as the learned segmentations (``jaxseg.decoding.scoring.score``
with the config's ``eval`` section: adapted Rand and VOI against the dense labels, NERL against
the skeletons). Images are ``[c, z, y, x]`` (the mean over channels is thresholded) or
``[z, y, x]``. Volumes are read whole: baselines are for test cubes that fit in memory. Never
imports JAX.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.ndimage

from jaxseg.decoding import scoring

BASELINES = ("one_segment", "per_voxel", "image_threshold")

# Metric direction, for "beats by a margin" checks: +1 higher is better, -1 lower is better.
METRIC_DIRECTIONS = {"adapted_rand": -1, "voi": -1, "nerl": +1}


def one_segment(shape: Sequence[int]) -> np.ndarray:
  """Everything one segment (id 1)."""
  return np.ones(tuple(shape), np.uint32)


def per_voxel(shape: Sequence[int]) -> np.ndarray:
  """Every voxel its own segment (ids 1..N in C order)."""
  n = int(np.prod(shape))
  if n >= np.iinfo(np.uint32).max:
    raise ValueError(f"per_voxel: {n} voxels do not fit uint32 ids")
  return np.arange(1, n + 1, dtype=np.uint32).reshape(tuple(shape))


def image_threshold(image: np.ndarray) -> np.ndarray:
  """6-connected components of ``image > mean(image)`` (ids 1..K, 0 = below the mean).

  Args:
    image: ``[z, y, x]`` or ``[c, z, y, x]`` (channels averaged).
  """
  image = np.asarray(image, np.float32)
  if image.ndim == 4:
    image = image.mean(axis=0)
  if image.ndim != 3:
    raise ValueError(
      f"image_threshold: expected a [z, y, x] or [c, z, y, x] image, got {image.shape}"
    )
  labels, _ = scipy.ndimage.label(image > image.mean())  # the default structure is 6-connected
  return labels.astype(np.uint32)


def baseline_segmentations(image: np.ndarray) -> dict[str, np.ndarray]:
  """``{name: [z, y, x] uint32 segmentation}`` for every baseline of :data:`BASELINES`."""
  shape = np.shape(image)[-3:]
  return {
    "one_segment": one_segment(shape),
    "per_voxel": per_voxel(shape),
    "image_threshold": image_threshold(image),
  }


def score_baselines(
  volume, config, *, erl_cache_dir: str | None = None
) -> dict[str, dict[str, Any]]:
  """Builds and scores every baseline of one volume with the learned segmentations' scorer.

  Args:
    volume: a ``jaxseg.io.datasets.LabeledVolume`` (already windowed to its usable z range).
    config: the run config (its ``eval`` section).
    erl_cache_dir: where the skeleton's parsed arrays are cached (the run's ``cache/erl``).

  Returns:
    ``{baseline: metrics}`` where metrics are ``evaluate``'s dict plus ``segments`` (the number
    of ids) and ``seconds`` (building and scoring).
  """
  image = np.asarray(volume.image[...])
  out = {}
  for name, seg in baseline_segmentations(image).items():
    start = time.perf_counter()
    metrics = dict(scoring.score(seg, volume, config.eval, erl_cache_dir=erl_cache_dir))
    metrics["segments"] = int(seg.max())
    metrics["seconds"] = time.perf_counter() - start
    out[name] = metrics
  return out


def margin(learned: dict, baselines: dict[str, dict], metric: str) -> float | None:
  """How much better ``learned[metric]`` is than the best trivial baseline (positive = better).

  ``None`` when the metric is missing from the learned result or from every baseline.
  """
  direction = METRIC_DIRECTIONS[metric]
  values = [
    b[metric]
    for name, b in baselines.items()
    if name.removeprefix("baseline: ") in BASELINES and b.get(metric) is not None
  ]
  if learned.get(metric) is None or not values:
    return None
  best = max(v * direction for v in values)
  return float(learned[metric] * direction - best)
