"""MedNeXt v1 (Roy et al. 2023), the BANIS / PyTC NISB network, sizes S, B, M, L.

Input ``[b, z, y, x, in_channels]``, output ``[b, z, y, x, out_channels]`` logits in the compute
dtype; each spatial size must be a multiple of 16 (four isotropic stride-2 stages).

Layout, with ``C = base_channels`` (32) and widths ``C, 2C, 4C, 8C, 16C``; stages are indexed
enc0-3, bottleneck, dec3-0, and ``exp[i]`` / ``blocks[i]`` come from ``SIZES``:

- Stem: 1x1x1 conv ``in -> C`` with bias.
- ``Block(c, r)``: depthwise k^3 conv (bias) -> GroupNorm(groups=c) -> 1x1 conv ``c -> r c`` ->
  GELU -> 1x1 conv ``r c -> c`` -> ``+ input``.
- Encoder stage i: ``blocks[i]`` x ``Block(C_i, exp[i])`` (its output is the skip), then
  ``DownBlock(C_i -> C_{i+1}, exp[i+1])``: the block with a stride-2 depthwise conv, output
  ``2 C_i``, no inner residual, plus a 1x1 stride-2 conv of the input.
- Bottleneck: ``blocks[4]`` x ``Block(16C, exp[4])``.
- Decoder stage j (level 3 .. 0): ``UpBlock(C_{j+1} -> C_j, exp[...])`` (depthwise stride-2
  transposed conv, plus a 1x1 stride-2 transposed conv of the input), *add* the skip, then
  ``Block`` x ``blocks[...]``.
- Head: 1x1x1 conv ``C -> out_channels`` with bias (a ``ConvTranspose3d`` in the reference, which
  only changes its init scale).

Up-block geometry (reproduces MedNeXt / PyTC exactly): a stride-2 transposed conv with kernel k
and padding ``k // 2`` gives ``2n - 1`` voxels, one short of the skip. The reference then
*prepends* one zero voxel on each spatial axis (``F.pad(x, (1, 0, 1, 0, 1, 0))``), to both the
block output and the residual path, so output ``0`` along each axis is exactly zero before the
skip is added and output ``o >= 1`` comes from transposed-conv position ``o - 1``. Padding at
the end instead would shift the decoder by one voxel relative to the skip.

Initialisation is PyTorch's default (``torch_default_uniform``): weights and biases
``U(+-1/sqrt(fan_in))`` with PyTorch's fan-in, which for transposed convs counts *output*
channels per group. GroupNorm scale 1, bias 0.

Deep supervision (off by default, as in BANIS and PyTC): the call returns a tuple ``(full,
half, quarter, eighth, sixteenth)`` of logits, finest first (MedNeXt's ``[x, x_ds_1, ..,
x_ds_4]``), from extra 1x1 heads after dec1, dec2, dec3 and the bottleneck.

Remat: with ``remat=True`` every block (including down and up blocks) is rematerialised in the
backward pass, PyTorch's ``checkpoint_style='outside_block'``; the memory it saves (MedNeXt-L at
128^3, batch 2: about 20 GB per device for the step) is counted in ``docs/memory.md``.

Parameter counts (1 -> 6 channels): S/k3 5,551,046 (paper: 5.6 M), B/k3 10,526,438 (10.5 M),
M/k3 17,549,094 (17.6 M), L/k3 61,779,398 (61.8 M), L/k5 62,993,030 (63.0 M). The reference
has one more parameter, a dummy tensor working around a PyTorch checkpointing bug, which is not
part of the network.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxseg.common.errors import ConfigError
from jaxseg.models import layers

# size -> (expansion ratio per stage, blocks per stage), stages enc0-3, bottleneck, dec3-0
# (MedNeXt create_mednextv1_{small,base,medium,large}).
SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
  "S": ((2,) * 9, (2,) * 9),
  "B": ((2, 3, 4, 4, 4, 4, 4, 3, 2), (2,) * 9),
  "M": ((2, 3, 4, 4, 4, 4, 4, 3, 2), (3, 4, 4, 4, 4, 4, 4, 4, 3)),
  "L": ((3, 4, 8, 8, 8, 8, 8, 4, 3), (3, 4, 8, 8, 8, 8, 8, 4, 3)),
}

NUM_STAGES = 4
INPUT_MULTIPLE = (2**NUM_STAGES,) * 3


def _conv(in_f, out_f, kernel, *, strides=1, groups=1, dtype, param_dtype, rngs, padding=None):
  """``Conv`` with PyTorch's default ``Conv3d`` initialisation."""
  fan_in = layers.torch_fan_in(in_f, out_f, (kernel,) * 3, groups)
  init = layers.torch_default_uniform(fan_in)
  return layers.Conv(
    in_f,
    out_f,
    kernel,
    strides=strides,
    padding=padding,
    groups=groups,
    kernel_init=init,
    bias_init=init,
    dtype=dtype,
    param_dtype=param_dtype,
    rngs=rngs,
  )


