"""Affinity losses and accuracy against straightforward float64 numpy references."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxseg.training import losses


def _np_per_channel_bce(x, y, m, max_pw=10.0, clamp=20.0):
  """docs/targets_and_losses.md "Losses", literally, in float64 with loops over channels."""
  x = np.clip(x.astype(np.float64), -clamp, clamp)
  y = y.astype(np.float64)
  per = []
  for c in range(x.shape[-1]):
    valid = m[..., c] > 0
    xc, yc = x[..., c][valid], y[..., c][valid]
    n_pos = yc.sum()
    n_neg = (1 - yc).sum()
    pw = min(n_neg / n_pos, max_pw) if n_pos > 0 else 1.0
    sig = 1 / (1 + np.exp(-xc))
    elem = -(pw * yc * np.log(sig) + (1 - yc) * np.log(1 - sig))
    per.append(elem.mean() if elem.size else 0.0)
  return float(np.sum(per)), np.asarray(per)


def _random_case(seed, shape=(2, 3, 5, 6, 4)):
  rng = np.random.default_rng(seed)
  x = rng.normal(0, 4, shape).astype(np.float32)
  y = (rng.random(shape) < 0.8).astype(np.float32)
  m = (rng.random(shape) < 0.7).astype(np.float32)
  y[..., 1] = 0  # a channel without positives: weight 1
  m[..., 2] = 0  # a channel without valid voxels: loss 0
  y[..., 3] = (rng.random(shape[:-1]) < 0.02).astype(np.float32)  # rare positives: capped at 10
  x[0, 0, 0, 0, 0] = 60.0  # beyond the clamp
  return x, y, m


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_channel_bce_matches_numpy(seed):
  x, y, m = _random_case(seed)
  total, per = jax.jit(losses.per_channel_bce)(x, y, m)
  want_total, want_per = _np_per_channel_bce(x, y, m)
  np.testing.assert_allclose(np.asarray(per), want_per, rtol=1e-5, atol=1e-6)
  assert float(total) == pytest.approx(want_total, rel=1e-5)
  assert float(per[2]) == 0.0


def test_per_channel_bce_bf16_logits_computed_in_float32():
  x, y, m = _random_case(3)
  xb = jnp.asarray(x, jnp.bfloat16)
  total, per = losses.per_channel_bce(xb, y, m)
  assert total.dtype == jnp.float32 and per.dtype == jnp.float32
  want, _ = _np_per_channel_bce(np.asarray(xb.astype(jnp.float32)), y, m)
  assert float(total) == pytest.approx(want, rel=1e-5)


def test_per_channel_bce_extreme_logits_are_finite_with_finite_gradients():
  shape = (1, 2, 3, 3, 2)
  x = np.full(shape, 1e4, np.float32)
  x[..., 1] = -1e4
  y = np.zeros(shape, np.float32)
  y[..., 1] = 1
  m = np.ones(shape, np.float32)
  total, grads = jax.value_and_grad(lambda a: losses.per_channel_bce(a, y, m)[0])(jnp.asarray(x))
  assert np.isfinite(float(total)) and np.all(np.isfinite(np.asarray(grads)))
  # Clamped at 20: each channel is softplus(20) (wrong with full confidence), pw = 0 on ch 1
  # (all valid voxels positive: n_neg / n_pos = 0), so only channel 0 counts.
  assert float(total) == pytest.approx(np.log1p(np.exp(20.0)), rel=1e-6)
  # No gradient beyond the clamp, as in PyTorch's clamp.
  assert np.all(np.asarray(grads) == 0)


def test_per_channel_bce_broadcast_mask_and_weight_cap():
  rng = np.random.default_rng(4)
  shape = (2, 2, 4, 4, 3)
  x = rng.normal(size=shape).astype(np.float32)
  y = (rng.random(shape) < 0.05).astype(np.float32)
  m1 = (rng.random((*shape[:-1], 1)) < 0.8).astype(np.float32)
  total, per = losses.per_channel_bce(x, y, m1, max_pos_weight=3.0, logit_clamp=5.0)
  want_total, want_per = _np_per_channel_bce(x, y, np.broadcast_to(m1, shape), 3.0, 5.0)
  np.testing.assert_allclose(np.asarray(per), want_per, rtol=1e-5)
  assert float(total) == pytest.approx(want_total, rel=1e-5)


def _np_masked_bce(x, y, m):
  x, y = x.astype(np.float64), y.astype(np.float64)
  sig = 1 / (1 + np.exp(-x))
  elem = -(y * np.log(sig) + (1 - y) * np.log(1 - sig))
  valid = m > 0
  per = np.array([elem[..., c][valid[..., c]].mean() for c in range(x.shape[-1])])
  return elem[valid].mean(), per


def test_masked_bce_is_mean_over_all_valid_entries():
  rng = np.random.default_rng(5)
  shape = (2, 3, 4, 5, 3)
  x = rng.normal(0, 3, shape).astype(np.float32)
  y = (rng.random(shape) < 0.5).astype(np.float32)
  m = (rng.random(shape) < 0.6).astype(np.float32)
  m[..., 0] = 1  # different valid counts per channel: total != mean of channel means
  total, per = losses.masked_bce(x, y, m)
  want_total, want_per = _np_masked_bce(x, y, m)
  assert float(total) == pytest.approx(want_total, rel=1e-5)
  np.testing.assert_allclose(np.asarray(per), want_per, rtol=1e-5)
  assert float(total) != pytest.approx(float(np.mean(want_per)), rel=1e-3)


def test_affinity_accuracy():
  x = np.array([3.0, -1.0, 0.5, -2.0, 4.0, -0.1], np.float32).reshape(1, 1, 1, 6, 1)
  y = np.array([1, 0, 0, 1, 1, 0], np.float32).reshape(x.shape)
  m = np.array([1, 1, 1, 1, 0, 1], np.float32).reshape(x.shape)
  # Valid: (3,1) ok, (-1,0) ok, (.5,0) wrong, (-2,1) wrong, (-.1,0) ok -> 3 / 5.
  assert float(losses.affinity_accuracy(x, y, m)) == pytest.approx(0.6)
  correct, n = losses.accuracy_counts(x, y, m)
  assert (float(correct), float(n)) == (3.0, 5.0)
  assert float(losses.affinity_accuracy(x, y, np.zeros_like(m))) == 0.0


def test_make_loss_fn():
  x, y, m = _random_case(6)
  train = ml_collections.ConfigDict(
    {"loss": "per_channel_bce", "max_pos_weight": 10.0, "logit_clamp": 20.0}
  )
  assert float(losses.make_loss_fn(train)(x, y, m)[0]) == pytest.approx(
    _np_per_channel_bce(x, y, m)[0], rel=1e-5
  )
  train.loss = "masked_bce"
  assert float(losses.make_loss_fn(train)(x, y, m)[0]) == pytest.approx(
    float(losses.masked_bce(x, y, m)[0])
  )
  train.loss = "dice"
  with pytest.raises(ValueError, match=r"unknown train\.loss"):
    losses.make_loss_fn(train)
