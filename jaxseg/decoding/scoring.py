"""Decode and score: a decoder's config with tuned parameters, segmentation metrics, objectives.

Owns:
  * :func:`decoder_config`: a config copy whose ``decode`` section runs one decoder with tuned
    parameters (``best_params.json``'s ``params``); :func:`with_params` the same on a plain
    ``decode`` dict (a trial's).
  * :func:`score` / :func:`evaluate_loaded`: the metrics of
    :func:`jaxseg.metrics.evaluation.evaluate` for a ``[z, y, x]`` segmentation against a volume's
    dense labels and / or skeletons.
  * :func:`decode_and_evaluate`: decode one cached affinity volume to disk
    (:func:`jaxseg.decoding.decode_lib.decode`), score every output segmentation and write
    ``metrics.json`` beside them; a finished identical job is reused.
  * Objectives: ``nerl`` is maximised, ``adapted_rand`` and ``voi`` minimised.

Never imports JAX.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxseg.common import outputs
from jaxseg.common.errors import ConfigError, InputError
from jaxseg.common.files import json_ready, local_abspath, read_json, write_json
from jaxseg.common.outputs import Decision, StageOutput, input_identity

if TYPE_CHECKING:
  from jaxseg.io.datasets import LabeledVolume

OBJECTIVES = {"nerl": "maximize", "adapted_rand": "minimize", "voi": "minimize"}
DECODERS = ("cc", "waterz", "mws")
METRICS_FILE = "metrics.json"
# The decode keys each decoder's tuning sets (``thresholds`` for waterz holds the best one).
TUNED_KEYS = {
  "cc": ("threshold",),
  "waterz": ("merge_function", "aff_threshold_low", "aff_threshold_high", "thresholds"),
  "mws": ("bias_short", "bias_long"),
}
# Decoders whose tuned keys live in a sub-section of ``config.decode`` (``decode.mws.bias_short``).
TUNED_SECTION = {"mws": "mws"}


@dataclasses.dataclass
class CachedAffinities:
  """One volume's cached prediction.

  Attributes:
    name: the volume's short name (``seed100``).
    affinities: path of ``<name>.zarr/affinities`` (``[C, z, y, x]``).
    volume: the volume with its z range applied (:meth:`LabeledVolume.windowed`): image, labels,
      skeleton.
    mask: path of the QC affinity mask (uint8 ``[z, y, x]``, 1 = keep), or None.
    reused: True when the prediction existed before this call.
    qc: the QC summary (``low_z``, ``high_z``, report paths, ...) or None when QC is off.
  """

  name: str
  affinities: str
  volume: LabeledVolume
  mask: str | None = None
  reused: bool = False
  qc: dict | None = None


def check_decoder(decoder: str) -> str:
  if decoder not in DECODERS:
    raise ConfigError(f"decoder must be one of {DECODERS}, not {decoder!r}")
  return decoder


def direction(objective: str) -> str:
  """``"maximize"`` or ``"minimize"`` for an objective name."""
  if objective not in OBJECTIVES:
    raise ConfigError(f"objective must be one of {sorted(OBJECTIVES)}, not {objective!r}")
  return OBJECTIVES[objective]


def worst_value(direction_: str) -> float:
  """What a failed or timed-out trial scores: the worst possible value."""
  return -math.inf if direction_ == "maximize" else math.inf


def better(a: float, b: float, direction_: str) -> bool:
  """Whether ``a`` is strictly better than ``b``."""
  return a > b if direction_ == "maximize" else a < b


def best_row(rows: Sequence[Mapping[str, Any]], direction_: str, key: str = "value") -> Any:
  """The row whose ``key`` is best, the first of them among equals (no NaN values)."""
  sign = -1.0 if direction_ == "maximize" else 1.0
  return min(rows, key=lambda r: sign * r[key])


def objective_value(metrics: Mapping[str, Any], objective: str) -> float:
  """The objective's value in a metrics dict (NaN when the metric is missing or undefined)."""
  value = metrics.get(objective)
  return float("nan") if value is None else float(value)


def needs(objective: str) -> str:
  """Which ground truth an objective needs: ``"skeleton"`` or ``"labels"``."""
  direction(objective)
  return "skeleton" if objective == "nerl" else "labels"


