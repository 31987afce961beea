"""Decoder tuning on cached affinities: the library behind ``python -m jaxseg.tune``.

Owns :func:`tune` (an Optuna study per decoder that resumes after a kill), :func:`tune_test`
(the best parameters applied to the test volumes) and :func:`load_best_params`.

Layout under the workdir::

  tune/<decoder>/study.db           the SQLite study (resumable; fingerprinted)
  tune/<decoder>/best_params.json   params (decode keys), best value / threshold, objective, ...
  tune/<decoder>/trials.csv         one row per trial
  tune/<decoder>/objective.png      objective per trial, best so far
  tune/<decoder>/tune.json          the run summary
  tune/<decoder>/config.json        the resolved config
  tune/<decoder>/test/<name>/       tune-test: segmentation(s), decode.json, metrics.json
  predictions/<key>/                the affinity cache (:mod:`jaxseg.inference.cache`)
  cache/erl/                        parsed skeletons (:func:`jaxseg.io.skeleton.load_skeletons`)

Trials only decode and score (:mod:`jaxseg.tuning.trials`, in a child process with a timeout);
affinities are predicted once per checkpoint and input. JAX is imported only when a prediction is
missing.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from optuna import logging as optuna_logging

from jaxseg.common import config_util, outputs
from jaxseg.common.errors import ConfigError, MissingInputError, OutputError
from jaxseg.common.files import atomic_output, json_ready, read_json, write_json
from jaxseg.common.outputs import Decision, StageOutput
from jaxseg.decoding import mws, scoring
from jaxseg.decoding.settings import decode_settings, mask_path
from jaxseg.inference import cache
from jaxseg.io.datasets import LabeledVolume, dataset_volumes
from jaxseg.io.skeleton import workdir_cache_dir, workdir_skeleton_dir
from jaxseg.tuning import plot as plot_lib
from jaxseg.tuning import search
from jaxseg.tuning import trials as trials_lib

BEST_PARAMS = "best_params.json"
STUDY_DB = "study.db"
TRIAL_SCRATCH = "trial_scratch"  # blockwise decodes of large volumes, one trial at a time
TRIALS_CSV = "trials.csv"
PLOT = "objective.png"
SUMMARY = "tune.json"
# trials.csv columns after the value and the parameters.
_CSV_EXTRA = (
  "threshold",
  "seconds",
  "timed_out",
  "defaults",
  "repeat_of",
  "interrupted",
  "error",
)
# The study's own files (``overwrite`` of a study of other settings deletes exactly these).
_OUTPUTS = (STUDY_DB, BEST_PARAMS, TRIALS_CSV, PLOT, SUMMARY)

TEST_SPLIT_REFUSAL = (
  "config.tune.split is 'test': tuning on the test volumes fits the decoder to the data it is "
  "scored on, so the test score no longer measures generalisation (PyTC tunes SNEMI3D this way). "
  "Tune on 'val' (e.g. SNEMI's data.val_sections), or set config.tune.force_test / pass "
  "--force_test to do it anyway"
)


def tune_folder(workdir: str, decoder: str) -> str:
  return os.path.join(workdir, "tune", decoder)


def predictions_root(workdir: str) -> str:
  return os.path.join(workdir, "predictions")


def load_best_params(workdir: str, decoder: str) -> dict | None:
  """The saved ``best_params.json`` of a decoder's tuning, or None when it was not tuned.

  Raises:
    InputError: the file exists but is not valid JSON (names it; also a ``ValueError``).
  """
  path = os.path.join(tune_folder(workdir, decoder), BEST_PARAMS)
  return read_json(path, missing_ok=True, hint="; delete it to tune again")


def tuned_config(config, workdir: str, decoder: str):
  """``config`` with the decoder's tuned settings from ``workdir`` applied (``decode.method`` =
  ``decoder``; the tuned keys replace the config's, every other key stays).

  Returns:
    ``(config copy, best_params.json contents)``.

  Raises:
    MissingInputError: ``workdir`` has no tuning of ``decoder`` (names the file and the command
      that makes it).
  """
  best = load_best_params(workdir, decoder)
  if best is None:
    path = os.path.join(tune_folder(workdir, decoder), BEST_PARAMS)
    raise MissingInputError(
      f"{path}: not tuned yet; run python -m jaxseg.tune --mode=tune --decoder={decoder} "
      "(or jaxseg.run --mode=tune) first"
    )
  return scoring.decoder_config(config, decoder, best["params"]), best


def _check_split(split: str, force_test: bool) -> None:
  if split == "test" and not force_test:
    raise ConfigError(TEST_SPLIT_REFUSAL)


def _checkpoint_fingerprint(ingredients: Mapping[str, Any]) -> dict:
  return {k: ingredients[k] for k in ("checkpoint_dir", "steps", "step", "use_ema")}


def study_fingerprint(config, space: search.SearchSpace, key: str, split: str) -> dict:
  """What a study's trials depend on: search space, cached affinities, decode and scoring.

  The decode part is ``config.decode``'s fingerprint without the tuned keys; the trial budget
  and the TPE settings are not part of it (a study may be extended).
  """
  decode = decode_settings(scoring.decoder_config(config, space.decoder)).fingerprint()
  for k in ("thresholds", "merge_function", "aff_threshold"):
    decode.pop(k, None)
  for k in scoring.TUNED_KEYS[space.decoder]:
    decode.get("mws", {}).pop(k, None)
  # The QC's masks are covered by the qc settings; a user's own mask (qc off) by its path and
  # the rules it records, so one rebuilt in place does not continue the old study.
  user_mask = decode.pop("affinity_mask_path", "")
  if user_mask:
    decode["affinity_mask"] = [os.path.abspath(user_mask), scoring.mask_spec(user_mask)]
  qc = config_util.config_to_dict(config.qc) if config.qc.enabled else None
  # The ground truth is scored against, by content: a corrected skeleton or label volume at the
  # same path makes the old trials' scores stale (the images are in the cache key).
  inputs = {v.name: scoring.ground_truth_identity(v) for v in dataset_volumes(config.data, split)}
  if user_mask:
    inputs["affinity_mask"] = outputs.input_identity(user_mask)
  named = {}
  name = search.study_name(config, space.decoder)
  if name != search.DEFAULT_STUDY_NAME.format(decoder=space.decoder):
    named["study_name"] = name  # a study under another name is another study
  return json.loads(
    json.dumps(
      {
        **named,
        "space": space.fingerprint(),
        "split": split,
        "cache_key": key,
        "decode": decode,
        "eval": scoring.eval_settings(config),
        "qc": qc,
        "inputs": inputs,
      }
    )
  )


def trial_setup(
  config,
  space: search.SearchSpace,
  cached: Sequence[cache.CachedAffinities],
  split: str,
  scratch: str | None = None,
  erl_cache_dir: str | None = None,
) -> dict:
  """What the trial worker loads (:func:`jaxseg.tuning.trials.load_state`).

  ``scratch``: where trials decode volumes larger than ``decode.block_shape`` (blockwise; a
  temporary folder when None). ``erl_cache_dir``: where skeletons' parsed arrays are cached
  (default jaxseg's own cache folder).
  """
  decode = config_util.config_to_dict(config.decode)
  decode["method"] = space.decoder
  if space.decoder == "waterz":
    decode["thresholds"] = list(space.thresholds)
  user_mask = mask_path(decode.get("affinity_mask_path")) or None
  decode["affinity_mask_path"] = ""  # masks travel per volume
  return {
    "data": config_util.config_to_dict(config.data),
    "split": split,
    "volumes": [
      {"name": c.name, "affinities": c.affinities, "mask": c.mask or user_mask} for c in cached
    ],
    "decode": decode,
    "eval": scoring.eval_settings(config),
    "objective": space.objective,
    "scratch": scratch,
    "erl_cache_dir": erl_cache_dir,
  }


def _check_ground_truth(volumes: Sequence[LabeledVolume], objective: str) -> None:
  kind = scoring.needs(objective)
  if kind == "skeleton":
    missing = [v.name for v in volumes if v.skeleton is None]
  else:
    missing = [v.name for v in volumes if v.labels is None]
  if missing:
    what = "skeleton.pkl" if kind == "skeleton" else "dense labels"
    raise ConfigError(
      f"objective {objective!r} needs {what}, which volume(s) {missing} lack; pick another "
      "config.tune.<decoder>.objective"
    )


def _format_params(params: Mapping[str, Any]) -> str:
  return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _duration(seconds: float) -> str:
  seconds = round(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@outputs.writes_outputs
def tune(
  config,
  workdir: str,
  *,
  checkpoint: str,
  decoder: str | None = None,
  force_test: bool | None = None,
  n_trials: int | None = None,
  show_progress: bool = True,
  overwrite: bool = False,
) -> dict:
  """Tunes one decoder on the ``config.tune.split`` volumes; resumes a killed study.

  Args:
    config: the run config (``tune``, ``decode``, ``eval``, ``data``, ``infer``, ``run``,
      ``qc``, ``seed``).
    workdir: the run folder (outputs in ``tune/<decoder>``, affinities in ``predictions``).
    checkpoint: the training workdir or its ``checkpoints`` folder (for predicting).
    decoder: ``cc``, ``waterz`` or ``mws`` (default ``config.decode.method``).
    force_test: allow ``tune.split == "test"`` (default ``config.tune.force_test``).
    n_trials: complete trials the study should have (default: the grid size, or
      ``tune.<decoder>.n_trials`` for TPE); a finished study asked for more continues.
    show_progress: one line per trial (value, parameters, best so far, rate, ETA), progress
      bars while predicting.
    overwrite: discard an existing study of other settings (and its outputs) and start again.

  Returns:
    ``decoder``, ``best_params`` (decode keys, for :func:`scoring.decoder_config`),
    ``best_value``, ``best_threshold``, ``objective``, ``direction``, ``n_complete``,
    ``n_trials``, ``study`` (the ``study.db`` path), ``best_params_path``, ``plot``,
    ``trials_csv``, ``summary_path``, ``skipped`` (True when a finished study was found and
    nothing ran), ``trials_run``, ``interrupted`` (trials a killed run left, now rerun),
    ``timed_out``, ``seconds``.

  Raises:
    ConfigError: bad settings, or the test split without ``force_test``.
    OutputError: a study of other settings (without ``overwrite``), or another tuner holds it.
    InputError: ground truth the objective needs is missing, or no trial scored a finite value.
    trials.TrialError: a trial hit a user's mistake (the trial is recorded as FAIL with the
      traceback).
    trials.TrialCrash: a trial raised anything else, a bug (recorded the same way).
  """
  start = time.perf_counter()
  decoder = scoring.check_decoder(decoder or str(config.decode.method))
  split = str(config.tune.split)
  _check_split(split, bool(config.tune.force_test) if force_test is None else bool(force_test))
  space = search.search_space(config, decoder)  # ConfigError naming the tune.* key
  target = space.n_trials if n_trials is None else int(n_trials)
  if space.sampler == "grid":
    target = min(target, space.grid_size)
  if target < 1:
    raise ConfigError(f"n_trials must be >= 1, not {target}")
  workdir = os.path.abspath(workdir)
  # The work dir gets tune/, predictions/ and cache/: it must be new, empty or jaxseg's, and
  # apart from the data.
  root = config.data.get("root")
  outputs.check_outside_inputs(workdir, [root] if root else [], what="work dir")
  outputs.prepare_folder(workdir, what="work dir")
  timeout = float(config.tune.trial_timeout_s)
  folder = tune_folder(workdir, decoder)
  key, ingredients = cache.cache_key(config, checkpoint, split)
  fingerprint = study_fingerprint(config, space, key, split)

  stage = study_output(folder, decoder, fingerprint)
  # One tuner per study (a second one would mark the first one's running trial as failed), and
  # the lock is taken before anything of the study can be replaced.
  with outputs.held_exclusively(folder, "another jaxseg.tune"):
    decision = stage.open(overwrite=overwrite)
    best = load_best_params(workdir, decoder) if decision is Decision.REUSE else None
    if (
      best is not None
      and int(best.get("n_complete", 0)) >= target
      # Trials that timed out under a shorter timeout than now get another chance.
      and not (best.get("n_timed_out") and float(best.get("trial_timeout_s", 0.0)) < timeout)
    ):
      return _finished_result(folder, best, start)
    if decision is Decision.REUSE:
      stage.invalidate()  # asked for more trials, or for timed-out ones again
    # Everything that can refuse is checked before the (possibly hours long) prediction.
    _check_ground_truth(dataset_volumes(config.data, split), space.objective)
    if decoder == "mws":
      mws.check_predicted_channels(config)  # the long-range channels must be predicted
    result = _tune_locked(
      config, workdir, checkpoint, decoder, split, space, target, timeout, folder, fingerprint,
      key, ingredients, show_progress, start,
    )  # fmt: skip
    stage.finish()
    return result


def study_output(folder: str, decoder: str, fingerprint: dict) -> StageOutput:
  """A study's entry in its folder's manifest: the study, its outputs and its scratch.

  ``test/`` (tune-test decodes) is not listed: each of its folders is a decode of its own.
  """
  return StageOutput(
    folder,
    name="study",
    stage=f"{decoder} tuning study",
    fingerprint=fingerprint,
    paths=(*_OUTPUTS, config_util.RESOLVED_CONFIG_NAME, TRIAL_SCRATCH),
    what="tune folder",
  )


def _tune_locked(
  config, workdir, checkpoint, decoder, split, space, target, timeout, folder, fingerprint,
  key, ingredients, show_progress, start,
) -> dict:  # fmt: skip
  """:func:`tune` once the study is this process's: open it, predict, run the trials."""
  config_util.save_config(config, folder)
  optuna_logging.set_verbosity(optuna_logging.WARNING)  # the trial lines below replace its own
  open_study = functools.partial(
    search.open_study,
    os.path.join(folder, STUDY_DB),
    search.study_name(config, decoder),
    space,
    fingerprint,
    int(config.seed),
    timeout,
  )
  study, interrupted = open_study()
  cached = cache.cached_predictions(
    config,
    checkpoint,
    split,
    predictions_root(workdir),
    show_progress=show_progress,
    skeleton_dir=workdir_skeleton_dir(workdir),
  )
  if space.sampler == "tpe":
    search.enqueue_defaults(study, space)
  todo = search.pending_trials(study, space, target, timeout)
  n_done = len(search.complete_trials(study, timeout))
  say = print if show_progress else logging.info
  say(
    f"tune {decoder} on {split} ({', '.join(c.name for c in cached)}): {space.objective} "
    f"({space.direction}), {space.sampler} sampler; {n_done} of {target} trials done"
    + (f", {interrupted} interrupted (rerun)" if interrupted else "")
    + f", {todo} to run"
  )
  run = {}
  if todo:
    scratch = os.path.join(folder, TRIAL_SCRATCH)
    erl_cache = workdir_cache_dir(workdir)
    run = _run_trials(config, study, space, cached, split, todo, say, scratch, erl_cache)
    shutil.rmtree(scratch, ignore_errors=True)
  outputs = write_outputs(
    study, space, folder, fingerprint, _checkpoint_fingerprint(ingredients), timeout
  )
  summary = {
    **outputs,
    "split": split,
    "volumes": [c.name for c in cached],
    "predictions": os.path.join(predictions_root(workdir), key),
    "cache_key": key,
    "n_trials": target,
    "trials_run": run.get("trials_run", 0),
    "timed_out": run.get("timed_out", 0),
    "interrupted": interrupted,
    "trial_seconds": run.get("seconds", 0.0),
    "worker_restarts": run.get("restarts", 0),
    "seconds": round(time.perf_counter() - start, 3),
    "skipped": False,
  }
  write_json(os.path.join(folder, SUMMARY), json_ready(summary))
  say(
    f"tune {decoder}: {'flat optimum' if space.selection == 'flat' else 'best'} "
    f"{space.objective} {summary['best_value']:.4f} with "
    f"{_format_params(summary['best_params'])} (trial {summary['best_trial']}); "
    f"{summary['n_complete']} trials; {summary['best_params_path']}"
  )
  return summary


