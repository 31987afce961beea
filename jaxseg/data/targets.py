"""Target settings: ``config.target`` resolved and checked, and the crop shape the host reads.

Owns :class:`TargetSettings` (the affinity offsets ``(dz, dy, dx)`` per channel, their storage
convention, the ``((lead, trail),) * 3`` context read around the patch, the label erosion) and the
read shape ``(Zr, Yr, Xr)`` = ``data.patch_size`` + context, which the host crop reader
(:class:`jaxseg.data.pipeline.TrainData`) and the device transform
(:func:`jaxseg.data.pipeline.make_device_transform`) share.

Also owns the optional local shape descriptor head (``target.lsd``, :class:`LsdSettings`; the
descriptors themselves are computed by :mod:`jaxseg.data.lsd`) and the one rule for the model's
output channels, :func:`model_out_channels`: the ``n_aff`` affinity channels of the preset first,
then :data:`LSD_CHANNELS` descriptor channels when ``target.lsd.enabled``. Numpy-free.
"""

from __future__ import annotations

import dataclasses

from jaxseg.common import config_util
from jaxseg.common.errors import ConfigError
from jaxseg.data.affinity import Context, affinity_context, check_convention, get_preset
from jaxseg.data.erosion import PLANES


@dataclasses.dataclass(frozen=True)
class TargetSettings:
  """What ``config.target`` asks for, resolved and checked.

  Attributes:
    offsets: ``(dz, dy, dx)`` per affinity channel (from ``target.preset``).
    convention: ``'source'`` or ``'target'`` storage.
    context: ``((lead_z, trail_z), (lead_y, trail_y), (lead_x, trail_x))`` read around the patch.
    erosion: half-width of the erosion window (0: none).
    erosion_plane: ``'yx'``, ``'zy'`` or ``'zx'``.
  """

  offsets: tuple[tuple[int, int, int], ...]
  convention: str
  context: Context
  erosion: int
  erosion_plane: str

  @property
  def num_channels(self) -> int:
    return len(self.offsets)


def target_settings(config) -> TargetSettings:
  """Resolves ``config.target`` into :class:`TargetSettings`.

  ``target.target_context`` is PyTC's number: either 3 values (extra voxels per axis z, y, x) or 6
  (leading z, y, x then trailing z, y, x). All zeros means no context (edges whose partner lies
  outside the crop are masked, the SNEMI recipe). Otherwise the context is
  ``affinity_context(offsets, convention)`` and must agree with the configured numbers.

  Raises:
    ValueError: context disagreeing with the preset, ``relabel_connected_components=True``, or a
      bad erosion setting.
  """
  target = config.target
  try:
    spec = get_preset(target.preset)
    convention = check_convention(target.get("convention", spec.convention))
  except ValueError as e:  # the message names the bad value and the valid ones
    raise ConfigError(f"config.target: {e}") from None
  if target.get("relabel_connected_components", False):
    raise ConfigError(
      "target.relabel_connected_components=True is not supported: jaxseg keeps the label ids of "
      "the volume within each crop, as PyTC's recipes do (relabel_connected_components: false)"
    )
  configured = tuple(int(v) for v in target.get("target_context", (0, 0, 0)))
  if len(configured) not in (3, 6) or min(configured, default=0) < 0:
    raise ConfigError(
      f"target.target_context must be 3 (per axis) or 6 (leading z, y, x, trailing z, y, x) "
      f"non-negative ints, got {configured}"
    )
  if any(configured):
    context = affinity_context(spec.offsets, convention)
    if len(configured) == 3:
      agrees = all(lead + trail == c for (lead, trail), c in zip(context, configured, strict=True))
    else:
      lead, trail = configured[:3], configured[3:]
      agrees = context == tuple(zip(lead, trail, strict=True))
    if not agrees:
      raise ConfigError(
        f"target.target_context {configured} disagrees with the context the {target.preset!r} "
        f"offsets need under the {convention!r} convention: {context} ((leading, trailing) per "
        "axis z, y, x); fix target_context or set it to zeros for no context"
      )
  else:
    context = ((0, 0), (0, 0), (0, 0))
  erosion = target.get("erosion", 0)
  if int(erosion) != erosion or erosion < 0:
    raise ConfigError(f"target.erosion must be a non-negative int, got {erosion!r}")
  plane = target.get("erosion_plane", "yx")
  if plane not in PLANES:
    raise ConfigError(f"target.erosion_plane must be one of {sorted(PLANES)}, got {plane!r}")
  return TargetSettings(spec.offsets, convention, context, int(erosion), plane)