def eval_settings(config) -> dict:
  """The ``config.eval`` values that change scores (``arand``, ``crop_fraction``,
  ``merge_threshold``)."""
  ev = config.eval
  return {
    "arand": str(ev.arand),
    "crop_fraction": float(ev.crop_fraction),
    "merge_threshold": int(ev.merge_threshold),
  }


def decoder_config(config, decoder: str, params: Mapping[str, Any] | None = None):
  """A copy of ``config`` with ``decode.method = decoder`` and tuned ``params`` applied.

  Args:
    config: the run config (left untouched).
    decoder: ``"cc"``, ``"waterz"`` or ``"mws"``.
    params: ``{"threshold": t}`` for cc; for waterz any of ``merge_function``,
      ``aff_threshold_low``, ``aff_threshold_high`` and ``thresholds`` (a sequence; a single
      ``threshold`` is taken as ``thresholds = (threshold,)``); for mws ``bias_short`` and / or
      ``bias_long`` (set in ``decode.mws``).

  Raises:
    ValueError: an unknown decoder or a parameter the decoder's tuning does not set.
  """
  check_decoder(decoder)
  out = config.copy_and_resolve_references()
  decode = out.decode
  decode.method = decoder
  params = dict(params or {})
  if decoder == "waterz" and "threshold" in params:
    if "thresholds" in params:
      raise ValueError("give waterz 'threshold' or 'thresholds', not both")
    params["thresholds"] = (params.pop("threshold"),)
  unknown = sorted(set(params) - set(TUNED_KEYS[decoder]))
  if unknown:
    raise ValueError(
      f"tuned parameters {unknown} are not {decoder} parameters; expected some of "
      f"{list(TUNED_KEYS[decoder])}"
    )
  section = decode[TUNED_SECTION[decoder]] if decoder in TUNED_SECTION else decode
  for key, value in params.items():
    if key == "thresholds":
      decode.thresholds = tuple(float(t) for t in value)
    elif key == "merge_function":
      decode.merge_function = str(value)
    else:
      section[key] = float(value)
  return out


def with_params(decode: Mapping[str, Any], params: Mapping[str, Any]) -> dict:
  """A plain ``config.decode`` dict with a trial's ``params`` applied where its method keeps
  them (top level, or ``decode.mws`` for the mutex watershed)."""
  out = dict(decode)
  name = TUNED_SECTION.get(str(out.get("method")))
  if name is None:
    out.update(params)
  else:
    out[name] = {**dict(out.get(name) or {}), **params}
  return out


def _with_mask(config, mask: str | None):
  if not mask:
    return config
  out = config.copy_and_resolve_references()
  out.decode.affinity_mask_path = str(mask)
  return out


# -- scores ----------------------------------------------------------------------------------------


def evaluate_loaded(
  segmentation,
  labels,
  skeletons,
  resolution: Sequence[float] | None,
  eval_config: Mapping[str, Any],
  *,
  erl_cache_dir: str | None = None,
) -> dict:
  """:func:`jaxseg.metrics.evaluation.evaluate` with the ground truth already opened or loaded.

  Args:
    segmentation: ``[z, y, x]`` labels (array or lazy volume).
    labels: dense GT ``[z, y, x]`` (array or volume) or None.
    skeletons: :class:`jaxseg.io.skeleton.Skeletons`, a skeleton path, or None.
    resolution: (z, y, x) nm, to place skeleton nodes.
    eval_config: ``config.eval`` or :func:`eval_settings`'s dict.
    erl_cache_dir: the cache folder of a skeleton path's parsed arrays (default jaxseg's).
  """
  from jaxseg.metrics.evaluation import evaluate

  settings = dict(eval_config) if isinstance(eval_config, Mapping) else eval_config.to_dict()
  return evaluate(
    segmentation,
    labels,
    skeletons,
    resolution=resolution,
    arand=str(settings["arand"]),
    crop_fraction=float(settings["crop_fraction"]),
    merge_threshold=int(settings["merge_threshold"]),
    erl_cache_dir=erl_cache_dir,
  )


