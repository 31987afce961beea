r"""Decoding benchmarks: CC throughput against cc3d, waterz post-processing cost, blockwise memory.

Cases (each prints a markdown table; ``--output`` saves all numbers as one JSON document):

* ``cc``: :func:`jaxseg.decoding.cc.decode_affinity_cc` on a 256^3 volume against
  ``cc3d.connected_components(mask, connectivity=6)`` on the equivalent binary mask, same run.
  The mask is realistic: the foreground of the centred pinky40 crop (``../shared/data``) with
  every voxel that touches another id (or background) through a face removed, so neighbouring
  segments are split by 2-voxel membranes; voxels left without any foreground face neighbour are
  dropped too (the affinity decoder never labels an isolated voxel, cc3d would make it a
  singleton). Without pinky40 the labels are a Voronoi volume treated the same way. The
  affinities are what a perfect NISB net would predict for that mask, ``source`` convention,
  channels z, y, x, float16 as ``jaxseg.predict`` writes them: ``aff[c, v] = mask[v] and
  mask[v + e_c]`` (0 where the partner is outside). Each repetition times cc3d and the decoder back to back; best and median
  seconds, Mvoxel/s, the ratio (goal: decoder <= 2x cc3d), the thresholding
  (:func:`~jaxseg.decoding.cc.edge_bits`) against the labelling
  (:func:`~jaxseg.decoding.cc.label_edge_bits`), and the decoder on one numba thread (cc3d is
  single-threaded). Both partitions are checked identical up to renaming.
* ``waterz``: the SNEMI path, :func:`jaxseg.decoding.decode_lib.decode_array` with the
  ``configs/snemi.py`` decode settings (aff85_his256, thresholds (0.5,), low 0.1, high 0.999,
  dust and branch merge on), against the bare ``waterz.agglomerate`` call with the arguments the
  decoder passes it (``return_region_graph=True``, scoring function string, discretize_queue
  256) on the same float32 affinities; both with stdout silenced through ``os.dup2`` (the bare
  call by the same ``waterz_ops.quiet_stdout`` the decoder uses). Each repetition runs both back
  to back; the median ratio is reported (goal: post-processing adds <= 15%). One more decode,
  untimed in the table, is clocked stage by stage (the library functions wrapped while it runs)
  to show where the extra time goes. Affinities (``--waterz_data``):

  - ``pinky`` (default): the centred pinky40 crop of ``--waterz_size`` (its corner holds few,
    large segments). pinky40 is a segmentation without membranes, so they are drawn in: every
    voxel touching another id becomes membrane (2 voxels thick), and the boundary map ``p`` rises
    linearly with the distance from the membranes (z counted 1.25x) to 1 at ``--waterz_ramp``
    voxels, ``aff[c, v] = min(p[v], p[v - e_c])`` (``target``). This gives about one watershed
    fragment per 750 voxels, the density of real predictions (``snemi_mini`` below: one per
    330). Noise (``--waterz_noise``, default off) is added only below 1, but even sd 0.05 turns
    the ramps' ties into ~30x more fragments, which makes waterz slow and flatters the ratio.
  - ``snemi_mini``: the real SNEMI3D-derived probability map of ``gala_snemi_mini`` (32 x 160 x
    160, membranes dark) as ``p``, same rule. Real boundaries but only 0.8 M voxels (a ~0.15 s
    waterz call), so the ratio is noisier.
  - ``voronoi``: a generated Voronoi volume treated like ``pinky`` (no data needed).
* ``memory``: blockwise CC decode (``decode_lib.decode`` with ``blockwise='always'``,
  ``num_workers=1``: daisy in this process) of a volume 8x one block (2x per axis) against a
  volume of exactly one block (the first block of the large one), same block shape, each in a
  child process of this script that never imports JAX. Inputs are float16 affinity zarrs
  written once to a temporary folder the way ``jaxseg.predict`` writes NISB affinities
  (channels x, y, z with ``offsets``/``convention``/``channels`` attributes, chunks the largest
  divisors <= 128 of the block). Each child reads its peak RSS (``VmHWM``) after start-up and
  after resetting the high-water mark (``/proc/self/clear_refs``), and samples RSS on a thread.
  Before measuring, each child runs one tiny blockwise decode, so the one-time start-up (imports,
  numba caches, daisy, tensorstore) is in "RSS before", not in the decode's growth. Goal: 8V
  within 1.25x of V. The 8V output is checked equal (ids included) to the whole-volume decode.

Shapes are ``(z, y, x)``. Usage::

  .venv/bin/python benchmarks/decode.py --output=/tmp/decode.json      # all cases, full sizes
  .venv/bin/python benchmarks/decode.py --quick                        # smoke run, tiny shapes
  .venv/bin/python benchmarks/decode.py --cases=waterz --waterz_data=snemi_mini

Nothing here imports JAX (the memory children check that it stays out of ``sys.modules``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from a checkout: configs/ and jaxseg/ importable

from jaxseg.common.config_util import load_sibling  # noqa: E402

_memory = load_sibling(__file__, "memory_probe")
_machine = load_sibling(__file__, "machine")

SNEMI = os.path.join(REPO, "configs", "snemi.py")
NISB = os.path.join(REPO, "configs", "nisb_base.py")
DATA = Path(REPO).parent / "shared" / "data"
CASES = ("cc", "waterz", "memory", "blockwise_waterz")
WATERZ_DATA = ("pinky", "snemi_mini", "voronoi")
ZYX = ((1, 0, 0), (0, 1, 0), (0, 0, 1))

_CASES = flags.DEFINE_list("cases", list(CASES), f"Cases to run: {', '.join(CASES)}.")
_OUTPUT = flags.DEFINE_string("output", "", "Write all results as one JSON document here.")
_QUICK = flags.DEFINE_bool(
  "quick", False, "Smoke run: tiny shapes and 2 repetitions (overrides the size flags)."
)
_REPEATS = flags.DEFINE_integer("repeats", 7, "cc, waterz: timed repetitions (best / median).")
_DATA = flags.DEFINE_string("data", str(DATA), "The shared data folder (pinky40, gala_snemi_mini).")
_SYNTHETIC = flags.DEFINE_bool(
  "synthetic", False, "Use generated Voronoi labels even where pinky40 is available."
)
_CC_SIZE = flags.DEFINE_list("cc_size", ["256", "256", "256"], "cc: volume (z,y,x).")
_CC_THRESHOLD = flags.DEFINE_float("cc_threshold", 0.5, "cc: affinity threshold (strict >).")
_CC_ONE_THREAD = flags.DEFINE_bool(
  "cc_one_thread", True, "cc: also time the decoder on one numba thread."
)
_WATERZ_DATA = flags.DEFINE_enum(
  "waterz_data", "pinky", WATERZ_DATA, "waterz: where the affinities come from."
)
_WATERZ_SIZE = flags.DEFINE_list(
  "waterz_size", ["64", "256", "256"], "waterz: volume (z,y,x) (pinky, voronoi)."
)
_WATERZ_RAMP = flags.DEFINE_float(
  "waterz_ramp", 3.0, "waterz: voxels from the membrane over which the boundary map rises to 1."
)
_WATERZ_NOISE = flags.DEFINE_float(
  "waterz_noise", 0.0, "waterz: sd of noise added to affinities below 1 (0 = none)."
)
_WATERZ_CORR = flags.DEFINE_float("waterz_corr", 4.0, "waterz: noise correlation, y/x voxels.")
_MEM_BLOCK = flags.DEFINE_list(
  "mem_block", ["128", "256", "256"], "memory: block shape = volume V; 8V is 2x per axis."
)
_MEM_CHECK = flags.DEFINE_bool(
  "mem_check", True, "memory: check the 8V blockwise output against the whole-volume decode."
)
_CHILD = flags.DEFINE_string("child", "", "Internal: run one memory child from this JSON spec.")

MB = 1024 * 1024
GOAL_CC_RATIO = 2.0
GOAL_WATERZ_OVERHEAD = 0.15
GOAL_RSS_RATIO = 1.25
QUICK = {
  "repeats": 2,
  "cc_size": (48, 64, 64),
  "waterz_size": (16, 64, 64),
  "mem_block": (32, 64, 64),
}


def _ints(values) -> tuple[int, ...]:
  return tuple(int(v) for v in values)


def _median(values) -> float:
  return float(statistics.median(values))


def _setting(name: str, flag):
  """A size flag's value, or the ``--quick`` one."""
  if _QUICK.value:
    return QUICK[name]
  return _ints(flag.value) if isinstance(flag.value, list) else flag.value


