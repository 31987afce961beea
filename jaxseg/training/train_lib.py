"""The training loop: ``train_and_evaluate(config, workdir)``, resumable, data-parallel.

Owns the train state, the jitted train / eval steps, the loop with logging, validation and
checkpoints, and :func:`restore_inference_model` for the inference code.

Shapes: host batches from :class:`jaxseg.data.pipeline.TrainData` are ``image`` float32 ``[B, Zr,
Yr, Xr, c]`` and ``labels`` int32 ``[B, Zr, Yr, Xr]`` (``Zr..`` = patch + target context, ``B`` the
global batch = ``train.batch_size`` per device x devices). Inside the jitted step
:func:`jaxseg.data.pipeline.make_device_transform` augments them (key ``fold_in(base, step)``),
erodes the labels and computes ``target`` / ``mask`` ``[B, Z, Y, X, n_aff]``; the model maps the
image ``[B, Z, Y, X, c]`` to logits ``[B, Z, Y, X, n_aff]``. With ``target.lsd.enabled`` the
transform also hands over the patch labels ``[B, Z, Y, X]``, the step computes the local shape
descriptors ``lsd_target`` ``[B, Z, Y, X, 10]`` / ``lsd_mask`` ``[B, Z, Y, X, 1]`` from them
(:func:`jaxseg.data.lsd.lsd_targets`), and the logits gain 10 channels after the affinities
(:func:`jaxseg.training.losses.make_objective`).

State layout (a plain pytree, replicated on every device)::

  {"step": int32 scalar,            # optimizer updates done; also the data / augmentation index
   "params": {...},                 # nnx.Param values as a nested dict (nnx.to_pure_dict)
   "rest": {...},                   # any other model state (empty for RSUNet / MedNeXt)
   "opt_state": optax state,        # clip_by_global_norm + AdamW
   "ema": {...} or None}            # EMA of params (train.ema.enabled)

The model's structure (``nnx.GraphDef``) stays outside, and ``nnx.merge(graphdef, params, rest)``
rebuilds the module inside the step. Because the crops of step ``s`` and their augmentation are
pure functions of ``(config.seed, s)``, restoring the state restores the whole run.

Workdir layout::

  workdir/config.json          the resolved config (written at every start)
  workdir/checkpoints/<step>/  see jaxseg.training.checkpoint
  workdir/tensorboard/         TensorBoard event files
  workdir/metrics.jsonl        one JSON line per train log and per validation
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from jaxseg.common import config_util, outputs
from jaxseg.common.errors import ConfigError, MissingInputError
from jaxseg.data import lsd as lsd_lib
from jaxseg.data import pipeline, targets
from jaxseg.io.datasets import dataset_volumes
from jaxseg.training import checkpoint as ckpt_lib
from jaxseg.training import ema as ema_lib
from jaxseg.training import losses, optim, paths, summary
from jaxseg.training import sharding as sharding_lib


class NonFiniteLossError(FloatingPointError):
  """The training loss or gradient became NaN / Inf."""


# Scalars the objective adds with local shape descriptors (losses.make_objective), logged as is.
_PART_LOSSES = ("loss_affinity", "loss_lsd")


# -- model and state -------------------------------------------------------------------------------


def compute_dtype(config) -> str:
  """The model's compute dtype: ``model.compute_dtype`` under mixed precision, else float32."""
  if config.train.mixed_precision:
    return config.model.compute_dtype
  return "float32"


def _build_model(config, dtype: str | None = None) -> nnx.Module:
  from jaxseg.models import build_model  # the models pull in their layers only when needed

  return build_model(config.model, rngs=nnx.Rngs(int(config.seed)), compute_dtype=dtype)


def model_graphdef(config, dtype: str | None = None):
  """``(graphdef, abstract_params, abstract_rest)`` without allocating parameters."""
  abstract = nnx.eval_shape(lambda: _build_model(config, dtype))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def _ema_enabled(config) -> bool:
  return bool(config.train.ema.enabled)


