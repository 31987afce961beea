"""Target settings: ``config.target`` resolved and checked, and the crop shape the host reads.

Owns :class:`TargetSettings` (the affinity offsets ``(dz, dy, dx)`` per channel, their storage
convention, the ``((lead, trail),) * 3`` context read around the patch, the label erosion) and the
read shape ``(Zr, Yr, Xr)`` = ``data.patch_size`` + context, which the host crop reader
(:class:`jaxseg.data.pipeline.TrainData`) and the device transform
(:func:`jaxseg.data.pipeline.make_device_transform`) share.
"""

from __future__ import annotations

import dataclasses

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
