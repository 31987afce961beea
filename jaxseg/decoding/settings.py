"""The ``config.decode`` section, checked once and resolved into :class:`DecodeSettings`.

Every bad value is reported before any volume is read, and a key the decoder does not know is an
error: PyTC's ``decode_waterz`` silently drops ``best_buddy`` and friends, we refuse to. Keys of
the other methods are allowed (every recipe carries all of them, see ``configs/common.py``) and
unused.

Shapes are ``(z, y, x)`` voxel triples. Numpy only (no jax).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import ml_collections

from jaxseg.common import config_util
from jaxseg.common.errors import ConfigError

METHODS = ("cc", "waterz", "mws")
BLOCKWISE = ("auto", "always", "never")
CONVENTIONS = ("source", "target")


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
class MwsSettings:
  """The mutex watershed (``docs/decoding.md``, "Mutex watershed").

  Attributes:
    channels: the preset's channel numbers decoded; ``()`` = every channel the file holds.
    bias_short: a nearest-neighbour edge weighs ``p - bias_short`` (attractive when > 0).
    bias_long: a long-range edge weighs ``p - bias_long``.
    strides: ``(z, y, x)``: long-range edges are kept at every ``strides``-th voxel per axis.
    randomized_strides: keep each long-range edge with probability ``1 / prod(strides)``
      instead (mwatershed's unseeded draw: not reproducible).
    max_voxels: the largest volume decoded (whole-volume, in memory); larger ones are refused.
  """

  channels: tuple[int, ...]
  bias_short: float
  bias_long: float
  strides: tuple[int, int, int]
  randomized_strides: bool
  max_voxels: int

  def fingerprint(self) -> dict:
    """What changes the labels (``max_voxels`` only refuses)."""
    out = dataclasses.asdict(self)
    out.pop("max_voxels")
    return out


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """``config.decode`` resolved.

  Attributes:
    method: ``"cc"``, ``"waterz"`` or ``"mws"``.
    channels: the three affinity channels decoded, as the preset numbers them (mapped to stored
      positions through the file's ``channels`` attribute when it has one).
    channel_order: axis (``z``/``y``/``x``) of each channel, for files that record no offsets.
    convention: storage convention, for files that record none.
    thresholds: CC: the single threshold (strict ``>``); waterz: the merge thresholds, ascending;
      mws: ``(bias_short,)``, the operating point its one segmentation is reported under.
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
    mws: the mutex watershed's settings when ``method == "mws"``, else None.
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
  mws: MwsSettings | None = None

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
    if self.mws is not None:
      out["mws"] = self.mws.fingerprint()
    return json.loads(json.dumps(out))  # tuples -> lists: comparable with what was saved


def _as_dict(section: Any) -> dict:
  if hasattr(section, "to_dict"):
    return section.to_dict()
  return dict(section)


def _with_defaults(given: Mapping, defaults: Mapping, where: str) -> dict:
  """``given`` over :func:`default_config` (nested sections merged key by key).

  Raises:
    ConfigError: a key the defaults do not have (refusing rather than silently ignoring it).
  """
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ConfigError(
      f"{where}: unknown key(s) {unknown}; known keys: {sorted(defaults)} (refusing rather than "
      "silently ignoring them)"
    )
  out = dict(defaults)
  for key, value in given.items():
    if isinstance(defaults[key], Mapping):
      out[key] = _with_defaults(_as_dict(value), defaults[key], f"{where}.{key}")
    else:
      out[key] = value
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


def default_config() -> ml_collections.ConfigDict:
  """Every decoder key (``docs/decoding.md``), for every method, with PyTC's numbers.

  A recipe picks ``method`` and sets its own storage convention and block shape. Every method's
  keys are always present so ``--config.decode.method=waterz`` works on any recipe; a key that is
  not listed here is an error, never silently ignored. This is the only place these defaults are
  written: recipes start from it (``configs/common.py``) and :func:`decode_settings` fills a
  partial section (a trial's parameters, a test's dict) from it.
  """
  decode = ml_collections.ConfigDict()
  # "cc" (NISB: thresholded connected components), "waterz" (SNEMI) or "mws" (mutex watershed)
  decode.method = "cc"
  decode.channels = (0, 1, 2)  # the preset's channel numbers of the three decoded edges
  decode.channel_order = "xyz"  # axis of each channel, used when the file records no offsets
  decode.convention = "source"  # used when the file records no convention
  # -- connected components
  decode.threshold = 0.75  # strict >; tuned values: about 0.66 (base), 0.70 (LICONN)
  # -- waterz
  decode.thresholds = (0.5,)  # all decoded in one pass, one segmentation each
  decode.merge_function = "aff85_his256"
  decode.discretize_queue = 256  # waterz's binned priority queue (0 = exact float queue)
  decode.aff_threshold_low = 0.1
  decode.aff_threshold_high = 0.999
  decode.dust = ml_collections.ConfigDict()
  decode.dust.enabled = True
  decode.dust.size = 800
  decode.dust.affinity = 0.3
  decode.dust.remove_size = 600
  # PyTC silently drops these keys in decode_waterz; we apply every configured stage.
  decode.branch_merge = ml_collections.ConfigDict()
  decode.branch_merge.enabled = True
  decode.branch_merge.iou_threshold = 0.5
  decode.branch_merge.size_ratio = (0.5, 2.0)
  decode.branch_merge.best_buddy = True
  decode.branch_merge.one_sided_threshold = 0.8
  decode.branch_merge.one_sided_min_size = 100
  decode.branch_merge.affinity_threshold = 0.0  # 0 disables the mean z-affinity gate
  # -- mutex watershed (whole volume; needs the long-range channels in the prediction)
  decode.mws = ml_collections.ConfigDict()
  decode.mws.channels = ()  # the preset's channel numbers to decode; () = every stored channel
  # Edge weight p - bias: attractive iff p > bias, processed by |p - bias|. 0.5 is where a
  # calibrated net is undecided; a higher bias_long makes long-range edges repulsive more often.
  decode.mws.bias_short = 0.5
  decode.mws.bias_long = 0.5
  decode.mws.strides = (1, 1, 1)  # (z, y, x): long-range edges at every stride-th voxel
  decode.mws.randomized_strides = False  # keep each with prob. 1 / prod(strides): not reproducible
  decode.mws.max_voxels = 1 << 25  # about 15 GB with banis6's 6 channels; larger is refused
  # -- every method
  decode.affinity_mask_path = ""  # uint8 volume, 1 = keep (jaxseg.qc writes one)
  decode.min_size = 0  # segments below this many voxels become 0 (PyTC: no size filter)
  # -- blockwise (volumes larger than memory)
  decode.blockwise = "auto"  # "auto": when the volume exceeds one block; "always"; "never"
  decode.block_shape = (256, 512, 512)
  decode.context = (8, 32, 32)  # waterz only: voxels read around each block for its watershed
  decode.num_workers = 1  # daisy worker processes (1 = in this process)
  decode.worker_command = ""  # e.g. "srun -N1 -n1 -c4": how a cluster starts each worker
  return decode


# What PyTC's tutorial writes for "no mask" (``test.decoding.affinity_mask_path=null``), and
# what a YAML / Python None becomes on the command line.
NO_MASK = ("", "null", "none")


def mask_path(value) -> str:
  """``decode.affinity_mask_path`` as a path, ``""`` for no mask (None, empty, ``null``, ``None``)."""
  text = "" if value is None else str(value).strip()
  return "" if text.lower() in NO_MASK else text


def decode_settings(config_or_section: Any) -> DecodeSettings:
  """Checks ``config.decode`` (or the section itself) and resolves it.

  Raises:
    ConfigError: an unknown key, method, axis order or convention; thresholds outside [0, 1];
      shapes that are not three positive integers; and so on, each naming the key (a
      ``ValueError`` too).
  """
  section = getattr(config_or_section, "decode", config_or_section)
  d = _with_defaults(_as_dict(section), default_config().to_dict(), "config.decode")
  method = d["method"]
  if method not in METHODS:
    raise ConfigError(f"config.decode.method must be one of {METHODS}, not {method!r}")
  try:
    channels = tuple(int(c) for c in d["channels"])
  except (TypeError, ValueError):
    channels = ()
  if len(channels) != 3 or len(set(channels)) != 3 or min(channels) < 0:
    raise ConfigError(
      f"config.decode.channels must be three distinct channel numbers, not {channels}"
    )
  order = str(d["channel_order"])
  if sorted(order) != ["x", "y", "z"]:
    raise ConfigError(f"config.decode.channel_order must be a permutation of 'zyx', not {order!r}")
  convention = d["convention"]
  if convention not in CONVENTIONS:
    raise ConfigError(f"config.decode.convention must be one of {CONVENTIONS}, not {convention!r}")

  mws_settings = _mws_settings(d["mws"]) if method == "mws" else None
  if method == "cc":
    thresholds = (_fraction(d["threshold"], "threshold"),)
  elif method == "mws":
    thresholds = (mws_settings.bias_short,)
  else:
    raw = d["thresholds"]
    raw = (raw,) if isinstance(raw, (int, float)) else tuple(raw)
    if not raw:
      raise ConfigError("config.decode.thresholds is empty")
    thresholds = tuple(sorted(_fraction(t, "thresholds") for t in raw))
    if len(set(thresholds)) != len(thresholds):
      raise ConfigError(f"config.decode.thresholds has repeats: {raw}")

  low = _fraction(d["aff_threshold_low"], "aff_threshold_low")
  high = _fraction(d["aff_threshold_high"], "aff_threshold_high")
  if method == "waterz" and not low < high:
    raise ConfigError(
      f"config.decode.aff_threshold_low ({low}) must be below aff_threshold_high ({high})"
    )
  queue = _number(d["discretize_queue"], "discretize_queue", int)
  if not 0 <= queue <= 65536:
    raise ConfigError(f"config.decode.discretize_queue must lie in [0, 65536], not {queue}")

  dust = d["dust"]
  dust_settings = None
  if method == "waterz" and dust["enabled"]:
    dust_settings = DustSettings(
      size=_number(dust["size"], "dust.size", int),
      affinity=_fraction(dust["affinity"], "dust.affinity"),
      remove_size=_number(dust["remove_size"], "dust.remove_size", int),
    )
  branch = d["branch_merge"]
  branch_settings = None
  if method == "waterz" and branch["enabled"]:
    try:
      ratio = tuple(float(r) for r in branch["size_ratio"])
    except (TypeError, ValueError):
      ratio = ()
    if len(ratio) != 2 or not 0 <= ratio[0] <= 1 or abs(ratio[0] * ratio[1] - 1) > 1e-6:
      raise ConfigError(
        "config.decode.branch_merge.size_ratio must be (r, 1 / r) with 0 < r <= 1 (or (0, inf) "
        f"to disable the size-ratio merge), not {ratio}"
      )
    branch_settings = BranchMergeSettings(
      iou_threshold=_fraction(branch["iou_threshold"], "branch_merge.iou_threshold"),
      size_ratio=ratio,
      best_buddy=bool(branch["best_buddy"]),
      one_sided_threshold=_fraction(
        branch["one_sided_threshold"], "branch_merge.one_sided_threshold"
      ),
      one_sided_min_size=_number(
        branch["one_sided_min_size"], "branch_merge.one_sided_min_size", int
      ),
      affinity_threshold=_fraction(branch["affinity_threshold"], "branch_merge.affinity_threshold"),
    )

  blockwise = d["blockwise"]
  if blockwise not in BLOCKWISE:
    raise ConfigError(f"config.decode.blockwise must be one of {BLOCKWISE}, not {blockwise!r}")
  if method == "mws" and blockwise == "always":
    raise ConfigError(
      "config.decode.blockwise='always' cannot run decode.method='mws', which decodes whole "
      "volumes only (docs/decoding.md, \"Mutex watershed\"); use 'auto' or 'never'"
    )
  num_workers = _number(d["num_workers"], "num_workers", int)
  if num_workers < 1:
    raise ConfigError(f"config.decode.num_workers must be >= 1, not {num_workers}")
  min_size = _number(d["min_size"], "min_size", int)
  if min_size < 0:
    raise ConfigError(f"config.decode.min_size must be >= 0, not {min_size}")
  return DecodeSettings(
    method=method,
    channels=channels,
    channel_order=order,
    convention=convention,
    thresholds=thresholds,
    merge_function=str(d["merge_function"]),
    discretize_queue=queue,
    aff_threshold_low=low,
    aff_threshold_high=high,
    dust=dust_settings,
    branch_merge=branch_settings,
    affinity_mask_path=mask_path(d["affinity_mask_path"]),
    min_size=min_size,
    blockwise=blockwise,
    block_shape=config_util.triple(d["block_shape"], "config.decode.block_shape", 1),
    context=config_util.triple(d["context"], "config.decode.context", 0),
    num_workers=num_workers,
    worker_command=str(d["worker_command"] or ""),
    mws=mws_settings,
  )


def _mws_settings(section: Mapping) -> MwsSettings:
  """``config.decode.mws`` checked (``docs/decoding.md``, "Mutex watershed")."""
  raw = section["channels"]
  try:
    channels = tuple(int(c) for c in ((raw,) if isinstance(raw, int) else raw or ()))
  except (TypeError, ValueError):
    channels = (-1,)
  if any(c < 0 for c in channels) or len(set(channels)) != len(channels):
    raise ConfigError(
      "config.decode.mws.channels must be () (every stored channel) or distinct channel "
      f"numbers, not {raw!r}"
    )
  max_voxels = _number(section["max_voxels"], "mws.max_voxels", int)
  if max_voxels < 1:
    raise ConfigError(f"config.decode.mws.max_voxels must be >= 1, not {max_voxels}")
  randomized = section["randomized_strides"]
  if not isinstance(randomized, bool):
    raise ConfigError(
      f"config.decode.mws.randomized_strides must be True or False, not {randomized!r}"
    )
  return MwsSettings(
    channels=channels,
    bias_short=_fraction(section["bias_short"], "mws.bias_short"),
    bias_long=_fraction(section["bias_long"], "mws.bias_long"),
    strides=config_util.triple(section["strides"], "config.decode.mws.strides", 1),
    randomized_strides=randomized,
    max_voxels=max_voxels,
  )