def _finished_result(folder: str, best: Mapping[str, Any], start: float) -> dict:
  """The result of a finished study, from its files (nothing is opened or run)."""
  path = os.path.join(folder, SUMMARY)
  summary = {}
  if os.path.exists(path):  # missing only if a run was killed between the two writes
    with open(path) as f:
      summary = json.load(f)
  return {
    **summary,
    "decoder": best["decoder"],
    "best_params": best["params"],
    **{k: best[k] for k in ("best_value", "best_threshold", "best_trial", "objective")},
    **{k: best[k] for k in ("direction", "n_complete")},
    "study": os.path.join(folder, STUDY_DB),
    "best_params_path": os.path.join(folder, BEST_PARAMS),
    "plot": os.path.join(folder, PLOT),
    "trials_csv": os.path.join(folder, TRIALS_CSV),
    "summary_path": path,
    "trials_run": 0,
    "timed_out": 0,
    "interrupted": 0,
    "seconds": round(time.perf_counter() - start, 3),
    "skipped": True,
  }


def _decode_params(params: Mapping[str, Any]) -> dict:
  """The trial's decode keys (waterz thresholds are in the worker's base settings)."""
  return {k: (v if isinstance(v, str) else float(v)) for k, v in params.items()}


def _earlier_result(trial) -> dict:
  """A repeated point's result, from the trial that ran it."""
  return {
    "value": trial.value,
    "threshold": trial.user_attrs.get("threshold"),
    "per_volume": trial.user_attrs.get("per_volume", {}),
    "thresholds": trial.user_attrs.get("thresholds", []),
    "seconds": 0.0,
  }