# -- test volumes ---------------------------------------------------------------------------------


_PINKY: list[np.ndarray] = []


def pinky_path() -> Path:
  return Path(_DATA.value) / "pinky40_autoseg_512" / "connectomics.npy.ckl.gz"


def load_pinky() -> np.ndarray | None:
  """The 512^3 pinky40 segmentation as C-contiguous ``[z, y, x]`` uint32, or None when absent.

  Kept after the first load (decompressing takes ~2 s and every case uses it).
  """
  if _SYNTHETIC.value or not pinky_path().exists():
    return None
  if not _PINKY:
    import crackle

    xyz = crackle.decompress(gzip.decompress(pinky_path().read_bytes()))
    _PINKY.append(np.ascontiguousarray(xyz.T))  # crackle gives x, y, z
  return _PINKY[0]


def voronoi_labels(shape, mean_cell: float = 2000.0, seed: int = 0) -> np.ndarray:
  """Nearest-seed labels ``[z, y, x]`` uint32 of random seeds, one cell per ``mean_cell`` voxels.

  z is treated as 1.25x coarser than y/x (pinky40's 40 x 32 x 32 nm).
  """
  from scipy import ndimage

  rng = np.random.default_rng(seed)
  n = max(2, int(np.prod(shape) / mean_cell))
  seeds = np.zeros(shape, np.uint32)
  flat = rng.choice(int(np.prod(shape)), n, replace=False)
  seeds.reshape(-1)[flat] = np.arange(1, n + 1, dtype=np.uint32)
  index = ndimage.distance_transform_edt(
    seeds == 0, sampling=(1.25, 1.0, 1.0), return_distances=False, return_indices=True
  )
  return seeds[tuple(index)]


