"""Models: shapes, parameter counts, fixed upsampling, conv geometry, init, dtypes, remat, errors.

Parameter counts are checked against closed forms re-derived here layer by layer from the
architecture descriptions (docs/models.md, MedNeXt v1) and against the published totals.
The upsampling and (transposed) convolutions are checked against direct numpy scatter / gather
implementations of PyTorch's definitions.
"""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxseg.common import config_util
from jaxseg.common.errors import ConfigError
from jaxseg.models import build_model, count_params, input_multiple, layers, mednext

REPO_ROOT = Path(__file__).resolve().parents[1]


def _rsunet_config(**overrides):
  config = dict(
    name="rsunet",
    in_channels=1,
    out_channels=3,
    widths=(4, 8, 12),
    pool=(1, 2, 2),
    depth_2d=1,
    norm_groups=4,
    activation="elu",
    compute_dtype="float32",
    param_dtype="float32",
    remat=False,
  )
  config.update(overrides)
  return config


def _mednext_config(**overrides):
  config = dict(
    name="mednext",
    size="S",
    kernel_size=3,
    in_channels=1,
    out_channels=2,
    base_channels=4,
    deep_supervision=False,
    compute_dtype="float32",
    param_dtype="float32",
    remat=False,
  )
  config.update(overrides)
  return config


def _forward(model, x):
  return nnx.jit(lambda m, v: m(v))(model, x)


def _output_spec(model, x):
  """Output shapes / dtypes of ``model(x)`` by tracing only (XLA compiles on CPU are slow)."""
  return nnx.eval_shape(lambda m, v: m(v), model, x)


# -- shapes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 4, 32, 32), (2, 3, 16, 24)])
def test_rsunet_output_shape(shape):
  config = _rsunet_config()
  assert input_multiple(config) == (1, 4, 4)
  model = build_model(config, rngs=nnx.Rngs(0))
  y = _output_spec(model, jnp.ones((*shape, 1)))
  assert y.shape == (*shape, 3) and y.dtype == jnp.float32


def test_rsunet_rejects_indivisible_input():
  model = build_model(_rsunet_config(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"divisible by \(1, 4, 4\)"):
    model(jnp.ones((1, 4, 30, 32, 1)))


def test_mednext_output_shapes_and_deep_supervision():
  config = _mednext_config()
  assert input_multiple(config) == (16, 16, 16)
  x = jnp.ones((1, 16, 16, 32, 1))
  y = _output_spec(build_model(config, rngs=nnx.Rngs(0)), x)
  assert y.shape == (1, 16, 16, 32, 2)
  ds_model = build_model(_mednext_config(deep_supervision=True), rngs=nnx.Rngs(0))
  outputs = _output_spec(ds_model, x)
  assert isinstance(outputs, tuple)
  assert [o.shape for o in outputs] == [
    (1, 16 // 2**s, 16 // 2**s, 32 // 2**s, 2) for s in range(5)
  ]
  with pytest.raises(ValueError, match="divisible by"):
    build_model(config, rngs=nnx.Rngs(0))(jnp.ones((1, 8, 16, 16, 1)))


# -- parameter counts -----------------------------------------------------------------------------


def _abstract_count(config):
  return count_params(nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0))))


def _rsunet_formula(in_ch, out_ch, widths, depth_2d):
  """RSUNet parameters, layer by layer: convs have no bias; each GroupNorm has 2 per channel."""

  def norm_act_conv(i, o, taps):
    return 2 * i + i * o * taps

  def conv_block(i, o, taps):
    return norm_act_conv(i, o, taps) + 3 * norm_act_conv(o, o, taps)

  taps = [9 if level < depth_2d else 27 for level in range(len(widths))]
  total = conv_block(in_ch, widths[0], taps[0])
  for level in range(1, len(widths)):
    total += conv_block(widths[level - 1], widths[level], taps[level])  # down
    up_proj = widths[level] * widths[level - 1]  # 1x1x1, no bias; the upsampling is fixed
    total += up_proj + conv_block(widths[level - 1], widths[level - 1], taps[level - 1])
  return total + 2 * widths[0] + widths[0] * out_ch + out_ch  # head: norm + 1x1 conv with bias


def test_rsunet_snemi_parameter_count():
  snemi = config_util.load_config(str(REPO_ROOT / "configs" / "snemi.py")).model
  count = _abstract_count(snemi)
  assert count == _rsunet_formula(1, 12, (18, 36, 48, 64, 80), depth_2d=1) == 2_292_824
  assert abs(count - 2.29e6) / 2.29e6 < 0.01