def create_train_state(config, tx: optax.GradientTransformation, sharding) -> tuple[Any, dict]:
  """Initialises ``(graphdef, state)`` with the state born replicated on the mesh.

  The parameters are a function of ``config.seed`` only, so every host (and a 1- or 2-device
  run) initialises the same model.
  """
  dtype = compute_dtype(config)
  graphdef, _, _ = model_graphdef(config, dtype)
  with_ema = _ema_enabled(config)

  def init():
    model = _build_model(config, dtype)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "rest": rest,
      "opt_state": tx.init(params),
      "ema": jax.tree.map(jnp.copy, params) if with_ema else None,
    }

  state = jax.jit(init, out_shardings=sharding.replicated)()
  return graphdef, state


def abstract_train_state(config, tx: optax.GradientTransformation) -> tuple[Any, dict]:
  """``(graphdef, state)`` with ``jax.ShapeDtypeStruct`` leaves: the state's shapes and dtypes,
  nothing allocated, for lowering and compiling the train step without running it."""
  graphdef, params, rest = model_graphdef(config, compute_dtype(config))
  state = {
    "step": jax.ShapeDtypeStruct((), jnp.int32),
    "params": params,
    "rest": rest,
    "opt_state": jax.eval_shape(tx.init, params),
    "ema": params if _ema_enabled(config) else None,
  }
  return graphdef, state


# -- steps ---------------------------------------------------------------------------------------


def _make_batch_fn(config, read_shape, *, train: bool):
  """``batch(key, image, labels)``: the device transform, plus the local shape descriptors
  (``lsd_target``, ``lsd_mask``) from the patch labels when ``target.lsd.enabled``."""
  transform = pipeline.make_device_transform(config, read_shape, train=train)
  lsd = targets.lsd_settings(config)
  if lsd is None:
    return transform

  def with_lsd(key, image, labels):
    batch = transform(key, image, labels)
    batch["lsd_target"], batch["lsd_mask"] = lsd_lib.lsd_targets(batch.pop("labels"), lsd)
    return batch

  return with_lsd


def make_train_step(config, graphdef, tx, sharding, read_shape):
  """The jitted ``train_step(state, image, labels) -> (state, metrics)`` (state donated).

  The step computes the targets from the raw crops on the device, runs forward / backward in the
  model's compute dtype with the loss in float32, clips, applies AdamW and updates the EMA. When
  the loss or the gradient norm is not finite, the state is returned unchanged (``metrics
  ["finite"]`` is False) so no NaN ever reaches the parameters or a checkpoint; the host stops.
  """
  transform = _make_batch_fn(config, read_shape, train=True)
  objective = losses.make_objective(config)
  lr_fn = optim.create_learning_rate_fn(config.optim, int(config.train.num_steps))
  base_key = jax.random.key(int(config.seed))
  # A separate stream from parameter init, named so that other uses of the seed cannot collide.
  aug_key = jax.random.fold_in(base_key, 0x5EED)
  with_ema = _ema_enabled(config)
  if with_ema:
    decay = float(config.train.ema.decay)
    warmup = int(config.train.ema.warmup_steps)

  def train_step(state, image, labels):
    step = state["step"]
    batch = transform(jax.random.fold_in(aug_key, step), image, labels)

    def loss_of(params):
      model = nnx.merge(graphdef, params, state["rest"])
      logits = model(batch["image"])
      total, parts = objective(logits, batch)
      _, _, rest = nnx.split(model, nnx.Param, ...)
      return total, (parts, nnx.to_pure_dict(rest))

    (loss, (parts, rest)), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(state):
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
      return {
        "step": step + 1,
        "params": params,
        "rest": rest,
        "opt_state": opt_state,
        "ema": ema_lib.ema_update(state["ema"], params, step, decay, warmup) if with_ema else None,
      }

    # A branch rather than ``where(finite, new, old)`` over the state: with the select, the old
    # parameters, moments and EMA are still read when the new ones are written into their donated
    # buffers, so XLA copies them, early, and keeps the copies through the backward pass (0.7 GB
    # for MedNeXt-L; docs/memory.md).
    new = jax.lax.cond(finite, update, lambda state: state, state)
    metrics = {
      "loss": loss,
      **parts,  # loss_per_channel (+ loss_affinity, loss_lsd)
      "grad_norm": grad_norm,
      "lr": lr_fn(step),
      "finite": finite,
    }
    return new, metrics

  repl = sharding.replicated
  return jax.jit(
    train_step,
    in_shardings=(repl, sharding.batch, sharding.batch),
    out_shardings=(repl, repl),
    donate_argnums=(0,),
  )


