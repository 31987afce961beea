"""Orbax checkpoints of a training run: save, keep top-k by a metric plus the latest, restore.

Layout (``workdir/checkpoints``, one orbax v0 ``CheckpointManager`` step folder per save)::

  checkpoints/<step>/params/    model parameters (nnx.Param state as a plain nested dict)
  checkpoints/<step>/ema/       EMA of the parameters (only when ``train.ema.enabled``)
  checkpoints/<step>/train/     {"step", "opt_state", "rest"}: the optimizer state, the step
                                counter and any non-parameter model state
  checkpoints/<step>/meta/      JSON: step, monitored metrics, the model config, saved_at

Trees are stored as plain dicts of arrays (``nnx.to_pure_dict``), so a checkpoint reads
back without the NNX version that wrote it and inference can restore ``ema`` / ``params`` alone.
The data stream and the augmentation keys are pure functions of ``(seed, step)``, so restoring
the ``step`` restores them too.

Retention (:meth:`CheckpointManager.save`): orbax keeps every step (``max_to_keep=None``) and this
module deletes, after each save has completed, every step that is not

* the latest complete step (always: a resumed run needs it, whatever its metric), or
* among the ``keep_top_k`` best by ``monitor`` (``min`` or ``max``), among steps that have it, or
* a multiple of ``keep_every`` (permanent milestones, PyTC's "every 50k steps"; 0 = none).

Deleting only after the newer save is committed means a crash during a save still leaves the
previous latest step intact (orbax writes into a temporary folder and renames it when complete).
Only a manager that saved prunes when it closes: one that only restored (``predict``, ``tune``,
``run --checkpoint`` reading another work dir) deletes nothing, whatever its retention settings.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxseg.common import config_util
from jaxseg.common.errors import ConfigError, MissingInputError

# Model config fields that do not change parameter shapes: a resumed or restored run may change
# them freely (bf16 vs f32 compute, rematerialisation).
_SHAPE_NEUTRAL_MODEL_FIELDS = frozenset({"compute_dtype", "remat"})


# -- pure-dict conversion --------------------------------------------------------------------------


def _is_state(x) -> bool:
  return isinstance(x, nnx.State)


def to_pure(tree: Any) -> Any:
  """Replaces every ``nnx.State`` in ``tree`` by its plain nested dict of arrays.

  The training loop already keeps plain dicts (``nnx.merge`` accepts them, and Flax is replacing
  ``nnx.State`` by dicts); this accepts States too so callers need not care.
  """
  return jax.tree.map(lambda s: nnx.to_pure_dict(s) if _is_state(s) else s, tree, is_leaf=_is_state)


def abstract_like(tree: Any, sharding=None) -> Any:
  """``jax.ShapeDtypeStruct`` s (with ``sharding``) for every array of ``tree``."""

  def one(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or getattr(x, "sharding", None))

  return jax.tree.map(one, tree)


# -- compatibility checks --------------------------------------------------------------------------


def model_config_dict(model_config) -> dict:
  """JSON-ready dict of ``config.model`` (tuples as lists)."""
  if isinstance(model_config, Mapping) and not hasattr(model_config, "to_json_best_effort"):
    return dict(model_config)
  return config_util.config_to_dict(model_config)


def model_config_differences(saved: Mapping, current: Mapping) -> list[str]:
  """Human-readable differences in the shape-relevant fields of two model config dicts."""
  out = []
  for key in sorted(set(saved) | set(current)):
    if key in _SHAPE_NEUTRAL_MODEL_FIELDS:
      continue
    a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
    if a != b:
      out.append(f"model.{key}: checkpoint {a!r}, config {b!r}")
  return out


def _path_str(path) -> str:
  """``a/0/kernel`` for a key path (dict keys may come back from orbax as strings)."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return "/".join(parts)


def _shape_differences(saved_tree: Any, abstract_tree: Any, limit: int = 5) -> list[str]:
  """Differences between the array shapes stored in a checkpoint item and the expected ones."""
  saved = {
    _path_str(p): tuple(getattr(x, "shape", ()) or ())
    for p, x in jax.tree_util.tree_flatten_with_path(saved_tree)[0]
  }
  wanted = {
    _path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
  }
  out = []
  for key in sorted(set(saved) | set(wanted)):
    if saved.get(key) != wanted.get(key):
      out.append(f"{key}: checkpoint {saved.get(key)}, model {wanted.get(key)}")
  if len(out) > limit:
    out = [*out[:limit], f"... and {len(out) - limit} more"]
  return out


class IncompatibleCheckpointError(ConfigError):
  """The checkpoint was written by a model of a different shape than the current config's."""


# -- the manager -----------------------------------------------------------------------------------


