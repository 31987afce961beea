"""Optimiser and learning-rate schedules (``config.optim``), as the PyTC recipes define them.

Owns :func:`create_learning_rate_fn` (step -> learning rate, jittable) and
:func:`create_optimizer` (gradient clipping, then AdamW with a weight-decay mask). The optimiser
works on any parameter pytree (an ``nnx.State`` of ``nnx.Param`` s or a plain nested dict).

Schedules (``optim.schedule``):

* ``warmup_cosine`` -- PyTC ``WarmupCosineLR`` (SNEMI). With ``e`` the epoch (``step //
  steps_per_epoch`` when ``step_per_epoch``, else the fractional ``step / steps_per_epoch``),
  ``E = num_steps / steps_per_epoch`` and ``W = warmup_steps / steps_per_epoch``::

      lr(e) = min_lr + (lr * w(e) - min_lr) * (1 + cos(pi * e / E)) / 2
      w(e)  = f * (1 - e / W) + e / W   for e < W, else 1        (f = warmup_start_factor)

  The cosine is multiplied by the warmup factor, not shifted after it (PyTC's formula).
* ``cosine`` -- PyTorch ``CosineAnnealingLR`` stepped every step (NISB / BANIS), no warmup::

      lr(t) = min_lr + (lr - min_lr) * (1 + cos(pi * t / T)) / 2,   T = num_steps

* ``constant`` -- ``lr`` at every step (tests, debugging).

Past the end of the schedule (``e > E``, ``t > T``) the value stays at the final one instead of
following the cosine back up, so training a little longer than planned is harmless.

Step ``k`` (0-based, the ``k``-th optimizer update) uses ``lr(k)``: optax passes the count of
updates already applied, exactly as a PyTorch scheduler stepped after each ``optimizer.step()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxseg.common.errors import ConfigError

SCHEDULES = ("warmup_cosine", "cosine", "constant")

# Parameter names that never get weight decay (besides the ndim rule, see `decay_mask`).
_NO_DECAY_NAMES = frozenset({"bias", "scale"})


def create_learning_rate_fn(optim_config, num_steps: int) -> Callable[[jax.Array], jax.Array]:
  """Returns ``schedule(step) -> lr`` (float32; works on Python ints and traced arrays).

  Args:
    optim_config: ``config.optim`` (``schedule``, ``lr``, ``min_lr``, ``warmup_steps``,
      ``warmup_start_factor``, ``steps_per_epoch``, ``step_per_epoch``).
    num_steps: total optimizer steps of the run (``config.train.num_steps``).
  """
  name = optim_config.schedule
  base_lr = float(optim_config.lr)
  if num_steps <= 0:
    raise ConfigError(f"train.num_steps must be positive, got {num_steps}")
  if name == "constant":
    return lambda step: jnp.full((), base_lr, jnp.float32)
  min_lr = float(optim_config.min_lr)
  warmup_steps = int(optim_config.warmup_steps)
  if name == "cosine":
    if warmup_steps:
      raise ConfigError(
        "optim.schedule='cosine' has no warmup (PyTorch CosineAnnealingLR); set "
        "optim.warmup_steps=0 or use optim.schedule='warmup_cosine'"
      )
    total = float(num_steps)

    def cosine(step):
      t = jnp.minimum(jnp.asarray(step, jnp.float32), total)
      return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * t / total))

    return cosine
  if name == "warmup_cosine":
    steps_per_epoch = int(optim_config.steps_per_epoch)
    if steps_per_epoch <= 0:
      raise ConfigError(f"optim.steps_per_epoch must be positive, got {steps_per_epoch}")
    per_epoch = bool(optim_config.step_per_epoch)
    start_factor = float(optim_config.warmup_start_factor)
    total_epochs = num_steps / steps_per_epoch
    warmup_epochs = warmup_steps / steps_per_epoch

    def warmup_cosine(step):
      step = jnp.asarray(step, jnp.int32 if per_epoch else jnp.float32)
      if per_epoch:
        epoch = (step // steps_per_epoch).astype(jnp.float32)
      else:
        epoch = step / steps_per_epoch
      epoch = jnp.minimum(epoch, total_epochs)
      if warmup_epochs > 0:
        frac = epoch / warmup_epochs
        warm = jnp.where(epoch < warmup_epochs, start_factor * (1.0 - frac) + frac, 1.0)
      else:
        warm = 1.0
      cos = 0.5 * (1.0 + jnp.cos(math.pi * epoch / total_epochs))
      return min_lr + (base_lr * warm - min_lr) * cos

    return warmup_cosine
  raise ConfigError(f"unknown optim.schedule {name!r}; valid: {', '.join(SCHEDULES)}")


def _path_names(path) -> list[str]:
  """Names along a pytree key path, without NNX's trailing ``.value`` attribute."""
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
  while names and names[-1] == "value":
    names.pop()
  return names


def decay_mask(params):
  """``True`` for the parameters that get weight decay: conv / dense kernels only.

  A parameter is decayed iff it has at least 2 dimensions and its name is not ``bias`` or
  ``scale``. Every convolution or dense kernel is >= 2-D (3-D convs: 5-D), while norm scales and
  offsets and biases are 1-D vectors, so the rank alone separates them whatever a model calls its
  layers; the name check is a second guard for a future 2-D scale. This is PyTC's "0 for norm
  layers", extended to biases as usual for AdamW (RSUNet has no conv bias; MedNeXt does).
  """

  def rule(path, leaf):
    names = _path_names(path)
    return bool(jnp.ndim(leaf) >= 2 and not (names and names[-1] in _NO_DECAY_NAMES))

  return jax.tree_util.tree_map_with_path(rule, params)


def create_optimizer(optim_config, num_steps: int) -> optax.GradientTransformation:
  """Gradient clipping by global norm (``optim.grad_clip``, 0 = off), then AdamW.

  AdamW follows ``torch.optim.AdamW``: ``eps`` added outside the square root, decoupled weight
  decay ``p -= lr * weight_decay * p`` scaled by the scheduled learning rate. Weight decay skips
  norm scales and biases (:func:`decay_mask`) unless ``optim.decay_norm_and_bias``.
  """
  if optim_config.name != "adamw":
    raise ConfigError(f"unknown optim.name {optim_config.name!r}; valid: adamw")
  schedule = create_learning_rate_fn(optim_config, num_steps)
  mask = None if optim_config.decay_norm_and_bias else decay_mask
  parts = []
  if optim_config.grad_clip and optim_config.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(float(optim_config.grad_clip)))
  parts.append(
    optax.adamw(
      schedule,
      b1=float(optim_config.b1),
      b2=float(optim_config.b2),
      eps=float(optim_config.eps),
      weight_decay=float(optim_config.weight_decay),
      mask=mask,
    )
  )
  return optax.chain(*parts)