def _mark_failed(study, trial, **attrs) -> None:
  """Records why ``trial`` failed and marks it FAIL (its point reruns on resume).

  Never raises for a trial that is already finished: the error that brought us here is the one
  the user must see.
  """
  from optuna.exceptions import UpdateFinishedTrialError
  from optuna.trial import TrialState

  try:
    for key, value in attrs.items():
      trial.set_user_attr(key, value)
    study.tell(trial, state=TrialState.FAIL)
  except UpdateFinishedTrialError:
    pass


def _run_trials(
  config, study, space, cached, split, todo: int, say, scratch: str, erl_cache_dir: str
) -> dict:
  """Asks, runs and tells ``todo`` trials with one worker process; one line per trial."""

  distributions = space.distributions()
  worst = scoring.worst_value(space.direction)
  timeout = float(config.tune.trial_timeout_s)
  complete = search.complete_trials(study, timeout)
  finite = [{"value": t.value, "number": t.number} for t in complete if math.isfinite(t.value)]
  best = _best_of(finite, space.direction) if finite else None
  best = (best["value"], best["number"]) if best else None
  n_before = len(complete)
  timed_out = 0
  started = time.perf_counter()
  setup = trial_setup(config, space, cached, split, scratch, erl_cache_dir)
  with trials_lib.TrialWorker(setup, timeout) as worker:
    for i in range(todo):
      with warnings.catch_warnings():
        # The config's defaults (trial 0 of TPE) may lie between grid steps (0.999): intended.
        warnings.filterwarnings("ignore", message="Fixed parameter", category=UserWarning)
        trial = study.ask(distributions)
      params = space.snap(trial.params)
      t0 = time.perf_counter()
      # TPE on a small discrete space repeats itself: a repeat takes the earlier result.
      same = search.same_point(study, space, params) if space.sampler != "grid" else None
      try:
        result = _earlier_result(same) if same else worker.run(_decode_params(params))
      except trials_lib.TrialTimeout:
        result = None
      except (trials_lib.TrialError, trials_lib.TrialCrash) as e:
        _mark_failed(study, trial, error=f"{e}\n{e.details}"[-4000:])
        raise
      except BaseException:  # Ctrl-C: the point is rerun next time
        _mark_failed(study, trial, interrupted=True)
        raise
      # Decode and score time in the worker; a timed-out trial's wall time (with any restart).
      seconds = result["seconds"] if result is not None else time.perf_counter() - t0
      trial.set_user_attr("seconds", round(seconds, 3))
      if same:
        trial.set_user_attr("repeat_of", same.number)
      if result is None:
        timed_out += 1
        value = worst
        trial.set_user_attr("timed_out", True)
        trial.set_user_attr("timeout_s", timeout)
      else:
        value = result["value"]
        if not math.isfinite(value):
          value = worst
        trial.set_user_attr("threshold", result["threshold"])
        trial.set_user_attr("per_volume", json_ready(result["per_volume"]))
        if space.decoder == "waterz":
          trial.set_user_attr("thresholds", result["thresholds"])
      study.tell(trial, value)
      if math.isfinite(value) and (best is None or scoring.better(value, best[0], space.direction)):
        best = (value, trial.number)
      elapsed = time.perf_counter() - started
      rate = elapsed / (i + 1)
      shown = dict(params)
      if result is not None and space.decoder == "waterz":
        shown["threshold"] = result["threshold"]
      say(
        f"  trial {trial.number} ({n_before + i + 1}/{n_before + todo}): "
        + (f"timed out after {timeout:g} s" if result is None else f"{space.objective}={value:.4f}")
        + f" [{_format_params(shown)}]"
        + (f" (repeat of trial {same.number})" if same else "")
        + (f" | best {best[0]:.4f} (trial {best[1]})" if best else "")
        + f" | {rate:.1f} s/trial, ETA {_duration(rate * (todo - i - 1))}"
      )
    restarts = worker.starts - 1
  return {
    "trials_run": todo,
    "timed_out": timed_out,
    "restarts": restarts,
    "seconds": round(time.perf_counter() - started, 3),
  }


