"""The QC report: :class:`QcReport` (what a scan found) and its files.

Owns :class:`QcReport` (per-section means ``[C][Z]``, per-channel ``[C]`` and per-section ``[Z]``
statistics, the keep range ``[low_z, high_z)``; plain JSON-able values), :func:`write_report` /
:func:`read_report` (markdown with YAML front matter: ``img``, ``out``, ``low_z``, ``high_z``,
``bg_thresh``, ``border_width``, ...), the PNG plot of the means beside it (:func:`plot_path`) and
:func:`stable_path` (paths are recorded absolute, so a report is usable from any working
directory). Used by the scan, the mask and :func:`jaxseg.quality.run_qc`. Never imports JAX.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import yaml

from jaxseg.common.errors import InputError, MissingInputError
from jaxseg.common.files import atomic_output, local_abspath
from jaxseg.quality.settings import QcSettings

_REQUIRED_FRONT_MATTER = ("low_z", "high_z", "bg_thresh", "border_width")
# Report warning and log line when no section is good (low_z == high_z == 0).
NOTHING_KEPT = "no section passed QC: the mask keeps nothing"


@dataclasses.dataclass
class QcReport:
  """What :func:`jaxseg.quality.scan.scan_affinities` found; plain JSON-able values (NaN stored as
  None).

  Attributes:
    affinities: path of the affinity volume.
    image: path of the image used by the border diagnostic, or None.
    shape: ``[C, Z, Y, X]``.
    dtype: stored affinity dtype.
    channels: channel numbers (the file's ``channels`` attribute, else ``0..C-1``).
    offsets: each channel's offset (z, y, x) from the file's attributes, or None.
    settings: the QC settings used.
    slice_mean: ``[C][Z]`` mean of the finite values of every section (None: no finite value).
    slice_std: ``[C][Z]`` their standard deviation.
    slice_nonfinite: ``[Z]`` NaN + Inf values per section, all channels.
    sampled_z: the sections sampled every ``z_stride``.
    interior_z: the samples the interior mean used.
    interior_mean: ``[C]`` per channel.
    cutoff: ``[C]`` ``interior_mean - drift_thresh``.
    nan_count, inf_count: ``[C]`` over the whole volume.
    min, max: ``[C]`` of the finite values.
    low_z, high_z: the sections ``[low_z, high_z)`` worth decoding; ``0, 0`` (empty) when no
      section passed.
    border: the XY-border diagnostic (see :func:`jaxseg.quality.scan.scan_affinities`), or None
      without an image.
    warnings: anything a user should know (fallbacks, non-finite values, ...).
    seconds: time the scan took.
  """

  affinities: str
  image: str | None
  shape: list[int]
  dtype: str
  channels: list[int]
  offsets: list[list[int]] | None
  settings: QcSettings
  slice_mean: list[list[float | None]]
  slice_std: list[list[float | None]]
  slice_nonfinite: list[int]
  sampled_z: list[int]
  interior_z: list[int]
  interior_mean: list[float | None]
  cutoff: list[float | None]
  nan_count: list[int]
  inf_count: list[int]
  min: list[float | None]
  max: list[float | None]
  low_z: int
  high_z: int
  border: dict | None = None
  warnings: list[str] = dataclasses.field(default_factory=list)
  seconds: float = 0.0

  @property
  def depth(self) -> int:
    return int(self.shape[1])

  @property
  def total_nan(self) -> int:
    return int(sum(self.nan_count))

  @property
  def total_inf(self) -> int:
    return int(sum(self.inf_count))

  def good(self, z: int) -> bool:
    """Whether section ``z`` passes: every channel at or above its cutoff, no NaN / Inf."""
    if self.slice_nonfinite[z]:
      return False
    for c, cut in enumerate(self.cutoff):
      mean = self.slice_mean[c][z]
      if cut is None or mean is None or mean < cut:
        return False
    return True

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping) -> QcReport:
    d = dict(d)
    d["settings"] = QcSettings(**d["settings"])
    return cls(**d)

  def frontmatter(self) -> dict:
    """The report's YAML front matter: PyTC's keys first, then the rest of the decision."""
    finite_min = [v for v in self.min if v is not None]
    finite_max = [v for v in self.max if v is not None]
    s = self.settings
    out = {
      # Absolute when local: a mask can be built from the report in any working directory.
      "img": stable_path(self.image),
      "out": stable_path(self.affinities),
      "low_z": int(self.low_z),
      "high_z": int(self.high_z),
      "bg_thresh": _plain_number(s.bg_thresh),
      "border_width": int(s.border_width),
      "generator": "jaxseg.qc",
      "shape": [int(n) for n in self.shape],
      "dtype": self.dtype,
      "channels": list(self.channels),
      "z_stride": s.z_stride,
      "k_edge": s.k_edge,
      "refine_window": s.refine_window,
      "drift_thresh": s.drift_thresh,
      "n_z_border": s.n_z_border,
      "interior_mean": [_round(v) for v in self.interior_mean],
      "cutoff": [_round(v) for v in self.cutoff],
      "nan_count": self.total_nan,
      "inf_count": self.total_inf,
      "min": _round(min(finite_min)) if finite_min else None,
      "max": _round(max(finite_max)) if finite_max else None,
    }
    if self.border is not None:
      b = self.border
      out["border"] = {
        "ring_background_fraction": _round(b["ring_background_fraction"]),
        "interior_background_fraction": _round(b["interior_background_fraction"]),
        "ring_background_mean": _round_list(b["ring_background_mean"]),
        "interior_background_mean": _round_list(b["interior_background_mean"]),
      }
    out["warnings"] = list(self.warnings)
    return out


def _round(v: float | None, digits: int = 6) -> float | None:
  return None if v is None or not math.isfinite(v) else round(float(v), digits)


def _round_list(values: Sequence[float | None] | None) -> list | None:
  return None if values is None else [_round(v) for v in values]


def _plain_number(v: float) -> int | float:
  return int(v) if float(v).is_integer() else float(v)


def stable_path(path: str | None) -> str | None:
  """``path`` made absolute (stable across working directories), ``file.h5:dataset`` included;
  URLs and tensorstore specs (a volume opened from a dict is named by its JSON) as they are."""
  if path is None:
    return None
  path = os.fspath(path)
  return path if path.startswith("{") else local_abspath(path)


# -- the report -----------------------------------------------------------------------------------


def plot_path(path_md: str) -> str:
  """The PNG beside a report: ``means.png`` next to ``report.md``, else ``<stem>_means.png``."""
  stem = os.path.splitext(os.path.basename(path_md))[0]
  name = "means.png" if stem == "report" else f"{stem}_means.png"
  return os.path.join(os.path.dirname(os.path.abspath(path_md)), name)


def write_report(report: QcReport, path_md: str | os.PathLike) -> dict:
  """Writes the markdown report (YAML front matter + tables) and the PNG plot beside it.

  Returns:
    ``{"report": path_md, "plot": png path}``.
  """
  path_md = os.fspath(path_md)
  os.makedirs(os.path.dirname(os.path.abspath(path_md)), exist_ok=True)
  png = plot_path(path_md)
  _plot_means(report, png)
  front = yaml.safe_dump(report.frontmatter(), sort_keys=False, default_flow_style=None, width=100)
  text = f"---\n{front}---\n\n{_markdown_body(report, os.path.basename(png))}"
  with atomic_output(path_md) as tmp, open(tmp, "w") as f:
    f.write(text)
  return {"report": path_md, "plot": png}


def _fmt(v: float | None, spec: str = ".4f") -> str:
  return "n/a" if v is None else format(v, spec)


def _markdown_body(report: QcReport, png_name: str) -> str:
  s, depth = report.settings, report.depth
  lines = [f"# Affinity QC: `{report.affinities}`", ""]
  dropped = [f"{report.low_z} at the start"] if report.low_z else []
  dropped += [f"{depth - report.high_z} at the end"] if report.high_z < depth else []
  if report.low_z >= report.high_z:
    kept = f"**{NOTHING_KEPT[0].upper()}{NOTHING_KEPT[1:]}** (low_z = high_z = {report.low_z})"
  else:
    kept = f"Keeps sections **[{report.low_z}, {report.high_z})** of {depth}: " + (
      ("drops " + " and ".join(dropped)) if dropped else "nothing dropped"
    )
  lines += [
    f"Shape (C, z, y, x) {tuple(report.shape)}, {report.dtype}. {kept}.",
    "",
    f"Sections sampled every {s.z_stride}; the interior mean leaves out {s.k_edge} samples at "
    f"each end ({len(report.interior_z)} used); a section is good when every channel's mean is "
    f"at least its interior mean - {s.drift_thresh:g} and it holds no NaN / Inf; the ends are "
    f"searched within {s.refine_window} sections.",
    "",
    "| channel | offset (z, y, x) | interior mean | cutoff | min | max | NaN | Inf |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for c, ch in enumerate(report.channels):
    offset = tuple(report.offsets[c]) if report.offsets else "?"
    lines.append(
      f"| {ch} | {offset} | {_fmt(report.interior_mean[c])} | {_fmt(report.cutoff[c])} | "
      f"{_fmt(report.min[c])} | {_fmt(report.max[c])} | {report.nan_count[c]} | "
      f"{report.inf_count[c]} |"
    )
  lines += ["", f"![per-section means]({png_name})", ""]
  lines += ["## XY border (report only)", ""]
  b = report.border
  if b is None:
    lines.append("No image given: not checked." if report.image is None else "Not checked.")
  else:
    lines += [
      f"Image `{report.image}`, {len(b['z'])} sections (z = {', '.join(map(str, b['z']))}), "
      f"{s.border_width}-pixel ring, background = image <= {s.bg_thresh:g}.",
      "",
      "| region | pixels | background | mean affinity at background (per channel) |",
      "|---|---|---|---|",
    ]
    for name, key in (("ring", "ring"), ("interior", "interior")):
      means = b[f"{key}_background_mean"]
      shown = ", ".join(_fmt(v, ".3f") for v in means) if means else "n/a"
      lines.append(
        f"| {name} | {b[f'{key}_voxels']} | {b[f'{key}_background']} "
        f"({_fmt(b[f'{key}_background_fraction'], '.1%')}) | {shown} |"
      )
    lines += ["", "The affinity mask drops ring pixels whose image is background."]
  lines.append("")
  if report.warnings:
    lines += ["## Warnings", ""] + [f"- {w}" for w in report.warnings] + [""]
  shown_z = sorted(
    set(report.sampled_z)
    | set(range(min(s.refine_window, depth)))
    | set(range(max(0, depth - s.refine_window), depth))
  )
  lines += [
    "## Per-section means",
    "",
    f"Every {s.z_stride}th section and the {s.refine_window} at each end.",
    "",
    "| z | " + " | ".join(f"ch {c}" for c in report.channels) + " | NaN/Inf | kept |",
    "|---|" + "---|" * len(report.channels) + "---|---|",
  ]
  for z in shown_z:
    means = " | ".join(_fmt(report.slice_mean[c][z]) for c in range(len(report.channels)))
    kept = "yes" if report.low_z <= z < report.high_z else "no"
    flag = "" if report.good(z) else " (bad)"
    lines.append(f"| {z} | {means} | {report.slice_nonfinite[z]} | {kept}{flag} |")
  return "\n".join(lines) + "\n"


def _plot_means(report: QcReport, path: str) -> str:
  import matplotlib

  matplotlib.use("Agg")  # files only; never needs a display
  import matplotlib.pyplot as plt

  depth = report.depth
  z = np.arange(depth)
  fig, ax = plt.subplots(figsize=(9, 4))
  if report.low_z > 0:
    ax.axvspan(-0.5, report.low_z - 0.5, color="0.85", label="dropped")
  if report.high_z < depth:
    ax.axvspan(report.high_z - 0.5, depth - 0.5, color="0.85", label=None if report.low_z else "dropped")  # fmt: skip
  for c, ch in enumerate(report.channels):
    color = f"C{c % 10}"
    mean = np.array([np.nan if v is None else v for v in report.slice_mean[c]])
    offset = f" {tuple(report.offsets[c])}" if report.offsets else ""
    ax.plot(z, mean, color=color, lw=1, label=f"channel {ch}{offset}")
    ax.plot(report.sampled_z, mean[report.sampled_z], "o", color=color, ms=3)
    if report.cutoff[c] is not None:
      ax.axhline(report.cutoff[c], color=color, ls="--", lw=0.8)
  for value, name in ((report.low_z, "low_z"), (report.high_z, "high_z")):
    ax.axvline(value - 0.5, color="k", lw=0.8)
    # Labels inside the axes: low_z to the right of its line, high_z to the left.
    right = name == "low_z"
    ax.annotate(f"{name} {value}", (value - 0.5, 1), xycoords=("data", "axes fraction"),
                xytext=(3 if right else -3, -10), textcoords="offset points", fontsize=8,
                ha="left" if right else "right")  # fmt: skip
  ax.set_xlabel("z (section)")
  ax.set_ylabel("mean affinity")
  ax.set_xlim(-0.5, depth - 0.5)
  ax.set_title("Per-section mean affinity (dots: samples; dashed: cutoffs)", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower center")
  fig.tight_layout()
  with atomic_output(path) as tmp:
    fig.savefig(tmp, dpi=100)
  plt.close(fig)
  return path


def read_report(path_md: str | os.PathLike) -> dict:
  """The front matter of a QC report, as a dict.

  Raises:
    FileNotFoundError: no such file.
    ValueError: no YAML front matter, YAML that does not parse to a mapping, or a missing /
      malformed ``low_z``, ``high_z``, ``bg_thresh`` or ``border_width`` (names the file).
  """
  path_md = os.fspath(path_md)
  if not os.path.isfile(path_md):
    raise MissingInputError(f"{path_md}: no such QC report")
  with open(path_md) as f:
    text = f.read()
  lines = text.splitlines()
  if not lines or lines[0].strip() != "---":
    raise InputError(f"{path_md}: not a QC report: it does not start with '---' front matter")
  end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), None)
  if end is None:
    raise InputError(f"{path_md}: the front matter has no closing '---' line")
  try:
    front = yaml.safe_load("\n".join(lines[1:end]))
  except yaml.YAMLError as e:
    raise InputError(f"{path_md}: the front matter is not valid YAML: {e}") from None
  if not isinstance(front, dict):
    raise InputError(f"{path_md}: the front matter must be a mapping, got {type(front).__name__}")
  missing = [k for k in _REQUIRED_FRONT_MATTER if k not in front]
  if missing:
    raise InputError(f"{path_md}: the front matter lacks {missing}")
  for key in ("low_z", "high_z", "border_width"):
    if isinstance(front[key], bool) or not isinstance(front[key], int) or front[key] < 0:
      raise InputError(f"{path_md}: {key} must be an integer >= 0, not {front[key]!r}")
  if isinstance(front["bg_thresh"], bool) or not isinstance(front["bg_thresh"], (int, float)):
    raise InputError(f"{path_md}: bg_thresh must be a number, not {front['bg_thresh']!r}")
  if front["low_z"] > front["high_z"]:  # equal: an empty range, a QC that passed no section
    raise InputError(f"{path_md}: low_z {front['low_z']} must not exceed high_z {front['high_z']}")
  return front
