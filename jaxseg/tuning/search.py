"""Search spaces, samplers and resumable Optuna studies for decoder tuning (``config.tune``).

Owns:
  * :class:`SearchSpace` (:func:`search_space`): the parameters one decoder's tuning samples,
    as value lists on an inclusive grid (``(low, high, step)`` in the config, rounded so that
    ``0.3 + 0.05 * k`` is exactly ``0.45``, not ``0.45000000000000007``; or listed,
    ``("values", a, b, ...)``) or categorical choices.
    cc: ``threshold``; waterz: ``merge_function``, ``aff_threshold_low``,
    ``aff_threshold_high`` (its merge ``thresholds`` are decoded in every trial, not sampled);
    mws: ``bias_short``, ``bias_long`` (``decode.mws``).
  * :func:`make_sampler`: ``grid`` (:class:`ResumableGridSampler`, every grid point once) or
    ``tpe`` (:class:`ResumableTPESampler`: Optuna's TPE, each trial seeded from ``config.seed``
    and the trials before it, so a resumed study draws what an uninterrupted one draws).
  * :func:`open_study`: the SQLite study under the tune folder, loaded if it exists; it carries a
    fingerprint of what it tunes (search space, affinities, scoring) and refuses to continue with
    another; trials left RUNNING by a killed job are marked FAIL, so their points are rerun.
  * :func:`pending_trials`: how many trials a (resumed) study still needs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from jaxseg.common import outputs
from jaxseg.common.errors import ConfigError, OutputError
from jaxseg.decoding import scoring

FINGERPRINT_ATTR = "jaxseg_fingerprint"
SAMPLERS = ("grid", "tpe")
SELECTIONS = ("best", "flat")
# Grid values are rounded to this many decimals (no float drift from low + k * step).
_DECIMALS = 10
# A sampled float within this of a grid value is that value.
SNAP_TOL = 1e-6
# A grid spec ("values", a, b, ...) lists its values instead of (low, high, step).
VALUES_TAG = "values"


def grid_values(spec: Sequence[Any], name: str) -> tuple[float, ...]:
  """The grid values a ``tune.*`` key names, in increasing order.

  ``(low, high, step)``: the inclusive grid ``low, low + step, ..., high``.
  ``("values", a, b, ...)``: exactly those values, for an uneven grid. Thresholds on a plain
  sigmoid's probabilities want one: the evidence a network has for a voxel pair grows with the
  logit, so ``0.99 -> 0.999 -> 1.0`` are steps of similar size while a linear grid spends most
  of its points below 0.99 (``("values", 0.9, 0.95, 0.99, 0.999, 1.0)``).

  Raises:
    ConfigError: neither form, ``step <= 0``, ``high < low``, or repeated values (naming
      ``name``, the user's ``tune.*`` key).
  """
  if len(spec) and isinstance(spec[0], str):
    if spec[0] != VALUES_TAG:
      raise ConfigError(
        f"{name} must be (low, high, step) or ({VALUES_TAG!r}, v1, v2, ...), not {spec!r}"
      )
    try:
      values = sorted(round(float(v), _DECIMALS) + 0.0 for v in spec[1:])
    except (TypeError, ValueError):
      raise ConfigError(
        f"{name}: the values after {VALUES_TAG!r} must be numbers: {spec!r}"
      ) from None
    if not values or len(set(values)) != len(values):
      raise ConfigError(
        f"{name}: ({VALUES_TAG!r}, ...) needs one or more distinct values: {spec!r}"
      )
    return tuple(values)
  try:
    low, high, step = (float(v) for v in spec)
  except (TypeError, ValueError):
    raise ConfigError(
      f"{name} must be (low, high, step) or ({VALUES_TAG!r}, v1, v2, ...), not {spec!r}"
    ) from None
  if step <= 0 or high < low:
    raise ConfigError(f"{name} must be (low, high, step) with step > 0 and high >= low: {spec!r}")
  count = math.floor((high - low) / step + 1e-9) + 1
  return tuple(round(low + i * step, _DECIMALS) + 0.0 for i in range(count))


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """What one decoder's tuning samples.

  Attributes:
    decoder: ``cc``, ``waterz`` or ``mws``.
    sampler: ``grid`` or ``tpe``.
    objective: ``nerl``, ``adapted_rand`` or ``voi``.
    choices: parameter -> its values (floats on a grid, or strings), in order.
    thresholds: waterz merge thresholds decoded in every trial (not sampled); ``()`` for cc.
    n_trials: trials a full study runs (the grid size for ``grid``).
    n_startup_trials: TPE's random trials before it models the objective.
    defaults: the config's own values, run first (TPE ``enqueue_defaults``), or None.
    selection: ``best`` (the best scored point) or ``flat`` (the point whose grid neighbourhood
      scores best on average; :func:`jaxseg.tuning.tune_lib.select_point`).
  """

  decoder: str
  sampler: str
  objective: str
  choices: dict[str, tuple]
  thresholds: tuple[float, ...] = ()
  n_trials: int = 0
  n_startup_trials: int = 10
  defaults: dict | None = None
  selection: str = "best"

  @property
  def direction(self) -> str:
    return scoring.direction(self.objective)

  def distributions(self) -> dict[str, BaseDistribution]:
    """Optuna distributions: even grids as stepped floats, uneven ones as categorical (TPE
    samples on the grid either way)."""
    out: dict[str, BaseDistribution] = {}
    for name, values in self.choices.items():
      if isinstance(values[0], str):
        out[name] = CategoricalDistribution(values)
      elif len(values) == 1:
        out[name] = FloatDistribution(values[0], values[0])
      elif _evenly_spaced(values):
        step = round(values[1] - values[0], _DECIMALS)
        out[name] = FloatDistribution(values[0], values[-1], step=step)
      else:  # an uneven ("values", ...) grid: TPE picks among the listed values
        out[name] = CategoricalDistribution(values)
    return out

  def snap(self, params: Mapping[str, Any]) -> dict:
    """``params`` with floats moved onto their grid value (off-grid values, such as enqueued
    config defaults, are only rounded)."""
    out = {}
    for name, value in params.items():
      values = self.choices.get(name)
      if values is None or isinstance(value, str):
        out[name] = value
        continue
      nearest = min(values, key=lambda v, x=float(value): abs(v - x))
      out[name] = nearest if abs(nearest - value) <= SNAP_TOL else round(float(value), _DECIMALS)
    return out

  def grid_points(self) -> list[dict]:
    """Every combination of the choices (the grid sampler's points), in order."""
    names = list(self.choices)
    return [
      dict(zip(names, combo, strict=True)) for combo in itertools.product(*self.choices.values())
    ]

  @property
  def grid_size(self) -> int:
    return math.prod(len(v) for v in self.choices.values())

  def fingerprint(self) -> dict:
    """What makes two studies comparable (not the trial budget or the TPE settings)."""
    out = {
      "decoder": self.decoder,
      "sampler": self.sampler,
      "objective": self.objective,
      "choices": {k: list(v) for k, v in self.choices.items()},
      "thresholds": list(self.thresholds),
    }
    if self.selection != "best":  # what best_params.json holds depends on it
      out["selection"] = self.selection
    return out


def _evenly_spaced(values: Sequence[float]) -> bool:
  steps = np.diff(np.asarray(values, dtype=np.float64))
  return bool(np.allclose(steps, steps[0], rtol=0.0, atol=1e-9))


DEFAULT_STUDY_NAME = "jaxseg-{decoder}"


def study_name(config, decoder: str) -> str:
  """``config.tune.study_name`` with ``{decoder}`` filled in.

  Raises:
    ConfigError: a template with other fields, or an empty name.
  """
  template = str(config.tune.get("study_name", DEFAULT_STUDY_NAME))
  try:
    name = template.format(decoder=decoder)
  except (KeyError, IndexError, ValueError):
    raise ConfigError(
      f"config.tune.study_name {template!r}: only {{decoder}} can be filled in"
    ) from None
  if not name.strip():
    raise ConfigError("config.tune.study_name is empty")
  return name


def search_space(config, decoder: str) -> SearchSpace:
  """The search space of ``config.tune.<decoder>``.

  Raises:
    ConfigError: unknown decoder, sampler or objective; malformed grids; empty choices; a waterz
      space whose ``aff_threshold_low`` can reach its ``aff_threshold_high`` (names the
      ``tune.*`` key). Only the user's values are checked here, so that only they are
      ConfigErrors.
  """
  scoring.check_decoder(decoder)
  section = config.tune[decoder]
  where = f"config.tune.{decoder}"
  sampler = str(section.get("sampler", "grid"))
  if sampler not in SAMPLERS:
    raise ConfigError(f"{where}.sampler must be one of {SAMPLERS}, not {sampler!r}")
  selection = str(config.tune.get("selection", "best"))
  if selection not in SELECTIONS:
    raise ConfigError(f"config.tune.selection must be one of {SELECTIONS}, not {selection!r}")
  objective = str(section.objective)
  try:
    scoring.direction(objective)
  except ConfigError as e:
    raise ConfigError(f"{where}.{e}") from None  # "objective must be one of ...": name the key
  thresholds: tuple[float, ...] = ()
  defaults = None
  # A grid visits every point anyway; the config's own values are TPE's first trial.
  enqueue = section.get("enqueue_defaults", False) and sampler == "tpe"
  if decoder == "cc":
    choices = {"threshold": grid_values(section.threshold_grid, f"{where}.threshold_grid")}
  elif decoder == "mws":
    choices = {
      "bias_short": grid_values(section.bias_short, f"{where}.bias_short"),
      "bias_long": grid_values(section.bias_long, f"{where}.bias_long"),
    }
    if enqueue:
      defaults = _in_space(
        {k: float(config.decode.mws[k]) for k in ("bias_short", "bias_long")}, choices
      )
  else:
    merge = tuple(str(m) for m in section.merge_functions)
    if not merge:
      raise ConfigError(f"{where}.merge_functions is empty")
    if len(set(merge)) != len(merge):
      raise ConfigError(f"{where}.merge_functions has repeats: {merge}")
    choices = {
      "merge_function": merge,
      "aff_threshold_low": grid_values(section.aff_threshold_low, f"{where}.aff_threshold_low"),
      "aff_threshold_high": grid_values(section.aff_threshold_high, f"{where}.aff_threshold_high"),
    }
    if max(choices["aff_threshold_low"]) >= min(choices["aff_threshold_high"]):
      raise ConfigError(
        f"{where}: every aff_threshold_low must lie below every aff_threshold_high, got "
        f"{section.aff_threshold_low} and {section.aff_threshold_high}"
      )
    try:
      thresholds = tuple(sorted(float(t) for t in section.thresholds))
    except (TypeError, ValueError):
      raise ConfigError(f"{where}.thresholds must be numbers, not {section.thresholds!r}") from None
    if not thresholds or not all(0.0 <= t <= 1.0 for t in thresholds):
      raise ConfigError(f"{where}.thresholds must be values in [0, 1], not {section.thresholds}")
    if len(set(thresholds)) != len(thresholds):
      raise ConfigError(f"{where}.thresholds has repeats: {section.thresholds}")
    defaults = _waterz_defaults(config, choices) if enqueue else None
  for name in ("threshold", "aff_threshold_low", "aff_threshold_high", "bias_short", "bias_long"):
    if name in choices and not all(0.0 <= v <= 1.0 for v in choices[name]):
      raise ConfigError(f"{where}: {name} values must lie in [0, 1], got {choices[name]}")
  grid_size = math.prod(len(v) for v in choices.values())
  if sampler == "grid":
    n_trials = grid_size
  else:
    try:
      n_trials = int(section.get("n_trials", grid_size))
    except (TypeError, ValueError):
      raise ConfigError(
        f"{where}.n_trials must be a whole number, not {section.n_trials!r}"
      ) from None
  return SearchSpace(
    decoder=decoder,
    sampler=sampler,
    objective=objective,
    choices=choices,
    thresholds=thresholds,
    n_trials=n_trials,
    n_startup_trials=int(section.get("n_startup_trials", 10)),
    defaults=defaults,
    selection=selection,
  )


def _waterz_defaults(config, choices: Mapping[str, tuple]) -> dict | None:
  """``config.decode``'s own waterz values when they lie inside the space, else None.

  "Inside" means a listed merge function and thresholds within the grid's range; a value
  between grid steps (the default ``aff_threshold_high = 0.999``) is run as it is, so trial 0
  scores exactly what the untuned config would.
  """
  decode = config.decode
  params = {
    "merge_function": str(decode.merge_function),
    "aff_threshold_low": float(decode.aff_threshold_low),
    "aff_threshold_high": float(decode.aff_threshold_high),
  }
  if params["merge_function"] not in choices["merge_function"]:
    return None
  return _in_space(params, choices)


def _in_space(params: dict, choices: Mapping[str, tuple]) -> dict | None:
  """``params`` when each float lies within its grid's range (between steps is fine), else
  None."""
  for name, value in params.items():
    values = choices[name]
    if not isinstance(value, str) and not values[0] - SNAP_TOL <= value <= values[-1] + SNAP_TOL:
      return None
  return params


# -- samplers --------------------------------------------------------------------------------------


class ResumableGridSampler(optuna.samplers.GridSampler):
  """Optuna's grid sampler, made to resume: only a COMPLETE trial uses up its grid point.

  Optuna counts every finished trial as a visit, FAIL included, so a point whose trial was
  interrupted (marked FAIL by :func:`open_study`) would never run again. The tuner asks exactly as
  many trials as points lack a COMPLETE trial, so this sampler never stops the study itself.
  """

  def __init__(self, search_space, seed: int | None = None, timeout_s: float | None = None):
    super().__init__(search_space, seed=seed)
    self.timeout_s = timeout_s

  def _get_unvisited_grid_ids(self, study: optuna.Study) -> list[int]:
    done, running = set(), set()
    for t in study._storage.get_all_trials(study._study_id, deepcopy=False):
      attrs = t.system_attrs
      if "grid_id" not in attrs or not self._same_search_space(attrs["search_space"]):
        continue
      if settled(t, self.timeout_s):
        done.add(attrs["grid_id"])
      elif t.state == TrialState.RUNNING:
        running.add(attrs["grid_id"])
    todo = set(range(self._n_min_trials)) - done
    return sorted(todo - running) or sorted(todo)

  def after_trial(self, study, trial, state, values) -> None:
    """No ``study.stop()``: the tuner asks for exactly the missing points."""


# The trials TPE learns from (Optuna's TPE ignores FAIL ones).
_LEARNED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)


class ResumableTPESampler(optuna.samplers.TPESampler):
  """Optuna's TPE, made to resume: a trial's draws depend only on the seed and earlier trials.

  Optuna's TPE draws every trial from one random stream per process, so a study resumed by a new
  process would replay the first session's draws (or, reseeded, leave the uninterrupted study's
  path). Here both streams (TPE's and its startup random sampler's) are reseeded before each
  trial from ``(seed, n)``, ``n`` the COMPLETE / PRUNED trials before it, i.e. the trials TPE
  models. So trial N's point is a function of the seed and trials 0..N-1 alone, and a trial that
  a kill left RUNNING (made FAIL by :func:`open_study`, which TPE ignores) is asked again with
  the very point it had.
  """

  def __init__(self, *, seed: int, **kwargs):
    super().__init__(seed=seed, **kwargs)
    self._base_seed = int(seed) % 2**64  # SeedSequence takes no negative entropy

  def before_trial(self, study: optuna.Study, trial) -> None:
    learned = study.get_trials(deepcopy=False, states=_LEARNED_STATES)
    n = sum(t.number < trial.number for t in learned)
    tpe_seed, random_seed = np.random.SeedSequence([self._base_seed, n]).generate_state(2)
    self._rng.rng.seed(int(tpe_seed))
    self._random_sampler._rng.rng.seed(int(random_seed))
    super().before_trial(study, trial)


def make_sampler(
  space: SearchSpace, seed: int, timeout_s: float | None = None
) -> optuna.samplers.BaseSampler:
  """The space's sampler (``grid``: every point once, shuffled by ``seed``; ``tpe``: TPE whose
  trial N depends only on ``seed`` and trials 0..N-1).

  ``timeout_s``: the current trial timeout; a grid point that timed out under a shorter one is
  run again.
  """
  if space.sampler == "grid":
    choices = {k: list(v) for k, v in space.choices.items()}
    return ResumableGridSampler(choices, seed=seed, timeout_s=timeout_s)
  return ResumableTPESampler(n_startup_trials=space.n_startup_trials, seed=seed)


# -- studies ---------------------------------------------------------------------------------------


def open_study(
  path: str,
  name: str,
  space: SearchSpace,
  fingerprint: Mapping[str, Any],
  seed: int,
  timeout_s: float | None = None,
) -> tuple[optuna.Study, int]:
  """Creates or loads the SQLite study at ``path`` and readies it to continue.

  Args:
    path: the ``study.db`` file (its folder is created).
    name: the study name inside it.
    space: the search space (direction and sampler).
    fingerprint: JSON-ready description of what is tuned; stored as a user attribute of a new
      study and compared with the stored one of an existing study.
    seed: sampler seed (the same for a resumed study: its samplers draw per trial).
    timeout_s: the trial timeout of this run (see :func:`settled`).

  Returns:
    ``(study, interrupted)``: the study, and how many trials a killed run had left RUNNING (now
    FAIL; a grid study reruns their points).

  Raises:
    ValueError: the stored study tunes something else (the differences are listed).
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  storage = optuna.storages.RDBStorage(f"sqlite:///{os.path.abspath(path)}")
  study = optuna.create_study(
    storage=storage,
    study_name=name,
    load_if_exists=True,
    direction=space.direction,
    sampler=make_sampler(space, seed, timeout_s),
  )
  saved = study.user_attrs.get(FINGERPRINT_ATTR)
  if saved is None and not study.trials:
    study.set_user_attr(FINGERPRINT_ATTR, dict(fingerprint))
  else:
    differences = outputs.differences(saved, dict(fingerprint))
    if differences:
      raise OutputError(
        f"{path}: holds a study made with other settings ({'; '.join(differences[:10])}); "
        "use --overwrite (tune(..., overwrite=True)) to start it again, or another workdir"
      )
  interrupted = 0
  for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
    # A RUNNING trial in a study nobody else tunes was left by a killed job.
    storage.set_trial_user_attr(t._trial_id, "interrupted", True)
    storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    interrupted += 1
  return study, interrupted


def settled(trial, timeout_s: float | None = None) -> bool:
  """A COMPLETE trial that stands, i.e. not one that timed out under a shorter timeout than
  ``timeout_s`` (raising ``tune.trial_timeout_s`` gives those points another chance)."""
  if trial.state != TrialState.COMPLETE:
    return False
  if timeout_s is None or not trial.user_attrs.get("timed_out"):
    return True
  return float(trial.user_attrs.get("timeout_s", math.inf)) >= float(timeout_s)


def complete_trials(
  study: optuna.Study, timeout_s: float | None = None
) -> list[optuna.trial.FrozenTrial]:
  """The study's :func:`settled` trials."""
  trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
  return [t for t in trials if settled(t, timeout_s)]


def same_point(study: optuna.Study, space: SearchSpace, params: Mapping[str, Any]):
  """A COMPLETE, not timed-out trial that ran exactly ``params`` (decoding is deterministic, so
  its result stands for a repeat), or None."""
  key = _point_key(space.snap(params))
  for t in complete_trials(study):
    if not t.user_attrs.get("timed_out") and _point_key(space.snap(t.params)) == key:
      return t
  return None


def pending_trials(
  study: optuna.Study, space: SearchSpace, n_trials: int, timeout_s: float | None = None
) -> int:
  """How many trials to run so the study has ``n_trials`` settled ones.

  A grid study runs each point lacking a settled trial (at most ``n_trials`` in all).
  """
  complete = complete_trials(study, timeout_s)
  budget = max(0, n_trials - len(complete))
  if space.sampler != "grid":
    return budget
  done = {_point_key(space.snap(t.params)) for t in complete}
  missing = [p for p in space.grid_points() if _point_key(p) not in done]
  return min(len(missing), budget)


def _point_key(params: Mapping[str, Any]) -> tuple:
  return tuple(sorted(params.items()))


def enqueue_defaults(study: optuna.Study, space: SearchSpace) -> bool:
  """Queues the config's own decode values as the next trial unless a trial already ran (or
  waits to run) them. Returns whether it queued them."""
  if space.defaults is None:
    return False
  for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.WAITING)):
    if t.user_attrs.get("defaults"):
      return False
  study.enqueue_trial(dict(space.defaults), user_attrs={"defaults": True})
  return True