def label_volume(shape) -> tuple[np.ndarray, str]:
  """``[z, y, x]`` labels of ``shape``: the centred pinky40 crop if it fits, else Voronoi.

  Centred because pinky40's corner holds few, large segments (a 64 x 256 x 256 corner crop has
  77 ids, the centred one 244).
  """
  pinky = load_pinky()
  if pinky is not None and all(s <= n for s, n in zip(shape, pinky.shape, strict=True)):
    origin = tuple((n - s) // 2 for s, n in zip(shape, pinky.shape, strict=True))
    box = tuple(slice(o, o + s) for o, s in zip(origin, shape, strict=True))
    return np.ascontiguousarray(pinky[box]), f"pinky40 crop at {origin}"
  return voronoi_labels(shape), "Voronoi (pinky40 not used)"


def interior_mask(labels: np.ndarray) -> np.ndarray:
  """Foreground without every voxel whose face neighbour has another id, then without voxels
  that have no foreground face neighbour left. ``[z, y, x]`` bool."""
  keep = labels > 0
  for axis in range(3):
    lo = [slice(None)] * 3
    hi = [slice(None)] * 3
    lo[axis], hi[axis] = slice(None, -1), slice(1, None)
    differ = labels[tuple(hi)] != labels[tuple(lo)]
    keep[tuple(hi)] &= ~differ
    keep[tuple(lo)] &= ~differ
  # Dropping an isolated voxel never isolates another (its neighbours are background), so one
  # pass makes every kept voxel an end of an active edge.
  touched = np.zeros_like(keep)
  for axis in range(3):
    lo = [slice(None)] * 3
    hi = [slice(None)] * 3
    lo[axis], hi[axis] = slice(None, -1), slice(1, None)
    touched[tuple(hi)] |= keep[tuple(lo)]
    touched[tuple(lo)] |= keep[tuple(hi)]
  return keep & touched


def mask_affinities(mask: np.ndarray, dtype=np.float16) -> np.ndarray:
  """``source``-convention ``[3, z, y, x]`` (channels z, y, x): 1 where both ends are in
  ``mask``, 0 elsewhere and where the partner lies outside the array."""
  aff = np.zeros((3, *mask.shape), dtype)
  aff[0, :-1] = mask[:-1] & mask[1:]
  aff[1, :, :-1] = mask[:, :-1] & mask[:, 1:]
  aff[2, :, :, :-1] = mask[:, :, :-1] & mask[:, :, 1:]
  return aff


def same_partition(ours: np.ndarray, ours_count: int, theirs: np.ndarray) -> dict:
  """Whether two labellings are the same partition up to renaming (0 = background in both).

  Maps each of our ids to the other labelling's id at its first voxel; the partitions are equal
  iff that map reproduces the other labelling on every voxel and is injective on our ids.
  """
  from jaxseg.decoding import cc

  first = cc.component_first_index(ours, ours_count)
  lut = np.zeros(ours_count + 1, theirs.dtype)
  lut[1:] = theirs.reshape(-1)[first]
  mapped = lut[ours]
  theirs_count = int(np.unique(theirs).size - (1 if (theirs == 0).any() else 0))
  equal = (
    bool((mapped == theirs).all())
    and np.unique(lut[1:]).size == ours_count
    and not (lut[1:] == 0).any()
    and ours_count == theirs_count
  )
  identity = equal and bool((lut[1:] == np.arange(1, ours_count + 1)).all())
  return {"equal": equal, "same_ids": identity, "ours": ours_count, "theirs": theirs_count}


# -- timing helpers -------------------------------------------------------------------------------


def timed(fn):
  """``(seconds, result)`` of one call."""
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


class StageClock:
  """Adds up the wall time spent in chosen module functions while active (wrapped in place).

  Generator functions (``waterz.agglomerate``) are timed across their iteration, not their call.
  Nested stages are counted in both.
  """

  def __init__(self, targets: dict[str, tuple[object, str]], generators=()):
    self.targets = targets
    self.generators = set(generators)
    self.seconds = dict.fromkeys(targets, 0.0)
    self._saved = []

  def _wrap(self, name, fn):
    def plain(*args, **kwargs):
      t0 = time.perf_counter()
      try:
        return fn(*args, **kwargs)
      finally:
        self.seconds[name] += time.perf_counter() - t0

    def generator(*args, **kwargs):
      t0 = time.perf_counter()
      it = iter(fn(*args, **kwargs))
      self.seconds[name] += time.perf_counter() - t0
      while True:
        t0 = time.perf_counter()
        try:
          item = next(it)
        except StopIteration:
          return
        finally:
          self.seconds[name] += time.perf_counter() - t0
        yield item

    return generator if name in self.generators else plain

  def __enter__(self):
    for name, (module, attr) in self.targets.items():
      fn = getattr(module, attr)
      self._saved.append((module, attr, fn))
      setattr(module, attr, self._wrap(name, fn))
    return self

  def __exit__(self, *exc):
    for module, attr, fn in reversed(self._saved):
      setattr(module, attr, fn)
    self._saved.clear()


# -- case cc --------------------------------------------------------------------------------------


@contextlib.contextmanager
def numba_threads(n: int):
  import numba

  saved = numba.get_num_threads()
  numba.set_num_threads(n)
  try:
    yield
  finally:
    numba.set_num_threads(saved)


def cc_case() -> dict:
  """Decoder against cc3d on the same 256^3 foreground, same run."""
  import cc3d
  import numba

  from jaxseg.decoding import cc

  shape = _setting("cc_size", _CC_SIZE)
  repeats = _setting("repeats", _REPEATS)
  threshold = _CC_THRESHOLD.value
  labels, origin = label_volume(shape)
  mask = interior_mask(labels)
  mask_u8 = mask.view(np.uint8)
  aff = mask_affinities(mask)
  voxels = int(np.prod(shape))
  del labels

  def ours():
    return cc.decode_affinity_cc(aff, threshold)

  def theirs():
    return cc3d.connected_components(mask_u8, connectivity=6)

  # Warm-up: numba compile or cache load, page faults of the first allocation.
  seg = ours()
  ref = theirs()
  count = int(seg.max())
  check = same_partition(seg, count, ref)
  if not check["equal"]:
    raise AssertionError(f"decode_affinity_cc and cc3d disagree: {check}")
  del seg, ref

  runs = []
  for _ in range(repeats):
    t_theirs, _ = timed(theirs)
    t_ours, _ = timed(ours)
    t_bits, bits = timed(lambda: cc.edge_bits(aff, threshold))
    t_label, _ = timed(functools.partial(cc.label_edge_bits, bits))
    runs.append({"cc3d": t_theirs, "ours": t_ours, "edge_bits": t_bits, "label": t_label})
  one_thread = None
  if _CC_ONE_THREAD.value and numba.get_num_threads() > 1:
    with numba_threads(1):
      ours()
      one_thread = [timed(ours)[0] for _ in range(repeats)]

  def stat(key):
    values = [r[key] for r in runs]
    return {"best": min(values), "median": _median(values)}

  result = {
    "volume": list(shape),
    "labels": origin,
    "voxels": voxels,
    "foreground": float(mask.mean()),
    "components": count,
    "threshold": threshold,
    "aff_dtype": str(aff.dtype),
    "repeats": repeats,
    "numba_threads": numba.get_num_threads(),
    "partition_equal": check["equal"],
    "same_ids": check["same_ids"],
    "runs": runs,
    "ours": stat("ours"),
    "cc3d": stat("cc3d"),
    "edge_bits": stat("edge_bits"),
    "label_edge_bits": stat("label"),
    "ratio_median": _median([r["ours"] / r["cc3d"] for r in runs]),
    "ratio_best": min(r["ours"] for r in runs) / min(r["cc3d"] for r in runs),
    "goal_ratio": GOAL_CC_RATIO,
  }
  if one_thread:
    result["ours_1_thread"] = {"best": min(one_thread), "median": _median(one_thread)}
    result["ratio_1_thread_median"] = result["ours_1_thread"]["median"] / result["cc3d"]["median"]

  print(f"\n### cc: decode_affinity_cc vs cc3d.connected_components, {shape} ({origin})\n")
  print(
    f"foreground {100 * result['foreground']:.1f}% of {voxels / 1e6:.1f} M voxels, "
    f"{count} components; affinities {result['aff_dtype']} [3, z, y, x], threshold {threshold}; "
    f"{repeats} repetitions, numba threads {result['numba_threads']}\n"
  )
  print("| what | best s | median s | Mvoxel/s (median) |")
  print("|---|---|---|---|")
  rows = [
    ("cc3d.connected_components(mask, connectivity=6)", result["cc3d"]),
    ("decode_affinity_cc(aff, t)", result["ours"]),
    ("  edge_bits (thresholding)", result["edge_bits"]),
    ("  label_edge_bits (labelling)", result["label_edge_bits"]),
  ]
  if one_thread:
    rows.append(("decode_affinity_cc, 1 numba thread", result["ours_1_thread"]))
  for name, s in rows:
    print(f"| {name} | {s['best']:.3f} | {s['median']:.3f} | {voxels / s['median'] / 1e6:.0f} |")
  line = (
    f"ratio decoder / cc3d: **{result['ratio_median']:.2f}x** median of per-repetition ratios, "
    f"{result['ratio_best']:.2f}x best against best (goal <= {GOAL_CC_RATIO:.0f}x)"
  )
  if one_thread:
    line += f"; on 1 thread {result['ratio_1_thread_median']:.2f}x"
  print(line)
  print(
    f"partitions identical up to renaming: {check['equal']} ({check['ours']} vs "
    f"{check['theirs']} components; same ids as cc3d: {check['same_ids']})"
  )
  return result


# -- case waterz ----------------------------------------------------------------------------------


def _blur(volume: np.ndarray, sigma: float) -> np.ndarray:
  """Gaussian blur of each channel, ``sigma`` voxels in y/x and half that in z."""
  from scipy import ndimage

  if sigma <= 0:
    return volume
  return np.stack([ndimage.gaussian_filter(c, (sigma / 2, sigma, sigma)) for c in volume])


def boundary_affinities(p: np.ndarray) -> np.ndarray:
  """``target``-convention ``[3, z, y, x]`` float32 (channels z, y, x) from a ``[z, y, x]`` map
  that is low on membranes: the edge ``v - e_c <-> v``, stored at ``v``, is ``min(p[v],
  p[v - e_c])``; the leading plane of each channel (no partner) is 0."""
  aff = np.zeros((3, *p.shape), np.float32)
  aff[0, 1:] = np.minimum(p[1:], p[:-1])
  aff[1, :, 1:] = np.minimum(p[:, 1:], p[:, :-1])
  aff[2, :, :, 1:] = np.minimum(p[:, :, 1:], p[:, :, :-1])
  return aff


def waterz_affinities() -> tuple[np.ndarray, np.ndarray, str]:
  """``(aff [3, z, y, x] float32 target convention, labels, description)``."""
  from scipy import ndimage

  source = _WATERZ_DATA.value
  if source == "snemi_mini":
    import tifffile

    path = Path(_DATA.value) / "gala_snemi_mini"
    p = tifffile.imread(path / "train-probabilities.tif").astype(np.float32) / 255.0
    labels = tifffile.imread(path / "train-labels.tif")
    if _QUICK.value:
      p, labels = p[:8, :64, :64], labels[:8, :64, :64]
    return boundary_affinities(p), labels, "gala_snemi_mini probabilities / 255"
  shape = _setting("waterz_size", _WATERZ_SIZE)
  if source == "pinky":
    labels, where = label_volume(shape)
  else:
    labels, where = voronoi_labels(shape), "Voronoi"
  # A boundary map a good net could predict: 0 on 2-voxel membranes between ids, rising linearly
  # with the distance from them (z voxels 1.25x y/x) to 1 at ``ramp`` voxels.
  ramp = _WATERZ_RAMP.value
  distance = ndimage.distance_transform_edt(interior_mask(labels), sampling=(1.25, 1.0, 1.0))
  aff = boundary_affinities(np.clip(distance.astype(np.float32) / ramp, 0.0, 1.0))
  what = f"{where}: membrane distance map, ramp {ramp} voxels"
  if _WATERZ_NOISE.value > 0:
    # Only below 1: confident interiors stay one plateau (>= high joins), as with real nets.
    rng = np.random.default_rng(0)
    noise = _blur(rng.standard_normal(aff.shape, dtype=np.float32), _WATERZ_CORR.value)
    noise *= _WATERZ_NOISE.value / max(float(noise.std()), 1e-12)
    aff = np.where(aff >= 1.0, aff, np.clip(aff + noise, 0.0, 1.0)).astype(np.float32)
    what += f", noise sd {_WATERZ_NOISE.value} (correlation {_WATERZ_CORR.value}) below 1"
  return aff, labels, what


def snemi_settings():
  from jaxseg.common.config_util import load_config
  from jaxseg.decoding.settings import decode_settings

  settings = decode_settings(load_config(SNEMI))
  if settings.method != "waterz" or settings.dust is None or settings.branch_merge is None:
    raise RuntimeError(
      f"configs/snemi.py no longer decodes with waterz + dust + branch: {settings}"
    )
  return settings


def waterz_case() -> dict:
  """``decode_array`` (SNEMI settings) against the bare ``waterz.agglomerate`` call."""
  import waterz

  from jaxseg.decoding import decode_lib, waterz_ops, waterz_post
  from jaxseg.metrics.rand import adapted_rand

  repeats = _setting("repeats", _REPEATS)
  settings = snemi_settings()
  aff, gt, what = waterz_affinities()
  function, queue = waterz_ops.scoring_function(settings.merge_function, settings.discretize_queue)
  thresholds = list(settings.thresholds)
  # Same arguments as waterz_ops.agglomerate passes; the input is already in waterz's layout
  # (z, y, x channels, 'target', float32, C-contiguous), so the decoder's conversion is a copy.
  kwargs = {
    "aff_threshold_low": settings.aff_threshold_low,
    "aff_threshold_high": settings.aff_threshold_high,
    "return_region_graph": True,
    "scoring_function": function,
    "discretize_queue": queue,
  }

  def bare():
    with waterz_ops.quiet_stdout():
      return [(seg.max(), len(rg)) for seg, rg in waterz.agglomerate(aff, thresholds, **kwargs)]

  def ours():
    return decode_lib.decode_array(aff, settings)

  with waterz_ops.quiet_stdout():
    fragments = next(iter(waterz.agglomerate(aff, [0.0], **kwargs)))[0]
    n_fragments = int(np.unique(fragments).size - (1 if (fragments == 0).any() else 0))
  del fragments
  bare()  # warm-up: library load, numba caches
  (_, seg), *_ = ours()
  segments = int(seg.max())
  with waterz_ops.quiet_stdout():
    bare_seg = next(iter(waterz.agglomerate(aff, thresholds, **kwargs)))[0].copy()
  bare_segments = int(np.unique(bare_seg).size - (1 if (bare_seg == 0).any() else 0))
  quality = {
    "ours": float(adapted_rand(gt, seg).error),
    "bare": float(adapted_rand(gt, bare_seg).error),
    "gt_ids": int(np.unique(gt[gt > 0]).size),
  }
  del seg, bare_seg

  runs = []
  for _ in range(repeats):
    t_bare, _ = timed(bare)
    t_ours, _ = timed(ours)
    runs.append({"bare": t_bare, "ours": t_ours})

  stages = {
    "to_waterz_affinities": (waterz_ops, "to_waterz_affinities"),
    "waterz_ops.agglomerate": (waterz_ops, "agglomerate"),
    "waterz.agglomerate (C++)": (waterz, "agglomerate"),
    "postprocess (dust, branch merge, relabel)": (waterz_post, "postprocess"),
  }
  with StageClock(stages, generators=("waterz.agglomerate (C++)",)) as clock:
    total, _ = timed(ours)
  breakdown = dict(clock.seconds)
  top = (
    "to_waterz_affinities",
    "waterz_ops.agglomerate",
    "postprocess (dust, branch merge, relabel)",
  )
  breakdown["rest"] = total - sum(breakdown[k] for k in top)
  breakdown["total"] = total

  voxels = int(np.prod(aff.shape[1:]))
  result = {
    "affinities": what,
    "volume": list(aff.shape[1:]),
    "voxels": voxels,
    "settings": {
      "merge_function": settings.merge_function,
      "scoring_function": function,
      "discretize_queue": queue,
      "thresholds": thresholds,
      "aff_threshold": [settings.aff_threshold_low, settings.aff_threshold_high],
      "dust": dataclasses.asdict(settings.dust),
      "branch_merge": dataclasses.asdict(settings.branch_merge),
    },
    "fragments": n_fragments,
    "segments": segments,
    "segments_bare": bare_segments,
    "adapted_rand": quality,
    "repeats": repeats,
    "runs": runs,
    "bare_s": _median([r["bare"] for r in runs]),
    "ours_s": _median([r["ours"] for r in runs]),
    "overhead": _median([r["ours"] / r["bare"] for r in runs]) - 1.0,
    "breakdown_s": breakdown,
    "goal_overhead": GOAL_WATERZ_OVERHEAD,
  }
  print(f"\n### waterz: SNEMI decode_array vs bare waterz.agglomerate, {tuple(aff.shape[1:])}\n")
  print(
    f"{what}; {n_fragments} watershed fragments, {bare_segments} waterz regions at "
    f"{thresholds} ({voxels / n_fragments:.0f} voxels per fragment), {segments} segments "
    f"after dust + branch merge; adapted Rand vs the labels ({quality['gt_ids']} ids): ours "
    f"{quality['ours']:.4f}, bare waterz {quality['bare']:.4f}; {repeats} repetitions\n"
  )
  print("| what | median s |")
  print("|---|---|")
  print(
    f"| bare waterz.agglomerate ({settings.merge_function}, q={queue}) | {result['bare_s']:.3f} |"
  )
  print(f"| decode_array (SNEMI settings) | {result['ours_s']:.3f} |")
  print(
    f"| **post-processing adds** (median of ratios - 1) | **{100 * result['overhead']:.1f}%** |"
  )
  print(
    f"goal: <= {100 * GOAL_WATERZ_OVERHEAD:.0f}%. Runs (bare s, ours s): "
    + ", ".join(f"({r['bare']:.3f}, {r['ours']:.3f})" for r in runs)
  )
  print(
    "\none more decode_array, clocked by stage (s): "
    + ", ".join(f"{k} {v:.3f}" for k, v in breakdown.items())
  )
  return result


# -- case blockwise_waterz -------------------------------------------------------------------------


def _real_boundary_maps() -> list[tuple[str, np.ndarray, np.ndarray]]:
  """``(name, p low on membranes [z, y, x] float32, labels)`` for the staged real volumes."""
  import h5py
  import tifffile

  data = Path(_DATA.value)
  out = []
  fib = data / "gala_fibsem_example"
  if (fib / "test-p1.lzf.h5").exists():
    with h5py.File(fib / "test-p1.lzf.h5") as f:
      p = 1.0 - np.asarray(f["stack"], np.float32)  # p1 is the boundary probability
    with h5py.File(fib / "test-gt.lzf.h5") as f:
      gt = np.asarray(f["stack"])
    out.append(("gala_fibsem test (1 - p1)", p, gt))
  mini = data / "gala_snemi_mini"
  if (mini / "train-probabilities.tif").exists():
    p = tifffile.imread(mini / "train-probabilities.tif").astype(np.float32) / 255.0
    out.append(("gala_snemi_mini probabilities", p, tifffile.imread(mini / "train-labels.tif")))
  if _QUICK.value:
    out = [(n, p[:16, :64, :64], g[:16, :64, :64]) for n, p, g in out]
  return out


def blockwise_waterz_case(work: str) -> dict:
  """Blockwise waterz (8 blocks) against whole-volume waterz on real boundary maps."""
  from jaxseg.decoding import decode_lib
  from jaxseg.io import create_zarr, open_volume
  from jaxseg.metrics.rand import adapted_rand
  from jaxseg.metrics.voi import voi

  # Three thresholds, so each volume shows over- and under-merged regimes (at 0.5 the SNEMI-mini
  # map merges almost everything: its membranes sit near 0.56).
  base = dataclasses.replace(snemi_settings(), thresholds=(0.1, 0.3, 0.5))
  names = [f"segmentation_t{t:g}" for t in base.thresholds]
  rows = []
  for name, p, gt in _real_boundary_maps():
    aff = boundary_affinities(p)  # target convention, channels z, y, x
    path = os.path.join(work, f"bw_{len(rows)}.zarr")
    create_zarr(
      path, aff.shape, np.float32, attributes={
        "offsets": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "convention": "target", "channels": [0, 1, 2],
      },
    ).write((0, 0, 0, 0), aff).result()  # fmt: skip
    block = tuple(-(-s // 2) for s in p.shape)
    whole_settings = dataclasses.replace(base, blockwise="never")
    out = os.path.join(work, f"bw_{len(rows)}_whole")
    start = time.perf_counter()
    decode_lib.decode(whole_settings, path, out, show_progress=False)
    whole_s = time.perf_counter() - start
    wholes = [np.asarray(open_volume(os.path.join(out, n))[:]) for n in names]
    variants = [("recipe", c) for c in ((0, 0, 0), (4, 16, 16), (8, 32, 32))]
    variants.append(("agglomeration only", (8, 32, 32)))
    for post, context in variants:
      settings = dataclasses.replace(base, blockwise="always", block_shape=block, context=context)
      if post != "recipe":
        settings = dataclasses.replace(settings, dust=None, branch_merge=None)
        whole_settings = dataclasses.replace(settings, blockwise="never")
        out = os.path.join(work, f"bw_{len(rows)}_whole_plain")
        decode_lib.decode(whole_settings, path, out, show_progress=False)
        wholes = [np.asarray(open_volume(os.path.join(out, n))[:]) for n in names]
      out = os.path.join(work, f"bw_{len(rows)}_{'_'.join(map(str, context))}")
      start = time.perf_counter()
      decode_lib.decode(settings, path, out, show_progress=False)
      split_s = time.perf_counter() - start
      for threshold, n, whole in zip(base.thresholds, names, wholes, strict=True):
        split = np.asarray(open_volume(os.path.join(out, n))[:])
        gap = adapted_rand(whole.astype(np.int64), split)
        split_voi = voi(whole.astype(np.int64), split)
        rows.append(
          {
            "data": name,
            "post": post,
            "threshold": threshold,
            "shape": list(p.shape),
            "block": list(block),
            "context": list(context),
            "segments_whole": int(whole.max()),
            "segments_blockwise": int(split.max()),
            "are_blockwise_vs_whole": gap.error,
            "voi_blockwise_vs_whole": [float(split_voi.split), float(split_voi.merge)],
            "are_whole_vs_gt": adapted_rand(gt, whole).error,
            "are_blockwise_vs_gt": adapted_rand(gt, split).error,
            "identical": bool(np.array_equal(whole, split)),
            "whole_s": whole_s,
            "blockwise_s": split_s,
          }
        )
  print("\n### blockwise waterz vs whole-volume waterz (SNEMI settings, 2 x 2 x 2 blocks)\n")
  print("| data | threshold | steps | context | segments whole / blockwise | ARE blockwise vs whole | VOI split, merge "
        "| ARE vs GT: whole / blockwise | s whole / blockwise |")  # fmt: skip
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    print(
      f"| {r['data']} {tuple(r['shape'])} | {r['threshold']:g} | {r['post']} | {tuple(r['context'])} | {r['segments_whole']} / "
      f"{r['segments_blockwise']} | {r['are_blockwise_vs_whole']:.4f} | "
      f"{r['voi_blockwise_vs_whole'][0]:.3f}, {r['voi_blockwise_vs_whole'][1]:.3f} | "
      f"{r['are_whole_vs_gt']:.4f} / {r['are_blockwise_vs_gt']:.4f} | "
      f"{r['whole_s']:.2f} / {r['blockwise_s']:.2f} |"
    )
  return {"rows": rows}


# -- case memory ----------------------------------------------------------------------------------


def write_affinities(path: str, aff_zyx: np.ndarray, block) -> str:
  """Writes ``source`` z, y, x affinities as ``jaxseg.predict`` writes NISB's (x, y, z channels)."""
  from jaxseg.io import block_chunks, create_zarr

  shape = aff_zyx.shape[1:]
  chunks = block_chunks(block)
  out = create_zarr(
    path,
    (3, *shape),
    np.float16,
    chunks=(3, *chunks),
    attributes={
      "offsets": [[0, 0, 1], [0, 1, 0], [1, 0, 0]],
      "convention": "source",
      "channels": [0, 1, 2],
    },
  )
  for z0 in range(0, shape[0], chunks[0]):
    out.write((0, z0, 0, 0), aff_zyx[::-1, z0 : z0 + chunks[0]])
  out.flush()
  return path


def memory_case(work: str) -> dict:
  """V (one block) and 8V, each decoded blockwise in its own child process."""
  from jaxseg.io import open_volume

  block = _setting("mem_block", _MEM_BLOCK)
  large = tuple(2 * b for b in block)
  labels, origin = label_volume(large)
  aff = mask_affinities(interior_mask(labels))
  del labels
  inputs = {
    "V": write_affinities(
      os.path.join(work, "aff_V.zarr"), aff[:, : block[0], : block[1], : block[2]], block
    ),
    "8V": write_affinities(os.path.join(work, "aff_8V.zarr"), aff, block),
  }
  rows = {}
  for name, path in inputs.items():
    out = os.path.join(work, f"seg_{name}")
    spec = {"affinities": path, "output": out, "block_shape": list(block), "threshold": 0.5}
    rows[name] = run_child(spec, work)
    if name == "8V" and _MEM_CHECK.value:
      from jaxseg.decoding import cc

      whole = cc.decode_affinity_cc(aff, 0.5)
      got = np.asarray(open_volume(os.path.join(out, "segmentation"))[:])
      rows[name]["equals_whole_volume"] = bool(np.array_equal(got, whole))
      del whole, got
    shutil.rmtree(out)
  v, v8 = rows["V"], rows["8V"]
  result = {
    "block": list(block),
    "labels": origin,
    "V": v,
    "8V": v8,
    "process_peak_ratio": v8["process_peak_mb"] / v["process_peak_mb"],
    "goal_ratio": GOAL_RSS_RATIO,
  }
  if v["decode_peak_mb"] and v8["decode_peak_mb"]:
    result["decode_peak_ratio"] = v8["decode_peak_mb"] / v["decode_peak_mb"]
    result["decode_growth_ratio"] = (v8["decode_peak_mb"] - v8["rss_before_mb"]) / max(
      1e-9, v["decode_peak_mb"] - v["rss_before_mb"]
    )
  print(f"\n### memory: blockwise CC decode, peak host RSS, block {tuple(block)} ({origin})\n")
  print("| volume | voxels | blocks | segments | input (float16) | RSS before | decode peak "
        "| process peak | s |")  # fmt: skip
  print("|---|---|---|---|---|---|---|---|---|")
  for name, r in rows.items():
    peak = f"{r['decode_peak_mb']:.0f} MB" if r["decode_peak_mb"] else "-"
    print(
      f"| {name} {tuple(r['volume'])} | {np.prod(r['volume']) / 1e6:.1f} M | {r['blocks']} "
      f"| {r['segments']} | {r['input_mb']:.0f} MB | {r['rss_before_mb']:.0f} MB | {peak} "
      f"| {r['process_peak_mb']:.0f} MB | {r['seconds']:.1f} |"
    )
  for name, r in rows.items():
    quarters = ", ".join(f"{q:.0f}" for q in r["rss_quarters_mb"])
    print(
      f"{name}: highest RSS in each quarter of the decode: {quarters} MB; stage seconds "
      f"{r['timings']}; jax imported: {r['jax_imported']}"
    )
  line = f"8V / V process peak = **{result['process_peak_ratio']:.3f}** (goal <= {GOAL_RSS_RATIO})"
  if "decode_peak_ratio" in result:
    line += (
      f"; decode peak ratio {result['decode_peak_ratio']:.3f}, growth over the RSS before "
      f"decoding {result['decode_growth_ratio']:.3f}"
    )
  print(line)
  if "equals_whole_volume" in v8:
    print(
      f"8V blockwise output equals the whole-volume decode (ids included): "
      f"{v8['equals_whole_volume']}"
    )
  return result


# -- memory children ------------------------------------------------------------------------------


def child_memory(spec: dict) -> dict:
  """Decodes one affinity zarr blockwise in this process; RSS before, decode peak, process peak."""
  from jaxseg.common.config_util import load_config
  from jaxseg.decoding import decode_lib
  from jaxseg.decoding.settings import decode_settings
  from jaxseg.io import open_volume

  overrides = {
    "decode.threshold": spec["threshold"],
    "decode.blockwise": "always",
    "decode.block_shape": tuple(spec["block_shape"]),
    "decode.num_workers": 1,
  }
  settings = decode_settings(load_config(NISB, overrides))
  source = open_volume(spec["affinities"])
  # One tiny blockwise decode first: imports, numba cache loads, daisy and tensorstore start-up
  # belong to "before", not to the decode's own memory.
  warm = os.path.join(os.path.dirname(spec["output"]), f"warm_{os.getpid()}")
  tiny = mask_affinities(np.ones((8, 8, 8), bool))
  write_affinities(warm + ".zarr", tiny, (4, 4, 4))
  warm_settings = dataclasses.replace(settings, block_shape=(4, 4, 4))
  decode_lib.decode(warm_settings, warm + ".zarr", warm, show_progress=False)
  shutil.rmtree(warm)
  shutil.rmtree(warm + ".zarr")
  before = _memory.status_mb("VmRSS")
  startup_peak = _memory.status_mb("VmHWM")
  reset = _memory.reset_peak()
  with _memory.RssSampler(interval=0.02) as sampler:
    summary = decode_lib.decode(settings, spec["affinities"], spec["output"], show_progress=False)
  decode_peak = _memory.status_mb("VmHWM")
  return {
    "volume": list(source.shape[1:]),
    "input_mb": float(np.prod(source.shape)) * 2 / MB,
    "blocks": summary.get("blocks"),
    "segments": summary["segments"][0],
    "seconds": summary["seconds"],
    "timings": summary.get("timings"),
    "rss_quarters_mb": sampler.quarters(),
    "rss_before_mb": before,
    "startup_peak_mb": startup_peak,
    "decode_peak_mb": decode_peak if reset else None,
    "process_peak_mb": max(startup_peak, decode_peak),
    "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "peak_reset": reset,
    "jax_imported": "jax" in sys.modules,
  }


def run_child(spec: dict, work: str) -> dict:
  """Runs :func:`child_memory` in a fresh process of this script."""
  spec = {**spec, "result": os.path.join(work, f"child_{time.time_ns()}.json")}
  spec_path = spec["result"] + ".spec"
  with open(spec_path, "w") as f:
    json.dump(spec, f)
  command = [sys.executable, os.path.abspath(__file__), f"--child={spec_path}"]
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
  if done.returncode != 0:
    raise RuntimeError(f"memory child failed ({done.returncode}):\n{done.stderr[-4000:]}")
  with open(spec["result"]) as f:
    return json.load(f)


def child_main(spec_path: str) -> None:
  with open(spec_path) as f:
    spec = json.load(f)
  result = child_memory(spec)
  with open(spec["result"], "w") as f:
    json.dump(result, f)


# -- main -----------------------------------------------------------------------------------------


def machine_info() -> dict:
  """CPU count, memory, load, versions, numba threads, date."""
  return {
    **_machine.host_info(),
    **_machine.numba_info(),
    "cc3d": _machine.package_version("connected-components-3d"),
    "waterz": _machine.package_version("waterz"),
    "daisy": _machine.package_version("daisy"),
    "pinky40": load_pinky() is not None,
    "quick": _QUICK.value,
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CHILD.value:
    child_main(_CHILD.value)
    return
  unknown = sorted(set(_CASES.value) - set(CASES))
  if unknown:
    raise app.UsageError(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
  info = machine_info()
  print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
  results = {"machine": info}
  work = tempfile.mkdtemp(prefix="jaxseg_decode_bench_")
  try:
    if "cc" in _CASES.value:
      results["cc"] = cc_case()
    if "waterz" in _CASES.value:
      results["waterz"] = waterz_case()
    if "memory" in _CASES.value:
      results["memory"] = memory_case(work)
    if "blockwise_waterz" in _CASES.value:
      results["blockwise_waterz"] = blockwise_waterz_case(work)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(results, f, indent=1)
    print(f"\nwrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
