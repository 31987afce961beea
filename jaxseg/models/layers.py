"""Building blocks shared by the 3D networks: convolutions, GroupNorm, fixed upsampling, remat.

Every array here is channels-last, ``[b, z, y, x, c]``. Kernels are stored as ``[kz, ky, kx,
in_channels // groups, out_channels]`` (``DHWIO``) in ``param_dtype``; each layer casts its
input and parameters to its compute ``dtype`` before the arithmetic, so a network built with
``dtype=bfloat16`` and ``param_dtype=float32`` keeps float32 master weights and computes in bf16.

Initialisers are ``Init`` values (a distribution and its scale) rather than opaque functions,
and each parameter records its ``Init`` as ``nnx.Param`` metadata (``new_param``). That lets
``initialize`` draw every parameter of a model in one compiled program: drawing them one by one
compiles a separate random-number kernel per parameter shape, which costs tens of seconds for a
MedNeXt on a CPU. The two PyTorch schemes the reference networks use:

- ``kaiming_normal_fan_out(out, kernel)``: ``N(0, 2 / fan_out)`` (PyTC RSUNet).
- ``torch_default_uniform(fan_in)``: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, what PyTorch's
  ``kaiming_uniform_(a=sqrt(5))`` default for ``nn.Conv*`` weights (and their biases) reduces to
  (MedNeXt). The caller passes the fan-in PyTorch would compute, which differs between
  ``Conv3d`` and ``ConvTranspose3d`` (see ``torch_fan_in``).

Three functions have their own backward pass to bound training memory (``docs/memory.md``):
``group_norm`` and ``gelu`` keep only their input and recompute the rest, and ``call_block``
rematerialises a whole block. Each recompute starts from an input tied to the incoming cotangent
(``_after``), so XLA can neither merge it with the forward pass nor run it early.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxseg.common.config_util import triple

# Channels-last volumes and DHWIO kernels, for lax.conv_general_dilated.
_DIMENSION_NUMBERS = ("NDHWC", "DHWIO", "NDHWC")

_FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def resolve_dtype(dtype: str | jnp.dtype | type | None, default: str = "float32") -> jnp.dtype:
  """Turns a config dtype (``"bfloat16"``, a numpy/jnp dtype, or None -> ``default``) into a dtype.

  Raises:
    ValueError: for anything that is not a floating-point dtype.
  """
  if dtype is None:
    dtype = default
  try:
    resolved = jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f"unknown dtype {dtype!r}; use one of {_FLOAT_DTYPES}") from e
  if not jnp.issubdtype(resolved, jnp.floating):
    raise ValueError(f"dtype must be floating point ({_FLOAT_DTYPES}), got {dtype!r}")
  return resolved


def resolve_groups(channels: int, groups: int) -> int:
  """The GroupNorm group count PyTC uses: ``groups`` decremented until it divides ``channels``.

  ``resolve_groups(18, 4) == 3``, ``resolve_groups(36, 4) == 4``, ``resolve_groups(1, 4) == 1``.
  """
  if channels < 1 or groups < 1:
    raise ValueError(f"channels and groups must be >= 1, got {channels} and {groups}")
  groups = min(groups, channels)
  while channels % groups:
    groups -= 1
  return groups


# -- initialisers ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Init:
  """A parameter distribution: ``U(-scale, scale)``, ``N(0, scale^2)`` or the constant ``scale``.

  Calling it, ``init(key, shape, dtype)``, draws a value like any jax initialiser.
  """

  kind: str  # "uniform", "normal" or "constant"
  scale: float

  def __post_init__(self):
    if self.kind not in ("uniform", "normal", "constant"):
      raise ValueError(f"unknown init kind {self.kind!r}")

  def __call__(self, key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    shape = tuple(shape)
    unit = None
    if self.kind == "uniform":
      unit = jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0)
    elif self.kind == "normal":
      unit = jax.random.normal(key, shape, jnp.float32)
    return self.from_unit(unit, shape).astype(dtype)

  def from_unit(self, unit: jax.Array | None, shape: Sequence[int]) -> jax.Array:
    """The float32 value from a unit draw of ``shape`` (``U(-1, 1)`` or ``N(0, 1)`` by kind)."""
    if self.kind == "constant":
      return jnp.full(tuple(shape), self.scale, jnp.float32)
    return self.scale * unit


def kaiming_normal_fan_out(out_channels: int, kernel_size: Sequence[int]) -> Init:
  """``N(0, 2 / fan_out)``, ``fan_out = out_channels * prod(kernel)``.

  PyTorch's ``kaiming_normal_(mode='fan_out')`` with gain sqrt(2) (ReLU / leaky-ReLU(0)), which
  reads the fan-out from a ``Conv3d`` weight ``[out, in/groups, k...]``.
  """
  return Init("normal", math.sqrt(2.0 / (out_channels * math.prod(kernel_size))))


def torch_default_uniform(fan_in: int) -> Init:
  """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``: PyTorch's default for conv weights and biases.

  ``kaiming_uniform_(w, a=sqrt(5))`` has gain ``sqrt(2 / (1 + 5)) = sqrt(1/3)`` and bound
  ``sqrt(3) * gain / sqrt(fan_in) = 1 / sqrt(fan_in)``; ``_ConvNd.reset_parameters`` draws the
  bias from the same range.
  """
  return Init("uniform", 1.0 / math.sqrt(fan_in))


def torch_fan_in(
  in_channels: int,
  out_channels: int,
  kernel_size: Sequence[int],
  groups: int = 1,
  transposed: bool = False,
) -> int:
  """The fan-in PyTorch's default initialiser computes for a conv weight.

  PyTorch reads the fan-in from dimension 1 of the weight: ``in/groups`` for ``Conv3d`` (weight
  ``[out, in/groups, k...]``) but ``out/groups`` for ``ConvTranspose3d`` (weight ``[in,
  out/groups, k...]``). So a transposed conv's init scale depends on its *output* width.
  """
  per_group = (out_channels if transposed else in_channels) // groups
  return per_group * math.prod(kernel_size)


ZEROS = Init("constant", 0.0)
ONES = Init("constant", 1.0)


# True while ``initialize`` builds a module abstractly: its draws are discarded, so ``new_param``
# skips tracing the random-number generator (most of the tracing time of a large net).
_SHAPES_ONLY = contextvars.ContextVar("jaxseg_models_shapes_only", default=False)


def new_param(init: Init, rngs: nnx.Rngs | None, shape: Sequence[int], dtype) -> nnx.Param:
  """An ``nnx.Param`` drawn from ``init`` that remembers ``init`` (metadata ``initializer``)."""
  shape = tuple(shape)
  if _SHAPES_ONLY.get():
    return nnx.Param(jnp.zeros(shape, dtype), initializer=init)
  key = rngs.params() if init.kind != "constant" else None
  return nnx.Param(init(key, shape, dtype), initializer=init)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _unit_draws(key: jax.Array, num_uniform: int, num_normal: int) -> tuple[jax.Array, jax.Array]:
  uniform_key, normal_key = jax.random.split(key)
  return (
    jax.random.uniform(uniform_key, (num_uniform,), jnp.float32, -1.0, 1.0),
    jax.random.normal(normal_key, (num_normal,), jnp.float32),
  )


def initialize(construct: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module:
  """``construct(rngs)``, with all parameters drawn by one small compiled program.

  The module is first built abstractly (``nnx.eval_shape``: shapes only, nothing compiled or
  allocated). One jitted call then draws a single ``U(-1, 1)`` and a single ``N(0, 1)`` vector
  from ``rngs.params()``; they are cut into the parameters and scaled by each parameter's
  ``Init`` on the host (numpy) and placed on the default device. Slicing on the device instead
  would compile one kernel per parameter, which is what this avoids. Inside a trace (e.g. under
  ``nnx.eval_shape`` or ``jit``) the same cutting runs in jnp.

  Values differ from an eager ``construct(rngs)`` with the same seed, but follow the same
  distributions and are a pure function of the key.

  Raises:
    ValueError: if a parameter was not made by ``new_param`` (it has no ``initializer``).
  """
  token = _SHAPES_ONLY.set(True)
  try:
    abstract = nnx.eval_shape(lambda: construct(nnx.Rngs(0)))
  finally:
    _SHAPES_ONLY.reset(token)
  graphdef, state = nnx.split(abstract)
  flat = list(nnx.to_flat_state(state))
  specs = []
  for path, variable in flat:
    init = variable.get_metadata().get("initializer")
    if not isinstance(init, Init):
      raise ValueError(f"parameter {'/'.join(map(str, path))} has no Init metadata")
    specs.append((tuple(variable.shape), variable.dtype, init))
  sizes = {
    kind: sum(math.prod(shape) for shape, _, init in specs if init.kind == kind)
    for kind in ("uniform", "normal")
  }
  uniform, normal = _unit_draws(rngs.params(), sizes["uniform"], sizes["normal"])
  pools = {"uniform": uniform, "normal": normal}
  try:
    pools = {kind: np.asarray(pool) for kind, pool in pools.items()}
    traced = False
  except jax.errors.TracerArrayConversionError:  # built inside eval_shape / jit
    traced = True
  xp = jnp if traced else np
  offsets = dict.fromkeys(pools, 0)
  filled = []
  for (path, variable), (shape, dtype, init) in zip(flat, specs, strict=True):
    if init.kind == "constant":
      value = xp.full(shape, init.scale, dtype)
    else:
      size, start = math.prod(shape), offsets[init.kind]
      value = (init.scale * pools[init.kind][start : start + size].reshape(shape)).astype(dtype)
      offsets[init.kind] = start + size
    filled.append((path, variable.replace(value if traced else jnp.asarray(value))))
  return nnx.merge(graphdef, nnx.from_flat_state(filled))


# -- layers ---------------------------------------------------------------------------------------


class Conv(nnx.Module):
  """3D convolution, PyTorch ``Conv3d`` semantics (cross-correlation, symmetric zero padding).

  Output length per axis: ``(n + 2 * padding - kernel) // stride + 1``. The default padding is
  ``kernel // 2`` ("same" for odd kernels at stride 1).
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int | Sequence[int],
    *,
    strides: int | Sequence[int] = 1,
    padding: Sequence[int] | None = None,
    groups: int = 1,
    use_bias: bool = True,
    kernel_init: Init,
    bias_init: Init = ZEROS,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    kernel_size = triple(kernel_size, "kernel_size", scalar=True)
    if in_features % groups or out_features % groups:
      raise ValueError(f"groups={groups} must divide in ({in_features}) and out ({out_features})")
    self.kernel_size = kernel_size
    self.strides = triple(strides, "strides", scalar=True)
    self.padding = tuple(k // 2 for k in kernel_size) if padding is None else tuple(padding)
    self.groups = groups
    self.dtype = dtype
    shape = (*kernel_size, in_features // groups, out_features)
    self.kernel = new_param(kernel_init, rngs, shape, param_dtype)
    self.bias = new_param(bias_init, rngs, (out_features,), param_dtype) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    kernel = self.kernel[...].astype(self.dtype)
    pointwise = self.kernel_size == (1, 1, 1) and self.strides == (1, 1, 1) and self.groups == 1
    if pointwise and self.padding == (0, 0, 0):
      # A 1x1x1 conv is a matmul over channels; XLA handles the dot better than a degenerate conv.
      y = x @ kernel[0, 0, 0]
    elif self.strides == (1, 1, 1) and self.groups == 1 and jax.default_backend() == "cpu":
      y = _conv3d_as_2d(x, kernel, self.padding)
    else:
      y = lax.conv_general_dilated(
        x,
        kernel,
        window_strides=self.strides,
        padding=[(p, p) for p in self.padding],
        dimension_numbers=_DIMENSION_NUMBERS,
        feature_group_count=self.groups,
      )
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def _conv3d_as_2d(x: jax.Array, kernel: jax.Array, padding: Sequence[int]) -> jax.Array:
  """Stride-1 3D conv as a sum over z taps of 2D convs on ``[b * z, y, x, c]`` slices.

  Same result as the 3D conv. XLA:CPU runs 2D convolutions on its optimised (Eigen) kernels but
  3D ones, and above all their gradients, on a far slower path: for RSUNet layers this form is
  4-7x faster forward + backward on CPU. Accelerators keep the native 3D conv.
  """
  b, z, y, x_size, c = x.shape
  kz, pz = kernel.shape[0], padding[0]
  z_out = z + 2 * pz - kz + 1
  padded = jnp.pad(x, ((0, 0), (pz, pz), (0, 0), (0, 0), (0, 0)))
  out = None
  for dz in range(kz):
    plane = padded[:, dz : dz + z_out].reshape(b * z_out, y, x_size, c)
    term = lax.conv_general_dilated(
      plane,
      kernel[dz],
      window_strides=(1, 1),
      padding=[(padding[1], padding[1]), (padding[2], padding[2])],
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    out = term if out is None else out + term
  return out.reshape(b, z_out, *out.shape[1:])


class ConvTranspose(nnx.Module):
  """3D transposed convolution with PyTorch ``ConvTranspose3d`` semantics.

  Output length per axis: ``(n - 1) * stride - 2 * padding + kernel``, and ``out[o] = sum_i x[i]
  * w[o - stride * i + padding]`` with PyTorch's weight ``w``; the bias is added to every output
  voxel (also to those no input reaches). It runs as a forward conv over the stride-dilated
  input padded by ``kernel - 1 - padding``, so the stored kernel is PyTorch's weight flipped in
  space (the i.i.d. initialisation does not care).
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int | Sequence[int],
    *,
    strides: int | Sequence[int] = 1,
    padding: Sequence[int] | None = None,
    groups: int = 1,
    use_bias: bool = True,
    kernel_init: Init,
    bias_init: Init = ZEROS,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    kernel_size = triple(kernel_size, "kernel_size", scalar=True)
    padding = (0, 0, 0) if padding is None else tuple(padding)
    if any(p > k - 1 for p, k in zip(padding, kernel_size, strict=True)):
      raise ValueError(f"padding {padding} must be < kernel_size {kernel_size}")
    if in_features % groups or out_features % groups:
      raise ValueError(f"groups={groups} must divide in ({in_features}) and out ({out_features})")
    self.kernel_size = kernel_size
    self.strides = triple(strides, "strides", scalar=True)
    self.padding = padding
    self.groups = groups
    self.dtype = dtype
    shape = (*kernel_size, in_features // groups, out_features)
    self.kernel = new_param(kernel_init, rngs, shape, param_dtype)
    self.bias = new_param(bias_init, rngs, (out_features,), param_dtype) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    kernel = self.kernel[...].astype(self.dtype)
    y = lax.conv_general_dilated(
      x,
      kernel,
      window_strides=(1, 1, 1),
      padding=[(k - 1 - p, k - 1 - p) for k, p in zip(self.kernel_size, self.padding, strict=True)],
      lhs_dilation=self.strides,
      dimension_numbers=_DIMENSION_NUMBERS,
      feature_group_count=self.groups,
    )
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, ``x * Phi(x)``, as ``torch.nn.GELU()`` (not the tanh approximation).

  Its gradient keeps only ``x`` for the backward pass and recomputes ``Phi(x) + x * phi(x)`` there
  (in float32). Differentiating ``jax.nn.gelu`` instead keeps the erfc and exp intermediates as
  well: in MedNeXt, whose GELU acts on the 2-8x expanded width, that was two more expanded-width
  arrays per block (``docs/memory.md``).
  """
  return jax.nn.gelu(x, approximate=False)


def _gelu_fwd(x):
  return gelu(x), x


def _gelu_bwd(x, cotangent):
  # Tied to the cotangent so that XLA does not merge this erfc with the forward's (the same
  # expression for a float32 x) and keep the forward's intermediates alive instead.
  v = _after(x, cotangent).astype(jnp.float32)
  cdf = 0.5 * lax.erfc(-v * np.float32(1 / math.sqrt(2)))
  pdf = jnp.exp(-0.5 * v * v) * np.float32(1 / math.sqrt(2 * math.pi))
  return (((cdf + v * pdf) * cotangent.astype(jnp.float32)).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)

_ACTIVATIONS = {
  "elu": jax.nn.elu,  # alpha = 1, as torch.nn.ELU()
  "relu": jax.nn.relu,
  "gelu": gelu,
}


def activation_fn(name: str | None) -> Callable[[jax.Array], jax.Array]:
  """The activation for a config name (``"elu"``, ``"relu"``, ``"gelu"``); None is identity."""
  if name is None:
    return lambda x: x
  if name not in _ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; valid: {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


class GroupNorm(nnx.Module):
  """GroupNorm over ``[b, z, y, x, c]`` with an optional activation fused after it.

  Statistics are per sample and group, over all spatial positions and the group's channels
  (PyTorch ``nn.GroupNorm``, eps 1e-5). They are always computed in float32, whatever the compute
  dtype: a mean and variance over ~1e5-1e6 voxels summed in bf16 (8-bit mantissa) lose most of
  their digits, and ``E[(x - mean)^2]`` of nearly constant activations would be noise. The
  normalised, scaled (and activated) result is cast back to ``dtype``. See :func:`group_norm` for
  what the backward pass keeps.
  """

  def __init__(
    self,
    num_channels: int,
    num_groups: int,
    *,
    epsilon: float = 1e-5,
    activation: str | None = None,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
  ):
    if num_channels % num_groups:
      raise ValueError(f"num_groups={num_groups} must divide num_channels={num_channels}")
    activation_fn(activation)  # validate the name now rather than at the first call
    self.num_groups = num_groups
    self.epsilon = epsilon
    self.activation = activation
    self.dtype = dtype
    self.scale = new_param(ONES, None, (num_channels,), param_dtype)
    self.bias = new_param(ZEROS, None, (num_channels,), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return group_norm(
      x,
      self.scale[...],
      self.bias[...],
      self.num_groups,
      self.epsilon,
      self.activation,
      jnp.dtype(self.dtype),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def group_norm(
  x: jax.Array,
  scale: jax.Array,
  bias: jax.Array,
  num_groups: int,
  epsilon: float,
  activation: str | None,
  dtype: jnp.dtype,
) -> jax.Array:
  """``activation(GroupNorm(x) * scale + bias)`` in ``dtype``; the function behind
  :class:`GroupNorm` (``x`` ``[b, ..., c]``, ``scale`` / ``bias`` ``[c]``).

  The backward pass keeps only ``x`` in its own dtype and the per-group mean and ``1 / std``
  (``[b, 1, .., 1, groups, 1]``) and recomputes the normalised values from them in float32.
  Plain autodiff of the same forward keeps ``x - mean``, the normalised values and the activation's
  intermediates, all in float32 at the full width: 6-8 times the bytes of a bf16 ``x``, the
  largest excess over the hand count in ``docs/memory.md``.
  """
  return _group_norm_forward(x, scale, bias, num_groups, epsilon, activation, dtype)[0]


def _grouped(x: jax.Array, num_groups: int) -> jax.Array:
  """``x`` in float32 as ``[b, ..., groups, c // groups]``."""
  return x.astype(jnp.float32).reshape(*x.shape[:-1], num_groups, x.shape[-1] // num_groups)


def _group_axes(grouped: jax.Array) -> tuple[int, ...]:
  """The axes a group's statistics reduce: the spatial ones and the channels within the group."""
  return (*range(1, grouped.ndim - 2), grouped.ndim - 1)


def _normalized_and_affine(x, scale, bias, mean, rstd, num_groups):
  """``(x_hat, x_hat * scale + bias)`` in float32 with ``x``'s shape."""
  x_hat = ((_grouped(x, num_groups) - mean) * rstd).reshape(x.shape)
  return x_hat, x_hat * scale.astype(jnp.float32) + bias.astype(jnp.float32)


def _group_norm_forward(x, scale, bias, num_groups, epsilon, activation, dtype):
  grouped = _grouped(x, num_groups)
  axes = _group_axes(grouped)
  mean = jnp.mean(grouped, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(grouped - mean), axis=axes, keepdims=True)
  rstd = lax.rsqrt(var + epsilon)
  _, y = _normalized_and_affine(x, scale, bias, mean, rstd, num_groups)
  return activation_fn(activation)(y).astype(dtype), (x, scale, bias, mean, rstd)


def _group_norm_bwd(num_groups, epsilon, activation, dtype, residuals, cotangent):
  del epsilon, dtype  # folded into rstd / the cotangent's dtype
  x, scale, bias, mean, rstd = residuals
  # Recomputed from an ``x`` tied to the cotangent: the same expression of the plain ``x`` would
  # be merged with the forward's (XLA's CSE), which then keeps its float32 results alive across
  # the network, just what this function avoids.
  x_hat, y = _normalized_and_affine(_after(x, cotangent), scale, bias, mean, rstd, num_groups)
  _, activation_vjp = jax.vjp(activation_fn(activation), y)
  (dy,) = activation_vjp(cotangent.astype(jnp.float32))
  outer = tuple(range(x.ndim - 1))  # batch and spatial axes: per-channel parameter gradients
  d_scale = jnp.sum(dy * x_hat, axis=outer).astype(scale.dtype)
  d_bias = jnp.sum(dy, axis=outer).astype(bias.dtype)
  # d x = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) with g = dy * scale, means per group.
  g = _grouped(dy * scale.astype(jnp.float32), num_groups)
  x_hat = x_hat.reshape(g.shape)
  axes = _group_axes(g)
  dx = rstd * (
    g
    - jnp.mean(g, axis=axes, keepdims=True)
    - x_hat * jnp.mean(g * x_hat, axis=axes, keepdims=True)
  )
  return dx.reshape(x.shape).astype(x.dtype), d_scale, d_bias


group_norm.defvjp(_group_norm_forward, _group_norm_bwd)


# -- fixed resampling -----------------------------------------------------------------------------


def bilinear_taps(factor: int) -> np.ndarray:
  """1-D taps of the bilinear transposed-conv kernel for an integer upsampling ``factor``.

  Length ``2 * factor - factor % 2``, centred, ``1 - |i - centre| / factor``; factor 2 gives
  ``[.25, .75, .75, .25]``, factor 1 gives ``[1]``.
  """
  if factor < 1:
    raise ValueError(f"factor must be >= 1, got {factor}")
  size = 2 * factor - factor % 2
  centre = (size - 1) / 2
  return 1.0 - np.abs(np.arange(size) - centre) / factor


def _upsample_axis(x: jax.Array, axis: int, factor: int) -> jax.Array:
  """Transposed conv along one axis: taps ``bilinear_taps(f)``, stride f, padding f // 2.

  Output ``n * f``. Output ``f * m + s`` gathers ``sum_d t[f * d + s + p] * x[m - d]`` (zero
  outside ``x``), computed phase by phase from shifted slices and interleaved, which is exact and
  avoids a dilated conv.
  """
  if factor == 1:
    return x
  taps = bilinear_taps(factor)
  pad = factor // 2
  n = x.shape[axis]
  d_lo = -((factor - 1 + pad) // factor)  # smallest d with f * d + (f - 1) + p >= 0
  d_hi = (len(taps) - 1 - pad) // factor  # largest d with f * d + p <= len(taps) - 1
  widths = [(0, 0)] * x.ndim
  widths[axis] = (d_hi, -d_lo)
  padded = jnp.pad(x, widths)  # padded[m + d_hi] == x[m]
  phases = []
  for s in range(factor):
    acc = None
    for d in range(d_lo, d_hi + 1):
      j = factor * d + s + pad
      if 0 <= j < len(taps):
        start = d_hi - d
        term = float(taps[j]) * lax.slice_in_dim(padded, start, start + n, axis=axis)
        acc = term if acc is None else acc + term
    phases.append(acc)
  out = jnp.stack(phases, axis=axis + 1)
  return out.reshape(*x.shape[:axis], n * factor, *x.shape[axis + 1 :])


def bilinear_upsample(x: jax.Array, factors: Sequence[int]) -> jax.Array:
  """Fixed depthwise "bilinear" upsampling of ``[b, z, y, x, c]`` by integer ``(fz, fy, fx)``.

  Equals a depthwise ``ConvTranspose3d`` whose kernel is the outer product of
  ``bilinear_taps(f)`` per axis, stride ``f``, padding ``f // 2`` (PyTC RSUNet: kernel (1, 4, 4),
  stride (1, 2, 2), padding (0, 1, 1)), so each spatial size is multiplied exactly by its factor.
  Like that transposed conv it zero-pads, so border outputs see only part of the kernel mass
  (e.g. ``out[0] = .75 * x[0]`` for factor 2). No parameters; the dtype is preserved.
  """
  for axis, factor in zip((1, 2, 3), factors, strict=True):
    x = _upsample_axis(x, axis, int(factor))
  return x


def max_pool(x: jax.Array, window: Sequence[int]) -> jax.Array:
  """Max pooling of ``[b, z, y, x, c]`` with window = stride = ``window`` (floor division).

  Written as a reshape and a max, which is differentiable and cheap; trailing voxels that do not
  fill a window are dropped, as ``MaxPool3d`` does.
  """
  b, *spatial, c = x.shape
  kept = [n - n % w for n, w in zip(spatial, window, strict=True)]
  x = x[:, : kept[0], : kept[1], : kept[2]]
  blocks = [d for n, w in zip(kept, window, strict=True) for d in (n // w, w)]
  return jnp.max(x.reshape(b, *blocks, c), axis=(2, 4, 6))


def call_block(block: nnx.Module, x: jax.Array, remat: bool) -> jax.Array:
  """``block(x)``, rematerialised in the backward pass when ``remat`` (gradient checkpointing).

  With remat the forward pass keeps only the block's input (and its parameters, which live
  anyway); the backward pass recomputes the block's forward from it and differentiates that,
  trading one extra forward of the block for memory (PyTorch ``checkpoint``). The block must be
  pure: state it updates in the call (none of ours does) would be dropped.

  Written as a ``jax.custom_vjp`` rather than ``jax.checkpoint`` because of where the recompute
  is scheduled. ``jax.checkpoint`` keeps XLA from merging the recompute with the forward pass
  (common-subexpression elimination) by an optimisation barrier, but XLA:CPU drops the barriers
  right after CSE, and then nothing ties the recompute to its place in the backward pass: the
  scheduler runs every block's recompute as soon as its input exists, i.e. during the forward,
  and all of them stay live. Memory was then that of no remat at all (``docs/memory.md``). Here
  the recompute reads the input only through :func:`_after` the incoming cotangent, a real data
  dependency no pass removes, so each block is recomputed just before its own backward and its
  internals die with it.
  """
  if not remat:
    return block(x)
  graphdef, state = nnx.split(block)
  return _rematerialized(graphdef, state, x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rematerialized(graphdef, state, x: jax.Array) -> jax.Array:
  return nnx.merge(graphdef, state)(x)


def _rematerialized_fwd(graphdef, state, x):
  return nnx.merge(graphdef, state)(x), (state, x)


def _rematerialized_bwd(graphdef, residuals, cotangent):
  state, x = residuals
  x = _after(x, cotangent)
  _, vjp = jax.vjp(lambda s, v: nnx.merge(graphdef, s)(v), state, x)
  return vjp(cotangent)


_rematerialized.defvjp(_rematerialized_fwd, _rematerialized_bwd)


def _after(x: jax.Array, y: jax.Array) -> jax.Array:
  """``x`` unchanged, but computed from ``y``: ``x + 0 * y[0, .., 0]`` (a non-finite ``y[0]``
  counts as 0, so it cannot turn ``x`` into NaN). XLA does not fold ``0 * v`` for floats (it is
  NaN for an infinite ``v``), so the dependency survives every pass and orders the work that
  reads the result after ``y``."""
  first = y[(0,) * y.ndim]
  zero = jnp.where(jnp.isfinite(first), first, 0) * 0
  return x + zero.astype(x.dtype)
