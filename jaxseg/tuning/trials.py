"""Tuning trials in a child process: decode cached affinities with trial parameters, score them.

Owns :class:`TrialWorker`, one long-lived child process that loads a split's affinities ``[3, z, y,
x]`` (the decoded channels, in their stored dtype; the mutex watershed's ``[C, z, y, x]`` with
their offsets), masks ``[z, y, x]``, dense labels ``[z, y, x]`` and skeletons once, then serves
many trials; and the two functions it runs there, :func:`load_state` and :func:`run_trial`. A trial decodes every volume in memory with
:func:`jaxseg.decoding.decode_lib.decode_array` (waterz: all ``tune.waterz.thresholds`` in one pass)
and scores each segmentation with :func:`jaxseg.decoding.scoring.evaluate_loaded`; the objective over
several volumes is their mean, and for waterz the best threshold's mean is the trial's value.

Why a child: a trial that runs too long (waterz on a pathological merge function) is killed after
``tune.trial_timeout_s`` and the child restarted, without losing the tuner. The child is started
with the *spawn* method, because the parent may have JAX (and its threads) loaded from predicting,
and forking a process that runs JAX can deadlock.

Never imports JAX or Optuna (the child starts in about a second).
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxseg.common.errors import JaxsegError

# Messages from the child: (kind, payload).
_READY, _RESULT, _ERROR = "ready", "result", "error"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# How often the parent checks that a silent child is still alive.
_POLL_S = 0.5


class TrialTimeout(Exception):
  """A trial ran past the timeout; the child was killed and the next trial starts a new one."""


class TrialError(JaxsegError, RuntimeError):
  """A trial (or loading the data) hit a user's mistake in the child, or the child died.

  ``str(error)`` is one line saying why; ``details`` holds the child's traceback, if any.
  """

  def __init__(self, message: str, details: str = ""):
    super().__init__(message)
    self.details = details


class TrialCrash(RuntimeError):
  """A trial (or loading the data) raised anything else in the child: a bug in jaxseg.

  Not a :class:`JaxsegError`, so the entry point shows it with its traceback; the message holds
  the child's traceback too (the parent's own only shows where the message arrived), and so does
  ``details``.
  """

  def __init__(self, message: str, details: str = ""):
    super().__init__(f"{message}\n\nThe trial process's traceback:\n{details}".rstrip())
    self.details = details


# -- what runs in the child ------------------------------------------------------------------------


def load_state(setup: Mapping[str, Any]) -> dict:
  """Loads everything the trials share (runs once per child).

  Args:
    setup: from :func:`jaxseg.tuning.tune_lib.trial_setup`: ``data`` (the ``config.data`` dict),
      ``split``, ``volumes`` (``[{"name", "affinities", "mask"}]``), ``decode`` (the base
      ``config.decode`` dict, method set), ``eval`` (:func:`scoring.eval_settings`),
      ``objective``.

  Returns:
    The state :func:`run_trial` takes.

  Raises:
    VolumeError: unreadable affinities / mask / ground truth, or NaN / Inf in the affinities.
  """
  import ml_collections

  from jaxseg.decoding.decode_lib import (
    check_decoder_fits,
    open_affinities,
    open_mask,
    read_decoded,
    wants_blockwise,
  )
  from jaxseg.decoding.settings import decode_settings
  from jaxseg.io import VolumeError
  from jaxseg.io.datasets import dataset_volumes
  from jaxseg.io.skeleton import load_skeletons

  base = decode_settings(dict(setup["decode"]))
  by_name = {
    v.name: v
    for v in dataset_volumes(ml_collections.ConfigDict(dict(setup["data"])), setup["split"])
  }
  volumes = []
  for entry in setup["volumes"]:
    name = entry["name"]
    if name not in by_name:
      raise VolumeError(f"volume {name!r} is not in split {setup['split']!r} of config.data")
    volume = by_name[name].windowed()
    source = open_affinities(entry["affinities"], base)
    check_decoder_fits(source, base)
    resolution = tuple(float(r) for r in volume.image.resolution)
    skeletons = (
      load_skeletons(volume.skeleton, resolution=resolution, cache_dir=setup.get("erl_cache_dir"))
      if volume.skeleton
      else None
    )
    if wants_blockwise(base, source.spatial_shape):
      # Larger than one decode block (a NISB cube is 12 G voxels): every trial decodes it
      # blockwise into scratch and scores it lazily, as `decode` + `evaluate` would.
      if volume.labels is not None and tuple(volume.labels.shape) != source.spatial_shape:
        raise VolumeError(
          f"{source.volume.path}: affinities cover {source.spatial_shape} (z, y, x) but the "
          f"labels {volume.labels.path} have {tuple(volume.labels.shape)}"
        )
      volumes.append(
        {
          "name": name,
          "lazy": True,
          "affinities": entry["affinities"],
          "mask": entry.get("mask") or "",
          "labels": volume.labels,
          "skeletons": skeletons,
          "resolution": resolution,
        }
      )
      continue
    aff, offsets = read_decoded(source, base)
    if not np.isfinite(aff).all():
      raise VolumeError(f"{source.volume.path}: affinities contain NaN or Inf")
    mask = None
    if entry.get("mask"):
      mask = np.asarray(open_mask(entry["mask"], source.spatial_shape)[:])
    labels = None
    if volume.labels is not None:
      labels = np.asarray(volume.labels.read())
      if labels.shape != source.spatial_shape:
        raise VolumeError(
          f"{source.volume.path}: affinities cover {source.spatial_shape} (z, y, x) but the "
          f"labels {volume.labels.path} have {labels.shape}"
        )
    volumes.append(
      {
        "name": name,
        "aff": aff,
        "distances": source.distances,
        "offsets": offsets,
        "convention": source.convention,
        "mask": mask,
        "labels": labels,
        "skeletons": skeletons,
        "resolution": resolution,
      }
    )
  return {
    "decode": dict(setup["decode"]),
    "eval": dict(setup["eval"]),
    "objective": setup["objective"],
    "volumes": volumes,
    "scratch": setup.get("scratch"),
  }


def run_trial(state: Mapping[str, Any], params: Mapping[str, Any]) -> dict:
  """Decodes every volume with ``params`` applied to the base decode settings and scores it.

  Args:
    state: from :func:`load_state`.
    params: decode keys to override (``threshold``; or ``merge_function``,
      ``aff_threshold_low``, ``aff_threshold_high``; or ``decode.mws``'s ``bias_short``,
      ``bias_long``).

  Returns:
    ``value`` (mean objective over the volumes at the best threshold; NaN scores count as the
    worst value), ``threshold`` (that threshold), ``per_volume`` (``{name: value}`` there),
    ``thresholds`` (``[{"threshold", "value"}]`` for every decoded threshold), ``seconds``.
  """
  from jaxseg.decoding import scoring
  from jaxseg.decoding.decode_lib import decode_array
  from jaxseg.decoding.settings import decode_settings

  start = time.perf_counter()
  objective = state["objective"]
  direction = scoring.direction(objective)
  settings = decode_settings(scoring.with_params(state["decode"], params))
  per_threshold: dict[float, dict[str, float]] = {}
  for v in state["volumes"]:
    if v.get("lazy"):
      results = _decode_to_scratch(state, v, params)
    else:
      results = decode_array(
        v["aff"],
        settings,
        distances=v["distances"],
        offsets=v["offsets"],
        convention=v["convention"],
        mask=v["mask"],
      )
    for threshold, seg in results:
      metrics = scoring.evaluate_loaded(
        seg, v["labels"], v["skeletons"], v["resolution"], state["eval"]
      )
      value = scoring.objective_value(metrics, objective)
      per_threshold.setdefault(float(threshold), {})[v["name"]] = value
  rows = []
  for threshold, values in sorted(per_threshold.items()):
    finite = [x if math.isfinite(x) else scoring.worst_value(direction) for x in values.values()]
    rows.append({"threshold": threshold, "value": float(np.mean(finite)), "per_volume": values})
  best = scoring.best_row(rows, direction)
  return {
    "value": best["value"],
    "threshold": best["threshold"],
    "per_volume": best["per_volume"],
    "thresholds": [{"threshold": r["threshold"], "value": r["value"]} for r in rows],
    "seconds": time.perf_counter() - start,
  }


def _decode_to_scratch(state: Mapping[str, Any], v: Mapping[str, Any], params: Mapping[str, Any]):
  """Blockwise decode of one large volume into ``scratch/<name>``: ``[(threshold, lazy seg)]``.

  The scratch folder of the previous trial is replaced (its fingerprint differs); the decode
  uses ``decode.num_workers`` / ``decode.worker_command`` like ``python -m jaxseg.decode``.
  """
  from jaxseg.decoding import scoring
  from jaxseg.decoding.decode_lib import decode
  from jaxseg.decoding.settings import decode_settings
  from jaxseg.io import open_volume

  decode_section = scoring.with_params(state["decode"], params)
  settings = decode_settings({**decode_section, "affinity_mask_path": v["mask"]})
  if not state.get("scratch"):
    state["scratch"] = tempfile.mkdtemp(prefix="jaxseg_trials_")
  out = os.path.join(state["scratch"], v["name"])
  summary = decode(settings, v["affinities"], out, overwrite=True, show_progress=False)
  return [
    (threshold, open_volume(path))
    for path, threshold in zip(summary["arrays"], summary["thresholds"], strict=True)
  ]


def _die_with_parent(parent_pid: int) -> None:
  """Ends this child when the tuner dies, even by SIGKILL, instead of finishing its trial.

  On Linux the kernel delivers SIGKILL to the child when its parent exits (``PR_SET_PDEATHSIG``);
  elsewhere the child notices at its next message. A parent that died before the call shows as a
  changed parent pid.
  """
  if sys.platform.startswith("linux"):
    try:
      libc = ctypes.CDLL(None, use_errno=True)
      libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
      pass
  if os.getppid() != parent_pid:
    os._exit(1)


def _serve(
  conn, setup: Mapping[str, Any], load: Callable, trial: Callable, parent_pid: int
) -> None:
  """The child's loop: load once, then answer one trial per message until told to stop."""
  _die_with_parent(parent_pid)
  try:
    state = load(setup)
  except Exception as e:  # everything goes back to the parent as text
    conn.send((_ERROR, _error_payload(e)))
    return
  conn.send((_READY, None))
  while True:
    try:
      params = conn.recv()
    except (EOFError, OSError):  # the parent is gone
      return
    if params is None:
      return
    try:
      conn.send((_RESULT, trial(state, params)))
    except Exception as e:
      conn.send((_ERROR, _error_payload(e)))


