"""waterz's scoring functions: their strings, and the per-edge statistics that merging updates.

Owns, for :mod:`~jaxseg.decoding.graph_agglomeration`:

  * :class:`MergeFunction` / :func:`parse_merge_function`: the waterz scoring-function strings
    graph agglomeration implements, ``OneMinus<MeanAffinity<RegionGraphType, ScoreValue>>`` and
    ``OneMinus<HistogramQuantileAffinity<RegionGraphType, Q, ScoreValue, B[, true|false]>>``
    (whitespace-insensitive, as :func:`jaxseg.decoding.waterz_ops.scoring_function` returns them).
  * :func:`discretize`: waterz's ``discretize()``, which bins both histograms and the bin queue.
  * :class:`EdgeScores` / :func:`edge_scores`: the statistics of ``E`` region-graph edges as the
    merge kernels update them, built from an :class:`~jaxseg.decoding.graph_edges.EdgeTable`;
    :func:`score_edge` (waterz's ``scoreEdge``) and :func:`merge_stats` (``notifyEdgeMerge``).

Histograms are circular linked lists of (bin, count) items, one list per edge; an edge that has
absorbed many items also gets a dense ``B``-bin array from a pool bounded by items / 64, so memory
stays O(edges). Scores follow waterz in float32 (see the module docstring of
:mod:`~jaxseg.decoding.graph_agglomeration`).

This module never imports JAX.
"""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

import numba
import numpy as np

# Histograms with at least this many (bin, count) items get a dense array; fewer are summed from
# their item list when scored. Bounds the dense pool by items / DENSE_MIN arrays.
DENSE_MIN = 64
KIND_MEAN = 0
KIND_HISTOGRAM = 1

_SUPPORTED = (
  "OneMinus<MeanAffinity<RegionGraphType, ScoreValue>>",
  "OneMinus<HistogramQuantileAffinity<RegionGraphType, Q, ScoreValue, B[, true|false]>>",
)
_MEAN_FORMS = (
  "OneMinus<MeanAffinity<RegionGraphType,ScoreValue>>",
  "OneMinus<EdgeStatisticValue<RegionGraphType,MeanAffinityProvider<RegionGraphType,ScoreValue>>>",
)
_HISTOGRAM_RE = re.compile(
  r"OneMinus<HistogramQuantileAffinity<RegionGraphType,(\d+),ScoreValue,(\d+)(?:,(true|false))?>>"
)


# -- scoring-function strings ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MergeFunction:
  """A waterz scoring function graph agglomeration implements.

  Attributes:
    kind: ``"mean"`` (1 - mean affinity) or ``"histogram_quantile"`` (1 - histogram quantile).
    quantile: Q in percent (histogram only).
    bins: number of histogram bins B (histogram only).
    init_with_max: histogram only: each initial edge counts once, at its largest affinity.
  """

  kind: str
  quantile: int = 0
  bins: int = 0
  init_with_max: bool = True

  @property
  def needs_histograms(self) -> bool:
    """Whether edge tables must carry per-contact histograms (quantile without InitWithMax)."""
    return self.kind == "histogram_quantile" and not self.init_with_max

  def to_string(self) -> str:
    """The canonical waterz scoring-function string."""
    if self.kind == "mean":
      return "OneMinus<MeanAffinity<RegionGraphType, ScoreValue>>"
    init = "true" if self.init_with_max else "false"
    return (
      f"OneMinus<HistogramQuantileAffinity<RegionGraphType, {self.quantile}, ScoreValue, "
      f"{self.bins}, {init}>>"
    )


def parse_merge_function(spec: str | MergeFunction) -> MergeFunction:
  """Parses a waterz scoring-function string (whitespace-insensitive).

  Args:
    spec: e.g. ``"OneMinus<HistogramQuantileAffinity<RegionGraphType, 85, ScoreValue, 256>>"``,
      or a :class:`MergeFunction` (returned as is).

  Raises:
    NotImplementedError: for a scoring function this module does not implement.
    ValueError: for a histogram with no bins.
  """
  if isinstance(spec, MergeFunction):
    return spec
  text = re.sub(r"\s+", "", str(spec))
  if text in _MEAN_FORMS:
    return MergeFunction("mean")
  match = _HISTOGRAM_RE.fullmatch(text)
  if match:
    quantile, bins = int(match.group(1)), int(match.group(2))
    if bins < 1:
      raise ValueError(f"a histogram needs at least one bin: {spec!r}")
    return MergeFunction("histogram_quantile", quantile, bins, match.group(3) != "false")
  raise NotImplementedError(
    f"graph agglomeration does not implement the scoring function {spec!r}; supported: "
    + "; ".join(_SUPPORTED)
  )


@numba.njit(cache=True, nogil=True)
def discretize(value, levels):
  # waterz's discretize(): clamp first (NaN and <= 0 -> 0), then floor(value * levels) in float32.
  if not (value > 0):
    return 0
  if value >= 1:
    return levels - 1
  b = np.int64(np.float32(value) * np.float32(levels))
  return min(b, levels - 1)