def score(
  segmentation, volume: LabeledVolume, eval_config, *, erl_cache_dir: str | None = None
) -> dict:
  """Metrics of a ``[z, y, x]`` segmentation against a (windowed) volume's ground truth.

  Dense metrics (adapted Rand, VOI) when the volume has labels, NERL / ERL when it has a
  skeleton: the dict of :func:`jaxseg.metrics.evaluation.evaluate`. ``erl_cache_dir``: where the
  skeleton's parsed arrays are cached (the run's or tuner's ``<workdir>/cache/erl``; default
  jaxseg's).

  Raises:
    ValueError: the volume has neither labels nor a skeleton.
    VolumeError: shapes differ.
  """
  if volume.labels is None and volume.skeleton is None:
    raise InputError(f"volume {volume.name} has no labels and no skeleton to score against")
  labels = volume.labels
  if labels is not None and volume.mask is not None:
    # Outside the labelled region the ground truth says nothing, and every dense metric ignores
    # GT <= 0. (A masked volume is read into memory whole: masks come with a lab's own crops.)
    labels = np.where(volume.mask.read() != 0, labels.read(), 0)
  return evaluate_loaded(
    segmentation,
    labels,
    volume.skeleton,
    tuple(volume.image.resolution),
    eval_config,
    erl_cache_dir=erl_cache_dir,
  )


def mask_spec(path: str | None):
  """The rules a jaxseg.qc mask records in its attributes (None without a mask)."""
  from jaxseg.decoding.decode_lib import MASK_SPEC_ATTR
  from jaxseg.io import open_volume

  return open_volume(path).attrs.get(MASK_SPEC_ATTR, "") if path else None


@outputs.writes_outputs
def decode_and_evaluate(
  config,
  cached: CachedAffinities,
  output_dir: str,
  *,
  overwrite: bool = False,
  show_progress: bool = True,
  erl_cache_dir: str | None = None,
) -> dict:
  """Decodes one cached affinity volume with ``config.decode`` and scores every segmentation.

  Writes ``output_dir/segmentation[_t<thr>]``, ``decode.json``, ``preview.png`` (by
  :func:`jaxseg.decoding.decode_lib.decode`, masked with ``cached.mask`` when set) and
  ``output_dir/metrics.json``.

  Args:
    config: the run config (``decode``, ``eval``, and ``tune.<method>.objective`` to pick the
      best threshold).
    cached: from :func:`jaxseg.inference.cache.cached_predictions`.
    output_dir: the decode folder.
    overwrite: replace a decode made with other settings instead of refusing.
    show_progress: progress bars for blockwise decodes.
    erl_cache_dir: where skeletons' parsed arrays are cached (see :func:`score`).

  Returns:
    The ``metrics.json`` contents: ``volume``, ``decoder``, ``affinities``, ``mask``,
    ``results`` (``[{"threshold", "segmentation", "segments", **metrics}]``, one per
    threshold; mws rows add ``params``, its two biases), ``best`` (index into ``results`` by
    the decoder's tuning objective, or None without ground truth), ``objective``, ``decode``
    (the decode summary), ``seconds``, ``reused`` (True when a finished identical job was
    found).

  Raises:
    VolumeError: bad inputs, or ``output_dir`` holds a decode made differently (unless
      ``overwrite``).
  """
  from jaxseg.decoding.decode_lib import decode
  from jaxseg.decoding.settings import decode_settings

  start = time.perf_counter()
  config = _with_mask(config, cached.mask)
  settings = decode_settings(config)
  volume = cached.volume
  has_gt = volume.labels is not None or volume.skeleton is not None
  objective = str(config.tune[settings.method].objective) if "tune" in config else None
  fingerprint = _scores_fingerprint(config, settings, cached, objective)
  metrics_path = os.path.join(output_dir, METRICS_FILE)
  inputs = _scores_inputs(settings, cached)
  scores = StageOutput(
    output_dir,
    name="scores",
    stage="scores",
    fingerprint={**fingerprint, "inputs": inputs},
    paths=(METRICS_FILE,),
    what="decode folder",
  )
  # The scores are made from the decode beside them and from the ground truth: stale ones are
  # deleted before anything else (a run killed later leaves none to be reported), they are
  # reused only while the decode is too, and never once an input changed.
  decision = scores.open(overwrite=True)
  summary = decode(
    settings, cached.affinities, output_dir, overwrite=overwrite, show_progress=show_progress
  )
  if decision is Decision.REUSE and summary.get("already_done"):
    return {**read_json(metrics_path, hint="; delete it to redo the job"), "reused": True}
  if decision is Decision.REUSE:
    scores.invalidate()
  results = _score_rows(summary, volume, config.eval, has_gt, erl_cache_dir)
  if settings.mws is not None:  # its one segmentation's parameters, for the report's rows
    for row in results:
      row["params"] = {"bias_short": settings.mws.bias_short, "bias_long": settings.mws.bias_long}
  best = _best_row(results, objective) if has_gt else None
  out = {
    "volume": cached.name,
    "decoder": settings.method,
    "affinities": cached.affinities,
    "mask": cached.mask,
    "fingerprint": fingerprint,
    "complete": True,
    "objective": objective,
    "results": results,
    "best": best,
    "decode": {
      k: summary.get(k) for k in ("seconds", "preview", "blockwise", "shape", "already_done")
    },
    "seconds": round(time.perf_counter() - start, 3),
  }
  out = json_ready(out)
  write_json(metrics_path, out)
  scores.finish()
  return {**out, "reused": False}