def _best_of(rows: Sequence[Mapping[str, Any]], direction: str) -> Mapping[str, Any]:
  """The best row by ``value``; among equal values the earliest trial (the first to find it)."""
  return scoring.best_row(sorted(rows, key=lambda r: r["number"]), direction)


def select_point(rows: Sequence[Mapping[str, Any]], space: search.SearchSpace) -> dict:
  """The setting tuning keeps, from the scored trials (``_trial_rows``, finite values only).

  ``selection = "best"``: the best trial (its best waterz threshold). ``"flat"``: every scored
  point (a trial's parameters with each waterz threshold it decoded) gets the mean value of its
  neighbourhood, the scored points within one grid step of it along every numeric parameter
  (and the same merge function); the best mean wins, its own value is reported. Points off the
  grid (an enqueued default between steps) reach the grid values on either side. Ties go to
  the earliest trial, then the lowest threshold.

  Returns:
    ``params`` (sampled), ``threshold``, ``value``, ``number`` and, for ``flat``,
    ``neighbourhood_value``.
  """
  if space.selection == "best":
    best = _best_of(rows, space.direction)
    return {k: best[k] for k in ("params", "threshold", "value", "number")}
  axes = {k: v for k, v in space.choices.items() if not isinstance(v[0], str)}
  if space.decoder == "waterz":
    axes["threshold"] = tuple(space.thresholds)
  points = []
  for row in rows:
    per_threshold = row.get("thresholds") or []
    if space.decoder == "waterz" and per_threshold:
      for entry in per_threshold:
        if math.isfinite(entry["value"]):
          point = {**row["params"], "threshold": entry["threshold"]}
          points.append({"point": point, "value": entry["value"], "number": row["number"]})
    else:
      point = {**row["params"], "threshold": row["threshold"]}
      points.append({"point": point, "value": row["value"], "number": row["number"]})
  spans = {name: sorted(set(values)) for name, values in axes.items()}

  def reach(name: str, x: float) -> tuple[float, float]:
    """The grid values on either side of ``x`` (itself where at an end)."""
    below = [v for v in spans[name] if v < x - search.SNAP_TOL]
    above = [v for v in spans[name] if v > x + search.SNAP_TOL]
    return (below[-1] if below else x, above[0] if above else x)

  def near(a: Mapping[str, Any], ranges: Mapping[str, tuple], b: Mapping[str, Any]) -> bool:
    for name, value in a.items():
      if name in ranges:
        low, high = ranges[name]
        if not low - search.SNAP_TOL <= float(b[name]) <= high + search.SNAP_TOL:
          return False
      elif b.get(name) != value:
        return False
    return True

  sign = -1.0 if space.direction == "maximize" else 1.0
  for p in points:
    ranges = {k: reach(k, float(v)) for k, v in p["point"].items() if k in axes}
    p["mean"] = float(np.mean([q["value"] for q in points if near(p["point"], ranges, q["point"])]))
  chosen = min(points, key=lambda p: (sign * p["mean"], p["number"], p["point"]["threshold"]))
  params = {k: v for k, v in chosen["point"].items() if k in space.choices}
  return {
    "params": params,
    "threshold": chosen["point"]["threshold"],
    "value": chosen["value"],
    "number": chosen["number"],
    "neighbourhood_value": chosen["mean"],
  }