@numba.njit(cache=True, nogil=True)
def _bins_of(values, nbins):
  out = np.empty(values.shape[0], np.int64)
  for i in range(values.shape[0]):
    out[i] = discretize(values[i], nbins)
  return out


# -- statistics while merging ---------------------------------------------------------------------


class EdgeScores(NamedTuple):
  """The statistics of ``E`` edges that merging updates in place (numba arrays).

  Arrays a scoring function does not use are ``[1]`` placeholders.

  Attributes:
    kind: :data:`KIND_MEAN` or :data:`KIND_HISTOGRAM`.
    quantile: Q in percent (histogram).
    nbins: histogram bins B (1 for the mean).
    mean32: ``[E]`` float32 mean affinity (mean).
    cnt: ``[E]`` int64 number of contacts (mean).
    item_bin, item_cnt: ``[I]`` int64 histogram items: bin and count.
    item_next: ``[I]`` int64 next item of the same edge (circular lists).
    g_head: ``[E]`` int64 one item of each edge's list (-1 once the edge is absorbed).
    g_items, g_total: ``[E]`` int64 number of items and total count of each edge.
    g_dense: ``[E]`` int64 row of ``dense`` holding the edge's histogram, or -1.
    dense: ``[S, B]`` int32 dense histograms (waterz's histograms count in int too).
    dense_free: ``[S]`` int64 stack of free rows of ``dense``; dense_state ``[1]``: its size.
    tmp: ``[B]`` int64 zeroed scratch for scoring an item list.
  """

  kind: int
  quantile: int
  nbins: int
  mean32: np.ndarray
  cnt: np.ndarray
  item_bin: np.ndarray
  item_cnt: np.ndarray
  item_next: np.ndarray
  g_head: np.ndarray
  g_items: np.ndarray
  g_total: np.ndarray
  g_dense: np.ndarray
  dense: np.ndarray
  dense_free: np.ndarray
  dense_state: np.ndarray
  tmp: np.ndarray


def edge_scores(edges, function: MergeFunction) -> EdgeScores:
  """The merge-time statistics of ``edges`` (an ``EdgeTable``; its arrays are not modified).

  Raises:
    ValueError: for a histogram function without InitWithMax on a table without matching
      per-contact histograms, or an edge with an empty histogram.
  """
  num_edges = int(edges.u.size)
  kind = KIND_MEAN if function.kind == "mean" else KIND_HISTOGRAM
  nbins = max(function.bins, 1)
  if kind == KIND_MEAN:
    mean32 = np.array(edges.mean, np.float32)  # copies: merging updates them in place
    cnt = np.array(edges.count, np.int64)
  else:
    mean32 = np.zeros(1, np.float32)
    cnt = np.zeros(1, np.int64)
  if kind != KIND_HISTOGRAM:
    placeholder = np.zeros(1, np.int64)
    return EdgeScores(kind, function.quantile, nbins, mean32, cnt, *[placeholder] * 7,
                      np.zeros((1, 1), np.int32), np.zeros(1, np.int64), np.zeros(1, np.int64),
                      np.zeros(nbins, np.int64))  # fmt: skip
  if function.init_with_max:
    # One item per edge: a single count at the bin of the largest contact affinity.
    item_bin = _bins_of(np.ascontiguousarray(edges.aff_max, np.float32), nbins)
    item_cnt = np.ones(num_edges, np.int64)
    ptr = np.arange(num_edges + 1, dtype=np.int64)
  else:
    if edges.hist_ptr is None or edges.hist_bins != function.bins:
      raise ValueError(
        f"{function.to_string()} needs per-contact histograms with {function.bins} bins: "
        "build the edge tables with edge_statistics(..., merge_function=...)"
      )
    item_bin = np.asarray(edges.hist_bin, np.int64)
    item_cnt = np.asarray(edges.hist_count, np.int64)
    ptr = np.asarray(edges.hist_ptr, np.int64)
  item_next = np.arange(1, item_bin.size + 1, dtype=np.int64)
  g_items = np.diff(ptr)
  if num_edges and g_items.min() < 1:
    raise ValueError("every edge needs a non-empty histogram")
  g_head = ptr[:-1].copy()
  item_next[ptr[1:] - 1] = g_head  # close each edge's list into a circle
  g_total = np.add.reduceat(item_cnt, g_head) if num_edges else np.zeros(0, np.int64)
  g_total = g_total.astype(np.int64)
  pool = item_bin.size // DENSE_MIN + 1
  dense = np.zeros((pool, nbins), np.int32)  # waterz's histograms count in int too
  dense_free = np.arange(pool, dtype=np.int64)[::-1].copy()
  dense_state = np.array([pool], np.int64)
  g_dense = np.full(num_edges, -1, np.int64)
  _init_dense(g_head, g_items, g_dense, item_bin, item_cnt, item_next, dense, dense_free,
              dense_state)  # fmt: skip
  return EdgeScores(kind, function.quantile, nbins, mean32, cnt, item_bin, item_cnt, item_next,
                    g_head, g_items, g_total, g_dense, dense, dense_free, dense_state,
                    np.zeros(nbins, np.int64))  # fmt: skip


