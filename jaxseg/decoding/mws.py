"""The mutex watershed (``decode.method = "mws"``): every affinity channel at once, no threshold.

Wolf et al., "The Mutex Watershed" (ECCV 2018; TPAMI 2020), through the ``mwatershed`` package
(``docs/decoding.md``, "Mutex watershed"). Owns:

  * :class:`MwsChannels` / :func:`resolve_channels`: which stored channels of an affinity volume
    ``[C, z, y, x]`` the decoder reads, their ``(z, y, x)`` offsets and storage convention, from
    the attributes ``jaxseg.predict`` writes (``channels``, ``offsets``, ``convention``). Refuses,
    in one line, a file without the long-range channels (``infer.output_channels``), without
    offsets, or larger than ``decode.mws.max_voxels``.
  * :func:`check_predicted_channels`: the same refusal from the config alone, before a
    prediction is made (the tuner and the chain).
  * :func:`edge_weights`: probabilities ``[C, z, y, x]`` to signed weights ``p - bias`` (float64;
    > 0 attractive, < 0 repulsive, processed by decreasing magnitude).
  * :func:`mutex_watershed`: affinities ``[C, z, y, x]`` (either convention) to labels
    ``[z, y, x]``, ids ``1..K`` in scan order, optional size filter.

Whole volume in memory only (no blockwise variant): about 75 bytes per edge inside
``mwatershed`` plus 16 bytes per channel and voxel for the weights, i.e. ~0.45 kB per voxel with
banis6's six channels. Never imports JAX.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from jaxseg.common.errors import ConfigError
from jaxseg.data.affinity import convert_convention, get_preset
from jaxseg.decoding import labels as labels_lib
from jaxseg.decoding.settings import DecodeSettings, MwsSettings, decode_settings

# Measured peak of mwatershed 0.5.4 per edge (edge list, weights, sort), and the weights' two
# float64 copies (ours and the one mwatershed takes) per channel and voxel: the refusal's estimate.
_BYTES_PER_EDGE = 75
_BYTES_PER_CHANNEL_VOXEL = 16
_SUGGEST = "decode it with decode.method='cc' or 'waterz' (blockwise)"


def is_long_range(offset: Sequence[int]) -> bool:
  """Any edge longer than one face step (``(0, 0, 10)``, ``(2, 0, 0)``; diagonals too)."""
  return sum(abs(int(d)) for d in offset) > 1


@dataclasses.dataclass(frozen=True)
class MwsChannels:
  """The stored channels the mutex watershed decodes.

  Attributes:
    positions: stored channel indices, in the order decoded (by channel number).
    channels: the preset's numbers of those channels.
    offsets: ``(dz, dy, dx)`` of each.
    convention: ``source`` or ``target``.
  """

  positions: tuple[int, ...]
  channels: tuple[int, ...]
  offsets: tuple[tuple[int, int, int], ...]
  convention: str

  def read(self, volume, box: Sequence[slice] = ()) -> np.ndarray:
    """The channels over a spatial box as ``[C, z, y, x]`` in the stored dtype."""
    box = tuple(box) + (slice(None),) * (3 - len(box))
    return np.stack([np.asarray(volume[(p, *box)]) for p in self.positions])


def _stored_channels(volume) -> list[int]:
  """The file's ``channels`` attribute (the preset's numbers), else ``0..C-1``."""
  stored = volume.attrs.get("channels")
  if stored is None:
    return list(range(volume.shape[0]))
  try:
    return [int(c) for c in stored]
  except (TypeError, ValueError):
    raise ConfigError(
      f"{volume.path}: its 'channels' attribute must be a list of channel numbers, got {stored!r}"
    ) from None


def _stored_offsets(volume) -> list[tuple[int, int, int]]:
  if "offsets" not in volume.attrs:
    raise ConfigError(
      f"{volume.path}: decode.method='mws' needs each channel's (z, y, x) offset, which the file "
      "does not record (no 'offsets' attribute; jaxseg.predict writes one); decode it with "
      "decode.method='cc' or 'waterz'"
    )
  raw = volume.attrs["offsets"]
  try:
    offsets = [tuple(int(v) for v in o) for o in raw]
  except (TypeError, ValueError):
    offsets = []
  if len(offsets) != volume.shape[0] or any(len(o) != 3 for o in offsets):
    raise ConfigError(
      f"{volume.path}: its 'offsets' attribute must hold a (z, y, x) offset for each of the "
      f"{volume.shape[0]} channels, got {raw!r}"
    )
  return offsets


def _check_channels(who: str, channels, offsets, held: str, note: str) -> None:
  """Refuses a set of channels without a long-range edge, or without a unit edge per axis.

  The message reads ``{who} needs ..., but {held} only ... channels [...]{note}; ...``.
  """
  if not any(is_long_range(o) for o in offsets):
    raise ConfigError(
      f"{who} needs long-range affinity channels, but {held} only nearest-neighbour channels "
      f"{list(channels)}{note}; predict with infer.output_channels=() (all of the preset's "
      "channels) or decode with decode.method='cc' or 'waterz'"
    )
  axes = {next(a for a in range(3) if o[a]) for o in offsets if not is_long_range(o) and any(o)}
  if axes != {0, 1, 2}:
    raise ConfigError(
      f"{who} needs a nearest-neighbour channel along each of z, y and x, but {held} channels "
      f"{list(channels)}{note} with offsets {[list(o) for o in offsets]}"
    )


def resolve_channels(volume, settings: DecodeSettings) -> MwsChannels:
  """The channels of an affinity volume ``[C, z, y, x]`` the mutex watershed decodes.

  Raises:
    ConfigError: no ``offsets`` attribute; ``decode.mws.channels`` the file lacks; no long-range
      channel or no nearest-neighbour channel per axis among them; more than
      ``decode.mws.max_voxels`` voxels. Each in one line naming the key to change.
  """
  mws = settings.mws
  stored = _stored_channels(volume)
  offsets = _stored_offsets(volume)
  # In channel-number order, whatever the stored order: mwatershed breaks ties between equal
  # weights by the order it reads the edges in.
  wanted = sorted(mws.channels or stored)
  missing = [c for c in wanted if c not in stored]
  if missing:
    raise ConfigError(
      f"{volume.path}: decode.mws.channels {list(mws.channels)} asks for channel(s) {missing}, "
      f"but the file holds channels {stored} (infer.output_channels when it was predicted)"
    )
  positions = tuple(stored.index(c) for c in wanted)
  chosen = tuple(offsets[p] for p in positions)
  _check_channels(
    f"{volume.path}: decode.method='mws'",
    wanted,
    chosen,
    "the file holds",
    " (infer.output_channels when it was predicted)",
  )
  check_size(str(volume.path), tuple(volume.shape[1:]), len(positions), chosen, mws)
  return MwsChannels(
    positions=positions,
    channels=tuple(wanted),
    offsets=chosen,
    convention=str(volume.attrs.get("convention", settings.convention)),
  )


def check_size(
  where: str, shape: Sequence[int], num_channels: int, offsets, mws: MwsSettings
) -> None:
  """Refuses a volume above ``decode.mws.max_voxels`` (the decode holds it whole in memory)."""
  voxels = math.prod(int(s) for s in shape)
  if voxels <= mws.max_voxels:
    return
  edges = sum(
    voxels / (math.prod(mws.strides) if is_long_range(o) else 1) for o in offsets
  )  # fmt: skip
  gigabytes = (edges * _BYTES_PER_EDGE + voxels * num_channels * _BYTES_PER_CHANNEL_VOXEL) / 1e9
  raise ConfigError(
    f"{where}: {tuple(shape)} is {voxels} voxels, more than decode.mws.max_voxels="
    f"{mws.max_voxels} (the mutex watershed decodes whole volumes in memory, here about "
    f"{gigabytes:.3g} GB); {_SUGGEST}, or raise decode.mws.max_voxels"
  )


def check_predicted_channels(config, who: str = "decode.method='mws'") -> None:
  """Refuses, before anything is predicted, a config whose predictions cannot feed the mutex
  watershed: ``infer.output_channels`` keeps none of the preset's long-range channels, or not
  the ``decode.mws.channels`` asked for. Configs without a preset are left to the decode.

  ``who`` starts the message: what asked for the mutex watershed.
  """
  target, infer = config.get("target"), config.get("infer")
  if target is None or infer is None or not target.get("preset"):
    return
  try:
    spec = get_preset(str(target.preset))
  except ValueError:
    return  # the prediction names the bad preset itself
  settings = decode_settings({**config.decode.to_dict(), "method": "mws"})
  output = [int(c) for c in (infer.get("output_channels") or range(spec.num_channels))]
  wanted = list(settings.mws.channels or output)
  missing = [c for c in wanted if c not in output]
  if missing:
    raise ConfigError(
      f"decode.mws.channels {list(settings.mws.channels)} asks for channel(s) {missing}, but "
      f"infer.output_channels={tuple(output)} does not predict them"
    )
  offsets = [spec.offsets[c] for c in wanted if 0 <= c < spec.num_channels]
  held = f"infer.output_channels={tuple(output)} predicts"
  _check_channels(who, wanted, offsets, held, f" of {spec.name}")


# -- decoding ---------------------------------------------------------------------------------------


def edge_weights(aff: np.ndarray, offsets: Sequence[Sequence[int]], mws: MwsSettings) -> np.ndarray:
  """Signed mutex-watershed weights of probabilities ``aff`` ``[C, z, y, x]``.

  Nearest-neighbour channels give ``p - bias_short``, long-range ones ``p - bias_long``
  (float64, as mwatershed takes them): positive = attractive, negative = repulsive, and
  ``|weight|`` orders the edges. An edge exactly at its bias is repulsive with weight 0 (last).
  """
  out = np.empty(aff.shape, np.float64)
  for c, offset in enumerate(offsets):
    out[c] = aff[c]
    out[c] -= mws.bias_long if is_long_range(offset) else mws.bias_short
  return out


def mutex_watershed(
  aff: np.ndarray,
  offsets: Sequence[Sequence[int]],
  convention: str,
  mws: MwsSettings,
  *,
  min_size: int = 0,
) -> np.ndarray:
  """Decodes affinities ``[C, z, y, x]`` with the mutex watershed.

  Args:
    aff: probabilities (float16/32/64, 1 = same object), finite.
    offsets: ``(dz, dy, dx)`` of each channel.
    convention: their storage (``source``: ``aff[c, v]`` is the edge ``v <-> v + o``;
      ``target``: ``v - o <-> v``); ``target`` is converted to ``source``, which is mwatershed's
      own (it pairs ``v`` with ``v + o``, and skips edges whose partner lies outside).
    mws: biases and strides.
    min_size: segments with fewer voxels become 0 (0 or 1 keeps all).

  Returns:
    ``[z, y, x]`` ids ``1..K`` in C-order scan of first appearance, smallest unsigned dtype;
    0 where a voxel has no attractive edge at all, or its segment was too small.
  """
  import mwatershed

  aff = np.asarray(aff)
  offsets = tuple(tuple(int(d) for d in o) for o in offsets)
  if aff.ndim != 4 or aff.shape[0] != len(offsets):
    raise ValueError(f"affinities must be [{len(offsets)}, z, y, x], got {aff.shape}")
  if convention != "source":
    aff, _ = convert_convention(aff, offsets, convention, "source")
  weights = edge_weights(aff, offsets, mws)
  del aff
  strides = [list(mws.strides) if is_long_range(o) else [1, 1, 1] for o in offsets]
  labels = mwatershed.agglom(
    weights,
    [list(o) for o in offsets],
    strides=strides,
    randomized_strides=mws.randomized_strides,
  )
  del weights
  out, _ = labels_lib.relabel_sequential(labels, min_size=min_size)
  return out