def _scores_fingerprint(config, settings, cached: CachedAffinities, objective: str | None) -> dict:
  """What the scores are made with: decode and eval settings, affinities, mask, ground truth."""
  volume = cached.volume
  return json.loads(
    json.dumps(
      {
        "decode": settings.fingerprint(),
        "affinities": os.path.abspath(cached.affinities),
        # The mask's rules, not just its path (the QC's or the user's): a mask rebuilt in place
        # must not reuse scores.
        "mask_spec": mask_spec(settings.affinity_mask_path or None),
        "eval": eval_settings(config),
        "labels": local_abspath(volume.labels.path) if volume.labels is not None else None,
        "skeleton": local_abspath(volume.skeleton) if volume.skeleton else None,
        "objective": objective,
      }
    )
  )


def _scores_inputs(settings, cached: CachedAffinities) -> dict:
  """The identities of the files the scores are made from (changed in place: scored again)."""
  volume = cached.volume
  return {
    "affinities": input_identity(cached.affinities),
    "mask": input_identity(settings.affinity_mask_path) if settings.affinity_mask_path else None,
    **ground_truth_identity(volume),
  }


def ground_truth_identity(volume: LabeledVolume) -> dict:
  """What a volume is scored against, by file identity: labels, skeleton and (when given) the
  labelled-region mask. A corrected file at the same path makes old scores stale."""
  identity = {
    "labels": input_identity(volume.labels.path) if volume.labels is not None else None,
    "skeleton": input_identity(volume.skeleton) if volume.skeleton else None,
  }
  if volume.mask is not None:  # only then: older scores keep their fingerprints
    identity["gt_mask"] = input_identity(volume.mask.path)
  return identity


def _score_rows(
  summary: dict, volume: LabeledVolume, eval_config, has_gt: bool, erl_cache_dir: str | None
) -> list[dict]:
  """One row per decoded segmentation: threshold, path, segments and (with GT) its metrics."""
  from jaxseg.io import open_volume

  results = []
  for path, threshold, count in zip(
    summary["arrays"], summary["thresholds"], summary["segments"], strict=True
  ):
    row = {"threshold": float(threshold), "segmentation": path, "segments": int(count)}
    if has_gt:
      metrics = score(open_volume(path), volume, eval_config, erl_cache_dir=erl_cache_dir)
      metrics["eval_seconds"] = metrics.pop("seconds")
      row.update(metrics)
    results.append(row)
  return results


def _best_row(results: list[dict], objective: str | None) -> int | None:
  """The index of the row with the best finite ``objective`` (the first of ties), else None."""
  if objective is None or objective not in results[0]:
    return None
  best = None
  best_direction = direction(objective)
  values = [objective_value(r, objective) for r in results]
  for i, value in enumerate(values):
    if math.isfinite(value) and (best is None or better(value, values[best], best_direction)):
      best = i
  return best
