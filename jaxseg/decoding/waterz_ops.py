"""Thin, safe layer over waterz 0.10.1: scoring-function names, affinity layout, agglomeration.

Owns:
  * :func:`scoring_function`: PyTC-style merge-function names (``aff85_his256``, ``mean``, ...) to
    waterz's C++ scoring-function strings and the matching ``discretize_queue``.
  * :func:`normalize_scoring_function`: the canonical spelling waterz keys its prebuilt variants
    by (no whitespace, explicit ``InitWithMax``), for comparing and parsing strings.
  * :func:`check_compilable`: fails early, with the install command, when a scoring function is
    not prebuilt and cannot be compiled here (no Boost headers, compiler or witty).
  * :func:`quiet_stdout`: silences waterz's chatter (C++ ``std::cout`` on file descriptor 1, and
    Python ``print``).
  * :func:`to_waterz_affinities`: ``[3, z, y, x]`` affinities in any channel order and storage
    convention to waterz's layout.
  * :func:`agglomerate`: waterz at several thresholds, returning independent copies of the
    segmentations and each threshold's surviving region graph (working around a waterz bug that
    corrupts multi-threshold passes when region graphs are extracted).

waterz's layout: ``aff[c, z, y, x]`` float32, C-contiguous, channels ``c = 0, 1, 2`` = z, y, x,
and ``aff[c, p]`` links voxel ``p`` with ``p - e_c`` (the edge is stored at its higher voxel,
jaxseg's ``'target'`` convention). Segmentations are ``[z, y, x]`` uint64, 0 = background.

waterz 0.10.1 quirks this module hides: it accepts float32 only; it yields the *same* buffer for
every threshold and mutates it in place; it overwrites a ``fragments`` array it is given; its C++
prints to stdout; only some scoring functions ship prebuilt (the others are compiled on first use
and need Boost headers, a C++ compiler and witty); and extracting a region graph between two
thresholds of one pass changes the merging at the later ones (see :func:`agglomerate`).

This module never imports JAX; waterz itself is imported lazily, so the names and layout helpers
work without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from jaxseg.common.errors import ConfigError, JaxsegError
from jaxseg.data import affinity as affinity_lib

# The name forms :func:`scoring_function` understands, with what each one means.
MERGE_FUNCTIONS: dict[str, str] = {
  "affQQ_hisBBB": (
    "OneMinus<HistogramQuantileAffinity<RegionGraphType, QQ, ScoreValue, BBB>>: 1 - the QQth "
    "percentile of a BBB-bin affinity histogram (InitWithMax: each initial edge counts once, "
    "at its maximum); e.g. aff85_his256 (PyTC's SNEMI recipe)"
  ),
  "affQQ, affQQ_his0": (
    "OneMinus<QuantileAffinity<RegionGraphType, QQ, ScoreValue>>: 1 - the exact QQth percentile"
  ),
  "maxK": "OneMinus<MeanMaxKAffinity<RegionGraphType, K, ScoreValue>>: 1 - mean of the K largest",
  "mean, mean_aff, affmean": "OneMinus<MeanAffinity<RegionGraphType, ScoreValue>>: 1 - mean",
  "OneMinus<...>": "any waterz C++ scoring-function string, passed through unchanged",
}

# The histogram functions discretize the merge queue by default, as PyTC's recipe does
# (env.md measured aff85_his256 with discretize_queue=256).
DEFAULT_HISTOGRAM_QUEUE = 256

# Where a system Boost (apt-get install libboost-dev) puts its headers; the compiler searches it
# even though waterz's own include list may not name it.
SYSTEM_INCLUDE_DIRS = ("/usr/include", "/usr/local/include")

_MEAN_NAMES = ("mean", "mean_aff", "affmean")
_HIS_RE = re.compile(r"aff(\d+)_his(\d+)")
_QUANTILE_RE = re.compile(r"aff(\d+)")
_MAXK_RE = re.compile(r"max(\d+)")


def scoring_function(name: str, discretize_queue: int | None = None) -> tuple[str, int]:
  """Translates a merge-function name into waterz's scoring-function string and queue size.

  Args:
    name: ``affQQ_hisBBB`` (QQ in 1..99 percent, BBB > 0 bins), ``affQQ`` / ``affQQ_his0``,
      ``maxK``, ``mean`` / ``mean_aff`` / ``affmean``, or a raw ``OneMinus<...>`` string.
    discretize_queue: bins of waterz's merge queue (0 = exact priority queue). ``None`` picks
      the default: :data:`DEFAULT_HISTOGRAM_QUEUE` for histogram functions, 0 for the others.

  Returns:
    ``(scoring_function_string, discretize_queue)``. Strings are spelled the way waterz's
    documentation and PyTC spell them (``", "`` between template arguments, ``InitWithMax``
    left at its default ``true``); :func:`normalize_scoring_function` gives the compact form.

  Raises:
    ValueError: for a name of none of these forms (the message lists the forms).
  """
  text = str(name).strip()
  is_histogram = False
  match_his = _HIS_RE.fullmatch(text)
  match_quantile = _QUANTILE_RE.fullmatch(text)
  match_maxk = _MAXK_RE.fullmatch(text)
  if text in _MEAN_NAMES:
    function = "OneMinus<MeanAffinity<RegionGraphType, ScoreValue>>"
  elif match_his and int(match_his.group(2)) > 0:
    quantile, bins = _check_quantile(match_his.group(1), text), int(match_his.group(2))
    function = (
      f"OneMinus<HistogramQuantileAffinity<RegionGraphType, {quantile}, ScoreValue, {bins}>>"
    )
    is_histogram = True
  elif match_his or match_quantile:
    quantile = _check_quantile((match_his or match_quantile).group(1), text)
    function = f"OneMinus<QuantileAffinity<RegionGraphType, {quantile}, ScoreValue>>"
  elif match_maxk and int(match_maxk.group(1)) > 0:
    function = (
      f"OneMinus<MeanMaxKAffinity<RegionGraphType, {int(match_maxk.group(1))}, ScoreValue>>"
    )
  elif text.startswith("OneMinus<") and text.endswith(">") and _balanced(text):
    function = text
    is_histogram = "HistogramQuantileAffinity<" in text
  else:
    forms = "\n".join(f"  {form}: {meaning}" for form, meaning in MERGE_FUNCTIONS.items())
    raise ConfigError(f"unknown waterz merge function {name!r}; known forms:\n{forms}")
  if discretize_queue is None:
    discretize_queue = DEFAULT_HISTOGRAM_QUEUE if is_histogram else 0
  discretize_queue = int(discretize_queue)
  if not 0 <= discretize_queue <= 65536:
    raise ValueError(f"discretize_queue must be in [0, 65536], got {discretize_queue}")
  return function, discretize_queue


def _check_quantile(text: str, name: str) -> int:
  quantile = int(text)
  if not 0 < quantile < 100:
    raise ConfigError(f"merge function {name!r}: the percentile must lie in 1..99, got {quantile}")
  return quantile


def _balanced(text: str) -> bool:
  depth = 0
  for char in text:
    depth += {"<": 1, ">": -1}.get(char, 0)
    if depth < 0:
      return False
  return depth == 0


def normalize_scoring_function(function: str) -> str:
  """Canonical spelling of a scoring-function string, as waterz keys its prebuilt variants.

  Whitespace is removed around ``<``, ``>`` and ``,`` (and runs of it collapse to one space
  elsewhere), and ``HistogramQuantileAffinity<RegionGraphType,Q,ScoreValue,B>`` gets its default
  ``InitWithMax`` spelled out (``,true``). Two strings with the same canonical spelling name the
  same C++ type.
  """
  text = re.sub(r"\s+", " ", function.strip())
  text = re.sub(r" ?([<>,]) ?", r"\1", text)
  return re.sub(
    r"(\bHistogramQuantileAffinity<RegionGraphType,\d+,ScoreValue,\d+)>", r"\1,true>", text
  )


def _missing_build_tools() -> list[str]:
  """What compiling a non-prebuilt waterz variant would lack on this machine."""
  missing = []
  from waterz import _codegen  # Lazy: waterz is only needed when agglomerating.

  boost_dirs = [Path(d) for d in (*_codegen.include_dirs(), *SYSTEM_INCLUDE_DIRS)]
  if not any((d / "boost" / "multi_array.hpp").is_file() for d in boost_dirs):
    missing.append("the Boost headers (boost/multi_array.hpp)")
  if not (shutil.which("g++") or shutil.which("c++")):
    missing.append("a C++ compiler (g++)")
  try:
    import witty  # noqa: F401  (only probed: waterz imports it itself when compiling)
  except ImportError:
    missing.append("the witty package")
  return missing


def is_prebuilt(function: str, discretize_queue: int) -> bool:
  """Whether waterz ships this variant compiled (no compiler needed to use it)."""
  from waterz import _agglomerate  # Lazy: see _missing_build_tools.

  return _agglomerate._load_prebuilt(function, discretize_queue) is not None


class BuildToolsMissingError(JaxsegError, RuntimeError):
  """A merge function waterz must compile, on a machine without Boost / a compiler / witty."""


def check_compilable(function: str, discretize_queue: int) -> None:
  """Raises a clear error if waterz would have to compile ``function`` and cannot.

  Prebuilt variants always pass. For the others waterz needs the Boost headers, a C++ compiler
  and witty; without them it fails deep inside a compile with a less helpful message.

  Raises:
    BuildToolsMissingError: naming the function and how to install what is missing (a
      ``RuntimeError``).
  """
  if is_prebuilt(function, discretize_queue):
    return
  missing = _missing_build_tools()
  if missing:
    fixes = ["apt-get install libboost-dev g++"]
    if "the witty package" in missing:
      fixes.append("pip install witty")
    raise BuildToolsMissingError(
      f"waterz scoring function {function!r} (discretize_queue={discretize_queue}) is not "
      f"prebuilt and must be compiled, but {', '.join(missing)} "
      f"{'is' if len(missing) == 1 else 'are'} missing. Install with: {'; '.join(fixes)}. "
      "Or pick a prebuilt variant (mean, or affQQ_his256 with QQ in 10, 15, ..., 95)."
    )


@contextlib.contextmanager
def quiet_stdout(verbose: bool = False) -> Iterator[None]:
  """Silences stdout inside the block: file descriptor 1 and Python's ``sys.stdout``.

  waterz talks both ways: its C++ writes ``std::cout`` to descriptor 1 directly (redirecting
  ``sys.stdout`` alone misses it), and its Cython wrapper ``print``s. Descriptor 1 goes to
  /dev/null with ``os.dup2`` and ``sys.stdout`` to a null stream; Python's buffer is flushed
  first, so text printed before the block keeps its place, and both are restored also when the
  block raises.

  Args:
    verbose: if True, do nothing (let waterz talk).
  """
  if verbose:
    yield
    return
  sys.stdout.flush()
  saved = os.dup(1)
  try:
    with open(os.devnull, "w") as devnull:
      os.dup2(devnull.fileno(), 1)
      try:
        with contextlib.redirect_stdout(devnull):
          yield
      finally:
        os.dup2(saved, 1)
  finally:
    os.close(saved)


def _axis_of(offset: tuple[int, int, int]) -> tuple[int, int]:
  """``(axis, signed distance)`` of an offset along exactly one axis."""
  nonzero = [axis for axis in range(3) if offset[axis] != 0]
  if len(nonzero) != 1:
    raise ValueError(f"waterz needs one axis-aligned offset per axis, got {offset}")
  return nonzero[0], offset[nonzero[0]]


def to_waterz_affinities(
  aff: np.ndarray, offsets: Sequence[Sequence[int]], convention: str
) -> np.ndarray:
  """Affinities ``[3, z, y, x]`` in waterz's layout: channels z, y, x, stored at the higher voxel.

  Each channel is moved with :func:`jaxseg.data.affinity.convert_convention` (the one place
  conventions are converted) so that ``out[c, p]`` describes the edge between ``p - d e_c`` and
  ``p``: a ``'source'`` channel with a positive offset moves by ``+d`` along its axis, a
  ``'target'`` channel with a negative offset also moves by ``+d`` (the edge with offset ``-d``
  stored at ``v - d`` is the edge with offset ``+d`` stored at ``v``), the other two cases stay.
  Vacated leading planes are 0.

  Long-range triples (``d > 1``, e.g. ``(0, 0, 3), (0, 3, 0), (2, 0, 0)``) are accepted and handed
  to waterz as if they were unit edges, as PyTC does with aff12 channels ``[6, 9, 4]``: waterz
  reads ``out[c, p]`` as the link ``p - e_c <-> p``, so the value of the long edge ending at ``p``
  decides that unit link. Both conventions give the same array. The leading ``d - 1`` planes
  along each axis then hold no edges (0 = boundary); the caller crops that border.

  Args:
    aff: ``[3, z, y, x]`` affinities, any float dtype (values are cast to float32).
    offsets: the three channels' ``(dz, dy, dx)`` offsets, in any channel order, one per axis,
      e.g. x, y, z = ``((0, 0, 1), (0, 1, 0), (1, 0, 0))``.
    convention: ``'source'`` or ``'target'``.

  Returns:
    float32 ``[3, z, y, x]``, C-contiguous, a new array.
  """
  offsets = affinity_lib.normalize_offsets(offsets)
  affinity_lib.check_convention(convention)
  aff = np.asarray(aff)
  if aff.ndim != 4 or aff.shape[0] != 3 or len(offsets) != 3:
    raise ValueError(f"need [3, z, y, x] affinities and 3 offsets, got {aff.shape}, {offsets}")
  if not np.issubdtype(aff.dtype, np.floating):
    raise TypeError(f"affinities must be floating point, got {aff.dtype}")
  axes = [_axis_of(o) for o in offsets]
  if sorted(axis for axis, _ in axes) != [0, 1, 2]:
    raise ValueError(f"offsets must cover the z, y and x axes once each, got {offsets}")
  out = np.empty(aff.shape, np.float32)
  for c, (axis, distance) in enumerate(axes):
    channel = aff[c : c + 1]
    needs_shift = (convention == "source") == (distance > 0)
    if needs_shift:
      # convert_convention moves a source channel by +offset, a target one by -offset: either
      # way by +|d| along the axis here.
      channel, _ = affinity_lib.convert_convention(
        channel,
        (offsets[c],),
        convention,
        "target" if convention == "source" else "source",
      )
    out[axis] = channel[0]
  return out


@dataclasses.dataclass(frozen=True)
class WaterzResult:
  """One threshold's agglomeration.

  Attributes:
    threshold: the merge threshold (regions merged while their score < threshold).
    segmentation: ``[z, y, x]`` uint64, an independent copy (waterz's ids: each region carries
      the id of one of its fragments; not compact).
    rg_u, rg_v: ``[E]`` uint64 ids of the regions joined by each surviving region-graph edge
      (``None`` when region graphs were not asked for).
    rg_score: ``[E]`` float32 score of each edge (all >= threshold), as waterz reports it.
  """

  threshold: float
  segmentation: np.ndarray
  rg_u: np.ndarray | None = None
  rg_v: np.ndarray | None = None
  rg_score: np.ndarray | None = None


def _region_graph_arrays(region_graph) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  n = len(region_graph)
  u = np.fromiter((e["u"] for e in region_graph), np.uint64, count=n)
  v = np.fromiter((e["v"] for e in region_graph), np.uint64, count=n)
  score = np.fromiter((e["score"] for e in region_graph), np.float32, count=n)
  return u, v, score


def agglomerate(
  aff_w: np.ndarray,
  thresholds: Sequence[float] | float,
  *,
  low: float,
  high: float,
  merge_function: str,
  discretize_queue: int | None = None,
  fragments: np.ndarray | None = None,
  region_graphs: bool = True,
  verbose: bool = False,
) -> list[WaterzResult]:
  """waterz's watershed (unless ``fragments`` are given) and agglomeration at every threshold.

  waterz 0.10.1 runs all thresholds incrementally in one pass, but asking it for region graphs
  corrupts that pass: extracting the graph rescores stale edges and pushes them into the merge
  queue again, and a later threshold then stops merging early at such an entry (measured on
  gala_snemi_mini with noise: 220 instead of 84 segments at 0.3 after a graph at 0.1). So:

  * ``region_graphs=False`` or a single threshold: one waterz pass for everything.
  * ``region_graphs=True`` with several thresholds: the watershed runs once (a waterz pass that
    merges nothing), then every threshold is agglomerated from those fragments in its own pass.
    Each result is exactly what a separate single-threshold call gives (waterz builds the same
    region graph from its own fragments as from its internal watershed).

  Args:
    aff_w: ``[3, z, y, x]`` affinities in waterz's layout (:func:`to_waterz_affinities`); other
      float dtypes are cast to float32.
    thresholds: one or more merge thresholds; results come back sorted by threshold.
    low, high: waterz's ``aff_threshold_low`` / ``aff_threshold_high`` for its watershed
      (voxels whose best affinity is <= low stay 0; affinities >= high always join).
    merge_function: a name or string accepted by :func:`scoring_function`.
    discretize_queue: queue bins; ``None`` = :func:`scoring_function`'s default.
    fragments: optional ``[z, y, x]`` non-negative integer fragments used instead of the
      watershed; never modified (waterz gets uint64 copies).
    region_graphs: also return each threshold's surviving region graph (for dust merge).
    verbose: let waterz print its progress to stdout.

  Returns:
    One :class:`WaterzResult` per threshold, ascending.
  """
  function, queue = scoring_function(merge_function, discretize_queue)
  aff_w = np.ascontiguousarray(aff_w, dtype=np.float32)
  if aff_w.ndim != 4 or aff_w.shape[0] != 3:
    raise ValueError(f"aff_w must be [3, z, y, x], got shape {aff_w.shape}")
  thresholds = sorted(float(t) for t in np.atleast_1d(np.asarray(thresholds, np.float64)))
  if not thresholds:
    return []
  if fragments is not None:
    fragments = np.asarray(fragments)
    if fragments.shape != aff_w.shape[1:]:
      raise ValueError(f"fragments {fragments.shape} do not match affinities {aff_w.shape}")
    if not np.issubdtype(fragments.dtype, np.integer) or (fragments.size and fragments.min() < 0):
      raise ValueError("fragments must be non-negative integers")
    fragments = np.ascontiguousarray(fragments, dtype=np.uint64)
  check_compilable(function, queue)

  import waterz  # Lazy: only the agglomeration itself needs the compiled extension.

  def run(pass_thresholds, pass_fragments, with_graph):
    # waterz overwrites the fragments it gets, and hands out one buffer for every threshold,
    # mutated in place: copy both ways.
    outputs = waterz.agglomerate(
      aff_w,
      list(pass_thresholds),
      fragments=None if pass_fragments is None else pass_fragments.copy(),
      aff_threshold_low=low,
      aff_threshold_high=high,
      return_region_graph=with_graph,
      scoring_function=function,
      discretize_queue=queue,
    )
    results = []
    for threshold, output in zip(pass_thresholds, outputs, strict=True):
      if with_graph:
        segmentation, graph = output
        results.append(WaterzResult(threshold, segmentation.copy(), *_region_graph_arrays(graph)))
      else:
        results.append(WaterzResult(threshold, output.copy()))
    return results

  with quiet_stdout(verbose):
    if not region_graphs or len(thresholds) == 1:
      return run(thresholds, fragments, region_graphs)
    if fragments is None:
      # A threshold below every score merges nothing (waterz skips it before even scoring):
      # the buffer then holds the watershed's fragments.
      (watershed,) = run([-math.inf], None, False)
      fragments = watershed.segmentation
    return [run([t], fragments, True)[0] for t in thresholds]


# Below this many voxels per region, waterz's watershed leaves agglomeration nearly all the work,
# and its region graph grows with the regions: at about one region per voxel (tempered affinities
# that never reach aff_threshold_high 0.999) a 250^3 decode takes minutes and about 17 GB.
MIN_VOXELS_PER_REGION = 20
_SAMPLE_SHAPE = (32, 64, 64)


def sample_box(shape: Sequence[int]) -> tuple[slice, slice, slice]:
  """The central box of at most 32 x 64 x 64 voxels of a ``(z, y, x)`` volume: enough to tell how
  finely the watershed cuts, and cheap to read and cut."""
  return tuple(
    slice(max(0, (n - s) // 2), max(0, (n - s) // 2) + min(n, s))
    for n, s in zip(shape, _SAMPLE_SHAPE, strict=True)
  )


def estimate_watershed(sample: np.ndarray, *, low: float, high: float) -> dict:
  """How finely waterz's watershed would cut a volume, measured by running it on a sample of it.

  Args:
    sample: ``[3, z, y, x]`` affinities in waterz's layout, of the :func:`sample_box`.
    low, high: waterz's ``aff_threshold_low`` / ``aff_threshold_high``.

  Returns:
    ``{"voxels_per_region", "share_above_high", "max_affinity", "voxels"}`` of the sample:
    ``share_above_high`` is the share of voxels with an edge at or above ``high`` (edges that
    join unconditionally); with few of them, only steepest-ascent basins group voxels.
  """
  sample = np.ascontiguousarray(sample, dtype=np.float32)
  voxels = int(np.prod(sample.shape[1:]))
  if voxels == 0:
    return {
      "voxels_per_region": math.inf,
      "share_above_high": 0.0,
      "max_affinity": 0.0,
      "voxels": 0,
    }
  (fragments,) = agglomerate(
    sample, [-math.inf], low=low, high=high, merge_function="aff50_his256", region_graphs=False
  )
  regions = len(np.unique(fragments.segmentation[fragments.segmentation > 0]))
  return {
    "voxels_per_region": voxels / max(regions, 1),
    "share_above_high": float((sample >= high).any(axis=0).mean()),
    "max_affinity": float(sample.max()),
    "voxels": voxels,
  }