def make_eval_step(config, graphdef, sharding, read_shape):
  """The jitted ``eval_step(params, rest, image, labels) -> (sums, preview)``.

  ``sums``: ``loss`` and ``loss_per_channel`` of the batch (with local shape descriptors also
  ``loss_affinity`` and ``loss_lsd``), ``correct`` / ``valid`` entry counts for the affinity
  accuracy. ``preview``: the mid-z slice of the first sample's ``image`` ``[Y, X, c]``, ``target``
  and ``prediction`` (probabilities) ``[Y, X, n_aff]``.
  """
  transform = _make_batch_fn(config, read_shape, train=False)
  objective = losses.make_objective(config)
  n_aff, _ = targets.model_out_channels(config)

  def eval_step(params, rest, image, labels):
    batch = transform(None, image, labels)
    model = nnx.merge(graphdef, params, rest)
    logits = model(batch["image"])
    total, parts = objective(logits, batch)
    logits = logits[..., :n_aff]  # the affinity channels
    correct, valid = losses.accuracy_counts(logits, batch["target"], batch["mask"])
    mid = batch["image"].shape[1] // 2
    preview = {
      "image": batch["image"][0, mid],
      "target": batch["target"][0, mid],
      "prediction": jax.nn.sigmoid(logits[0, mid].astype(jnp.float32)),
    }
    sums = {"loss": total, **parts, "correct": correct, "valid": valid}
    return sums, preview

  repl = sharding.replicated
  return jax.jit(
    eval_step,
    in_shardings=(repl, repl, sharding.batch, sharding.batch),
    out_shardings=(repl, repl),
  )


# -- helpers -----------------------------------------------------------------------------------


