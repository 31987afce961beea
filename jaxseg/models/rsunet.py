"""RSUNet: the residual symmetric U-Net of DeepEM / PyTC (``docs/models.md``, "RSUNet").

Input ``[b, z, y, x, in_channels]`` (float, any dtype), output ``[b, z, y, x, out_channels]``
logits in the compute dtype. Each spatial size must be a multiple of ``input_multiple(pool,
len(widths))`` (with the SNEMI preset (1, 16, 16)), so that every pooled size is exact and the
upsampled path lines up with its skip.

Layout, with ``L = len(widths)`` levels; level ``l`` uses (1, 3, 3) kernels if ``l < depth_2d``
and 3x3x3 otherwise, all "same"-padded and without bias:

- Pre-activation unit ``NormActConv(i, o)``: GroupNorm -> activation -> conv ``i -> o``.
- ``ConvBlock(i, o)``: ``NormActConv(i, o)``; ``x + NormActConv(o, o)(NormActConv(o, o)(x))``;
  ``NormActConv(o, o)``.
- Input block ``ConvBlock(in, w0)`` (its first op normalises the raw image).
- Down stage ``l = 1 .. L-1``: max-pool by ``pool``, then ``ConvBlock(w[l-1], w[l])``.
- Up stage ``l = L-1 .. 1``: fixed bilinear upsampling (a depthwise transposed conv with taps
  ``[.25, .75, .75, .25]`` per pooled axis; no parameters), 1x1x1 conv ``w[l] -> w[l-1]``,
  *add* the level's skip, ``ConvBlock(w[l-1], w[l-1])``.
- Head: GroupNorm -> activation -> 1x1x1 conv ``w0 -> out_channels`` with bias.

GroupNorm uses ``norm_groups`` decremented until it divides the width (18 -> 3). Convs are
initialised Kaiming-normal (fan_out), the head bias with zeros, norms with scale 1 and bias 0.
With widths (18, 36, 48, 64, 80), 1 -> 12 channels and depth_2d 1 the net has 2,292,824
parameters (PyTC: about 2.29 M).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxseg.common.errors import ConfigError
from jaxseg.models import layers


def input_multiple(pool: Sequence[int], num_levels: int) -> tuple[int, int, int]:
  """Per-axis divisor the input needs: ``pool ** (num_levels - 1)``."""
  return tuple(int(p) ** (num_levels - 1) for p in pool)


class NormActConv(nnx.Module):
  """GroupNorm -> activation -> conv (no bias), the pre-activation unit of RSUNet."""

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: Sequence[int],
    *,
    norm_groups: int,
    activation: str,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
    rngs: nnx.Rngs,
  ):
    self.norm = layers.GroupNorm(
      in_features,
      layers.resolve_groups(in_features, norm_groups),
      activation=activation,
      dtype=dtype,
      param_dtype=param_dtype,
    )
    self.conv = layers.Conv(
      in_features,
      out_features,
      kernel_size,
      use_bias=False,
      kernel_init=layers.kaiming_normal_fan_out(out_features, kernel_size),
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(self.norm(x))


class ConvBlock(nnx.Module):
  """``NormActConv(i, o)``, a two-unit residual ``x + f(x)``, then ``NormActConv(o, o)``."""

  def __init__(self, in_features: int, out_features: int, kernel_size: Sequence[int], **kwargs):
    self.pre = NormActConv(in_features, out_features, kernel_size, **kwargs)
    self.res1 = NormActConv(out_features, out_features, kernel_size, **kwargs)
    self.res2 = NormActConv(out_features, out_features, kernel_size, **kwargs)
    self.post = NormActConv(out_features, out_features, kernel_size, **kwargs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.pre(x)
    x = x + self.res2(self.res1(x))
    return self.post(x)


class RSUNet(nnx.Module):
  """Residual symmetric U-Net; see the module docstring for the layout and shapes."""

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    *,
    widths: Sequence[int] = (18, 36, 48, 64, 80),
    pool: Sequence[int] = (1, 2, 2),
    depth_2d: int = 1,
    norm_groups: int = 4,
    activation: str = "elu",
    remat: bool = False,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    widths = tuple(int(w) for w in widths)
    pool = tuple(int(p) for p in pool)
    if not widths or any(w < 1 for w in widths):
      raise ConfigError(f"model.widths must be a non-empty sequence of ints >= 1, got {widths}")
    if len(pool) != 3 or any(p < 1 for p in pool):
      raise ConfigError(f"model.pool must be 3 ints >= 1 (z, y, x), got {pool}")
    if not 0 <= depth_2d <= len(widths):
      raise ConfigError(f"model.depth_2d must be in [0, {len(widths)}], got {depth_2d}")
    if norm_groups < 1:
      raise ConfigError(f"model.norm_groups must be >= 1, got {norm_groups}")
    if in_channels < 1 or out_channels < 1:
      raise ConfigError(
        f"model.in_channels / model.out_channels must be >= 1, got {in_channels} / {out_channels}"
      )
    layers.activation_fn(activation)
    self.widths = widths
    self.pool = pool
    self.remat = remat
    self.dtype = dtype
    kw = dict(
      norm_groups=norm_groups,
      activation=activation,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )

    def kernel(level):
      return (1, 3, 3) if level < depth_2d else (3, 3, 3)

    levels = len(widths)
    self.input_block = ConvBlock(in_channels, widths[0], kernel(0), **kw)
    self.down_blocks = nnx.List(
      [
        ConvBlock(widths[level - 1], widths[level], kernel(level), **kw)
        for level in range(1, levels)
      ]
    )
    # Decoder, deepest first: up_proj[i] / up_blocks[i] bring level L-1-i to level L-2-i.
    self.up_proj = nnx.List(
      [
        layers.Conv(
          widths[level],
          widths[level - 1],
          1,
          use_bias=False,
          kernel_init=layers.kaiming_normal_fan_out(widths[level - 1], (1, 1, 1)),
          dtype=dtype,
          param_dtype=param_dtype,
          rngs=rngs,
        )
        for level in range(levels - 1, 0, -1)
      ]
    )
    self.up_blocks = nnx.List(
      [
        ConvBlock(widths[level - 1], widths[level - 1], kernel(level - 1), **kw)
        for level in range(levels - 1, 0, -1)
      ]
    )
    self.head_norm = layers.GroupNorm(
      widths[0],
      layers.resolve_groups(widths[0], norm_groups),
      activation=activation,
      dtype=dtype,
      param_dtype=param_dtype,
    )
    self.head = layers.Conv(
      widths[0],
      out_channels,
      1,
      use_bias=True,
      kernel_init=layers.kaiming_normal_fan_out(out_channels, (1, 1, 1)),
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits ``[b, z, y, x, out_channels]`` in the compute dtype for ``x`` ``[b, z, y, x, c]``."""
    multiple = input_multiple(self.pool, len(self.widths))
    if x.ndim != 5 or any(s % m for s, m in zip(x.shape[1:4], multiple, strict=True)):
      raise ValueError(
        f"rsunet: input must be [b, z, y, x, c] with (z, y, x) divisible by {multiple}, "
        f"got shape {x.shape}"
      )
    x = layers.call_block(self.input_block, x, self.remat)
    skips = []
    for block in self.down_blocks:
      skips.append(x)
      x = layers.max_pool(x, self.pool)
      x = layers.call_block(block, x, self.remat)
    for proj, block in zip(self.up_proj, self.up_blocks, strict=True):
      x = layers.bilinear_upsample(x, self.pool)
      x = proj(x) + skips.pop()
      x = layers.call_block(block, x, self.remat)
    return self.head(self.head_norm(x))


__all__ = ["ConvBlock", "NormActConv", "RSUNet", "input_multiple"]