class CheckpointManager:
  """Saves and restores training checkpoints in one folder with top-k + latest retention.

  Args:
    directory: the checkpoint folder (``workdir/checkpoints``); created when missing.
    keep_top_k: how many best steps by ``monitor`` to keep (0 = only the latest and milestones).
    monitor: the metric name in the ``metrics`` given to :meth:`save` (e.g. ``val_loss``).
    monitor_mode: ``min`` or ``max``.
    keep_every: steps that are multiples of this are never deleted (0 = none).
    async_save: write in a background thread (orbax's default); the device arrays are copied to
      host memory before :meth:`save` returns, so the caller may donate them afterwards.
  """

  def __init__(
    self,
    directory: str,
    *,
    keep_top_k: int = 3,
    monitor: str = "val_loss",
    monitor_mode: str = "min",
    keep_every: int = 0,
    async_save: bool = True,
  ):
    if monitor_mode not in ("min", "max"):
      raise ConfigError(f"train.monitor_mode must be 'min' or 'max', got {monitor_mode!r}")
    self.directory = os.path.abspath(directory)
    self.keep_top_k = int(keep_top_k)
    self.monitor = monitor
    self.monitor_mode = monitor_mode
    self.keep_every = int(keep_every or 0)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=None, create=True, enable_async_checkpointing=async_save
    )
    # Handlers named up front: a fresh process can then read item metadata (the shape check)
    # before it has saved or restored anything.
    handlers = {name: ocp.StandardCheckpointHandler() for name in ("params", "ema", "train")}
    handlers["meta"] = ocp.JsonCheckpointHandler()
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self._meta: dict[int, dict] = {}
    self._saved = False  # close() prunes only after a save of this manager

  # -- queries ---------------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def meta(self, step: int) -> dict:
    """The JSON metadata saved with ``step`` (cached)."""
    if step not in self._meta:
      restored = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      self._meta[step] = dict(restored["meta"])
    return self._meta[step]

  def _score(self, step: int) -> float | None:
    value = self.meta(step).get("metrics", {}).get(self.monitor)
    if value is None or not math.isfinite(float(value)):
      return None
    return float(value) if self.monitor_mode == "min" else -float(value)

  def best_steps(self) -> list[int]:
    """Steps with a finite ``monitor`` value, best first (ties: the later step first)."""
    scored = [(s, self._score(s)) for s in self.all_steps()]
    scored = [(score, -s, s) for s, score in scored if score is not None]
    return [s for _, _, s in sorted(scored)]

  def best_step(self) -> int | None:
    best = self.best_steps()
    return best[0] if best else None

  def resolve_step(self, step: int | str | None) -> int:
    """``None``/``"latest"`` -> latest step, ``"best"`` -> best by ``monitor`` (else latest)."""
    if step is None or step == "latest":
      found = self.latest_step()
    elif step == "best":
      found = self.best_step()
      if found is None:
        found = self.latest_step()
    else:
      try:
        found = int(step)
      except (TypeError, ValueError):
        raise ConfigError(f"step must be 'best', 'latest' or a number, not {step!r}") from None
      if found not in self.all_steps():
        raise MissingInputError(
          f"no checkpoint for step {found} in {self.directory}; have {self.all_steps()}"
        )
    if found is None:
      raise MissingInputError(f"no checkpoint in {self.directory}")
    return found

  # -- save / retention ------------------------------------------------------------------------

  def save(
    self,
    step: int,
    *,
    params: Any,
    train: Any,
    ema: Any = None,
    metrics: Mapping[str, float] | None = None,
    model_config=None,
  ) -> None:
    """Saves one step (asynchronously) and prunes older steps under the retention rule.

    Args:
      step: the number of optimizer steps done.
      params: the model parameters (an ``nnx.State`` or plain tree).
      train: ``{"step", "opt_state", "rest"}``.
      ema: the EMA parameters, or ``None`` when EMA is off.
      metrics: the metrics to rank this step by (``monitor`` among them, or not).
      model_config: ``config.model``, kept to refuse restoring into a different model.
    """
    step = int(step)
    self._saved = True
    # Finish the previous save before pruning, so "latest" is a complete checkpoint.
    self._mngr.wait_until_finished()
    self.prune()
    if step in self.all_steps():
      return  # already saved (e.g. the final step coincides with a periodic save)
    meta = {
      "step": step,
      "metrics": {k: float(v) for k, v in (metrics or {}).items()},
      "model": model_config_dict(model_config) if model_config is not None else None,
      "ema": ema is not None,
      "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    items = {
      "params": ocp.args.StandardSave(to_pure(params)),
      "train": ocp.args.StandardSave(to_pure(train)),
      "meta": ocp.args.JsonSave(meta),
    }
    if ema is not None:
      items["ema"] = ocp.args.StandardSave(to_pure(ema))
    self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
    self._meta[step] = meta

  def steps_to_keep(self) -> set[int]:
    """The retention rule applied to the complete steps (see the module docstring)."""
    steps = self.all_steps()
    if not steps:
      return set()
    keep = {steps[-1]}
    keep.update(self.best_steps()[: max(self.keep_top_k, 0)])
    if self.keep_every:
      keep.update(s for s in steps if s % self.keep_every == 0)
    return keep

  def prune(self) -> None:
    """Deletes the complete steps that the retention rule does not keep."""
    keep = self.steps_to_keep()
    for step in self.all_steps():
      if step not in keep:
        self._mngr.delete(step)
        self._meta.pop(step, None)

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    """Waits for pending writes, applies retention (if this manager saved) and releases it.

    A manager that only restored deletes nothing: its retention settings are the reader's config,
    not necessarily the ones that trained the checkpoints (a step ``predict`` was asked for, or
    another work dir's milestones, would go).
    """
    self._mngr.wait_until_finished()
    if self._saved:
      self.prune()
    self._mngr.close()

  # -- restore ---------------------------------------------------------------------------------

  def check_model(self, step: int, model_config, abstract_params: Any = None) -> None:
    """Raises :class:`IncompatibleCheckpointError` if ``step`` holds a differently shaped model."""
    saved = self.meta(step).get("model")
    problems = []
    if saved is not None and model_config is not None:
      problems = model_config_differences(saved, model_config_dict(model_config))
    if not problems and abstract_params is not None:
      stored = self._mngr.item_metadata(step)["params"]
      tree = getattr(stored, "tree", stored)
      if tree is not None:
        problems = _shape_differences(tree, to_pure(abstract_params))
    if problems:
      raise IncompatibleCheckpointError(
        f"the checkpoint at step {step} in {self.directory} was written by a model of a "
        "different shape than the current config asks for ("
        + "; ".join(problems)
        + "); use a new --workdir for a different model, or restore the checkpoint's model "
        "settings"
      )

  def restore(
    self,
    step: int,
    *,
    params: Any = None,
    train: Any = None,
    ema: Any = None,
    sharding=None,
  ) -> dict[str, Any]:
    """Restores the items whose templates are given (others are not read).

    Args:
      step: the step to restore.
      params, train, ema: templates (concrete or abstract trees shaped like what was saved);
        ``None`` skips the item. Trees come back as plain dicts (see :func:`to_pure`).
      sharding: where to place the arrays (e.g. the replicated sharding); default: as the
        template's arrays, else the default device.

    Returns:
      ``{"params": ..., "train": ..., "ema": ...}`` for the requested items.
    """
    wanted = {"params": params, "train": train, "ema": ema}
    wanted = {k: v for k, v in wanted.items() if v is not None}
    if "ema" in wanted and not self.meta(step).get("ema"):
      raise MissingInputError(f"the checkpoint at step {step} has no EMA (train.ema.enabled off)")
    args = {
      k: ocp.args.StandardRestore(abstract_like(to_pure(v), sharding)) for k, v in wanted.items()
    }
    restored = self._mngr.restore(step, args=ocp.args.Composite(**args))
    return {k: restored[k] for k in wanted}

  def restore_model(
    self, step: int, *, params: Any, rest: Any = None, use_ema: bool = True
  ) -> dict[str, Any]:
    """The model of ``step`` for inference: its weights and non-parameter state, no optimizer.

    Args:
      step: the step to restore.
      params: template of the parameters (concrete or abstract), for the EMA as well.
      rest: template of the non-parameter model state, or ``None`` / an empty tree (RSUNet,
        MedNeXt): then it is returned as given and the ``train`` item is not read.
      use_ema: the EMA weights when the checkpoint has them, else the raw parameters.

    Returns:
      ``{"weights": "ema" or "params", "params": ..., "rest": ...}``, the arrays on the default
      device.
    """
    weights = "ema" if use_ema and self.meta(step).get("ema") else "params"
    restored = self.restore(step, **{weights: params})[weights]
    if rest is not None and jax.tree.leaves(rest):
      rest = self._restore_rest(step, rest)
    return {"weights": weights, "params": restored, "rest": rest}

  def _restore_rest(self, step: int, rest: Any) -> Any:
    """The ``rest`` entry of the ``train`` item alone.

    That item holds the optimizer state too, whose structure only the optimizer can describe: a
    partial restore reads just ``rest``, so inference needs no optimizer (nor the memory for its
    moments).
    """
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    template = {"rest": abstract_like(to_pure(rest), device)}
    args = ocp.args.PyTreeRestore(
      item=template,
      restore_args=ocp.checkpoint_utils.construct_restore_args(template),
      partial_restore=True,
    )
    checkpointer = ocp.PyTreeCheckpointer()
    try:
      restored = checkpointer.restore(os.path.join(self.directory, str(step), "train"), args=args)
    finally:
      checkpointer.close()
    return restored["rest"]