def _format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = round(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _channel_scalars(prefix: str, values) -> dict[str, float]:
  return {f"{prefix}_c{i}": float(v) for i, v in enumerate(np.asarray(values).ravel())}


def _check_batch_geometry(config) -> None:
  from jaxseg.models import input_multiple

  targets.check_out_channels(config)  # model.out_channels = affinities (+ 10 descriptors)
  patch = tuple(int(p) for p in config.data.patch_size)
  multiple = input_multiple(config.model)
  if any(p % m for p, m in zip(patch, multiple, strict=True)):
    raise ConfigError(
      f"data.patch_size {patch} must be a multiple of {multiple} (z, y, x) for model "
      f"{config.model.name!r} with these settings"
    )
  if int(config.train.batch_size) < 1:
    raise ConfigError(f"train.batch_size (per device) must be >= 1, got {config.train.batch_size}")


def _eval_enabled(config) -> bool:
  return int(config.train.eval_every) > 0 and int(config.train.eval_batches) > 0


class _Evaluator:
  """Runs validation on the fixed val crops with the EMA (or raw) parameters.

  On ``split="train"`` (``train.preview_every`` without validation) the same fixed, unaugmented
  crops come from the training volumes: a preview of what the net makes of its training data.
  """

  def __init__(
    self, config, graphdef, sharding, local_batch: int, volumes, split="val", n_batches=None
  ):
    self.data = pipeline.TrainData(
      config,
      split,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      volumes=volumes,
    )
    self.step_fn = make_eval_step(config, graphdef, sharding, self.data.read_shape)
    self.sharding = sharding
    self.local_batch = local_batch
    self.n_batches = int(config.train.eval_batches if n_batches is None else n_batches)

  def __call__(self, params, rest) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    totals, preview = [], None
    with self.data.eval_batches(self.local_batch, self.n_batches) as batches:
      for host_batch in batches:
        batch = sharding_lib.to_global(host_batch, self.sharding)
        sums, pre = self.step_fn(params, rest, batch["image"], batch["labels"])
        totals.append(sums)
        preview = pre if preview is None else preview
    totals = jax.device_get(totals)
    loss = float(np.mean([t["loss"] for t in totals]))
    per_channel = np.mean([t["loss_per_channel"] for t in totals], axis=0)
    correct = float(np.sum([t["correct"] for t in totals]))
    valid = float(np.sum([t["valid"] for t in totals]))
    metrics = {"loss": loss, "accuracy": correct / max(valid, 1.0)}
    metrics.update(
      {k: float(np.mean([t[k] for t in totals])) for k in _PART_LOSSES if k in totals[0]}
    )
    metrics.update(_channel_scalars("loss", per_channel))
    return metrics, jax.device_get(preview)


def _restore_state(manager, step: int, state: dict, sharding) -> dict:
  """The train state of checkpoint ``step``, restored onto ``state``'s shapes and shardings."""
  has_ema = bool(manager.meta(step).get("ema"))
  restored = manager.restore(
    step,
    params=state["params"],
    train={"step": state["step"], "opt_state": state["opt_state"], "rest": state["rest"]},
    ema=state["ema"] if has_ema else None,
    sharding=sharding.replicated,
  )
  ema = restored.get("ema")
  if state["ema"] is not None and ema is None:
    # EMA switched on for a run that had none: start the average from the restored weights.
    logging.warning("checkpoint %d has no EMA; starting the EMA from its parameters", step)
    ema = jax.tree.map(jnp.copy, restored["params"])
  elif state["ema"] is None:
    ema = None
  new = {**restored["train"], "params": restored["params"], "ema": ema}
  if int(new["step"]) != step:
    raise ValueError(f"checkpoint {step} in {manager.directory} holds step {int(new['step'])}")
  return new


# -- the loop ------------------------------------------------------------------------------------


class _TrainingRun:
  """What one :func:`train_and_evaluate` call's steps share: settings, state, data and counters.

  Built in the order the run needs them (settings, checkpoints, train state, data and writers);
  :meth:`run` then trains from ``step`` to ``end`` and :meth:`result` reports. The contexts it
  opens (checkpoint manager, metric writer, batch stream) are closed by the caller's ``stack``.
  """

  def __init__(
    self,
    config,
    workdir: str,
    stack: contextlib.ExitStack,
    *,
    stop_at: int | None,
    abstract_params: dict,
    volumes: dict,
  ):
    """``abstract_params``: the model's parameter shapes (:func:`model_graphdef`); ``volumes``:
    the opened volumes of ``train`` (and ``val`` when validating), by split."""
    self.config, self.workdir, self.stack = config, workdir, stack
    self.abstract_params, self.volumes = abstract_params, volumes
    train_cfg = config.train
    self.num_steps = int(train_cfg.num_steps)
    self.is_main = jax.process_index() == 0
    self.sharding = sharding_lib.create_sharding(int(train_cfg.mesh_devices))
    self.per_device = int(train_cfg.batch_size)
    self.global_batch = sharding_lib.global_batch_size(self.per_device, self.sharding)
    self.local_batch = sharding_lib.local_batch_size(self.per_device, self.sharding)
    self.monitor = str(train_cfg.monitor)
    if self.monitor.startswith("val_") and not _eval_enabled(config):
      logging.warning(
        "train.monitor=%r but validation is off (train.eval_every / train.eval_batches): only the "
        "latest checkpoint (and train.keep_every milestones) will be kept",
        self.monitor,
      )
    self._open_checkpoints()
    self._init_state(stop_at)
    self._build_steps()
    self._init_counters()

  # -- setup ---------------------------------------------------------------------------------------

  def _open_checkpoints(self) -> None:
    """The checkpoint manager and optimizer; refuses another model's checkpoints, saves config."""
    config, train_cfg = self.config, self.config.train
    self.manager = ckpt_lib.CheckpointManager(
      os.path.join(self.workdir, paths.CHECKPOINT_DIR),
      keep_top_k=int(train_cfg.keep_top_k),
      monitor=self.monitor,
      monitor_mode=str(train_cfg.monitor_mode),
      keep_every=int(train_cfg.keep_every),
    )
    self.stack.callback(self.manager.close)
    self.tx = optim.create_optimizer(config.optim, self.num_steps)
    self.start = self.manager.latest_step()
    if self.start is not None:
      # Before anything is written: a different model in this workdir is a user error to report,
      # not a shape mismatch deep inside orbax.
      self.manager.check_model(self.start, config.model, self.abstract_params)
    if self.is_main:
      config_util.save_config(config, self.workdir)

  def _init_state(self, stop_at: int | None) -> None:
    """The train state: fresh, or the latest checkpoint's; ``step`` and ``end`` of this call."""
    self.graphdef, self.state = create_train_state(self.config, self.tx, self.sharding)
    if self.start is not None:
      self.state = _restore_state(self.manager, self.start, self.state, self.sharding)
      logging.info("resumed from %s at step %d", self.manager.directory, self.start)
    self.step = int(self.start or 0)
    self.end = self.num_steps if stop_at is None else min(int(stop_at), self.num_steps)

  def _build_steps(self) -> None:
    """The train data and step, the evaluator, the metric writer and the loop's cadences."""
    config, train_cfg = self.config, self.config.train
    self.train_data = pipeline.TrainData(
      config,
      "train",
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      volumes=self.volumes["train"],
    )
    self.train_step = make_train_step(
      config, self.graphdef, self.tx, self.sharding, self.train_data.read_shape
    )
    self.evaluator = (
      _Evaluator(config, self.graphdef, self.sharding, self.local_batch, self.volumes["val"])
      if _eval_enabled(config)
      else None
    )
    # Previews of a fixed training crop where there is no validation to show (SNEMI: PyTC logs
    # image previews every 10 epochs and holds no validation volume out).
    self.preview_every = int(train_cfg.get("preview_every", 0))
    self.previewer = (
      _Evaluator(
        config, self.graphdef, self.sharding, self.local_batch, self.volumes["train"], "train", 1
      )
      if self.preview_every > 0 and self.evaluator is None
      else None
    )
    self.writer = summary.MetricWriter(self.workdir, enabled=self.is_main)
    self.stack.callback(self.writer.close)
    self.voxels_per_step = self.global_batch * math.prod(int(p) for p in config.data.patch_size)
    self.log_every = max(1, int(train_cfg.log_every))
    self.eval_every = int(train_cfg.eval_every)
    self.ckpt_every = int(train_cfg.checkpoint_every)
    self.monitor_on_val = self.monitor.startswith("val_")
    logging.info(
      "training %s: %d steps from step %d, global batch %d (%d per device x %d devices), "
      "patch %s, workdir %s",
      config.name,
      self.num_steps,
      self.step,
      self.global_batch,
      self.per_device,
      self.sharding.num_devices,
      tuple(config.data.patch_size),
      self.workdir,
    )

  def _init_counters(self) -> None:
    self.pending: list[tuple[int, dict]] = []  # (step, device metrics) not yet read back
    self.window: list[dict] = []  # host metrics since the last log line
    self.since_save: list[float] = []  # train losses since the last checkpoint
    self.last_train_loss = None
    self.last_val: dict[str, Any] | None = None
    self.t_window = time.perf_counter()
    self.steps_window = 0
    self.overhead = 0.0  # seconds spent on validation / checkpoints inside the current window

  # -- the step loop -------------------------------------------------------------------------------

  def run(self) -> None:
    """Trains from ``step`` to ``end``, logging, validating and checkpointing on the way."""
    if self.step < self.end:
      batches = self.stack.enter_context(self.train_data.iterate(self.step, self.local_batch))
    if self.evaluator is not None and self.step == 0:
      # The starting point of the validation curve (not checkpointed).
      self.last_val = self._evaluate(0)
    while self.step < self.end:
      batch_step, host_batch = next(batches)
      assert batch_step == self.step, (batch_step, self.step)
      batch = sharding_lib.to_global(host_batch, self.sharding)
      self.state, metrics = self.train_step(self.state, batch["image"], batch["labels"])
      self.pending.append((self.step, metrics))
      self.step += 1
      self.steps_window += 1
      is_stop = self.step == self.end
      if self.step % self.log_every == 0 or is_stop:
        self._log_window()
      self._evaluate_and_save(is_stop)

  def _drain(self) -> None:
    """Reads back the pending step metrics; raises on the first non-finite one."""
    if not self.pending:
      return
    fetched = jax.device_get([m for _, m in self.pending])
    steps = [s for s, _ in self.pending]
    self.pending.clear()
    for s, m in zip(steps, fetched, strict=True):
      if not bool(m["finite"]):
        raise self._non_finite(s, m)
      self.window.append(m)
      self.since_save.append(float(m["loss"]))
      self.last_train_loss = float(m["loss"])

  def _non_finite(self, step: int, metrics: dict) -> NonFiniteLossError:
    latest = self.manager.latest_step()
    kept = (
      f"the last good checkpoint is step {latest} in {self.manager.directory}"
      if latest is not None
      else "no checkpoint had been saved yet"
    )
    return NonFiniteLossError(
      f"non-finite training loss at step {step} (loss {float(metrics['loss'])}, gradient norm "
      f"{float(metrics['grad_norm'])}); the update was not applied and {kept}. Try a lower "
      "optim.lr or a smaller optim.grad_clip, train.mixed_precision=False, and check the "
      "input data (NaN / Inf image values, labels) of this step's crops."
    )

  # -- logging window ------------------------------------------------------------------------------

  def _log_window(self) -> None:
    """The progress line and train scalars of the steps since the last one; opens a new window."""
    self._drain()
    step, num_steps, window = self.step, self.num_steps, self.window
    elapsed = max(time.perf_counter() - self.t_window - self.overhead, 1e-9)
    rate = self.steps_window / elapsed
    keys = ("loss", "grad_norm", *(k for k in _PART_LOSSES if k in window[0]))
    mean = {k: float(np.mean([m[k] for m in window])) for k in keys}
    self.last_train_loss = mean["loss"]  # one augmented batch is too noisy to report alone
    scalars = {
      **mean,
      "lr": float(window[-1]["lr"]),
      "steps_per_s": rate,
      "voxels_per_s": rate * self.voxels_per_step,
    }
    scalars.update(
      _channel_scalars("loss", np.mean([m["loss_per_channel"] for m in window], axis=0))
    )
    self.writer.write_scalars(step, scalars, kind="train")
    logging.info(
      "step %d/%d  loss %.4f  lr %.3g  %.2f steps/s  %.3g voxels/s  ETA %s",
      step,
      num_steps,
      mean["loss"],
      scalars["lr"],
      rate,
      scalars["voxels_per_s"],
      _format_duration((num_steps - step) / rate),
    )
    window.clear()
    self.steps_window, self.overhead, self.t_window = 0, 0.0, time.perf_counter()

  # -- evaluation and checkpoints ------------------------------------------------------------------

  def _evaluate_and_save(self, is_stop: bool) -> None:
    """Validation and a checkpoint where due after this step; their time is kept off the rate."""
    step = self.step
    is_last = step == self.num_steps
    t0 = time.perf_counter()
    evaluated = None
    if self.evaluator is not None and (step % self.eval_every == 0 or is_last):
      self._drain()
      evaluated = self.last_val = self._evaluate(step)
    if self.previewer is not None and (step % self.preview_every == 0 or is_last):
      self._drain()
      self._preview(step)
    periodic = self.ckpt_every > 0 and step % self.ckpt_every == 0
    if periodic or is_stop or (evaluated is not None and self.monitor_on_val):
      self._save(step, evaluated)
    self.overhead += time.perf_counter() - t0

  def _preview(self, at: int) -> None:
    """``train/preview`` (TensorBoard and ``previews/train_preview.png``): a fixed training crop's
    mid-z slice, its affinity targets and the prediction of the EMA (or raw) weights."""
    state = self.state
    params = state["ema"] if state["ema"] is not None else state["params"]
    _, preview = self.previewer(params, state["rest"])
    self.writer.write_image(
      at, "train/preview", summary.preview_grid(preview["image"], preview["target"],
                                                preview["prediction"])
    )  # fmt: skip

  def _evaluate(self, at: int) -> dict:
    state = self.state
    params = state["ema"] if state["ema"] is not None else state["params"]
    t0 = time.perf_counter()
    metrics, preview = self.evaluator(params, state["rest"])
    self.writer.write_scalars(at, metrics, kind="val")
    self.writer.write_image(
      at, "val/preview", summary.preview_grid(preview["image"], preview["target"],
                                              preview["prediction"])
    )  # fmt: skip
    if self.is_main:
      summary.plot_training_curves(self.workdir)
    logging.info(
      "step %d: val loss %.4f, accuracy %.4f (%d batches, %.1fs)",
      at,
      metrics["loss"],
      metrics["accuracy"],
      self.evaluator.n_batches,
      time.perf_counter() - t0,
    )
    return metrics

  def _save(self, at: int, val_metrics: dict | None) -> None:
    self._drain()  # never checkpoint past an unchecked (possibly NaN) step
    metrics = {}
    if self.since_save:
      metrics["train_loss"] = float(np.mean(self.since_save))
    if val_metrics is not None:
      metrics["val_loss"] = val_metrics["loss"]
      metrics["val_accuracy"] = val_metrics["accuracy"]
    state = self.state
    self.manager.save(
      at,
      params=state["params"],
      train={"step": state["step"], "opt_state": state["opt_state"], "rest": state["rest"]},
      ema=state["ema"],
      metrics=metrics,
      model_config=self.config.model,
    )
    self.since_save.clear()

  # -- the result ----------------------------------------------------------------------------------

  def result(self) -> dict[str, Any]:
    manager, monitor = self.manager, self.monitor
    best = manager.best_step()
    return {
      "step": self.step,
      "train_loss": self.last_train_loss,
      "val_loss": self.last_val["loss"] if self.last_val else None,
      "monitor": monitor,
      "best_step": best,
      "best_value": manager.meta(best)["metrics"].get(monitor) if best is not None else None,
      "checkpoint_dir": manager.directory,
      "resumed_from": self.start,
    }


@outputs.writes_outputs
def train_and_evaluate(
  config, workdir: str, *, stop_at: int | None = None, overwrite: bool = False
) -> dict[str, Any]:
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint when there is one.

  Every ``train.log_every`` steps: a progress line (loss, lr, steps/s, voxels/s, ETA), scalars to
  TensorBoard and ``metrics.jsonl``. At step 0 of a fresh run, every ``train.eval_every`` steps
  and at the end (when ``train.eval_batches > 0``): validation loss and affinity accuracy on the
  fixed val crops with the EMA weights, plus a preview image. Checkpoints every
  ``train.checkpoint_every`` steps, at each validation when ``train.monitor`` is a validation
  metric, and at the end (or ``stop_at``); see :mod:`jaxseg.training.checkpoint` for what is
  kept.

  Args:
    config: the full, resolved config.
    workdir: output folder: new, empty, or this training's (see
      :func:`jaxseg.training.paths.training_output`).
    stop_at: stop after this step with a checkpoint, as a preempted or time-limited job would;
      the schedules still follow ``train.num_steps`` and a later call continues exactly.
    overwrite: start afresh in a workdir trained with other settings, deleting only that run's
      own files (checkpoints, logs, resolved config).

  Returns:
    ``{"step", "train_loss", "val_loss", "best_step", "best_value", "monitor",
    "checkpoint_dir", "resumed_from"}`` (``None`` where not applicable).

  Raises:
    NonFiniteLossError: the loss became NaN / Inf (the last good checkpoint is kept).
    IncompatibleCheckpointError: the workdir holds checkpoints of a different model.
    OutputError: the workdir holds files jaxseg did not make, or a run of other training
      settings (unless ``overwrite``).
    ValueError: bad settings or data (messages from the data pipeline name volume and shapes).
  """
  num_steps = int(config.train.num_steps)
  if num_steps < 1:
    raise ConfigError(f"train.num_steps must be >= 1, got {num_steps}")
  # Before anything is written, in the order a user fixes them: the model and batch settings,
  # then the data (a missing file or a bad entry of the split's volumes).
  _check_batch_geometry(config)
  # Every model.* key, abstractly (no weights); the shapes also check a resumed checkpoint.
  _, abstract_params, _ = model_graphdef(config, compute_dtype(config))
  splits = ("train", "val") if _eval_enabled(config) else ("train",)
  volumes = {split: dataset_volumes(config.data, split) for split in splits}
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  stage = paths.training_output(config, workdir)
  if is_main:
    # Before anything is written: the workdir is new, empty or this training's; a run of other
    # training settings is refused (or, with overwrite, only its own files are removed).
    stage.open(overwrite=overwrite)
  else:
    os.makedirs(workdir, exist_ok=True)

  with contextlib.ExitStack() as stack:
    run = _TrainingRun(
      config, workdir, stack, stop_at=stop_at, abstract_params=abstract_params, volumes=volumes
    )
    run.run()
    run.manager.wait()
    run.manager.prune()
    if is_main:
      summary.plot_training_curves(workdir)
      if run.step >= num_steps:
        stage.finish()
    result = run.result()
  logging.info("training done: %s", result)
  return result


# -- inference export ------------------------------------------------------------------------------


def restore_inference_model(
  config,
  path: str,
  step: int | str | None = None,
  *,
  use_ema: bool = True,
  dtype: str | None = None,
) -> tuple[nnx.Module, dict]:
  """The trained model from a checkpoint, with the EMA weights when the run kept them.

  Args:
    config: the config of the run (its ``model`` section builds the network).
    path: a workdir or its ``checkpoints`` folder.
    step: ``None`` / ``"latest"``, ``"best"`` (by ``train.monitor``; latest if none has it) or a
      step number.
    use_ema: load the EMA weights when the checkpoint has them (else the raw parameters).
    dtype: compute dtype of the returned model (default ``model.compute_dtype``).

  Returns:
    ``(model, info)``: the module (weights on the default device) and ``{"step", "weights"
    ("ema" or "params"), "metrics", "checkpoint_dir"}``.
  """
  directory = paths.checkpoint_dir(path)
  if not os.path.isdir(directory):
    raise MissingInputError(f"no checkpoints at {path} (looked for {directory})")
  manager = ckpt_lib.CheckpointManager(
    directory,
    keep_top_k=int(config.train.keep_top_k),
    monitor=str(config.train.monitor),
    monitor_mode=str(config.train.monitor_mode),
  )
  try:
    found = manager.resolve_step(step)
    graphdef, abstract_params, abstract_rest = model_graphdef(config, dtype)
    manager.check_model(found, config.model, abstract_params)
    restored = manager.restore_model(
      found, params=abstract_params, rest=abstract_rest, use_ema=use_ema
    )
    model = nnx.merge(graphdef, restored["params"], restored["rest"])
    info = {
      "step": found,
      "weights": restored["weights"],
      "metrics": manager.meta(found).get("metrics", {}),
      "checkpoint_dir": manager.directory,
    }
  finally:
    manager.close()
  return model, info