def _mednext_formula(size, k, in_ch, out_ch, base=32):
  exp, blocks = mednext.SIZES[size]

  def body(c, r, out):
    depthwise = c * k**3 + c  # groups = c: one k^3 filter and a bias per channel
    return depthwise + 2 * c + (c * r * c + r * c) + (r * c * out + out)

  def block(c, r):
    return body(c, r, c)

  def down(c, r):
    return body(c, r, 2 * c) + (c * 2 * c + 2 * c)  # + 1x1 stride-2 residual conv with bias

  def up(c, r):
    return body(c, r, c // 2) + (c * (c // 2) + c // 2)

  widths = [base * 2**i for i in range(5)]
  total = in_ch * base + base  # stem
  for i in range(4):
    total += blocks[i] * block(widths[i], exp[i]) + down(widths[i], exp[i + 1])
  total += blocks[4] * block(widths[4], exp[4])
  for j in range(4):
    c = widths[4 - j]
    total += up(c, exp[5 + j]) + blocks[5 + j] * block(c // 2, exp[5 + j])
  return total + base * out_ch + out_ch  # head


@pytest.mark.parametrize(
  ("size", "kernel_size", "reference"), [("S", 3, 5.55e6), ("L", 3, 61.8e6), ("L", 5, 63.0e6)]
)
def test_mednext_parameter_count(size, kernel_size, reference):
  config = _mednext_config(size=size, kernel_size=kernel_size, out_channels=6, base_channels=32)
  count = _abstract_count(config)
  assert count == _mednext_formula(size, kernel_size, 1, 6)
  assert abs(count - reference) / reference < 0.01


# -- fixed upsampling and conv geometry -----------------------------------------------------------


def _transposed_conv_reference(x, kernels, strides, pads):
  """Depthwise ConvTranspose3d of ``[b, z, y, x, c]`` by direct scatter (PyTorch definition).

  ``kernels`` are per-axis 1-D taps (the kernel is their outer product); input voxel ``i``
  adds ``t[k] * x[i]`` to output ``stride * i + k - pad`` (kept only inside the output).
  """
  out_shape = [
    (n - 1) * s - 2 * p + len(t)
    for n, s, p, t in zip(x.shape[1:4], strides, pads, kernels, strict=True)
  ]
  out = np.zeros((x.shape[0], *out_shape, x.shape[4]))
  for i in np.ndindex(*x.shape[1:4]):
    for k in np.ndindex(*(len(t) for t in kernels)):
      o = [s * ii + kk - p for ii, kk, s, p in zip(i, k, strides, pads, strict=True)]
      if all(0 <= oo < n for oo, n in zip(o, out_shape, strict=True)):
        weight = math.prod(t[kk] for t, kk in zip(kernels, k, strict=True))
        out[:, o[0], o[1], o[2], :] += weight * x[:, i[0], i[1], i[2], :]
  return out


def test_bilinear_taps():
  np.testing.assert_array_equal(layers.bilinear_taps(2), [0.25, 0.75, 0.75, 0.25])
  np.testing.assert_array_equal(layers.bilinear_taps(1), [1.0])
  np.testing.assert_allclose(layers.bilinear_taps(3), [1 / 3, 2 / 3, 1, 2 / 3, 1 / 3])


@pytest.mark.parametrize("factors", [(1, 2, 2), (2, 3, 1)])
def test_bilinear_upsample_equals_transposed_conv(factors):
  x = np.random.default_rng(0).normal(size=(2, 2, 3, 4, 3))
  if factors == (1, 2, 2):  # PyTC: kernel (1, 4, 4), stride (1, 2, 2), padding (0, 1, 1)
    kernels = [np.array([1.0]), *[np.array([0.25, 0.75, 0.75, 0.25])] * 2]
    pads = (0, 1, 1)
  else:
    kernels = [layers.bilinear_taps(f) for f in factors]
    pads = tuple(f // 2 for f in factors)
  expected = _transposed_conv_reference(x, kernels, factors, pads)
  got = layers.bilinear_upsample(jnp.asarray(x, jnp.float32), factors)
  assert got.shape == (2, *(n * f for n, f in zip(x.shape[1:4], factors, strict=True)), 3)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)


def _set_params(module, seed):
  """Random values in every parameter, so the geometry tests do not depend on the init."""
  rng = np.random.default_rng(seed)
  state = nnx.state(module, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  leaves = [jnp.asarray(rng.normal(size=leaf.shape), leaf.dtype) for leaf in leaves]
  nnx.update(module, jax.tree.unflatten(treedef, leaves))


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_and_conv_transpose_match_pytorch_definitions(groups):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1, 4, 5, 6, 2))
  kw = dict(groups=groups, strides=2, padding=(1, 1, 1), kernel_init=layers.Init("normal", 1.0))
  conv = layers.initialize(lambda r: layers.Conv(2, 4, 3, rngs=r, **kw), nnx.Rngs(0))
  tconv = layers.initialize(lambda r: layers.ConvTranspose(2, 4, 3, rngs=r, **kw), nnx.Rngs(0))
  # Random biases too (the default init is zero), so the bias placement is checked.
  _set_params(conv, 1)
  _set_params(tconv, 2)
  per_in, per_out = 2 // groups, 4 // groups

  # Conv3d: out[o] = b + sum_k x[2 o + k - 1] w[k] (zero outside x); output (n + 2 - 3) // 2 + 1.
  w, b = np.asarray(conv.kernel[...]), np.asarray(conv.bias[...])
  out_shape = [(n - 1) // 2 + 1 for n in x.shape[1:4]]
  expected = np.tile(b, (1, *out_shape, 1)).astype(np.float64)
  for o in np.ndindex(*out_shape):
    for k in np.ndindex(3, 3, 3):
      i = [2 * oo + kk - 1 for oo, kk in zip(o, k, strict=True)]
      if all(0 <= ii < n for ii, n in zip(i, x.shape[1:4], strict=True)):
        for g in range(groups):
          xin = x[0, i[0], i[1], i[2], g * per_in : (g + 1) * per_in]
          expected[0, *o, g * per_out : (g + 1) * per_out] += (
            xin @ w[k][:, g * per_out : (g + 1) * per_out]
          )
  np.testing.assert_allclose(np.asarray(conv(jnp.asarray(x, jnp.float32))), expected, atol=1e-4)

  # ConvTranspose3d with PyTorch's weight W = flip(kernel): out[o] = b + sum_i x[i] W[o - 2 i + 1],
  # output (n - 1) * 2 - 2 + 3 = 2n - 1; the bias reaches every output voxel.
  torch_w = np.asarray(tconv.kernel[...])[::-1, ::-1, ::-1]
  out_shape = [2 * n - 1 for n in x.shape[1:4]]
  expected = np.tile(np.asarray(tconv.bias[...]), (1, *out_shape, 1)).astype(np.float64)
  for i in np.ndindex(*x.shape[1:4]):
    for k in np.ndindex(3, 3, 3):
      o = [2 * ii + kk - 1 for ii, kk in zip(i, k, strict=True)]
      if all(0 <= oo < n for oo, n in zip(o, out_shape, strict=True)):
        for g in range(groups):
          xin = x[0, i[0], i[1], i[2], g * per_in : (g + 1) * per_in]
          expected[0, *o, g * per_out : (g + 1) * per_out] += (
            xin @ torch_w[k][:, g * per_out : (g + 1) * per_out]
          )
  np.testing.assert_allclose(np.asarray(tconv(jnp.asarray(x, jnp.float32))), expected, atol=1e-4)


@pytest.mark.parametrize("kernel_size", [(1, 3, 3), (3, 3, 3)])
def test_stride_one_conv_matches_native_3d_conv(kernel_size):
  # On CPU ``Conv`` runs stride-1 convs as sums of 2D convs; compare with XLA's 3D conv.
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 4, 6, 5, 3)), jnp.float32)
  conv = layers.initialize(
    lambda r: layers.Conv(3, 4, kernel_size, kernel_init=layers.Init("normal", 1.0), rngs=r),
    nnx.Rngs(0),
  )
  _set_params(conv, 4)
  pads = [(k // 2, k // 2) for k in kernel_size]
  expected = (
    jax.lax.conv_general_dilated(
      x, conv.kernel[...], (1, 1, 1), pads, dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
    )
    + conv.bias[...]
  )
  np.testing.assert_allclose(np.asarray(conv(x)), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_mednext_up_block_prepends_one_voxel():
  block = layers.initialize(
    lambda r: mednext.UpBlock(8, 4, 2, 3, dtype=jnp.float32, param_dtype=jnp.float32, rngs=r),
    nnx.Rngs(0),
  )
  x = jax.random.normal(jax.random.key(0), (1, 3, 4, 5, 8))
  y, unpadded = nnx.jit(lambda b, v: (b(v), b.body(v) + b.residual(v)))(block, x)
  y, unpadded = np.asarray(y), np.asarray(unpadded)
  assert y.shape == (1, 6, 8, 10, 4) and unpadded.shape == (1, 5, 7, 9, 4)
  # The prepended planes are exactly zero; the rest is the 2n - 1 transposed-conv output.
  assert not y[:, 0].any() and not y[:, :, 0].any() and not y[:, :, :, 0].any()
  np.testing.assert_array_equal(y[:, 1:, 1:, 1:], unpadded)


# -- normalisation and init -----------------------------------------------------------------------


def test_group_norm_group_rule_and_values():
  assert [layers.resolve_groups(c, 4) for c in (18, 36, 48, 1, 7, 2)] == [3, 4, 4, 1, 1, 2]
  snemi = nnx.eval_shape(
    lambda: build_model(
      config_util.load_config(str(REPO_ROOT / "configs" / "snemi.py")).model, rngs=nnx.Rngs(0)
    )
  )
  assert snemi.input_block.res1.norm.num_groups == 3  # 18 channels
  assert snemi.down_blocks[0].pre.norm.num_groups == 3  # its input has 18 channels
  assert snemi.down_blocks[0].res1.norm.num_groups == 4  # 36 channels

  x = np.random.default_rng(2).normal(3.0, 2.0, size=(2, 3, 4, 5, 6))
  norm = layers.GroupNorm(6, 3, activation="elu")
  scale, bias = np.linspace(0.5, 2.0, 6), np.linspace(-1.0, 1.0, 6)
  norm.scale[...] = jnp.asarray(scale, jnp.float32)
  norm.bias[...] = jnp.asarray(bias, jnp.float32)
  grouped = x.reshape(2, 3, 4, 5, 3, 2)
  mean = grouped.mean(axis=(1, 2, 3, 5), keepdims=True)
  var = grouped.var(axis=(1, 2, 3, 5), keepdims=True)
  normed = ((grouped - mean) / np.sqrt(var + 1e-5)).reshape(x.shape) * scale + bias
  expected = np.where(normed > 0, normed, np.expm1(normed))
  np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x, jnp.float32))), expected, atol=1e-5)