def read_shape_for(config) -> tuple[int, int, int]:
  """``data.patch_size`` plus the target context: the crop the host reads, ``(Zr, Yr, Xr)``."""
  patch = patch_size_for(config)
  context = target_settings(config).context
  return tuple(p + lead + trail for p, (lead, trail) in zip(patch, context, strict=True))


def patch_size_for(config) -> tuple[int, int, int]:
  patch = tuple(int(p) for p in config.data.patch_size)
  if len(patch) != 3 or min(patch) < 1:
    raise ConfigError(f"data.patch_size must be 3 positive ints (z, y, x), got {patch}")
  return patch


# -- local shape descriptors (docs/targets_and_losses.md, "Local shape descriptors") --------------

# Mean offset (z, y, x), covariance (zz, yy, xx, zy, zx, yx), size.
LSD_CHANNELS = 10


@dataclasses.dataclass(frozen=True)
class LsdSettings:
  """``config.target.lsd`` resolved (only when enabled); hashable, so a static jit argument.

  Attributes:
    sigma_nm: the Gaussian window's standard deviation per axis ``(z, y, x)``, in nm.
    resolution: ``data.resolution``, nm per voxel ``(z, y, x)``.
    downsample: grid step per axis on which the descriptors are computed (then interpolated).
    max_objects: objects per crop that get descriptors (the ``max_objects`` smallest ids).
    weight: factor of the LSD loss added to the affinity loss.
  """

  sigma_nm: tuple[float, float, float]
  resolution: tuple[float, float, float]
  downsample: tuple[int, int, int]
  max_objects: int
  weight: float


def _positive_floats(value, key: str) -> tuple[float, float, float]:
  try:
    values = (value,) * 3 if isinstance(value, (int, float)) else tuple(value)
    out = tuple(float(v) for v in values)
  except (TypeError, ValueError):
    out = ()
  if len(out) != 3 or not all(0.0 < v < float("inf") for v in out):
    raise ConfigError(f"{key} must be one or three positive numbers (z, y, x; nm), got {value!r}")
  return out


def lsd_settings(config) -> LsdSettings | None:
  """``config.target.lsd`` resolved, or None when the section is absent or not enabled.

  Raises:
    ConfigError: a bad ``target.lsd`` value, or no ``data.resolution`` to measure sigma in.
  """
  lsd = config.target.get("lsd", None)
  if lsd is None or not lsd.get("enabled", False):
    return None
  sigma = _positive_floats(lsd.get("sigma_nm", 80.0), "target.lsd.sigma_nm")
  resolution = config.data.get("resolution", None)
  if resolution is None:
    raise ConfigError(
      "target.lsd.enabled needs data.resolution (nm per voxel, z, y, x): the descriptors' "
      "window target.lsd.sigma_nm is in nm"
    )
  resolution = _positive_floats(resolution, "data.resolution")
  downsample = config_util.triple(lsd.get("downsample", 2), "target.lsd.downsample", scalar=True)
  max_objects = lsd.get("max_objects", 128)
  if int(max_objects) != max_objects or max_objects < 1:
    raise ConfigError(f"target.lsd.max_objects must be an int >= 1, got {max_objects!r}")
  weight = lsd.get("weight", 1.0)
  if not isinstance(weight, (int, float)) or not 0.0 <= weight < float("inf"):
    raise ConfigError(f"target.lsd.weight must be a number >= 0, got {weight!r}")
  return LsdSettings(sigma, resolution, downsample, int(max_objects), float(weight))


def model_out_channels(config) -> tuple[int, int]:
  """``(n_aff, n_lsd)``: the model's output channels are ``n_aff`` affinities then ``n_lsd``
  local shape descriptors (0 unless ``target.lsd.enabled``). The one place this is derived."""
  try:
    n_aff = get_preset(config.target.preset).num_channels
  except ValueError as e:
    raise ConfigError(f"config.target: {e}") from None
  return n_aff, LSD_CHANNELS if lsd_settings(config) is not None else 0


def check_out_channels(config) -> tuple[int, int]:
  """:func:`model_out_channels`, after checking ``model.out_channels`` is their sum.

  Raises:
    ConfigError: one line naming ``model.out_channels``, ``target.preset`` and
      ``target.lsd.enabled`` with the number they need.
  """
  n_aff, n_lsd = model_out_channels(config)
  have = config.model.get("out_channels", None)
  if have != n_aff + n_lsd:
    lsd = f" + {n_lsd} (target.lsd.enabled=True)" if n_lsd else " (target.lsd.enabled=False)"
    raise ConfigError(
      f"model.out_channels={have!r} but target.preset={config.target.preset!r} gives {n_aff} "
      f"affinity channels{lsd}: set model.out_channels={n_aff + n_lsd}"
    )
  return n_aff, n_lsd