def _trial_rows(study, space: search.SearchSpace) -> list[dict]:
  rows = []
  for t in study.get_trials(deepcopy=False):
    if t.state.name in ("WAITING", "RUNNING"):
      continue
    rows.append(
      {
        "number": t.number,
        "state": t.state.name,
        "value": t.value,
        "params": space.snap(t.params),
        "threshold": t.user_attrs.get("threshold", t.params.get("threshold")),
        "thresholds": t.user_attrs.get("thresholds", []),
        "seconds": t.user_attrs.get("seconds"),
        "timed_out": bool(t.user_attrs.get("timed_out", False)),
        "defaults": bool(t.user_attrs.get("defaults", False)),
        "repeat_of": t.user_attrs.get("repeat_of", ""),
        "interrupted": bool(t.user_attrs.get("interrupted", False)),
        "error": str(t.user_attrs.get("error", "")).split("\n", 1)[0],
      }
    )
  return rows


def _best_params(space: search.SearchSpace, row: Mapping[str, Any]) -> dict:
  if space.decoder == "cc":
    return {"threshold": row["params"]["threshold"]}
  if space.decoder == "mws":
    return {k: row["params"][k] for k in ("bias_short", "bias_long")}
  return {
    "merge_function": row["params"]["merge_function"],
    "aff_threshold_low": row["params"]["aff_threshold_low"],
    "aff_threshold_high": row["params"]["aff_threshold_high"],
    "thresholds": [row["threshold"]],
  }


