"""The ``config.infer`` section, checked once and resolved into :class:`InferenceSettings`.

Everything the sliding-window engine and the block streamer need, with every bad value reported
before any volume is read: window sizes the network cannot take, unknown blending / activation /
ensemble names, output channels the model does not produce, a model whose output channels do not
match the affinity preset (plus the 10 local shape descriptor channels of ``target.lsd``, which
follow the affinities and are never written). Numpy only (no jax).

Shapes are ``(z, y, x)`` voxel triples; ``crop_pad`` is PyTC's six numbers
``(z0, z1, y0, y1, x0, x1)`` cropped from the padded, blended result, or ``()`` to crop exactly
``pad`` (the output then covers the input volume voxel for voxel).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxseg.common import config_util
from jaxseg.common.errors import ConfigError
from jaxseg.data.affinity import Offsets, check_convention, get_preset
from jaxseg.data.targets import check_out_channels
from jaxseg.inference.geometry import BLEND_MODES, Geometry, plan_geometry
from jaxseg.inference.tta import ENSEMBLES

# Named view sets (``infer.tta.views``); each stands for the three keys it sets. "xy8": the 8
# symmetries of the yx square (flips of y and x times quarter turns), PyTC's SNEMI3D "8x";
# "zyx16": those with and without a z flip; "custom": the config's own keys.
TTA_VIEW_SETS = {
  "custom": None,
  "xy8": {"flip_axes": ("y", "x"), "rot90_yx": True, "permute_axes": False},
  "zyx16": {"flip_axes": ("z", "y", "x"), "rot90_yx": True, "permute_axes": False},
}

ACTIVATIONS = ("sigmoid", "scale_sigmoid", "none")
PAD_MODES = ("reflect", "constant")
OUTPUT_DTYPES = ("float16", "float32")


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
  """``config.infer`` resolved against the model and the affinity preset.

  Attributes:
    window: model input window ``(z, y, x)``.
    overlap: fraction of the window shared by neighbours (stride = round(window * (1 - overlap))).
    snap_to_edge: the last window of each axis ends flush with the (padded) volume.
    pad: voxels of padding on both sides of each axis before windowing.
    pad_mode: ``"reflect"`` or ``"constant"`` (zeros).
    crop_pad: ``()`` or six ints cropped from the padded result.
    batch_size: windows per device per model call (``infer.sw_batch_size``).
    blending: window weight profile (``constant``, ``gaussian``, ``bump``, ``distance``).
    activation: ``sigmoid``, ``scale_sigmoid`` (``sigmoid(x / temperature)``) or ``none``.
    temperature: the ``scale_sigmoid`` temperature (5 in BANIS: ``sigmoid(0.2 x)``).
    activation_before_blend: apply the activation per window (BANIS) or after blending (PyTC
      SNEMI blends logits).
    offsets: the ``(dz, dy, dx)`` offset of every model output channel.
    convention: affinity storage convention of the model's channels.
    output_channels: model channels written, in this order (affinity channels only: the model's
      local shape descriptor channels, after the affinities, are never written).
    output_dtype: numpy dtype of the written affinities.
    block_shape: output voxels per block (a multiple of ``chunk_shape``).
    chunk_shape: spatial chunk shape of the output zarr (``()`` in the config = derived).
    tta: the ``infer.tta`` section as a plain dict (views are built per volume: they depend on
      its resolution).
    in_channels: image channels the model takes.
  """

  window: tuple[int, int, int]
  overlap: float
  snap_to_edge: bool
  pad: tuple[int, int, int]
  pad_mode: str
  crop_pad: tuple[int, ...]
  batch_size: int
  blending: str
  activation: str
  temperature: float
  activation_before_blend: bool
  offsets: Offsets
  convention: str
  output_channels: tuple[int, ...]
  output_dtype: np.dtype
  block_shape: tuple[int, int, int]
  chunk_shape: tuple[int, ...]
  tta: dict
  in_channels: int

  @property
  def output_offsets(self) -> Offsets:
    """Offsets of the written channels."""
    return tuple(self.offsets[c] for c in self.output_channels)

  def plan(self, volume_shape: Sequence[int], where: str = "volume") -> Geometry:
    """The window grid and block plan of a volume of spatial shape ``volume_shape``."""
    return plan_geometry(
      volume_shape,
      window=self.window,
      overlap=self.overlap,
      snap_to_edge=self.snap_to_edge,
      pad=self.pad,
      crop_pad=self.crop_pad,
      block_shape=self.block_shape,
      where=where,
    )

  def fingerprint(self) -> dict[str, Any]:
    """Everything that changes the bytes written (resuming with other values would mix outputs).

    ``batch_size`` is left out on purpose: it only changes how many windows share a call, so a
    run may resume on a machine with more or less memory.
    """
    out = dataclasses.asdict(self)
    out.pop("batch_size")
    out["output_dtype"] = np.dtype(self.output_dtype).name
    return _plain(out)


def _plain(value: Any) -> Any:
  """Tuples -> lists, recursively (JSON round trips compare equal)."""
  if isinstance(value, dict):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def _number(value: Any, name: str, kind):
  """``kind(value)`` (int or float), or a ConfigError naming ``infer.<name>``."""
  try:
    out = kind(value)
  except (TypeError, ValueError):
    raise ConfigError(f"infer.{name} must be a number, not {value!r}") from None
  if kind is int and out != value:
    raise ConfigError(f"infer.{name} must be an integer, not {value!r}")
  return out


def _choice(value: Any, name: str, choices: Sequence[str]) -> str:
  if value not in choices:
    raise ConfigError(f"infer.{name} must be one of {', '.join(choices)}; got {value!r}")
  return str(value)


def inference_settings(config) -> InferenceSettings:
  """Resolves and checks ``config.infer`` against ``config.model`` and ``config.target``.

  Raises:
    ConfigError: naming the key and the expected values (a ``ValueError`` too).
  """
  # Imported here: jaxseg.models imports jax, and this module stays importable without it.
  from jaxseg.models import input_multiple

  infer, model = config.infer, config.model
  window = config_util.triple(infer.window, "infer.window", 1)
  multiple = input_multiple(model)
  if any(w % m for w, m in zip(window, multiple, strict=True)):
    raise ConfigError(
      f"infer.window {window} must be a multiple of {multiple} (z, y, x) for this "
      f"{model.name} (its pooling); e.g. "
      f"{tuple(max(m, round(w / m) * m) for w, m in zip(window, multiple, strict=True))}"
    )
  overlap = _number(infer.overlap, "overlap", float)
  if not 0.0 <= overlap < 1.0:
    raise ConfigError(f"infer.overlap must be in [0, 1), got {overlap}")
  pad = config_util.triple(infer.pad, "infer.pad", 0)
  try:
    crop_pad = tuple(int(v) for v in (infer.crop_pad or ()))
  except (TypeError, ValueError):
    crop_pad = (-1,)
  if crop_pad and (len(crop_pad) != 6 or min(crop_pad) < 0):
    raise ConfigError(
      f"infer.crop_pad must be () or six ints >= 0 (z0, z1, y0, y1, x0, x1), got {crop_pad}"
    )
  batch_size = _number(infer.sw_batch_size, "sw_batch_size", int)
  if batch_size < 1:
    raise ConfigError(f"infer.sw_batch_size must be >= 1, got {batch_size}")
  temperature = _number(infer.temperature, "temperature", float)
  if temperature <= 0:
    raise ConfigError(f"infer.temperature must be > 0, got {temperature}")

  try:
    spec = get_preset(config.target.preset)
  except ValueError as e:
    raise ConfigError(f"target.preset: {e}") from None
  try:
    convention = check_convention(config.target.get("convention", spec.convention))
  except ValueError as e:
    raise ConfigError(f"target.convention: {e}") from None
  n_aff, _ = check_out_channels(config)  # the affinities, then any descriptor channels
  try:
    channels = tuple(int(c) for c in (infer.output_channels or range(n_aff)))
  except (TypeError, ValueError):
    channels = ()
  if not channels or any(c < 0 or c >= n_aff for c in channels):
    raise ConfigError(
      f"infer.output_channels {channels} must name affinity channels of the model's {n_aff}"
    )
  if len(set(channels)) != len(channels):
    raise ConfigError(f"infer.output_channels {channels} repeats a channel")

  block_shape = config_util.triple(infer.block_shape, "infer.block_shape", 1)
  chunk_shape = tuple(infer.chunk_shape or ())
  if chunk_shape:
    chunk_shape = config_util.triple(chunk_shape, "infer.chunk_shape", 1)
    if any(b % c for b, c in zip(block_shape, chunk_shape, strict=True)):
      raise ConfigError(
        f"infer.block_shape {block_shape} must be a multiple of infer.chunk_shape {chunk_shape}: "
        "a block writes whole chunks, so blocks never share one"
      )

  tta = infer.tta
  views = str(tta.get("views", "custom"))
  if views not in TTA_VIEW_SETS:
    raise ConfigError(
      f"infer.tta.views must be one of {tuple(TTA_VIEW_SETS)}, not {views!r} ('custom': the "
      "flip_axes / rot90_yx / permute_axes keys)"
    )
  preset = TTA_VIEW_SETS[views] or {}
  tta_dict = {
    "enabled": bool(tta.enabled),
    "flip_axes": tuple(str(a) for a in preset.get("flip_axes", tta.flip_axes)),
    "rot90_yx": bool(preset.get("rot90_yx", tta.rot90_yx)),
    "permute_axes": bool(preset.get("permute_axes", tta.permute_axes)),
    "ensemble": _choice(tta.ensemble, "tta.ensemble", ENSEMBLES),
  }
  return InferenceSettings(
    window=window,
    overlap=overlap,
    snap_to_edge=bool(infer.snap_to_edge),
    pad=pad,
    pad_mode=_choice(infer.pad_mode, "pad_mode", PAD_MODES),
    crop_pad=crop_pad,
    batch_size=batch_size,
    blending=_choice(infer.blending, "blending", BLEND_MODES),
    activation=_choice(infer.activation, "activation", ACTIVATIONS),
    temperature=temperature,
    activation_before_blend=bool(infer.activation_before_blend),
    offsets=spec.offsets,
    convention=convention,
    output_channels=channels,
    output_dtype=np.dtype(_choice(infer.output_dtype, "output_dtype", OUTPUT_DTYPES)),
    block_shape=block_shape,
    chunk_shape=chunk_shape,
    tta=tta_dict,
    in_channels=int(model.in_channels),
  )
