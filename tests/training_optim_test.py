"""Schedules (against the PyTC / PyTorch formulas), AdamW with its decay mask, EMA warmup."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from jaxseg.common.config_util import load_config
from jaxseg.training import ema as ema_lib
from jaxseg.training import optim

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _pytc_warmup_cosine(step, lr, min_lr, f, warmup_steps, num_steps, spe, per_epoch):
  """PyTC WarmupCosineLR, written out directly from docs/recipes.md (float64)."""
  e = step // spe if per_epoch else step / spe
  big_e, big_w = num_steps / spe, warmup_steps / spe
  w = f * (1 - e / big_w) + e / big_w if e < big_w else 1.0
  return min_lr + (lr * w - min_lr) * 0.5 * (1 + math.cos(math.pi * e / big_e))


def _torch_cosine_annealing(step, lr, eta_min, t_max):
  return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * step / t_max)) / 2


def test_snemi_warmup_cosine_matches_pytc_per_epoch():
  config = load_config(str(CONFIGS / "snemi.py"))
  num_steps = config.train.num_steps
  fn = jax.jit(optim.create_learning_rate_fn(config.optim, num_steps))
  steps = np.unique(
    np.concatenate([np.arange(0, num_steps, 997), [0, 999, 1000, 2999, 3000, 3001, num_steps - 1]])
  )
  got = np.asarray(jax.vmap(fn)(jnp.asarray(steps)))
  o = config.optim
  want = [
    _pytc_warmup_cosine(s, o.lr, o.min_lr, o.warmup_start_factor, o.warmup_steps, num_steps,
                        o.steps_per_epoch, True)
    for s in steps
  ]  # fmt: skip
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-12)
  # Constant within an epoch, and the first step uses lr * factor (the cosine times the warmup).
  assert float(fn(1000)) == float(fn(1999))
  assert float(fn(0)) == pytest.approx(3e-4 * 1e-5, rel=1e-4)
  assert float(fn(3000)) == pytest.approx(
    1e-6 + (3e-4 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 3 / 100))
  )


@pytest.mark.parametrize("per_epoch", [True, False])
def test_warmup_cosine_small_schedule(per_epoch):
  o = ml_collections.ConfigDict(
    dict(schedule="warmup_cosine", lr=1e-3, min_lr=1e-5, warmup_steps=30, warmup_start_factor=0.1,
         steps_per_epoch=10, step_per_epoch=per_epoch)
  )  # fmt: skip
  fn = optim.create_learning_rate_fn(o, 200)
  for s in range(0, 200, 3):
    want = _pytc_warmup_cosine(s, 1e-3, 1e-5, 0.1, 30, 200, 10, per_epoch)
    assert float(fn(s)) == pytest.approx(want, rel=1e-5), s


def test_nisb_cosine_matches_torch_per_step():
  config = load_config(str(CONFIGS / "nisb_base.py"))
  n = config.train.num_steps
  fn = jax.jit(jax.vmap(optim.create_learning_rate_fn(config.optim, n)))
  steps = np.concatenate([np.arange(0, n, 1234), [1, 2, n // 2, n - 1, n]])
  got = np.asarray(fn(jnp.asarray(steps)))
  want = [_torch_cosine_annealing(s, 1e-3, 0.0, n) for s in steps]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-10)
  assert float(fn(jnp.asarray([n + 50]))[0]) == pytest.approx(0.0, abs=1e-12)  # stays at the end


def test_cosine_with_warmup_or_unknown_schedule_raises():
  o = ml_collections.ConfigDict(dict(schedule="cosine", lr=1e-3, min_lr=0.0, warmup_steps=5))
  with pytest.raises(ValueError, match="no warmup"):
    optim.create_learning_rate_fn(o, 100)
  o.schedule = "linear"
  with pytest.raises(ValueError, match=r"unknown optim\.schedule"):
    optim.create_learning_rate_fn(o, 100)


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 4, (3, 3, 3), rngs=rngs)
    self.norm = nnx.GroupNorm(4, num_groups=2, rngs=rngs)
    self.head = nnx.Conv(4, 3, (1, 1, 1), use_bias=False, rngs=rngs)


def test_decay_mask_skips_norms_and_biases():
  params = nnx.state(_Net(nnx.Rngs(0)), nnx.Param)
  mask = nnx.to_pure_dict(optim.decay_mask(params))
  assert mask == {
    "conv": {"kernel": True, "bias": False},
    "norm": {"scale": False, "bias": False},
    "head": {"kernel": True},
  }
  # Plain dicts work too (the rule is by rank and name, not by NNX types).
  plain = {"w": jnp.ones((2, 3)), "bias": jnp.ones(3), "g": {"scale": jnp.ones((2, 2))}}
  assert optim.decay_mask(plain) == {"w": True, "bias": False, "g": {"scale": False}}


def _numpy_adamw(p, g, m, v, t, lr, b1, b2, eps, wd, decay):
  """torch.optim.AdamW, one step (float64)."""
  if decay:
    p = p * (1 - lr * wd)
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * g * g
  mh, vh = m / (1 - b1**t), v / (1 - b2**t)
  return p - lr * mh / (np.sqrt(vh) + eps), m, v


@pytest.mark.parametrize("decay_all", [False, True])
def test_adamw_with_clipping_matches_torch_semantics(decay_all):
  o = ml_collections.ConfigDict(
    dict(name="adamw", schedule="constant", lr=0.01, weight_decay=0.1,
         decay_norm_and_bias=decay_all, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0)
  )  # fmt: skip
  rng = np.random.default_rng(0)
  params = {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=(4,))}
  tx = optim.create_optimizer(o, 10)
  p = jax.tree.map(jnp.float32, params)
  state = tx.init(p)
  ref = {k: v.copy() for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in params.items()}
  vv = {k: np.zeros_like(v) for k, v in params.items()}
  for t in range(1, 4):
    grads = {k: rng.normal(size=v.shape) * 3 for k, v in params.items()}
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
    clipped = {k: g * min(1.0, 1.0 / norm) for k, g in grads.items()}
    for k in params:
      decay = decay_all or k == "kernel"
      ref[k], m[k], vv[k] = _numpy_adamw(
        ref[k], clipped[k], m[k], vv[k], t, 0.01, 0.9, 0.999, 1e-8, 0.1, decay
      )
    updates, state = tx.update(jax.tree.map(jnp.float32, grads), state, p)
    p = optax.apply_updates(p, updates)
  for k in params:
    np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=1e-5, atol=1e-6)


def test_ema_warmup_copies_then_averages():
  warmup, decay = 3, 0.9
  ema = {"w": jnp.full((2,), 100.0)}
  history = []
  for count in range(6):
    params = {"w": jnp.full((2,), float(count + 1))}
    ema = ema_lib.ema_update(ema, params, count, decay, warmup)
    history.append(float(ema["w"][0]))
  # Updates 0, 1, 2 are plain copies of the params (1, 2, 3); then e = 0.9 e + 0.1 p.
  want, e = [], None
  for count in range(6):
    p = float(count + 1)
    e = p if count < warmup else decay * e + (1 - decay) * p
    want.append(e)
  np.testing.assert_allclose(history, want, rtol=1e-6)
  assert history[:3] == [1.0, 2.0, 3.0]
  assert float(ema_lib.ema_decay(2, decay, warmup)) == 0.0
  assert float(ema_lib.ema_decay(3, decay, warmup)) == pytest.approx(decay)


def test_ema_under_jit_with_traced_count_and_nnx_state():
  params = nnx.state(_Net(nnx.Rngs(1)), nnx.Param)
  ema = jax.tree.map(jnp.zeros_like, params)
  step = jax.jit(lambda e, p, c: ema_lib.ema_update(e, p, c, 0.999, 500))
  out = step(ema, params, jnp.int32(499))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), out, params)
  out = step(ema, params, jnp.int32(500))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, 0.001 * b, rtol=1e-4), out, params)
