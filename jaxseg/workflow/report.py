"""The results folder of ``python -m jaxseg.run``: ``metrics.json``, ``report.md`` and previews.

Owns:
  * :func:`render_preview` / :func:`write_preview`: a PNG per volume and decoder, one row per z
    section, columns image | affinities (z, y, x edges as RGB) | segmentation | ground truth, ids
    in random (stable) colours. Inputs: image ``[c, z, y, x]`` or ``[z, y, x]``, affinities
    ``[3, z, y, x]`` (contrast stretched), segmentation and labels ``[z, y, x]`` ids; only the shown
    sections are read.
  * :func:`metric_rows`: the report's rows (decoder x {config, tuned}, then the baselines) from
    the metrics the chain collected.
  * :func:`write_report`: ``metrics.json`` and ``report.md`` (metrics table, previews, training
    curve, tuning and QC plots, stage timings, how to view the volumes).

The collected results (``results`` below) are a plain dict::

  {"name": config name, "workdir": ..., "test": {decoder: {volume: metrics.json of the decode}},
   "tuned": {decoder: {"best": best_params.json, "volumes": {volume: metrics.json}}},
   "baselines": {volume: {baseline: metrics}}, "stages": [{"stage", "status", "seconds", ...}],
   "images": {title: path relative to the results folder}, "qc": {volume: {"low_z", ...}},
   "viewer": {"layout", "base", "roots", "skipped"}}

where each decode's ``metrics.json`` holds ``results``: one entry per segmentation (threshold,
segmentation path and ``jaxseg.evaluate`` metrics). Never imports JAX.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from jaxseg.common import files
from jaxseg.workflow.baselines import BASELINES as TRIVIAL

REPORT_NAME = "report.md"
METRICS_NAME = "metrics.json"
_MIN_PANEL = 192  # small sections are upscaled (nearest) so the preview stays readable
_GAP = 4

# Table columns: key, header, format. Arrows say which way is better.
_COLUMNS = (
  ("adapted_rand", "adapted Rand ↓", "{:.4f}"),
  ("adapted_rand_precision", "precision", "{:.3f}"),
  ("adapted_rand_recall", "recall", "{:.3f}"),
  ("voi_split", "VOI split ↓", "{:.3f}"),
  ("voi_merge", "VOI merge ↓", "{:.3f}"),
  ("nerl", "NERL ↑", "{:.4f}"),
  ("segments", "segments", "{}"),
)


# -- previews -------------------------------------------------------------------------------------


def label_colours(ids: np.ndarray) -> np.ndarray:
  """RGB uint8 ``[..., 3]`` for integer ids: stable pseudo-random colours, id 0 black."""
  ids = np.asarray(ids).astype(np.uint64)
  h = ids * np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing spreads neighbouring ids
  h ^= h >> np.uint64(29)
  rgb = np.stack([(h >> np.uint64(s)) & np.uint64(0xFF) for s in (8, 24, 40)], axis=-1)
  rgb = (64 + rgb.astype(np.uint16) * 191 // 255).astype(np.uint8)  # never near black
  rgb[ids == 0] = 0
  return rgb


def preview_sections(depth: int, count: int) -> list[int]:
  """``count`` z sections spread evenly inside ``[0, depth)`` (never the very first / last)."""
  count = max(1, min(int(count), depth))
  return sorted({int((i + 1) * depth / (count + 1)) for i in range(count)})


def _grey(section: np.ndarray) -> np.ndarray:
  section = np.nan_to_num(section.astype(np.float32))
  lo, hi = np.percentile(section, (0.5, 99.5)) if section.size else (0.0, 1.0)
  grey = np.clip((section - lo) / max(hi - lo, 1e-6), 0, 1)
  return np.repeat((grey * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=-1)


def render_preview(
  image: np.ndarray,
  affinities: np.ndarray | None,
  segmentation: np.ndarray,
  labels: np.ndarray | None = None,
) -> np.ndarray:
  """The preview mosaic for the given sections, as RGB uint8 ``[H, W, 3]``.

  Args:
    image: ``[n, y, x]`` image sections (any dtype; contrast stretched per section).
    affinities: ``[3, n, y, x]`` z / y / x edge affinities (RGB, contrast stretched), or None.
    segmentation: ``[n, y, x]`` ids.
    labels: ``[n, y, x]`` ground-truth ids, or None.
  """
  n, h, w = segmentation.shape
  scale = max(1, math.ceil(_MIN_PANEL / max(1, min(h, w))))
  if affinities is not None:
    # Stretched (one range for all channels and sections): a young net's tempered affinities
    # can sit in a narrow band around 0.5.
    lo, hi = np.percentile(np.nan_to_num(affinities.astype(np.float32)), (1, 99))
    lo, hi = float(lo), max(float(hi), float(lo) + 1e-3)
  rows = []
  for i in range(n):
    panels = [_grey(image[i])]
    if affinities is not None:
      aff = np.clip((np.nan_to_num(affinities[:, i].astype(np.float32)) - lo) / (hi - lo), 0, 1)
      panels.append((np.moveaxis(aff, 0, -1) * 255 + 0.5).astype(np.uint8))
    panels.append(label_colours(segmentation[i]))
    if labels is not None:
      panels.append(label_colours(np.maximum(labels[i], 0)))
    row = []
    for panel in panels:
      panel = np.repeat(np.repeat(panel, scale, axis=0), scale, axis=1)
      row.append(np.pad(panel, ((_GAP, _GAP), (_GAP, _GAP), (0, 0)), constant_values=255))
    rows.append(np.concatenate(row, axis=1))
  return np.concatenate(rows, axis=0)


def write_preview(
  path: str,
  image,
  segmentation,
  *,
  affinity_source=None,
  labels=None,
  sections: int = 3,
) -> str:
  """Reads ``sections`` z sections of lazy volumes and writes :func:`render_preview` as a PNG.

  Args:
    path: the PNG to write (atomically).
    image: lazy ``[c, z, y, x]`` / ``[z, y, x]`` image (``jaxseg.io.Volume`` or array).
    segmentation: lazy ``[z, y, x]`` segmentation.
    affinity_source: an ``affinity_io.AffinitySource`` (its ``read(box)`` gives ``[3, z, y, x]``),
      or None.
    labels: lazy ``[z, y, x]`` ground truth, or None.
    sections: how many z sections (``run.preview_slices``).
  """
  zs = preview_sections(int(segmentation.shape[0]), sections)

  def take(volume, z):
    return np.asarray(volume[z] if len(volume.shape) == 3 else volume[:, z])

  img = [take(image, z) for z in zs]
  img = np.stack([s.mean(axis=0) if s.ndim == 3 else s for s in img])
  seg = np.stack([take(segmentation, z) for z in zs])
  lab = np.stack([take(labels, z) for z in zs]) if labels is not None else None
  aff = None
  if affinity_source is not None:
    aff = np.stack([affinity_source.read((slice(z, z + 1),))[:, 0] for z in zs], axis=1)
  mosaic = render_preview(img, aff, seg, lab)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with files.atomic_output(path) as tmp:
    Image.fromarray(mosaic).save(tmp)
  return path


# -- the metrics table ----------------------------------------------------------------------------


def _params_text(params: dict | None) -> str:
  if not params:
    return ""
  return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _row_params(entry: dict) -> dict:
  """A decoded segmentation's own parameters: its threshold, or the mutex watershed's biases."""
  return dict(entry.get("params") or {"threshold": entry.get("threshold")})


def _entries(decode_metrics: dict | None) -> list[dict]:
  return list((decode_metrics or {}).get("results", []))


def metric_rows(results: dict) -> list[dict]:
  """Rows of the metrics table: ``{"volume", "row", "params", **metrics}``.

  Per volume: each decoder with the config's parameters (``<decoder> (config)``), then with the
  tuned ones (``<decoder> (tuned)``), one row per decoded threshold; then each baseline.
  """
  volumes = []
  for per_volume in results.get("test", {}).values():
    volumes += [v for v in per_volume if v not in volumes]
  for per_decoder in results.get("tuned", {}).values():
    volumes += [v for v in per_decoder.get("volumes", {}) if v not in volumes]
  volumes += [v for v in results.get("baselines", {}) if v not in volumes]
  rows = []
  for volume in volumes:
    for decoder, per_volume in results.get("test", {}).items():
      for entry in _entries(per_volume.get(volume)):
        rows.append(
          {
            **entry,
            "volume": volume,
            "row": f"{decoder} (config)",
            "params": _params_text(_row_params(entry)),
          }
        )
    for decoder, tuned in results.get("tuned", {}).items():
      best = dict((tuned.get("best") or {}).get("params", {}))
      best.pop("thresholds", None)  # waterz's tuned threshold list: the row's own threshold
      best.pop("threshold", None)
      for entry in _entries(tuned.get("volumes", {}).get(volume)):
        params = {**best, **_row_params(entry)}
        rows.append(
          {**entry, "volume": volume, "row": f"{decoder} (tuned)", "params": _params_text(params)}
        )
    for name, metrics in results.get("baselines", {}).get(volume, {}).items():
      params = dict(metrics.get("params") or {})  # a boundary map's tuned decode keys
      if "thresholds" in params:
        params["threshold"] = float(params.pop("thresholds")[0])
      rows.append(
        {**metrics, "volume": volume, "row": f"baseline: {name}", "params": _params_text(params)}
      )
  return rows


def _cell(value, fmt: str) -> str:
  if value is None:
    return "–"
  if isinstance(value, float) and not math.isfinite(value):
    return "nan"
  return fmt.format(value)


def metrics_table(rows: Sequence[dict]) -> str:
  """The rows as a markdown table."""
  header = ["volume", "segmentation", "params"] + [h for _, h, _ in _COLUMNS]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    cells = [row["volume"], row["row"], row.get("params", "")]
    cells += [_cell(row.get(key), fmt) for key, _, fmt in _COLUMNS]
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
  return "\n".join(lines)


def _stage_table(stages: Sequence[dict]) -> str:
  lines = ["| stage | this run | seconds | computed in (s) | what |", "|---|---|---|---|---|"]
  total = 0.0
  for s in stages:
    total += float(s.get("seconds", 0.0))
    computed = s.get("computed_seconds")
    lines.append(
      f"| {s['stage']} | {s['status']} | {s.get('seconds', 0.0):.1f} | "
      f"{'–' if computed is None else f'{computed:.1f}'} | {s.get('detail', '')} |"
    )
  lines.append(f"| total | | {total:.1f} | | |")
  return "\n".join(lines)


def _best_learned(rows: Sequence[dict], metric: str, direction: int) -> dict | None:
  learned = [r for r in rows if not r["row"].startswith("baseline") and r.get(metric) is not None]
  return max(learned, key=lambda r: direction * r[metric]) if learned else None


def _summary_lines(rows: Sequence[dict]) -> list[str]:
  """One line per metric: the best learned row against the best baseline."""
  out = []
  for metric, label, direction in (("adapted_rand", "adapted Rand error", -1), ("nerl", "NERL", 1)):
    best = _best_learned(rows, metric, direction)
    if best is None:
      continue
    line = f"- best {label}: **{best[metric]:.4f}** ({best['row']}, {best['volume']})"
    for kind, names in (("trivial baseline", TRIVIAL), ("boundary-map reference", None)):
      bases = [
        r
        for r in rows
        if r["row"].startswith("baseline: ")
        and (r["row"][10:] in names if names else r["row"][10:] not in TRIVIAL)
        and r.get(metric) is not None
      ]
      if bases:
        base = max(bases, key=lambda r: direction * r[metric])
        line += f"; best {kind} {base[metric]:.4f} ({base['row'][10:]})"
    out.append(line)
  return out


def write_report(results_dir: str, results: dict) -> dict[str, str]:
  """Writes ``metrics.json`` and ``report.md`` into ``results_dir``; returns their paths."""
  os.makedirs(results_dir, exist_ok=True)
  rows = metric_rows(results)
  metrics_path = os.path.join(results_dir, METRICS_NAME)
  files.write_json(metrics_path, files.json_ready({**results, "table": rows}))

  lines = [f"# jaxseg run: {results.get('name', '')}", ""]
  lines.append(f"Work dir: `{results.get('workdir', '')}`; resolved config: `config.json`.")
  lines += ["", *_summary_lines(rows), "", "## Metrics on the test volumes", ""]
  if rows:
    lines.append(metrics_table(rows))
    lines += [
      "",
      "Adapted Rand error and VOI (bits) against the dense labels, NERL against the skeletons; "
      "↓ lower is better, ↑ higher is better. *config*: the recipe's decoder settings; *tuned*: "
      "the best parameters found by tuning on the split named below. Baselines are unlearned "
      "segmentations scored the same way: everything one segment, every voxel its own segment, "
      "and connected components of the image above its mean.",
    ]
  else:
    lines.append("No test metrics yet (run `--mode=test`).")
  for decoder, tuned in results.get("tuned", {}).items():
    best = tuned.get("best") or {}
    if best:
      split = (best.get("fingerprint") or {}).get("split", "?")
      leak = (
        " (**the test split itself**: its test scores are optimistic)" if split == "test" else ""
      )
      lines += [
        "",
        f"**{decoder}** tuned on `{split}`{leak}: "
        f"{_params_text(best.get('params'))}; {best.get('objective', 'objective')} = "
        f"{_cell(best.get('best_value'), '{:.4f}')} over "
        f"{best.get('n_complete', best.get('n_trials', '?'))} trials"
        + (
          f" (the flattest optimum: its grid neighbours average "
          f"{_cell(best.get('neighbourhood_value'), '{:.4f}')})."
          if best.get("selection") == "flat"
          else "."
        ),
      ]
  images = results.get("images", {})
  if images:
    lines += ["", "## Previews", ""]
    lines.append(
      "Rows are z sections; columns: image, affinities (z, y, x edges as R, G, B), "
      "segmentation, ground truth."
    )
    for title, rel in images.items():
      lines += ["", f"**{title}**", "", f"![{title}]({rel})"]
  qc = results.get("qc", {})
  if qc:
    lines += ["", "## Affinity QC", ""]
    for name, info in qc.items():
      lines.append(
        f"- {name}: usable z [{info.get('low_z')}, {info.get('high_z')}); "
        f"report `{info.get('report', '')}`"
      )
  stages = results.get("stages", [])
  if stages:
    lines += ["", "## Stages", "", _stage_table(stages)]
  viewer = results.get("viewer")
  if viewer:
    lines += [
      "",
      "## Viewing the volumes",
      "",
      f"`{viewer['layout']}` is a Neuroglancer state whose sources live under a local server "
      f"({viewer['base']}: `/workdir` = the work dir, `/data` = the data root). "
      "`python -m jaxseg.run --config=<config> --workdir=<dir> --view` serves both and opens a "
      "viewer (needs `pip install neuroglancer`).",
    ]
    for line in viewer.get("skipped", []):
      lines.append(f"- not shown: {line}")
  report_path = os.path.join(results_dir, REPORT_NAME)
  with files.atomic_output(report_path) as tmp, open(tmp, "w") as f:
    f.write("\n".join(lines) + "\n")
  return {"report": report_path, "metrics": metrics_path}