def test_initialisation_scales():
  # RSUNet: Kaiming normal, fan_out = out * 27 (demo widths, 3x3x3 level); norm scale 1, bias 0.
  model = build_model(_rsunet_config(widths=(8, 16, 24)), rngs=nnx.Rngs(0))
  kernel = np.asarray(model.down_blocks[1].res1.conv.kernel[...])  # (3, 3, 3, 24, 24)
  assert kernel.shape == (3, 3, 3, 24, 24)
  np.testing.assert_allclose(kernel.std(), math.sqrt(2 / (24 * 27)), rtol=0.03)
  norm = model.down_blocks[1].res1.norm
  assert np.all(np.asarray(norm.scale[...]) == 1) and np.all(np.asarray(norm.bias[...]) == 0)
  # The draw is a pure function of the key.
  same = build_model(_rsunet_config(widths=(8, 16, 24)), rngs=nnx.Rngs(0))
  other = build_model(_rsunet_config(widths=(8, 16, 24)), rngs=nnx.Rngs(1))
  np.testing.assert_array_equal(same.down_blocks[1].res1.conv.kernel[...], kernel)
  assert not np.allclose(other.down_blocks[1].res1.conv.kernel[...], kernel)

  # MedNeXt: PyTorch default U(+-1/sqrt(fan_in)), fan_in from out/groups for transposed convs.
  net = build_model(_mednext_config(base_channels=16, out_channels=6), rngs=nnx.Rngs(0))
  checks = {
    "bottleneck expand (fan_in 256)": (net.bottleneck[0].body.expand.kernel, 256),
    "encoder depthwise (fan_in 27)": (net.encoders[3][0].body.depthwise.kernel, 27),
    "up depthwise transposed (fan_in 27)": (net.ups[0].body.depthwise.kernel, 27),
    "up residual transposed (fan_in = out = 128)": (net.ups[0].residual.kernel, 128),
    "up residual bias": (net.ups[0].residual.bias, 128),
    "head (transposed: fan_in = out = 6)": (net.head.kernel, 6),
  }
  for name, (param, fan_in) in checks.items():
    values, bound = np.asarray(param[...]).ravel(), 1 / math.sqrt(fan_in)
    assert np.abs(values).max() <= bound, name
    assert np.abs(values).max() > 0.7 * bound, name


