"""The tuning plot (``objective.png``): the objective per trial with the best so far, and the
objective against the decoder's main parameter (cc: the threshold; waterz: the best merge
threshold, one colour per merge function; mws: its two biases, coloured by the objective). Matplotlib with the Agg backend; never imports JAX.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from jaxseg.common.files import atomic_output


def plot_trials(
  rows: Sequence[Mapping[str, Any]],
  path: str,
  *,
  decoder: str,
  objective: str,
  direction: str,
) -> str:
  """Writes the plot of finished trials.

  Args:
    rows: one dict per trial with ``number``, ``state``, ``value`` (None when failed), ``params``
      and ``threshold`` (the decoded threshold that scored ``value``), ``timed_out``.
    path: the PNG to write.
    decoder: ``cc``, ``waterz`` or ``mws`` (picks the right panel).
    objective: its name, for the axis.
    direction: ``maximize`` or ``minimize`` (for the best-so-far line).

  Returns:
    ``path``.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  done = [r for r in rows if r.get("state") == "COMPLETE" and r.get("value") is not None]
  finite = [r for r in done if math.isfinite(r["value"])]
  timed_out = [r for r in done if not math.isfinite(r["value"])]
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)

  xs = [r["number"] for r in finite]
  ys = [r["value"] for r in finite]
  left.plot(xs, ys, "o", color="tab:blue", label="trial")
  best, best_x, best_y = None, [], []
  for r in sorted(finite, key=lambda r: r["number"]):
    v = r["value"]
    if best is None or (v > best if direction == "maximize" else v < best):
      best = v
    best_x.append(r["number"])
    best_y.append(best)
  if best_x:
    left.step(best_x, best_y, where="post", color="tab:orange", label="best so far")
  if timed_out:
    # Timed-out trials score +-inf: drawn at the bottom / top edge of the finite values.
    edge = (min(ys) if direction == "maximize" else max(ys)) if ys else 0.0
    numbers = [r["number"] for r in timed_out]
    left.plot(numbers, [edge] * len(numbers), "x", color="tab:red", label="timed out")
  left.set_xlabel("trial")
  left.set_ylabel(f"{objective} ({'higher' if direction == 'maximize' else 'lower'} is better)")
  left.set_title(f"{decoder}: {len(done)} trials")
  left.legend(loc="best", fontsize="small")

  if decoder == "cc":
    pts = sorted((r["params"]["threshold"], r["value"]) for r in finite)
    right.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="tab:blue")
    right.set_xlabel("threshold")
  elif decoder == "mws":
    points = right.scatter(
      [r["params"]["bias_short"] for r in finite],
      [r["params"]["bias_long"] for r in finite],
      c=[r["value"] for r in finite],
      cmap="viridis" if direction == "maximize" else "viridis_r",
    )
    if finite:
      fig.colorbar(points, ax=right, label=objective)
    right.set_xlabel("bias_short")
  else:
    by_merge: dict[str, list] = {}
    for r in finite:
      by_merge.setdefault(str(r["params"].get("merge_function")), []).append(r)
    for name, group in sorted(by_merge.items()):
      right.plot([r["threshold"] for r in group], [r["value"] for r in group], "o", label=name)
    right.set_xlabel("best merge threshold of the trial")
    if by_merge:
      right.legend(loc="best", fontsize="small")
  right.set_ylabel("bias_long" if decoder == "mws" else objective)
  right.grid(alpha=0.3)
  left.grid(alpha=0.3)
  with atomic_output(path) as tmp:
    fig.savefig(tmp, dpi=100)
  plt.close(fig)
  return path
