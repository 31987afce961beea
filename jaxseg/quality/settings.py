"""``config.qc`` resolved: :class:`QcSettings` and :func:`qc_settings`, which checks the section.

The settings of the affinity QC (``docs/quality.md``, "Parameters"): sampling of the interior mean
(``z_stride``, ``k_edge``), the search windows at each end (``refine_window``), the drift cutoff
and the XY-border diagnostic (``border_width``, ``bg_thresh``, ``n_z_border``). Plain values; no
arrays. Never imports JAX.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import ml_collections

from jaxseg.common.errors import ConfigError

_KEYS = {
  "enabled", "z_stride", "k_edge", "refine_window", "drift_thresh", "border_width", "bg_thresh",
  "n_z_border",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class QcSettings:
  """``config.qc`` resolved (``docs/quality.md``, "Parameters"; the defaults are PyTC's numbers).

  Attributes:
    enabled: whether ``jaxseg.run`` runs QC on its predictions (the QC itself ignores it).
    z_stride: sections between samples of the interior mean.
    k_edge: samples left out at each end of the interior mean.
    refine_window: ``low_z`` / ``high_z`` are searched within this many sections of each end.
    drift_thresh: a channel's section mean below its interior mean minus this is bad.
    border_width: width (pixels) of the XY ring checked for background.
    bg_thresh: image intensity at or below which a pixel is background.
    n_z_border: sections sampled by the XY-border diagnostic.
  """

  enabled: bool = True
  z_stride: int = 10
  k_edge: int = 20
  refine_window: int = 30
  drift_thresh: float = 0.05
  border_width: int = 32
  bg_thresh: float = 30.0
  n_z_border: int = 8

  def fingerprint(self) -> dict:
    """Everything that changes the report (not ``enabled``)."""
    out = dataclasses.asdict(self)
    del out["enabled"]
    return out


def default_config(enabled: bool) -> ml_collections.ConfigDict:
  """A recipe's ``config.qc`` section: :class:`QcSettings`' defaults, their only copy."""
  return ml_collections.ConfigDict(dataclasses.asdict(QcSettings(enabled=enabled)))


def _int(value: Any, name: str, minimum: int) -> int:
  try:
    out = int(value)
    integral = float(value) == out
  except (TypeError, ValueError):
    integral = False
  if not integral or out < minimum:
    raise ConfigError(f"config.qc.{name} must be an integer >= {minimum}, not {value!r}")
  return out


def _float(value: Any, name: str, minimum: float | None = None) -> float:
  try:
    out = float(value)
  except (TypeError, ValueError):
    out = math.nan
  if not math.isfinite(out) or (minimum is not None and out < minimum):
    bound = f" >= {minimum:g}" if minimum is not None else ""
    raise ConfigError(f"config.qc.{name} must be a finite number{bound}, not {value!r}")
  return out


def qc_settings(config_or_section: Any = None) -> QcSettings:
  """Checks ``config.qc`` (or the section itself, a plain dict, or settings) and resolves it.

  ``None`` or an empty mapping gives PyTC's defaults.

  Raises:
    ValueError: an unknown key (refused rather than silently ignored) or a bad value, naming it.
  """
  if config_or_section is None:
    return QcSettings()
  if isinstance(config_or_section, QcSettings):
    return config_or_section
  if isinstance(config_or_section, Mapping) and "qc" in config_or_section:
    section = config_or_section["qc"]
  else:
    section = getattr(config_or_section, "qc", config_or_section)
  d = section.to_dict() if hasattr(section, "to_dict") else dict(section)
  unknown = sorted(set(d) - _KEYS)
  if unknown:
    raise ConfigError(
      f"config.qc: unknown key(s) {unknown}; known keys: {sorted(_KEYS)} (refusing rather than "
      "silently ignoring them)"
    )
  defaults = QcSettings()
  return QcSettings(
    enabled=bool(d.get("enabled", defaults.enabled)),
    z_stride=_int(d.get("z_stride", defaults.z_stride), "z_stride", 1),
    k_edge=_int(d.get("k_edge", defaults.k_edge), "k_edge", 0),
    refine_window=_int(d.get("refine_window", defaults.refine_window), "refine_window", 0),
    drift_thresh=_float(d.get("drift_thresh", defaults.drift_thresh), "drift_thresh", 0.0),
    border_width=_int(d.get("border_width", defaults.border_width), "border_width", 0),
    bg_thresh=_float(d.get("bg_thresh", defaults.bg_thresh), "bg_thresh"),
    n_z_border=_int(d.get("n_z_border", defaults.n_z_border), "n_z_border", 0),
  )
