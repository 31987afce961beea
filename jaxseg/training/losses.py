"""Affinity losses and metrics on channels-last batches.

Every function takes ``logits``, ``target`` and ``mask`` of the same shape ``[b, z, y, x, c]``
(``mask`` may also broadcast to it, e.g. ``[b, z, y, x, 1]``): raw network outputs, affinity
targets in {0, 1} and the loss mask (> 0 = valid voxel, from the unlabeled label -1 and edges
whose partner lies outside the crop). Everything is computed in float32 whatever the logits' dtype
(bf16 under mixed precision), and reductions run over the whole (global) batch, so under
``jax.jit`` with a batch-sharded input the statistics are those of the global batch.

* :func:`per_channel_bce` -- PyTC ``PerChannelBCEWithLogitsLoss(auto_pos_weight,
  max_pos_weight=10)`` (SNEMI aff12, NISB v1/v3): per-channel positive weight, per-channel mean,
  SUM over channels.
* :func:`masked_bce` -- plain BCE, mean over all valid entries (BANIS, NISB base).
* :func:`affinity_accuracy` -- fraction of valid entries where ``sigmoid(logit) > 0.5`` agrees
  with ``target > 0.5``.
* :func:`lsd_mse` -- the local shape descriptor loss: masked mean squared error of
  ``sigmoid(logits)`` against the descriptors ``[b, z, y, x, 10]`` (mask ``[b, z, y, x, 1]``).
* :func:`make_objective` -- the training objective on the model's logits ``[b, z, y, x, n_aff
  (+ 10)]``: ``train.loss`` on the affinity channels, plus ``target.lsd.weight`` x :func:`lsd_mse`
  on the descriptor channels when ``target.lsd.enabled`` (``docs/targets_and_losses.md``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxseg.common.errors import ConfigError
from jaxseg.data.targets import check_out_channels, lsd_settings

LOSSES = ("per_channel_bce", "masked_bce")


def _prepare(logits, target, mask):
  logits = jnp.asarray(logits).astype(jnp.float32)
  target = jnp.asarray(target).astype(jnp.float32)
  valid = jnp.broadcast_to(jnp.asarray(mask) > 0, logits.shape).astype(jnp.float32)
  return logits, target, valid


def _bce_terms(x, y):
  """``(-y log s(x), -(1 - y) log(1 - s(x)))`` with stable log-sigmoids (softplus form)."""
  # log s(x) = -softplus(-x), log(1 - s(x)) = -softplus(x): no exp overflow, no log(0).
  return y * jax.nn.softplus(-x), (1.0 - y) * jax.nn.softplus(x)


def per_channel_bce(logits, target, mask, max_pos_weight: float = 10.0, logit_clamp: float = 20.0):
  """PyTC's per-channel BCE with automatic positive weight (``docs/targets_and_losses.md``).

  1. Logits are clamped to ``[-logit_clamp, logit_clamp]``.
  2. Per channel ``c``, over the whole batch and only valid voxels:
     ``pw_c = min(n_neg / n_pos, max_pos_weight)``, or 1 when ``n_pos == 0``.
  3. Element loss ``-[pw_c * y * log s(x) + (1 - y) * log(1 - s(x))]``.
  4. Channel loss = mean over that channel's valid voxels (0 for a channel without any).
  5. Total = SUM over channels (not the mean: 12 channels weigh 12 times one).

  The weight is a statistic of the targets, so no gradient flows through it.

  Returns:
    ``(total, per_channel)``: a float32 scalar and the float32 ``[c]`` channel losses.
  """
  x, y, valid = _prepare(logits, target, mask)
  if logit_clamp is not None and logit_clamp > 0:
    x = jnp.clip(x, -logit_clamp, logit_clamp)
  axes = tuple(range(x.ndim - 1))
  n_valid = jnp.sum(valid, axis=axes)
  n_pos = jnp.sum(valid * y, axis=axes)
  n_neg = jnp.sum(valid * (1.0 - y), axis=axes)
  pos_weight = jnp.where(
    n_pos > 0, jnp.minimum(n_neg / jnp.maximum(n_pos, 1e-12), max_pos_weight), 1.0
  )
  pos_weight = jax.lax.stop_gradient(pos_weight)
  pos_term, neg_term = _bce_terms(x, y)
  elem = pos_weight * pos_term + neg_term
  per_channel = jnp.sum(valid * elem, axis=axes) / jnp.maximum(n_valid, 1.0)
  return jnp.sum(per_channel), per_channel


def masked_bce(logits, target, mask, logit_clamp: float | None = None):
  """Plain BCE with logits, mean over all valid entries of all channels (BANIS ``base``).

  Args:
    logit_clamp: optional clamp of the logits (BANIS has none; ``None`` or 0 = no clamp).

  Returns:
    ``(total, per_channel)``: the mean over every valid entry, and for logging each channel's own
    mean (``total`` is NOT the mean of ``per_channel`` when channels have different valid counts).
  """
  x, y, valid = _prepare(logits, target, mask)
  if logit_clamp:
    x = jnp.clip(x, -logit_clamp, logit_clamp)
  pos_term, neg_term = _bce_terms(x, y)
  elem = valid * (pos_term + neg_term)
  axes = tuple(range(x.ndim - 1))
  per_channel_sum = jnp.sum(elem, axis=axes)
  per_channel_n = jnp.sum(valid, axis=axes)
  total = jnp.sum(per_channel_sum) / jnp.maximum(jnp.sum(per_channel_n), 1.0)
  return total, per_channel_sum / jnp.maximum(per_channel_n, 1.0)


def accuracy_counts(logits, target, mask):
  """``(correct, valid)`` entry counts (float32 scalars) behind :func:`affinity_accuracy`."""
  x, y, valid = _prepare(logits, target, mask)
  # sigmoid(x) > 0.5 exactly when x > 0.
  agree = ((x > 0) == (y > 0.5)).astype(jnp.float32)
  return jnp.sum(valid * agree), jnp.sum(valid)


def affinity_accuracy(logits, target, mask):
  """Fraction of valid entries with ``(sigmoid(logit) > 0.5) == (target > 0.5)`` (0 if none)."""
  correct, n = accuracy_counts(logits, target, mask)
  return correct / jnp.maximum(n, 1.0)


def make_loss_fn(train_config):
  """``loss(logits, target, mask) -> (total, per_channel)`` for ``train.loss``."""
  name = train_config.loss
  if name == "per_channel_bce":
    max_pw = float(train_config.max_pos_weight)
    clamp = float(train_config.logit_clamp)
    return lambda logits, target, mask: per_channel_bce(logits, target, mask, max_pw, clamp)
  if name == "masked_bce":
    return lambda logits, target, mask: masked_bce(logits, target, mask)
  raise ConfigError(f"unknown train.loss {name!r}; valid: {', '.join(LOSSES)}")


def lsd_mse(logits, target, mask):
  """Mean of ``(sigmoid(logits) - target)^2`` over the valid entries (0 if there are none).

  ``logits`` and ``target`` are ``[b, z, y, x, 10]``, ``mask`` ``[b, z, y, x, 1]`` (broadcast over
  the descriptor channels), all reduced in float32 over the whole (global) batch.
  """
  x, y, valid = _prepare(logits, target, mask)
  err = jnp.square(jax.nn.sigmoid(x) - y)
  return jnp.sum(valid * err) / jnp.maximum(jnp.sum(valid), 1.0)


def make_objective(config):
  """``objective(logits, batch) -> (total, aux)`` on the model's logits ``[b, z, y, x, C]``.

  ``batch`` holds ``target`` / ``mask`` ``[b, z, y, x, n_aff]`` and, when ``target.lsd.enabled``,
  ``lsd_target`` ``[b, z, y, x, 10]`` / ``lsd_mask`` ``[b, z, y, x, 1]``. The affinity loss is
  ``train.loss`` on channels ``[:n_aff]``; with descriptors, ``total = affinity loss +
  target.lsd.weight * lsd_mse(channels [n_aff:])``. ``aux``: ``loss_per_channel`` (the affinity
  channels) and, with descriptors, the scalars ``loss_affinity`` and ``loss_lsd``.

  Raises:
    ConfigError: ``model.out_channels`` is not ``n_aff`` (+ 10 with descriptors), or a bad
      ``train.loss`` / ``target.lsd`` setting.
  """
  n_aff, n_lsd = check_out_channels(config)
  loss_fn = make_loss_fn(config.train)
  if not n_lsd:

    def affinity_only(logits, batch):
      total, per_channel = loss_fn(logits, batch["target"], batch["mask"])
      return total, {"loss_per_channel": per_channel}

    return affinity_only
  weight = lsd_settings(config).weight

  def with_lsd(logits, batch):
    affinity, per_channel = loss_fn(logits[..., :n_aff], batch["target"], batch["mask"])
    lsd = lsd_mse(logits[..., n_aff:], batch["lsd_target"], batch["lsd_mask"])
    aux = {"loss_per_channel": per_channel, "loss_affinity": affinity, "loss_lsd": lsd}
    return affinity + weight * lsd, aux

  return with_lsd