def write_outputs(
  study,
  space: search.SearchSpace,
  folder: str,
  fingerprint: Mapping,
  checkpoint: Mapping,
  timeout_s: float,
) -> dict:
  """Writes ``trials.csv``, ``objective.png`` and ``best_params.json`` from the study.

  Raises:
    ValueError: no trial scored a finite value (every one timed out).
  """
  rows = _trial_rows(study, space)
  csv_path = os.path.join(folder, TRIALS_CSV)
  names = list(space.choices)
  extra = [k for k in _CSV_EXTRA if k not in names]  # cc: the threshold is the parameter
  columns = ["number", "state", "value", *names, *extra]
  with atomic_output(csv_path) as tmp, open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    for r in rows:
      value = "" if r["value"] is None else repr(float(r["value"]))
      row = {"number": r["number"], "state": r["state"], "value": value, **r["params"]}
      writer.writerow({**row, **{k: r[k] for k in extra}})
  plot = os.path.join(folder, PLOT)
  plot_lib.plot_trials(
    rows, plot, decoder=space.decoder, objective=space.objective, direction=space.direction
  )
  scored = [r for r in rows if r["state"] == "COMPLETE" and math.isfinite(r["value"])]
  n_complete = sum(r["state"] == "COMPLETE" for r in rows)
  if not scored:
    raise ConfigError(
      f"{folder}: no trial of {n_complete} scored a finite {space.objective} (all timed out?); "
      "raise config.tune.trial_timeout_s"
    )
  best_row = select_point(scored, space)
  best = {
    "decoder": space.decoder,
    "params": _best_params(space, best_row),
    "best_value": float(best_row["value"]),
    "best_threshold": best_row["threshold"],
    "best_trial": best_row["number"],
    "selection": space.selection,
    **(
      {"neighbourhood_value": best_row["neighbourhood_value"]} if space.selection == "flat" else {}
    ),
    "objective": space.objective,
    "direction": space.direction,
    "n_complete": n_complete,
    "n_timed_out": sum(r["timed_out"] for r in rows),
    "n_failed": sum(r["state"] == "FAIL" for r in rows),
    "trial_timeout_s": float(timeout_s),
    "checkpoint": dict(checkpoint),
    "fingerprint": dict(fingerprint),
  }
  best_path = os.path.join(folder, BEST_PARAMS)
  write_json(best_path, json_ready(best))
  return {
    "decoder": space.decoder,
    "best_params": best["params"],
    "best_value": best["best_value"],
    "best_threshold": best["best_threshold"],
    "best_trial": best["best_trial"],
    "objective": space.objective,
    "direction": space.direction,
    "n_complete": n_complete,
    "study": os.path.join(folder, STUDY_DB),
    "best_params_path": best_path,
    "plot": plot,
    "trials_csv": csv_path,
    "summary_path": os.path.join(folder, SUMMARY),
  }


