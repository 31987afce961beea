"""Exponential moving average of the model parameters, with PyTC's decay warmup.

After every optimizer step (``count`` = number of EMA updates already done, i.e. the step before
it is incremented)::

    d = 0 if count < warmup_steps else decay
    ema <- d * ema + (1 - d) * params

so the first ``warmup_steps`` updates are plain copies and the average only starts once the
weights have left their random initialisation. The EMA covers ``nnx.Param`` s only; any other
model state (none in RSUNet / MedNeXt, which use GroupNorm) is taken from the live model, as
PyTC copies buffers instead of averaging them. Works on any pytree of float arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ema_decay(count, decay: float, warmup_steps: int) -> jax.Array:
  """The decay of the update that follows ``count`` earlier updates (float32 scalar)."""
  return jnp.where(jnp.asarray(count) < warmup_steps, 0.0, decay).astype(jnp.float32)


def ema_update(ema, params, count, decay: float, warmup_steps: int):
  """One EMA update: ``d * ema + (1 - d) * params`` with ``d = ema_decay(count, ...)``.

  Args:
    ema: the current average (same pytree structure as ``params``).
    params: the parameters after the optimizer step.
    count: updates done before this one (the training step index, 0-based).
    decay: the decay after warmup (0.999 in the recipes).
    warmup_steps: number of initial updates that copy ``params`` (decay 0).

  Returns:
    The new average, in each leaf's dtype.
  """
  d = ema_decay(count, decay, warmup_steps)

  def one(e, p):
    mixed = d * e.astype(jnp.float32) + (1.0 - d) * p.astype(jnp.float32)
    # With d == 0 this is exactly p (0 * e + 1 * p), also for non-finite e.
    return jnp.where(d == 0, p.astype(jnp.float32), mixed).astype(e.dtype)

  return jax.tree.map(one, ema, params)
