"""Training summaries: TensorBoard event files, a ``metrics.jsonl`` log and image previews.

Owns :class:`MetricWriter`, which writes every record twice:

* ``workdir/tensorboard/``: TensorBoard event files (``tensorboardX``, no TensorFlow needed):
  scalars under ``train/...`` and ``val/...`` and preview images.
* ``workdir/previews/<tag>.png``: the latest preview image of each tag, to look at without
  TensorBoard; :func:`plot_training_curves` draws ``workdir/training_curves.png`` from the log.
* ``workdir/metrics.jsonl``: one JSON object per line, ``{"kind": "train"|"val", "step": N,
  "time": unix seconds, <scalar name>: value, ...}``; :func:`read_metrics` reads it back. A resumed
  run appends, so a step may appear twice after a crash; :func:`read_metrics` keeps the last.

Only process 0 of a multi-host run writes (``enabled=False`` elsewhere).

Preview images (:func:`preview_grid`) take mid-z slices ``image [y, x]``, ``target [y, x, c]`` and
``prediction [y, x, c]`` (probabilities) and tile them into one grayscale ``[H, W]`` uint8 image:
top row the input and the target channels, bottom row the input and the predicted channels.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence

import numpy as np

from jaxseg.training.paths import CURVES_FILE, METRICS_FILE, PREVIEW_DIR, TENSORBOARD_DIR


def _to_float(value) -> float:
  return float(np.asarray(value, dtype=np.float64))


class MetricWriter:
  """Writes scalars and images to TensorBoard and ``metrics.jsonl`` under ``workdir``."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.workdir = workdir
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      from tensorboardX import SummaryWriter  # imported lazily: a heavy protobuf import

      os.makedirs(workdir, exist_ok=True)
      self._tb = SummaryWriter(logdir=os.path.join(workdir, TENSORBOARD_DIR))
      self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a")  # noqa: SIM115 (kept open)

  def write_scalars(self, step: int, scalars: Mapping[str, float], kind: str = "train") -> None:
    """Writes ``scalars`` as ``<kind>/<name>`` TensorBoard scalars and one jsonl line."""
    if not self.enabled:
      return
    values = {name: _to_float(v) for name, v in scalars.items()}
    for name, value in values.items():
      self._tb.add_scalar(f"{kind}/{name}", value, global_step=int(step))
    record = {"kind": kind, "step": int(step), "time": round(time.time(), 3)}
    # JSON has no NaN / Infinity: write them as strings so the file stays standard JSON.
    record.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()

  def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
    """Writes an ``[H, W]`` or ``[H, W, 3]`` image (uint8, or float in [0, 1])."""
    if not self.enabled:
      return
    image = np.asarray(image)
    if image.dtype != np.uint8:
      image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    dataformats = "HW" if image.ndim == 2 else "HWC"
    self._tb.add_image(tag, image, global_step=int(step), dataformats=dataformats)
    from PIL import Image

    from jaxseg.common.files import atomic_output

    path = os.path.join(self.workdir, PREVIEW_DIR, tag.replace("/", "_") + ".png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_output(path) as tmp:
      Image.fromarray(image).save(tmp)

  def flush(self) -> None:
    if self.enabled:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
      self.enabled = False


def read_metrics(workdir: str, kind: str | None = None) -> list[dict]:
  """The records of ``workdir/metrics.jsonl`` (of one ``kind``), one per step, in step order.

  When a step was logged twice (a run resumed after a crash re-runs some steps) the later record
  wins. Non-finite values come back as floats (``nan``, ``inf``).
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  by_key: dict[tuple[str, int], dict] = {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      record = json.loads(line)
      for key, value in record.items():
        if isinstance(value, str) and value in ("nan", "inf", "-inf"):
          record[key] = float(value)
      if kind is None or record.get("kind") == kind:
        by_key[(record.get("kind"), int(record["step"]))] = record
  return [by_key[k] for k in sorted(by_key, key=lambda k: (k[1], str(k[0])))]


def plot_training_curves(workdir: str, path: str | None = None) -> str | None:
  """Draws loss (train and val), validation accuracy and learning rate over steps to a PNG.

  Returns the path written (default ``workdir/training_curves.png``), or None when the log has
  no records yet.
  """
  train, val = read_metrics(workdir, "train"), read_metrics(workdir, "val")
  if not train and not val:
    return None
  import matplotlib

  matplotlib.use("Agg")  # files only; never needs a display
  import matplotlib.pyplot as plt

  from jaxseg.common.files import atomic_output

  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  if train:
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
  if val:
    steps = [r["step"] for r in val]
    ax_loss.plot(steps, [r["loss"] for r in val], "o-", label="val loss (EMA weights)")
    ax_acc.plot(steps, [r["accuracy"] for r in val], "o-", color="C2", label="val accuracy")
  ax_loss.set_xlabel("step")
  ax_loss.set_ylabel("loss")
  ax_loss.legend()
  ax_loss.grid(alpha=0.3)
  ax_acc.set_xlabel("step")
  ax_acc.set_ylabel("affinity accuracy")
  ax_acc.grid(alpha=0.3)
  if train and "lr" in train[0]:
    ax_lr = ax_acc.twinx()
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="C7", lw=1, label="lr")
    ax_lr.set_ylabel("learning rate")
    ax_lr.legend(loc="lower right")
  if val:
    ax_acc.legend(loc="upper left")
  fig.tight_layout()
  path = path or os.path.join(workdir, CURVES_FILE)
  with atomic_output(path) as tmp:
    fig.savefig(tmp, dpi=100)
  plt.close(fig)
  return path


def _normalise(a: np.ndarray) -> np.ndarray:
  a = np.asarray(a, np.float32)
  lo, hi = float(np.min(a)), float(np.max(a))
  return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def preview_grid(
  image: np.ndarray,
  target: np.ndarray,
  prediction: np.ndarray,
  channels: Sequence[int] = (0, 1, 2),
  border: int = 2,
) -> np.ndarray:
  """Tiles one slice of input, target and prediction into a uint8 ``[H, W]`` image.

  Args:
    image: ``[y, x]`` or ``[y, x, c]`` input slice (the first channel is shown, min-max scaled).
    target: ``[y, x, C]`` affinity targets in [0, 1].
    prediction: ``[y, x, C]`` predicted probabilities in [0, 1].
    channels: which affinity channels to show (those beyond ``C`` are skipped).
    border: white separator width in pixels.
  """
  image = np.asarray(image)
  if image.ndim == 3:
    image = image[..., 0]
  target, prediction = np.asarray(target), np.asarray(prediction)
  chans = [c for c in channels if c < target.shape[-1]]
  tiles_top = [_normalise(image)] + [np.clip(target[..., c], 0, 1) for c in chans]
  tiles_bottom = [_normalise(image)] + [np.clip(prediction[..., c], 0, 1) for c in chans]
  h, w = image.shape
  n = len(tiles_top)
  grid = np.ones((2 * h + border, n * w + (n - 1) * border), np.float32)
  for row, tiles in enumerate((tiles_top, tiles_bottom)):
    for col, tile in enumerate(tiles):
      y0, x0 = row * (h + border), col * (w + border)
      grid[y0 : y0 + h, x0 : x0 + w] = tile
  return (grid * 255.0 + 0.5).astype(np.uint8)