def _conv_transpose(in_f, out_f, kernel, *, strides=1, groups=1, dtype, param_dtype, rngs):
  """``ConvTranspose`` (padding ``kernel // 2``) with PyTorch's ``ConvTranspose3d`` init."""
  fan_in = layers.torch_fan_in(in_f, out_f, (kernel,) * 3, groups, transposed=True)
  init = layers.torch_default_uniform(fan_in)
  return layers.ConvTranspose(
    in_f,
    out_f,
    kernel,
    strides=strides,
    padding=(kernel // 2,) * 3,
    groups=groups,
    kernel_init=init,
    bias_init=init,
    dtype=dtype,
    param_dtype=param_dtype,
    rngs=rngs,
  )


class _InvertedBottleneck(nnx.Module):
  """``depthwise(x)`` -> GroupNorm(groups=c) -> 1x1 ``c -> r c`` -> GELU -> 1x1 ``r c -> out``."""

  def __init__(self, depthwise, channels, out_channels, expansion, *, dtype, param_dtype, rngs):
    self.depthwise = depthwise
    # groups == channels: every channel is normalised on its own (the MedNeXt default).
    self.norm = layers.GroupNorm(channels, channels, dtype=dtype, param_dtype=param_dtype)
    hidden = expansion * channels
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.expand = _conv(channels, hidden, 1, **kw)
    self.compress = _conv(hidden, out_channels, 1, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.expand(self.norm(self.depthwise(x)))
    y = layers.activation_fn("gelu")(y)
    return self.compress(y)


class Block(nnx.Module):
  """MedNeXt block ``x + f(x)`` at constant width and resolution."""

  def __init__(self, channels, expansion, kernel_size, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    depthwise = _conv(channels, channels, kernel_size, groups=channels, **kw)
    self.body = _InvertedBottleneck(depthwise, channels, channels, expansion, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x + self.body(x)


class DownBlock(nnx.Module):
  """Stride-2 block ``c -> out``: ``f(x)`` (stride-2 depthwise conv) + 1x1 stride-2 conv of x."""

  def __init__(self, channels, out_channels, expansion, kernel_size, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    depthwise = _conv(channels, channels, kernel_size, strides=2, groups=channels, **kw)
    self.body = _InvertedBottleneck(depthwise, channels, out_channels, expansion, **kw)
    self.residual = _conv(channels, out_channels, 1, strides=2, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.body(x) + self.residual(x)


class UpBlock(nnx.Module):
  """Stride-2 up block ``c -> out``: ``2n - 1`` voxels from the transposed convs, then one zero
  voxel prepended per spatial axis (see the module docstring) to reach ``2n``."""

  def __init__(self, channels, out_channels, expansion, kernel_size, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    depthwise = _conv_transpose(channels, channels, kernel_size, strides=2, groups=channels, **kw)
    self.body = _InvertedBottleneck(depthwise, channels, out_channels, expansion, **kw)
    self.residual = _conv_transpose(channels, out_channels, 1, strides=2, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.body(x) + self.residual(x)
    # Zero padding is linear, so padding the sum equals the reference's padding of both terms.
    return jnp.pad(y, ((0, 0), (1, 0), (1, 0), (1, 0), (0, 0)))


class MedNeXt(nnx.Module):
  """MedNeXt v1; see the module docstring for the layout, shapes and options."""

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    *,
    size: str = "S",
    kernel_size: int = 3,
    base_channels: int = 32,
    deep_supervision: bool = False,
    remat: bool = False,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    if size not in SIZES:
      raise ConfigError(f"model.size: unknown MedNeXt size {size!r}; valid: {sorted(SIZES)}")
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
      # An even kernel breaks the "same" padding and the 2n - 1 up-block geometry.
      raise ConfigError(f"model.kernel_size must be an odd int >= 1, got {kernel_size!r}")
    if base_channels < 1 or in_channels < 1 or out_channels < 1:
      raise ConfigError(
        "model.in_channels / model.out_channels / model.base_channels must be >= 1, got "
        f"{in_channels} / {out_channels} / {base_channels}"
      )
    expansions, counts = SIZES[size]
    widths = [base_channels * 2**i for i in range(NUM_STAGES + 1)]
    self.deep_supervision = deep_supervision
    self.remat = remat
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    k = kernel_size

    def stage(width, index):
      return nnx.List([Block(width, expansions[index], k, **kw) for _ in range(counts[index])])

    self.stem = _conv(in_channels, base_channels, 1, **kw)
    self.encoders = nnx.List([stage(widths[i], i) for i in range(NUM_STAGES)])
    self.downs = nnx.List(
      [DownBlock(widths[i], widths[i + 1], expansions[i + 1], k, **kw) for i in range(NUM_STAGES)]
    )
    self.bottleneck = stage(widths[NUM_STAGES], NUM_STAGES)
    # Decoder stages deepest first: ups[j] / decoders[j] bring level 4-j to level 3-j and use
    # stage index 5 + j of the size tables.
    self.ups = nnx.List(
      [
        UpBlock(widths[NUM_STAGES - j], widths[NUM_STAGES - j - 1], expansions[5 + j], k, **kw)
        for j in range(NUM_STAGES)
      ]
    )
    self.decoders = nnx.List(
      [stage(widths[NUM_STAGES - j - 1], NUM_STAGES + 1 + j) for j in range(NUM_STAGES)]
    )

    # The reference heads are 1x1 ConvTranspose3d: a pointwise conv whose PyTorch init scale
    # uses the output width as fan-in.
    def head(width):
      init = layers.torch_default_uniform(
        layers.torch_fan_in(width, out_channels, (1, 1, 1), 1, True)
      )
      return layers.Conv(width, out_channels, 1, kernel_init=init, bias_init=init, **kw)

    self.head = head(widths[0])
    # ds_heads[s - 1] reads level s (s = 1 .. 4), MedNeXt's out_1 .. out_4.
    self.ds_heads = (
      nnx.List([head(widths[s]) for s in range(1, NUM_STAGES + 1)]) if deep_supervision else None
    )

  def __call__(self, x: jax.Array) -> jax.Array | tuple[jax.Array, ...]:
    """Logits ``[b, z, y, x, out]``, or the deep-supervision tuple (finest first)."""
    if x.ndim != 5 or any(s % m for s, m in zip(x.shape[1:4], INPUT_MULTIPLE, strict=True)):
      raise ValueError(
        f"mednext: input must be [b, z, y, x, c] with (z, y, x) divisible by {INPUT_MULTIPLE}, "
        f"got shape {x.shape}"
      )

    def run(blocks, h):
      for block in blocks:
        h = layers.call_block(block, h, self.remat)
      return h

    x = self.stem(x)
    skips = []
    for encoder, down in zip(self.encoders, self.downs, strict=True):
      x = run(encoder, x)
      skips.append(x)
      x = layers.call_block(down, x, self.remat)
    x = run(self.bottleneck, x)
    side_outputs = []
    if self.ds_heads is not None:
      side_outputs.append(self.ds_heads[NUM_STAGES - 1](x))
    for j, (up, decoder) in enumerate(zip(self.ups, self.decoders, strict=True)):
      x = layers.call_block(up, x, self.remat) + skips.pop()
      x = run(decoder, x)
      level = NUM_STAGES - 1 - j
      if self.ds_heads is not None and level >= 1:
        side_outputs.append(self.ds_heads[level - 1](x))
    logits = self.head(x)
    if self.ds_heads is None:
      return logits
    return (logits, *reversed(side_outputs))


__all__ = ["INPUT_MULTIPLE", "SIZES", "Block", "DownBlock", "MedNeXt", "UpBlock"]
