"""Training memory: XLA's buffer assignment of the train step, and the pieces that keep it low.

``docs/memory.md`` has the hand count and the measurements. Nothing here times or runs a large
model: the MedNeXt-L figure comes from compiling the real LICONN train step (``benchmarks/
memory.py``) and reading ``memory_analysis()``.
"""

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from jaxseg.common.config_util import load_config
from jaxseg.data import targets
from jaxseg.models import layers, mednext
from jaxseg.training import optim, sharding, train_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Issue 17's bound for MedNeXt-L (LICONN recipe) at 64^3, batch 1, in bytes per voxel (12 KB).
MEDNEXT_L_BYTES_PER_VOXEL = 12_000


def _memory_benchmark():
  """``benchmarks/memory.py`` as a module (``benchmarks/`` is a folder of scripts)."""
  path = os.path.join(REPO_ROOT, "benchmarks", "memory.py")
  spec = importlib.util.spec_from_file_location("jaxseg_benchmarks_memory", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_mednext_l_train_step_stays_under_12_kb_per_voxel():
  # Compiles only (about 45 s on a 2-core CPU, most of it XLA's compile of 62 blocks).
  bench = _memory_benchmark()
  config = bench.load("configs/liconn.py")
  result = bench.train_step_memory(config, patch=(64, 64, 64), batch=1)
  assert result["model"] == "mednext" and result["size"] == "L" and result["remat"]
  assert result["dtype"] == "bfloat16" and result["voxels"] == 64**3
  assert result["temp_bytes_per_voxel"] <= MEDNEXT_L_BYTES_PER_VOXEL, result


class _Chain(nnx.Module):
  """``count`` MedNeXt blocks in a row, each through ``layers.call_block``."""

  def __init__(self, count, remat, rngs):
    kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=rngs)
    self.blocks = nnx.List([mednext.Block(16, 3, 3, **kw) for _ in range(count)])
    self.remat = remat

  def __call__(self, x):
    for block in self.blocks:
      x = layers.call_block(block, x, self.remat)
    return x


def _temp_bytes(count, remat, size=32):
  model = nnx.eval_shape(lambda: _Chain(count, remat, nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  x = jax.ShapeDtypeStruct((1, size, size, size, 16), jnp.bfloat16)

  def loss(state, x):
    return jnp.mean(nnx.merge(graphdef, state)(x).astype(jnp.float32) ** 2)

  compiled = jax.jit(jax.grad(loss)).lower(state, x).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_remat_keeps_only_each_block_input():
  # With remat, each further block adds only its bf16 input (16 channels x 2 bytes per voxel) to
  # the peak; without, all of its activations. jax.checkpoint (nnx.remat) failed the first half
  # on XLA:CPU, which scheduled every recompute during the forward pass.
  voxels = 32**3
  input_bytes = 16 * 2 * voxels
  per_block_remat = (_temp_bytes(8, True) - _temp_bytes(4, True)) / 4
  per_block_plain = (_temp_bytes(8, False) - _temp_bytes(4, False)) / 4
  assert per_block_remat <= 1.5 * input_bytes, per_block_remat / voxels
  assert per_block_plain >= 5 * input_bytes, per_block_plain / voxels


def _reference_group_norm(x, scale, bias, groups, activation):
  """GroupNorm written out with plain jnp, differentiated by JAX's autodiff."""
  grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
  axes = (*range(1, grouped.ndim - 2), grouped.ndim - 1)
  mean = jnp.mean(grouped, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(grouped - mean), axis=axes, keepdims=True)
  y = ((grouped - mean) * lax.rsqrt(var + 1e-5)).reshape(x.shape) * scale + bias
  plain = {None: lambda v: v, "elu": jax.nn.elu, "relu": jax.nn.relu}
  plain["gelu"] = lambda v: jax.nn.gelu(v, approximate=False)
  return plain[activation](y)


@pytest.mark.parametrize("activation", [None, "elu", "relu", "gelu"])
@pytest.mark.parametrize("groups", [1, 2, 6])
def test_group_norm_gradients_match_autodiff(activation, groups):
  keys = jax.random.split(jax.random.key(0), 4)
  x = 3 * jax.random.normal(keys[0], (2, 3, 4, 5, 6)) + 1
  scale, bias = jax.random.normal(keys[1], (6,)), jax.random.normal(keys[2], (6,))
  weights = jax.random.normal(keys[3], x.shape)
  norm = layers.GroupNorm(6, groups, activation=activation)
  norm.scale[...], norm.bias[...] = scale, bias

  def ours(x, scale, bias):
    return layers.group_norm(x, scale, bias, groups, 1e-5, activation, jnp.dtype(jnp.float32))

  def loss(fn):
    return lambda *args: jnp.sum(fn(*args) * weights)

  reference = functools.partial(_reference_group_norm, groups=groups, activation=activation)
  np.testing.assert_array_equal(norm(x), ours(x, scale, bias))
  np.testing.assert_array_equal(ours(x, scale, bias), reference(x, scale, bias))
  got = jax.grad(loss(ours), argnums=(0, 1, 2))(x, scale, bias)
  want = jax.grad(loss(reference), argnums=(0, 1, 2))(x, scale, bias)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()))


def test_gelu_is_exact_and_its_gradient_matches_autodiff():
  x = jnp.linspace(-8.0, 8.0, 1001)
  np.testing.assert_array_equal(layers.gelu(x), jax.nn.gelu(x, approximate=False))
  got = jax.grad(lambda v: jnp.sum(layers.gelu(v)))(x)
  want = jax.grad(lambda v: jnp.sum(jax.nn.gelu(v, approximate=False)))(x)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # bf16 in, bf16 gradient out (computed in float32, so at most one bf16 step from autodiff's).
  xb = x.astype(jnp.bfloat16)
  got = jax.grad(lambda v: jnp.sum(layers.gelu(v).astype(jnp.float32)))(xb)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=1e-2)


def test_non_finite_step_returns_the_state_unchanged():
  # The update is a lax.cond on the loss and gradient being finite (no where() over the donated
  # state, which made XLA copy all of it); a NaN batch must still leave the state as it was.
  overrides = {
    "data.patch_size": (8, 24, 24),
    "data.aug.name": "none",
    "model.widths": (4, 8),
    "model.norm_groups": 2,
    "train.batch_size": 1,
    "train.mesh_devices": 1,
  }
  config = load_config(os.path.join(REPO_ROOT, "configs", "demo.py"), overrides)
  shard = sharding.create_sharding(1)
  tx = optim.create_optimizer(config.optim, int(config.train.num_steps))
  graphdef, state = train_lib.create_train_state(config, tx, shard)
  read_shape = targets.read_shape_for(config)
  step_fn = train_lib.make_train_step(config, graphdef, tx, shard, read_shape)
  rng = np.random.default_rng(0)
  labels = rng.integers(1, 5, size=(1, *read_shape), dtype=np.int32)
  image = rng.random((1, *read_shape, 1), dtype=np.float32)
  before = jax.device_get(state)
  state, metrics = step_fn(state, np.full_like(image, np.nan), labels)
  assert not bool(metrics["finite"])
  after = jax.device_get(state)
  jax.tree.map(np.testing.assert_array_equal, after, before)
  state, metrics = step_fn(state, image, labels)
  assert bool(metrics["finite"]) and int(state["step"]) == 1
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), state["params"], before["params"])
  assert any(jax.tree.leaves(moved))
