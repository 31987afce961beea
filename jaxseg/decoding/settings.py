"""The ``config.decode`` section, checked once and resolved into :class:`DecodeSettings`.

Every bad value is reported before any volume is read, and a key the decoder does not know is an
error: PyTC's ``decode_waterz`` silently drops ``best_buddy`` and friends, we refuse to. Keys of
the other method are allowed (every recipe carries both, see ``configs/common.py``) and unused.

Shapes are ``(z, y, x)`` voxel triples. Numpy only (no jax).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from jaxseg.common.errors import ConfigError

METHODS = ("cc", "waterz")
BLOCKWISE = ("auto", "always", "never")
CONVENTIONS = ("source", "target")

_TOP_KEYS = {
  "method", "channels", "channel_order", "convention", "threshold", "thresholds",
  "merge_function", "discretize_queue", "aff_threshold_low", "aff_threshold_high", "dust",
  "branch_merge", "affinity_mask_path", "min_size", "blockwise", "block_shape", "context",
  "num_workers", "worker_command",
}  # fmt: skip
_DUST_KEYS = {"enabled", "size", "affinity", "remove_size"}
_BRANCH_KEYS = {
  "enabled", "iou_threshold", "size_ratio", "best_buddy", "one_sided_threshold",
  "one_sided_min_size", "affinity_threshold",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class DustSettings:
  """Dust merge (``docs/decoding.md``, "Dust merge"): join while affinity > ``affinity`` when either
  region is under ``size`` voxels; then drop regions under ``remove_size``."""

  size: int
  affinity: float
  remove_size: int


@dataclasses.dataclass(frozen=True)
class BranchMergeSettings:
  """The three branch-merge stages over slice pairs (``docs/decoding.md``, "Branch merge")."""

  iou_threshold: float
  size_ratio: tuple[float, float]
  best_buddy: bool
  one_sided_threshold: float
  one_sided_min_size: int
  affinity_threshold: float

  def as_kwargs(self) -> dict:
    """As :func:`jaxseg.decoding.branch_merge.branch_merge_pairs` takes them (its
    ``size_ratio`` is the lower end r of the range [r, 1 / r])."""
    kwargs = dataclasses.asdict(self)
    kwargs["size_ratio"] = self.size_ratio[0]
    return kwargs


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """``config.decode`` resolved.

  Attributes:
    method: ``"cc"`` or ``"waterz"``.
    channels: the three affinity channels decoded, as the preset numbers them (mapped to stored
      positions through the file's ``channels`` attribute when it has one).
    channel_order: axis (``z``/``y``/``x``) of each channel, for files that record no offsets.
    convention: storage convention, for files that record none.
    thresholds: CC: the single threshold (strict ``>``); waterz: the merge thresholds, ascending.
    merge_function: waterz merge function name (``aff85_his256``, ``mean``, ...).
    discretize_queue: waterz's queue bins (0 = exact).
    aff_threshold_low, aff_threshold_high: waterz's watershed thresholds.
    dust: dust merge settings, or None when disabled.
    branch_merge: branch merge settings, or None when disabled.
    affinity_mask_path: a uint8 volume (1 = keep), or "".
    min_size: segments under this many voxels become 0 (0 or 1 = keep all).
    blockwise: ``auto`` / ``always`` / ``never``.
    block_shape: voxels per block.
    context: waterz only: voxels read around each block for its watershed.
    num_workers: daisy worker processes (1 = in the calling process).
    worker_command: command prefix that starts a worker on a cluster ("" = local processes).
  """

  method: str
  channels: tuple[int, int, int]
  channel_order: str
  convention: str
  thresholds: tuple[float, ...]
  merge_function: str
  discretize_queue: int
  aff_threshold_low: float
  aff_threshold_high: float
  dust: DustSettings | None
  branch_merge: BranchMergeSettings | None
  affinity_mask_path: str
  min_size: int
  blockwise: str
  block_shape: tuple[int, int, int]
  context: tuple[int, int, int]
  num_workers: int
  worker_command: str

  @property
  def threshold(self) -> float:
    """The CC threshold."""
    return self.thresholds[0]

  def fingerprint(self) -> dict:
    """Everything that changes the decoded labels (not how the work is scheduled)."""
    out = {
      "method": self.method,
      "channels": list(self.channels),
      "thresholds": list(self.thresholds),
      "min_size": self.min_size,
      "affinity_mask_path": self.affinity_mask_path,
    }
    if self.method == "waterz":
      out.update(
        merge_function=self.merge_function,
        discretize_queue=self.discretize_queue,
        aff_threshold=[self.aff_threshold_low, self.aff_threshold_high],
        dust=dataclasses.asdict(self.dust) if self.dust else None,
        branch_merge=dataclasses.asdict(self.branch_merge) if self.branch_merge else None,
      )
    return json.loads(json.dumps(out))  # tuples -> lists: comparable with what was saved


def _as_dict(section: Any) -> dict:
  if hasattr(section, "to_dict"):
    return section.to_dict()
  return dict(section)


def _check_keys(given: Mapping, known: set, where: str) -> None:
  unknown = sorted(set(given) - known)
  if unknown:
    raise ConfigError(
      f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)} (refusing rather than "
      "silently ignoring them)"
    )


def _triple(value, name: str, minimum: int) -> tuple[int, int, int]:
  try:
    out = tuple(int(v) for v in value)
    whole = all(float(v) == v for v in value)
  except (TypeError, ValueError):  # not a sequence, or 'abc' from --config.decode.x=abc
    out, whole = (), False
  if len(out) != 3 or any(v < minimum for v in out) or not whole:
    raise ConfigError(f"config.decode.{name} must be three integers >= {minimum}, not {value!r}")
  return out


def _number(value, name: str, kind=float):
  """``kind(value)``, or a ConfigError naming ``config.decode.<name>``."""
  try:
    out = kind(value)
  except (TypeError, ValueError):
    raise ConfigError(
      f"config.decode.{name} must be {'an integer' if kind is int else 'a number'}, not {value!r}"
    ) from None
  if kind is int and isinstance(value, float) and value != out:
    raise ConfigError(f"config.decode.{name} must be an integer, not {value!r}")
  return out


def _fraction(value, name: str) -> float:
  value = _number(value, name)
  if not 0.0 <= value <= 1.0:
    raise ConfigError(f"config.decode.{name} must lie in [0, 1], not {value}")
  return value


def decode_settings(config_or_section: Any) -> DecodeSettings:
  """Checks ``config.decode`` (or the section itself) and resolves it.

  Raises:
    ConfigError: an unknown key, method, axis order or convention; thresholds outside [0, 1];
      shapes that are not three positive integers; and so on, each naming the key (a
      ``ValueError`` too).
  """
  section = getattr(config_or_section, "decode", config_or_section)
  d = _as_dict(section)
  _check_keys(d, _TOP_KEYS, "config.decode")
  method = d.get("method", "cc")
  if method not in METHODS:
    raise ConfigError(f"config.decode.method must be one of {METHODS}, not {method!r}")
  try:
    channels = tuple(int(c) for c in d.get("channels", (0, 1, 2)))
  except (TypeError, ValueError):
    channels = ()
  if len(channels) != 3 or len(set(channels)) != 3 or min(channels) < 0:
    raise ConfigError(
      f"config.decode.channels must be three distinct channel numbers, not {channels}"
    )
  order = str(d.get("channel_order", "xyz"))
  if sorted(order) != ["x", "y", "z"]:
    raise ConfigError(f"config.decode.channel_order must be a permutation of 'zyx', not {order!r}")
  convention = d.get("convention", "source")
  if convention not in CONVENTIONS:
    raise ConfigError(f"config.decode.convention must be one of {CONVENTIONS}, not {convention!r}")

  if method == "cc":
    thresholds = (_fraction(d.get("threshold", 0.75), "threshold"),)
  else:
    raw = d.get("thresholds", (0.5,))
    raw = (raw,) if isinstance(raw, (int, float)) else tuple(raw)
    if not raw:
      raise ConfigError("config.decode.thresholds is empty")
    thresholds = tuple(sorted(_fraction(t, "thresholds") for t in raw))
    if len(set(thresholds)) != len(thresholds):
      raise ConfigError(f"config.decode.thresholds has repeats: {raw}")

  low = _fraction(d.get("aff_threshold_low", 0.1), "aff_threshold_low")
  high = _fraction(d.get("aff_threshold_high", 0.999), "aff_threshold_high")
  if method == "waterz" and not low < high:
    raise ConfigError(
      f"config.decode.aff_threshold_low ({low}) must be below aff_threshold_high ({high})"
    )
  queue = _number(d.get("discretize_queue", 256), "discretize_queue", int)
  if not 0 <= queue <= 65536:
    raise ConfigError(f"config.decode.discretize_queue must lie in [0, 65536], not {queue}")

  dust = _as_dict(d.get("dust", {"enabled": False}))
  _check_keys(dust, _DUST_KEYS, "config.decode.dust")
  dust_settings = None
  if method == "waterz" and dust.get("enabled", False):
    dust_settings = DustSettings(
      size=_number(dust.get("size", 800), "dust.size", int),
      affinity=_fraction(dust.get("affinity", 0.3), "dust.affinity"),
      remove_size=_number(dust.get("remove_size", 600), "dust.remove_size", int),
    )
  branch = _as_dict(d.get("branch_merge", {"enabled": False}))
  _check_keys(branch, _BRANCH_KEYS, "config.decode.branch_merge")
  branch_settings = None
  if method == "waterz" and branch.get("enabled", False):
    try:
      ratio = tuple(float(r) for r in branch.get("size_ratio", (0.5, 2.0)))
    except (TypeError, ValueError):
      ratio = ()
    if len(ratio) != 2 or not 0 <= ratio[0] <= 1 or abs(ratio[0] * ratio[1] - 1) > 1e-6:
      raise ConfigError(
        "config.decode.branch_merge.size_ratio must be (r, 1 / r) with 0 < r <= 1 (or (0, inf) "
        f"to disable the size-ratio merge), not {ratio}"
      )
    branch_settings = BranchMergeSettings(
      iou_threshold=_fraction(branch.get("iou_threshold", 0.5), "branch_merge.iou_threshold"),
      size_ratio=ratio,
      best_buddy=bool(branch.get("best_buddy", True)),
      one_sided_threshold=_fraction(
        branch.get("one_sided_threshold", 0.8), "branch_merge.one_sided_threshold"
      ),
      one_sided_min_size=_number(
        branch.get("one_sided_min_size", 100), "branch_merge.one_sided_min_size", int
      ),
      affinity_threshold=_fraction(
        branch.get("affinity_threshold", 0.0), "branch_merge.affinity_threshold"
      ),
    )

  blockwise = d.get("blockwise", "auto")
  if blockwise not in BLOCKWISE:
    raise ConfigError(f"config.decode.blockwise must be one of {BLOCKWISE}, not {blockwise!r}")
  num_workers = _number(d.get("num_workers", 1), "num_workers", int)
  if num_workers < 1:
    raise ConfigError(f"config.decode.num_workers must be >= 1, not {num_workers}")
  min_size = _number(d.get("min_size", 0), "min_size", int)
  if min_size < 0:
    raise ConfigError(f"config.decode.min_size must be >= 0, not {min_size}")
  return DecodeSettings(
    method=method,
    channels=channels,
    channel_order=order,
    convention=convention,
    thresholds=thresholds,
    merge_function=str(d.get("merge_function", "aff85_his256")),
    discretize_queue=queue,
    aff_threshold_low=low,
    aff_threshold_high=high,
    dust=dust_settings,
    branch_merge=branch_settings,
    affinity_mask_path=str(d.get("affinity_mask_path", "") or ""),
    min_size=min_size,
    blockwise=blockwise,
    block_shape=_triple(d.get("block_shape", (256, 512, 512)), "block_shape", 1),
    context=_triple(d.get("context", (8, 32, 32)), "context", 0),
    num_workers=num_workers,
    worker_command=str(d.get("worker_command", "") or ""),
  )