def _check_still_tuned(config, checkpoint: str, decoder: str, folder: str) -> None:
  """Refuses tuned parameters whose study no longer matches the config and its inputs.

  Another checkpoint (retrained), other tuning, decode, scoring or QC settings, or ground truth
  changed in place: the parameters were fit to something else, so they are not applied.
  """
  split = str(config.tune.split)
  space = search.search_space(config, decoder)
  key, _ = cache.cache_key(config, checkpoint, split)
  fingerprint = study_fingerprint(config, space, key, split)
  saved = study_output(folder, decoder, fingerprint).saved()
  if saved is not None and saved.get("complete"):
    diff = outputs.differences(saved["fingerprint"], json.loads(json.dumps(fingerprint)))
    if not diff:
      return
    why = "; ".join(diff[:4]) + ("; ..." if len(diff) > 4 else "")
  else:
    why = "its study is unfinished"
  raise OutputError(
    f"{os.path.join(folder, BEST_PARAMS)}: these parameters were tuned for something else "
    f"({why}); tune again (jaxseg.run --mode=tune, or jaxseg.tune) before applying them"
  )


@outputs.writes_outputs
def tune_test(
  config,
  workdir: str,
  *,
  checkpoint: str,
  decoder: str | None = None,
  show_progress: bool = True,
) -> list[dict]:
  """Decodes and scores the test volumes with the tuned parameters.

  Outputs go to ``workdir/tune/<decoder>/test/<name>`` (a decode made with older best
  parameters is replaced). Parameters tuned for another checkpoint, other settings or changed
  ground truth are refused: tune again first.

  Returns:
    One :func:`scoring.decode_and_evaluate` result per test volume, plus ``params``.

  Raises:
    FileNotFoundError: the decoder was not tuned yet.
  """
  workdir = os.path.abspath(workdir)
  outputs.prepare_folder(workdir, what="work dir")
  decoder = scoring.check_decoder(decoder or str(config.decode.method))
  folder = tune_folder(workdir, decoder)
  tuned, best = tuned_config(config, workdir, decoder)
  _check_still_tuned(config, checkpoint, decoder, folder)
  cached = cache.cached_predictions(
    tuned,
    checkpoint,
    "test",
    predictions_root(workdir),
    show_progress=show_progress,
    skeleton_dir=workdir_skeleton_dir(workdir),
  )
  results = []
  for c in cached:
    result = scoring.decode_and_evaluate(
      tuned,
      c,
      os.path.join(folder, "test", c.name),
      overwrite=True,  # the folder belongs to the tuner: older best parameters are replaced
      show_progress=show_progress,
      erl_cache_dir=workdir_cache_dir(workdir),
    )
    results.append({**result, "params": best["params"]})
  return results
