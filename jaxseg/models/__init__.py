"""Segmentation networks: ``build_model`` from a ``config.model`` section, and helpers.

Every model takes ``x`` ``[b, z, y, x, in_channels]`` (float) and returns logits ``[b, z, y, x,
out_channels]`` in its compute dtype (``model_config.compute_dtype``, e.g. bfloat16 under mixed
precision), with parameters (``nnx.Param``) in ``model_config.param_dtype`` (float32). The
spatial sizes must be multiples of ``input_multiple(model_config)``.

- ``"rsunet"`` (``jaxseg.models.rsunet``): DeepEM / PyTC RSUNet, the SNEMI model. Fields:
  in_channels, out_channels, widths, pool, depth_2d, norm_groups, activation, compute_dtype,
  param_dtype, remat.
- ``"mednext"`` (``jaxseg.models.mednext``): MedNeXt v1 S/B/M/L, the NISB (BANIS) model.
  Fields: size, kernel_size, in_channels, out_channels, base_channels, deep_supervision,
  compute_dtype, param_dtype, remat.

To count or restore parameters without allocating them, build under ``nnx.eval_shape``::

  abstract = nnx.eval_shape(lambda: build_model(cfg.model, rngs=nnx.Rngs(0)))
  count_params(abstract)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxseg.common.errors import ConfigError
from jaxseg.models import layers, mednext, rsunet

MODEL_NAMES = ("rsunet", "mednext")


def _get(model_config: Mapping[str, Any], key: str, default: Any) -> Any:
  value = model_config.get(key, default)
  return default if value is None else value


def _check_int(value: Any, name: str, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(f"model.{name} must be an int >= {minimum}, got {value!r}")
  return value


def _int_tuple(value: Any, name: str, length: int | None = None) -> tuple[int, ...]:
  try:
    result = tuple(value)
  except TypeError as e:
    raise ConfigError(f"model.{name} must be a sequence of ints, got {value!r}") from e
  if (
    not result
    or (length is not None and len(result) != length)
    or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in result)
  ):
    size = f"{length} " if length is not None else ""
    raise ConfigError(
      f"model.{name} must be a non-empty sequence of {size}ints >= 1, got {value!r}"
    )
  return result


def _check_name(model_config: Mapping[str, Any]) -> str:
  name = model_config.get("name")
  if name not in MODEL_NAMES:
    raise ConfigError(f"model.name: unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
  return name


def _dtype(value: Any, key: str) -> jnp.dtype:
  try:
    return layers.resolve_dtype(value)
  except ValueError as e:
    raise ConfigError(f"{key}: {e}") from None


def build_model(
  model_config: Mapping[str, Any],
  *,
  rngs: nnx.Rngs,
  compute_dtype: str | jnp.dtype | None = None,
) -> nnx.Module:
  """Builds the network ``model_config.name`` describes.

  Args:
    model_config: the ``config.model`` section (a ConfigDict or a plain mapping).
    rngs: parameter initialisation keys.
    compute_dtype: overrides ``model_config.compute_dtype`` when given (e.g. float32 for an
      evaluation that should not run in bf16).

  Returns:
    The model; ``model(x)`` maps ``[b, z, y, x, in]`` to ``[b, z, y, x, out]`` logits. All
    parameters are drawn in one compiled program from ``rngs.params()``
    (``layers.initialize``), so building is fast and reproducible for a given key.

  Raises:
    ConfigError: for an unknown name or an invalid field (names the ``model.*`` key; also a
      ``ValueError``).
  """
  name = _check_name(model_config)
  if compute_dtype is not None:
    dtype = _dtype(compute_dtype, "compute dtype")
  else:
    dtype = _dtype(_get(model_config, "compute_dtype", None), "model.compute_dtype")
  param_dtype = _dtype(_get(model_config, "param_dtype", None), "model.param_dtype")
  in_channels = _check_int(model_config.get("in_channels"), "in_channels")
  out_channels = _check_int(model_config.get("out_channels"), "out_channels")
  remat = bool(_get(model_config, "remat", False))
  if name == "rsunet":
    widths = _int_tuple(model_config.get("widths"), "widths")
    depth_2d = _check_int(_get(model_config, "depth_2d", 1), "depth_2d", minimum=0)
    if depth_2d > len(widths):
      raise ConfigError(
        f"model.depth_2d must be in [0, {len(widths)}] (the levels of model.widths), got {depth_2d}"
      )
    activation = _get(model_config, "activation", "elu")
    try:
      layers.activation_fn(activation)
    except ValueError as e:
      raise ConfigError(f"model.activation: {e}") from None
    construct = functools.partial(
      rsunet.RSUNet,
      in_channels,
      out_channels,
      widths=widths,
      pool=_int_tuple(_get(model_config, "pool", (1, 2, 2)), "pool", 3),
      depth_2d=depth_2d,
      norm_groups=_check_int(_get(model_config, "norm_groups", 4), "norm_groups"),
      activation=activation,
      remat=remat,
      dtype=dtype,
      param_dtype=param_dtype,
    )
    return layers.initialize(lambda r: construct(rngs=r), rngs)
  size = model_config.get("size")
  if size not in mednext.SIZES:
    raise ConfigError(f"model.size must be one of {sorted(mednext.SIZES)}, got {size!r}")
  kernel_size = _check_int(_get(model_config, "kernel_size", 3), "kernel_size")
  if kernel_size % 2 == 0:
    raise ConfigError(f"model.kernel_size must be odd, got {kernel_size}")
  construct = functools.partial(
    mednext.MedNeXt,
    in_channels,
    out_channels,
    size=size,
    kernel_size=kernel_size,
    base_channels=_check_int(_get(model_config, "base_channels", 32), "base_channels"),
    deep_supervision=bool(_get(model_config, "deep_supervision", False)),
    remat=remat,
    dtype=dtype,
    param_dtype=param_dtype,
  )
  return layers.initialize(lambda r: construct(rngs=r), rngs)


def count_params(model: nnx.Module) -> int:
  """Number of scalars in the model's ``nnx.Param`` leaves (works on ``nnx.eval_shape`` models).

  The fixed RSUNet upsampling kernel is not a parameter and is not counted.
  """
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  return sum(math.prod(leaf.shape) for leaf in leaves)


def input_multiple(model_config: Mapping[str, Any]) -> tuple[int, int, int]:
  """``(mz, my, mx)``: every spatial input size must be a multiple of these.

  RSUNet: ``pool ** (len(widths) - 1)`` per axis ((1, 16, 16) for SNEMI); MedNeXt: (16, 16, 16).

  Raises:
    ConfigError: an unknown ``model.name``, bad ``model.widths`` / ``model.pool``.
  """
  name = _check_name(model_config)
  if name == "rsunet":
    widths = _int_tuple(model_config.get("widths"), "widths")
    pool = _int_tuple(_get(model_config, "pool", (1, 2, 2)), "pool", 3)
    return rsunet.input_multiple(pool, len(widths))
  return mednext.INPUT_MULTIPLE


__all__ = ["MODEL_NAMES", "build_model", "count_params", "input_multiple"]
