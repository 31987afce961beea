"""A boundary map made by another tool, decoded and tuned like the learned affinities.

A lab that already has a boundary classifier (ilastik, gala, an older network) wants to know
whether jaxseg beats it on its own data. A ``volumes`` entry may therefore carry ``boundaries``:
a ``[z, y, x]`` boundary probability map of the entry's image (float in ``[0, 1]``, or uint8
``0..255``; 1 = membrane). The run turns each into nearest-neighbour affinities (an edge is as
strong as its weaker end, ``1 - max(b(v), b(v + e))``), tunes every decoder on the
``tune.split`` entries' maps over the decoder's whole ``config.tune.<decoder>`` search space
(exhaustively, a grid even where the learned affinities get TPE, so the reference is tuned at
least as well as the model), decodes the test entry's map with the best parameters and scores
it with the learned segmentations' scorer. The rows appear in the report as
``baseline: boundaries + <decoder> (tuned)``.

Maps are read whole: this is for labelled crops that fit in memory. Never imports JAX.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxseg.common.errors import InputError
from jaxseg.decoding import scoring
from jaxseg.decoding.decode_lib import decode_array
from jaxseg.decoding.settings import decode_settings
from jaxseg.io.datasets import LabeledVolume
from jaxseg.tuning import search, tune_lib

# Decoders that decode in-memory nearest-neighbour affinities (decode_array).
DECODERS = ("cc", "waterz")


def row_name(decoder: str) -> str:
  return f"boundaries + {decoder} (tuned)"


def affinities_from_boundaries(boundaries: np.ndarray) -> np.ndarray:
  """Nearest-neighbour affinities of a boundary probability map.

  Args:
    boundaries: ``[z, y, x]`` probabilities in ``[0, 1]`` (1 = membrane).

  Returns:
    float32 ``[3, z, y, x]``, channels z, y, x in the ``source`` convention: ``out[c, v]`` is the
    edge ``v -> v + e_c``, ``1 - max(b(v), b(v + e_c))``; the last plane along each axis has no
    edge and holds 0.
  """
  inside = 1.0 - np.asarray(boundaries, np.float32)
  out = np.zeros((3, *inside.shape), np.float32)
  for axis in range(3):
    lower = [slice(None)] * 3
    upper = [slice(None)] * 3
    lower[axis] = slice(None, -1)
    upper[axis] = slice(1, None)
    out[(axis, *lower)] = np.minimum(inside[tuple(lower)], inside[tuple(upper)])
  return out


def read_boundaries(volume: LabeledVolume) -> np.ndarray:
  """The volume's (windowed) boundary map as float32 in ``[0, 1]``.

  Raises:
    InputError: no map, or float values outside ``[0, 1]`` (naming the file).
  """
  if volume.boundaries is None:
    raise InputError(f"volume {volume.name} has no boundaries entry")
  data = np.asarray(volume.boundaries.read())
  if data.dtype == np.uint8:
    return data.astype(np.float32) / 255.0
  data = data.astype(np.float32)
  low, high = float(np.nanmin(data)), float(np.nanmax(data))
  if not (np.isfinite(low) and np.isfinite(high) and low >= 0.0 and high <= 1.0):
    raise InputError(
      f"{volume.boundaries.path}: a boundary map must hold probabilities in [0, 1] (or uint8), "
      f"found values in [{low:g}, {high:g}]"
    )
  return data


def _segmentations(config, decoder: str, params: dict, aff: np.ndarray) -> list:
  settings = decode_settings(scoring.decoder_config(config, decoder, params))
  return decode_array(aff, settings, convention="source")


def _grid_params(space: search.SearchSpace) -> list[dict]:
  points = space.grid_points()
  if space.decoder == "waterz":
    points = [{**p, "thresholds": space.thresholds} for p in points]
  return points


def tune_boundaries(
  config, decoder: str, val: Sequence[tuple[LabeledVolume, np.ndarray]]
) -> tuple[dict, float]:
  """The kept decode parameters on the validation maps: ``(params, objective value)``.

  Every point of the decoder's search space is decoded (waterz: every merge threshold of the
  point in one pass) and scored on every validation volume; the objective is averaged, and the
  setting is kept by ``config.tune.selection`` as a study keeps it
  (:func:`jaxseg.tuning.tune_lib.select_point`), so the map and the model are tuned alike.
  """
  space = search.search_space(config, decoder)
  worst = scoring.worst_value(space.direction)
  rows = []
  for number, params in enumerate(_grid_params(space)):
    totals: dict[float, list[float]] = {}
    for volume, aff in val:
      for threshold, seg in _segmentations(config, decoder, params, aff):
        metrics = scoring.score(seg, volume, config.eval)
        totals.setdefault(threshold, []).append(scoring.objective_value(metrics, space.objective))
    per_threshold = []
    for threshold, values in sorted(totals.items()):
      value = float(np.mean(values))
      per_threshold.append(
        {"threshold": threshold, "value": value if np.isfinite(value) else worst}
      )
    sampled = {k: v for k, v in params.items() if k != "thresholds"}
    best = scoring.best_row(per_threshold, space.direction)
    if np.isfinite(best["value"]):
      rows.append(
        {
          "number": number,
          "params": sampled,
          "threshold": best["threshold"] if decoder != "mws" else None,
          "value": best["value"],
          "thresholds": per_threshold if decoder == "waterz" else [],
        }
      )
  if not rows:
    raise InputError(f"no {decoder} parameters scored a finite {space.objective} on the maps")
  kept = tune_lib.select_point(rows, space)
  params = dict(kept["params"])
  if decoder == "waterz":
    params["thresholds"] = (kept["threshold"],)
  return params, kept["value"]


def score_boundary_map(
  test: LabeledVolume,
  val: Sequence[LabeledVolume],
  config,
  decoders: Sequence[str],
  *,
  erl_cache_dir: str | None = None,
) -> dict[str, dict[str, Any]]:
  """``{row name: metrics}`` for each decoder of ``decoders`` this module can decode.

  Metrics are ``score``'s plus ``segments``, ``params`` (the tuned decode keys), ``tuned_on``
  (the validation volumes), ``tuned_value`` (their objective) and ``seconds``.
  """
  val_maps = [(v, affinities_from_boundaries(read_boundaries(v))) for v in val]
  test_aff = affinities_from_boundaries(read_boundaries(test))
  out = {}
  for decoder in decoders:
    if decoder not in DECODERS:
      continue
    start = time.perf_counter()
    params, tuned_value = tune_boundaries(config, decoder, val_maps)
    ((_, seg),) = _segmentations(config, decoder, params, test_aff)
    metrics = dict(scoring.score(seg, test, config.eval, erl_cache_dir=erl_cache_dir))
    metrics.update(
      segments=int(seg.max()),
      params=params,
      tuned_on=[v.name for v, _ in val_maps],
      tuned_value=tuned_value,
      seconds=time.perf_counter() - start,
    )
    out[row_name(decoder)] = metrics
  return out