# -- dtypes, remat, config ------------------------------------------------------------------------


def test_bf16_compute_keeps_float32_params():
  x = jnp.ones((1, 16, 16, 16, 1), jnp.float32)
  for config in (_rsunet_config(compute_dtype="bfloat16"), _mednext_config()):
    model = build_model(config, rngs=nnx.Rngs(0), compute_dtype="bfloat16")
    assert _output_spec(model, x).dtype == jnp.bfloat16
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert params and all(p.dtype == jnp.float32 for p in params)


def _value_and_grads(loss_fn, model):
  """Jitted loss and parameter gradients, compiled with XLA's backend optimisations off: these
  tests compare values, and on this CPU compiling a backward pass dominates their runtime."""
  graphdef, state = nnx.split(model)
  fn = jax.value_and_grad(lambda s: loss_fn(nnx.merge(graphdef, s)))
  options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
  return jax.jit(fn).lower(state).compile(compiler_options=options)(state)


def _assert_same_value_and_grads(loss_fn, model_plain, model_remat):
  value, grads = _value_and_grads(loss_fn, model_plain)
  value_remat, grads_remat = _value_and_grads(loss_fn, model_remat)
  np.testing.assert_allclose(value_remat, value, rtol=1e-6)
  grads, grads_remat = jax.tree.leaves(grads), jax.tree.leaves(grads_remat)
  assert len(grads) == len(grads_remat) > 0
  for g, g_remat in zip(grads, grads_remat, strict=True):
    np.testing.assert_allclose(g_remat, g, rtol=1e-5, atol=1e-7)


