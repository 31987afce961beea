"""Affinity input of the decoders: which stored channels are the decoded edges, and the mask.

Owns:
  * :class:`AffinitySource` / :func:`open_affinities`: an affinity volume ``[C, z, y, x]`` and
    which three stored channels are the decoded z, y and x edges, their offsets and storage
    convention (from the file's attributes, which ``jaxseg.predict`` writes, else from
    ``config.decode``); :func:`read_channels` reads them as ``[3, z, y, x]``.
  * :func:`check_decoder_fits`: refuses a decoder that cannot decode those edges (for the mutex
    watershed: a file without its long-range channels, or too large; ``mws.py``).
  * :func:`open_mask` / :func:`mask_affinities`: the affinity mask (``[z, y, x]``, non-zero =
    keep) and PyTC's mask step on ``[3, z, y, x]`` affinities.
  * :func:`long_range_crop`: the region where long-range edges have their partner in the volume.

Shared by the whole-volume decoder (``decode_lib``), the blockwise one (``blockwise``) and the
tuner; imports neither. Never imports JAX.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from jaxseg.common.errors import ConfigError
from jaxseg.decoding.settings import DecodeSettings
from jaxseg.io import VolumeError, open_volume
from jaxseg.io.volume import Volume

_AXES = "zyx"


@dataclasses.dataclass(frozen=True)
class AffinitySource:
  """The three decoded channels of an affinity volume.

  Attributes:
    volume: the lazy ``[C, z, y, x]`` volume.
    positions: stored channel index of the z, y and x edge (in that order).
    distances: edge length along z, y, x (1 = nearest neighbour; a long-range triple has more).
    convention: ``source`` or ``target``.
  """

  volume: Volume
  positions: tuple[int, int, int]
  distances: tuple[int, int, int]
  convention: str

  @property
  def offsets(self) -> tuple[tuple[int, int, int], ...]:
    """Offsets of the decoded channels in z, y, x order."""
    return tuple(
      tuple(self.distances[a] if b == a else 0 for b in range(3)) for a in range(3)
    )  # fmt: skip

  @property
  def spatial_shape(self) -> tuple[int, int, int]:
    return tuple(self.volume.shape[1:])

  def read(self, box: Sequence[slice] | None = None) -> np.ndarray:
    """The z, y, x channels of a box as ``[3, z, y, x]`` in the stored dtype."""
    box = tuple(box or ()) + (slice(None),) * (3 - len(box or ()))
    return read_channels(self.volume, self.positions, box)


def read_channels(volume: Volume, positions: Sequence[int], box: Sequence[slice]) -> np.ndarray:
  """Stored channels ``positions`` of a spatial box, as ``[len(positions), z, y, x]``."""
  return np.stack([np.asarray(volume[(p, *box)]) for p in positions])


def open_affinities(
  spec: str, settings: DecodeSettings, *, axis_order: str | None = None
) -> AffinitySource:
  """Opens an affinity volume and finds the decoded channels.

  Args:
    spec: an affinity array (``pred.zarr/affinities``, ``file.h5:dataset``, ...), or a predict
      output folder holding an ``affinities`` array.
    settings: ``config.decode``; its ``channels`` are the preset's channel numbers, mapped to
      stored positions through the file's ``channels`` attribute when it has one.
    axis_order: the on-disk axis order (``"cxyz"`` for PyTC's h5) of a file that names none;
      default the file's ``axis_order`` attribute, else ``czyx``.

  Raises:
    VolumeError: not a ``[C, z, y, x]`` float volume, an ``axis_order`` that does not fit it or
      contradicts the file's own, channels missing, offsets that are not one positive
      axis-aligned edge per axis, or a convention that contradicts the config.
  """
  spec = os.fspath(spec)
  if os.path.isdir(spec) and os.path.isdir(os.path.join(spec, "affinities")):
    spec = os.path.join(spec, "affinities")
  volume = open_volume(spec, axis_order=axis_order)
  own = volume.attrs.get("axis_order")
  if axis_order and own and str(own).lower() != volume.axis_order:
    # The explicit order would win in open_volume: a wrong flag must not transpose the volume.
    raise VolumeError(
      f"{spec}: axis_order={axis_order!r} (--axis_order) contradicts the file's own axis_order "
      f"attribute {own!r}; drop the flag"
    )
  if not volume.has_channels or len(volume.shape) != 4:
    raise VolumeError(f"{spec}: expected affinities [C, z, y, x], got shape {volume.shape}")
  if not np.issubdtype(volume.dtype, np.floating):
    raise VolumeError(f"{spec}: affinities must be floating point, got {volume.dtype}")
  stored = volume.attrs.get("channels")
  if stored is not None:
    try:
      stored = [int(c) for c in stored]
    except (TypeError, ValueError):
      raise VolumeError(
        f"{spec}: its 'channels' attribute must be a list of channel numbers, got {stored!r}"
      ) from None
    missing = [c for c in settings.channels if c not in stored]
    if missing:
      raise VolumeError(
        f"{spec}: decode.channels {list(settings.channels)} asks for channel(s) {missing}, but "
        f"the file holds channels {stored}"
      )
    positions = [stored.index(c) for c in settings.channels]
  else:
    positions = list(settings.channels)
    if max(positions) >= volume.shape[0]:
      raise VolumeError(
        f"{spec}: decode.channels {positions} out of range for {volume.shape[0]} channels"
      )
  if "offsets" in volume.attrs:
    try:
      offsets = [tuple(int(v) for v in volume.attrs["offsets"][p]) for p in positions]
    except (TypeError, ValueError, IndexError, KeyError):
      raise VolumeError(
        f"{spec}: its 'offsets' attribute must hold a (z, y, x) offset for each of the "
        f"{volume.shape[0]} channels, got {volume.attrs['offsets']!r}"
      ) from None
    if any(len(o) != 3 for o in offsets):
      raise VolumeError(
        f"{spec}: its 'offsets' attribute must hold (z, y, x) offsets, got {offsets}"
      )
    where = f"{spec} (its 'offsets' attribute)"
  else:
    offsets = [tuple(1 if a == axis else 0 for a in _AXES) for axis in settings.channel_order]
    where = f"{spec} (config.decode.channel_order={settings.channel_order!r})"
  convention = volume.attrs.get("convention", settings.convention)
  if convention != settings.convention:
    raise VolumeError(
      f"{spec}: stored in the {convention!r} convention but config.decode.convention is "
      f"{settings.convention!r}; fix the config"
    )
  axes = []
  for o in offsets:
    nonzero = [a for a in range(3) if o[a] != 0]
    if len(nonzero) != 1 or o[nonzero[0]] < 0:
      raise VolumeError(f"{where}: each decoded channel must be one positive axis edge, got {o}")
    axes.append(nonzero[0])
  if sorted(axes) != [0, 1, 2]:
    raise VolumeError(f"{where}: decoded channels must cover z, y and x once each, got {offsets}")
  by_axis = sorted(range(3), key=lambda i: axes[i])
  return AffinitySource(
    volume=volume,
    positions=tuple(positions[i] for i in by_axis),
    distances=tuple(offsets[i][axes[i]] for i in by_axis),
    convention=convention,
  )


def check_decoder_fits(source: AffinitySource, settings: DecodeSettings) -> None:
  """Refuses a decoder that cannot decode these edges, before any output is prepared.

  Raises:
    ConfigError: ``decode.method='cc'`` on long-range edges (the file's ``offsets`` attribute);
      ``decode.method='mws'`` on a file without long-range channels or above
      ``decode.mws.max_voxels`` (:func:`jaxseg.decoding.mws.resolve_channels`).
  """
  if settings.method == "mws":
    from jaxseg.decoding import mws

    mws.resolve_channels(source.volume, settings)
    return
  if settings.method == "cc" and tuple(source.distances) != (1, 1, 1):
    raise ConfigError(
      f"{source.volume.path}: its 'offsets' attribute gives the decoded channels "
      f"{list(source.positions)} long-range edges {tuple(source.distances)} (z, y, x), but "
      "decode.method='cc' decodes nearest-neighbour edges only; use decode.method='waterz', "
      "or set decode.channels to the nearest-neighbour channels"
    )


def open_mask(path: str, shape: Sequence[int]) -> Volume:
  """Opens an affinity mask (integer or bool ``[z, y, x]``, non-zero = keep) lazily."""
  mask = open_volume(path)
  if mask.has_channels or tuple(mask.shape) != tuple(shape):
    raise VolumeError(f"{path}: affinity mask must be [z, y, x] {tuple(shape)}, got {mask.shape}")
  if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
    raise VolumeError(f"{path}: affinity mask must be uint8 (1 = keep), got {mask.dtype}")
  return mask


def mask_affinities(aff: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
  """PyTC's mask step: the decoded channels are zeroed at masked voxels (stored convention)."""
  if mask is None:
    return aff
  return np.where(mask.astype(bool)[None], aff, np.zeros((), aff.dtype))


def long_range_crop(distances: Sequence[int], convention: str) -> tuple[slice, slice, slice]:
  """The region where every decoded edge has its partner inside the volume.

  Nearest-neighbour channels need no crop. A long-range triple (e.g. PyTC's ``[6, 9, 4]``) is
  decoded as if its edges were unit edges, which is only meaningful where they exist: the
  ``d - 1`` extra planes at the face that holds edges leaving the volume are cut (the leading
  face for ``target``, the trailing one for ``source``), decoded without them, and come back as
  background.
  """
  out = []
  for d in distances:
    extra = int(d) - 1
    if extra <= 0:
      out.append(slice(None))
    elif convention == "target":
      out.append(slice(extra, None))
    else:
      out.append(slice(None, -extra))
  return tuple(out)