def _error_payload(error: Exception) -> tuple[str, str, bool]:
  """``(message, traceback, is the user's)`` of the child's exception, for the parent.

  The exception itself may not unpickle in the parent, so it goes as text, with whether it is a
  user's mistake (a JaxsegError, or an OSError such as a full disk that the CLI explains): only
  those become a one-line :class:`TrialError`; anything else is a bug and keeps its traceback.
  """
  from jaxseg.common.cli import user_message

  known = user_message(error)
  if known is not None:
    return known, traceback.format_exc(), True
  return f"{type(error).__name__}: {error}", traceback.format_exc(), False


# -- the parent's handle ---------------------------------------------------------------------------


def _child_error(context: str, payload: tuple[str, str, bool]) -> TrialError | TrialCrash:
  """The parent's exception for the child's :func:`_error_payload`, ``context`` before it."""
  message, details, users = payload
  message = f"{context}: {message}" if context else message
  return TrialError(message, details) if users else TrialCrash(message, details)


class TrialWorker:
  """One child process serving trials, restarted after a timeout.

  Usage::

    with TrialWorker(setup, timeout_s=300) as worker:
      result = worker.run({"threshold": 0.6})   # TrialTimeout / TrialError on failure

  Args:
    setup: what :func:`load_state` (or ``load``) takes; must pickle.
    timeout_s: seconds one trial may take (loading the data is not counted).
    load, trial: module-level functions run in the child (pickled by name): ``load(setup) ->
      state`` once, ``trial(state, params) -> dict`` per trial.
  """

  def __init__(
    self,
    setup: Mapping[str, Any],
    timeout_s: float,
    *,
    load: Callable = load_state,
    trial: Callable = run_trial,
  ):
    self.setup = dict(setup)
    self.timeout_s = float(timeout_s)
    self._load = load
    self._trial = trial
    self._context = multiprocessing.get_context("spawn")
    self._process = None
    self._conn = None
    self.starts = 0  # child processes started so far (1 + restarts)

  def __enter__(self) -> TrialWorker:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  @property
  def alive(self) -> bool:
    return self._process is not None and self._process.is_alive()

  def start(self) -> None:
    """Starts the child and waits until it has loaded the data.

    Raises:
      TrialError: loading failed on a user's mistake (the child's message), or the child died
        while loading.
      TrialCrash: loading raised anything else (a bug; the child's traceback in the message).
    """
    if self.alive:
      return
    self.close()
    parent, child = self._context.Pipe()
    process = self._context.Process(
      target=_serve,
      args=(child, self.setup, self._load, self._trial, os.getpid()),
      name="jaxseg-tune-trials",
      daemon=True,
    )
    process.start()
    child.close()
    self._process, self._conn = process, parent
    self.starts += 1
    kind, payload = self._receive(deadline=None, what="loading the data")
    if kind == _ERROR:
      self.close()
      raise _child_error("loading the tuning data failed", payload)

  def run(self, params: Mapping[str, Any]) -> dict:
    """Runs one trial in the child.

    Raises:
      TrialTimeout: it took longer than ``timeout_s``; the child was killed.
      TrialError: the trial raised a user's mistake (message and child traceback), or the child
        died.
      TrialCrash: the trial raised anything else (a bug; the child's traceback in the message).
    """
    self.start()
    self._conn.send(dict(params))
    kind, payload = self._receive(deadline=time.monotonic() + self.timeout_s, what="a trial")
    if kind == _ERROR:
      raise _child_error("", payload)
    return payload

  def _receive(self, deadline: float | None, what: str):
    """The child's next message; kills it at ``deadline`` and notices when it dies."""
    while True:
      remaining = None if deadline is None else deadline - time.monotonic()
      if remaining is not None and remaining <= 0 and not self._conn.poll(0):
        self.close()
        raise TrialTimeout(f"{what} took longer than {self.timeout_s:g} s")
      wait = _POLL_S if remaining is None else max(0.0, min(_POLL_S, remaining))
      if self._conn.poll(wait):
        try:
          return self._conn.recv()
        except (EOFError, OSError):
          pass  # the child closed its end: it is exiting
      elif self._process.is_alive():
        continue
      self._process.join(timeout=5)
      code = self._process.exitcode
      self.close()
      raise TrialError(
        f"the trial process exited (code {code}) during {what}: out of memory, or killed? "
        "(Its own error, if any, is printed above. A script that calls jaxseg.tuning must "
        "guard its top level with `if __name__ == '__main__':`, since trials run in a spawned "
        "process that imports the script.)"
      )

  def close(self) -> None:
    """Stops the child (politely if idle, else killed)."""
    process, conn = self._process, self._conn
    self._process = self._conn = None
    if conn is not None:
      try:
        if process is not None and process.is_alive():
          conn.send(None)
      except (BrokenPipeError, OSError):
        pass
      conn.close()
    if process is not None:
      process.join(timeout=0.2)
      if process.is_alive():
        process.kill()
        process.join(timeout=5)