def test_rsunet_remat_gives_same_output_and_gradients():
  x = jax.random.normal(jax.random.key(3), (1, 2, 8, 8, 1))
  plain, remat = (
    build_model(_rsunet_config(widths=(4, 8), remat=flag), rngs=nnx.Rngs(0))
    for flag in (False, True)
  )
  _assert_same_value_and_grads(lambda m: jnp.mean(m(x) ** 2), plain, remat)


class _MedNeXtChain(nnx.Module):
  """Down -> Block -> Up, each through ``call_block`` (MedNeXt's remat path)."""

  def __init__(self, remat, rngs):
    kw = dict(dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
    self.remat = remat
    self.down = mednext.DownBlock(4, 8, 2, 3, **kw)
    self.block = mednext.Block(8, 2, 3, **kw)
    self.up = mednext.UpBlock(8, 4, 2, 3, **kw)

  def __call__(self, x):
    for block in (self.down, self.block, self.up):
      x = layers.call_block(block, x, self.remat)
    return x


def test_mednext_remat_wraps_every_block_and_keeps_values():
  # Structure: the full model rematerialises each of its 2 * 9 blocks and 4 + 4 down / up blocks.
  model = build_model(_mednext_config(remat=True), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  x = jnp.ones((1, 16, 16, 16, 1))
  jaxpr = jax.make_jaxpr(lambda s, v: nnx.merge(graphdef, s)(v))(state, x)
  names = [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
  # Each rematerialised block is one custom-VJP call (layers.call_block); no convolution is left
  # outside them (the stem and head are matmuls).
  assert sum("custom_vjp" in n for n in names) == 26
  assert not any("conv" in n for n in names)
  # Values: same loss and gradients through each block type (compiling the whole net twice on
  # this CPU would cost half a minute).
  x = jax.random.normal(jax.random.key(3), (1, 4, 4, 4, 4))
  plain, remat = (
    layers.initialize(lambda r, flag=flag: _MedNeXtChain(flag, r), nnx.Rngs(0))
    for flag in (False, True)
  )
  _assert_same_value_and_grads(lambda m: jnp.mean(m(x) ** 2), plain, remat)


def test_build_model_rejects_bad_configs():
  # ConfigError: the CLIs report it in one line naming the model.* key.
  with pytest.raises(ConfigError, match=r"model\.name: .*valid names: rsunet, mednext"):
    build_model({"name": "unet", "in_channels": 1, "out_channels": 1}, rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match="valid names"):
    input_multiple({"name": "unet"})
  bad = [
    (_rsunet_config(widths=()), "widths"),
    (_rsunet_config(widths=(4, 0)), "widths"),
    (_rsunet_config(pool=(2, 2)), "pool"),
    (_rsunet_config(depth_2d=7), "depth_2d"),
    (_rsunet_config(activation="tanh"), "activation"),
    (_mednext_config(size="XL"), "size"),
    (_mednext_config(kernel_size=4), "kernel_size"),
    (_mednext_config(compute_dtype="int8"), r"model\.compute_dtype: .*floating point"),
  ]
  for config, message in bad:
    with pytest.raises(ConfigError, match=message):
      build_model(config, rngs=nnx.Rngs(0))


def test_demo_config_model_jitted_forward():
  config = config_util.load_config(str(REPO_ROOT / "configs" / "demo.py"))
  model = build_model(config.model, rngs=nnx.Rngs(0))
  assert input_multiple(config.model) == (1, 8, 8)
  x = jax.random.uniform(jax.random.key(0), (1, 32, 64, 64, 1))
  y = _forward(model, x)
  assert y.shape == (1, 32, 64, 64, 6) and y.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(y)))