@numba.njit(cache=True, nogil=True)
def _add_items(dense, d, head, item_bin, item_cnt, item_next):
  # Adds the circular item list starting at `head` into dense histogram row d.
  i = head
  while True:
    dense[d, item_bin[i]] += item_cnt[i]
    i = item_next[i]
    if i == head:
      break


@numba.njit(cache=True, nogil=True)
def _new_dense(head, item_bin, item_cnt, item_next, dense, dense_free, dense_state):
  # Takes a free dense row and fills it from the item list at `head`; returns the row.
  dense_state[0] -= 1
  d = dense_free[dense_state[0]]
  _add_items(dense, d, head, item_bin, item_cnt, item_next)
  return d


@numba.njit(cache=True, nogil=True)
def _init_dense(g_head, g_items, g_dense, item_bin, item_cnt, item_next, dense, dense_free,
                dense_state):  # fmt: skip
  for e in range(g_head.shape[0]):
    if g_items[e] >= DENSE_MIN:
      g_dense[e] = _new_dense(g_head[e], item_bin, item_cnt, item_next, dense, dense_free,
                              dense_state)  # fmt: skip


@numba.njit(cache=True, nogil=True)
def score_edge(e, scores):
  # waterz's scoreEdge: 1 - mean, or 1 - the histogram quantile, in float32.
  if scores.kind == 0:
    return np.float32(1.0 - np.float64(scores.mean32[e]))
  nbins = scores.nbins
  item_bin, item_cnt, item_next = scores.item_bin, scores.item_cnt, scores.item_next
  dense, tmp = scores.dense, scores.tmp
  pivot = scores.quantile * scores.g_total[e] // 100 + 1
  found = nbins
  acc = 0
  d = scores.g_dense[e]
  if d >= 0:
    for b in range(nbins):
      acc += dense[d, b]
      if acc >= pivot:
        found = b
        break
  else:
    h = scores.g_head[e]
    lo = nbins
    hi = -1
    i = h
    while True:
      b = item_bin[i]
      tmp[b] += item_cnt[i]
      lo = min(lo, b)
      hi = max(hi, b)
      i = item_next[i]
      if i == h:
        break
    for b in range(lo, hi + 1):
      acc += tmp[b]
      if acc >= pivot:
        found = b
        break
    i = h
    while True:
      tmp[item_bin[i]] = 0
      i = item_next[i]
      if i == h:
        break
  value = np.float32((np.float64(found) + 0.5) / nbins)
  return np.float32(1.0 - np.float64(value))


@numba.njit(cache=True, nogil=True)
def merge_stats(src, dst, scores):
  # Statistics of edge src join those of dst (waterz's notifyEdgeMerge(src, dst)).
  if scores.kind == 0:
    mean32, cnt = scores.mean32, scores.cnt
    ns = cnt[src]
    nd = cnt[dst]
    mean32[dst] = (mean32[src] * np.float32(ns) + mean32[dst] * np.float32(nd)) / np.float32(
      ns + nd
    )
    cnt[dst] = ns + nd
    return
  item_bin, item_cnt, item_next = scores.item_bin, scores.item_cnt, scores.item_next
  g_head, g_items, g_total, g_dense = scores.g_head, scores.g_items, scores.g_total, scores.g_dense
  dense, dense_free, dense_state = scores.dense, scores.dense_free, scores.dense_state
  g_total[dst] += g_total[src]
  g_items[dst] += g_items[src]
  ds = g_dense[src]
  dd = g_dense[dst]
  nbins = dense.shape[1]
  if ds >= 0 and dd >= 0:
    for b in range(nbins):
      dense[dd, b] += dense[ds, b]
      dense[ds, b] = 0
    dense_free[dense_state[0]] = ds
    dense_state[0] += 1
  elif dd >= 0 or ds >= 0:
    target = dd if dd >= 0 else ds
    head = g_head[src] if dd >= 0 else g_head[dst]  # the list of the side without a row
    _add_items(dense, target, head, item_bin, item_cnt, item_next)
    g_dense[dst] = target
  else:
    hs = g_head[src]
    hd = g_head[dst]
    # Splice two circular lists: swap the successors of one item of each.
    nxt = item_next[hs]
    item_next[hs] = item_next[hd]
    item_next[hd] = nxt
    if g_items[dst] >= DENSE_MIN:
      g_dense[dst] = _new_dense(hd, item_bin, item_cnt, item_next, dense, dense_free, dense_state)
  g_dense[src] = -1
  g_head[src] = -1
  g_total[src] = 0
  g_items[src] = 0
