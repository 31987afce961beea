"""Label renumbering benchmark (run by hand): ``jaxseg.decoding.labels`` against fastremap.

Times each renumbering function of :mod:`jaxseg.decoding.labels` three ways on the same
segmentation, in the same process: jaxseg's numpy / numba version from before it used fastremap
("before", kept here), jaxseg now, and the plain fastremap call; the outputs must hold the same
ids (the last column names any dtype that differs):

* ``relabel_sequential`` vs ``fastremap.renumber(start=1, preserve_zero=True)``: ids ``1..K`` in
  C-order of first appearance, smallest unsigned dtype.
* ``relabel_sequential(min_size=...)`` vs ``fastremap.unique`` + ``mask`` + ``renumber``.
* ``np.unique(return_counts=True)`` (inside "before", and ``dust``) vs ``fastremap.unique``.
* ``apply_lut`` (sorted key / value arrays) vs ``fastremap.remap`` (a dict built from them; its
  time is counted): a table holding every non-zero id (an agglomeration's), and one missing 10%
  of them (``apply_lut`` maps those to 0; fastremap needs ``mask_except`` first).
* ``compact_roots`` vs ``fastremap.renumber(preserve_zero=False)`` on union-find roots.

Segmentations (``[z, y, x]``, C-contiguous): 256^3 uint32 Voronoi cells with ~10k and ~100k
sparse random ids and one-voxel membranes (0) between cells along x; pinky40's real 512^3 uint32
segmentation when ``shared/data`` has it; a 512^3 uint64 one with ~100k ids above 2**32
(``--nolarge`` skips it: the "before" functions need several GB there). Best of ``--best_of`` runs after one warm-up run.

Usage::

  .venv/bin/python benchmarks/labels.py [--best_of=5] [--nolarge] [--synthetic]

Prints the machine and a markdown table; results go to ``benchmarks/RESULTS.md`` by hand.
"""

from __future__ import annotations

import os
import sys
import time

import fastremap
import numba
import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from a checkout: jaxseg/ importable

from jaxseg.common.config_util import load_sibling  # noqa: E402
from jaxseg.decoding import labels  # noqa: E402

_machine = load_sibling(__file__, "machine")
# decode.py's Voronoi generator and pinky40 loader (and its --data / --synthetic flags).
_decode = load_sibling(__file__, "decode")

_BEST_OF = flags.DEFINE_integer("best_of", 5, "Timed runs per function (the best is reported).")
_LARGE = flags.DEFINE_bool("large", True, "Also the 512^3 uint64 segmentation (several GB).")
_MIN_SIZE = flags.DEFINE_integer("min_size", 100, "relabel_sequential's size filter (voxels).")


def segmentation(shape, n_ids: int, dtype, seed: int) -> np.ndarray:
  """Voronoi cells with ``n_ids`` sparse random ids, 0 on the x-faces between cells."""
  cells = _decode.voronoi_labels(shape, mean_cell=np.prod(shape) / n_ids, seed=seed)
  rng = np.random.default_rng(seed)
  low = 2**32 if np.dtype(dtype).itemsize == 8 else 1
  high = np.iinfo(dtype).max
  ids = np.unique(rng.integers(low, high, int(cells.max()) + n_ids // 10 + 8, dtype=dtype))
  seg = rng.permutation(ids)[: int(cells.max()) + 1][cells]
  seg[..., 1:][seg[..., 1:] != seg[..., :-1]] = 0
  return seg


def best_time(fn, repeats: int):
  """(best seconds of ``repeats`` runs after a warm-up, the warm-up's result)."""
  result = fn()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best, result


def same(a, b) -> str:
  """'yes', 'ids (dtype a vs b)', or raises: the two results must hold the same ids."""
  a = a if isinstance(a, tuple) else (a,)
  b = b if isinstance(b, tuple) else (b,)
  notes = []
  for x, y in zip(a, b, strict=True):
    if not np.array_equal(x, y):
      raise AssertionError(f"results differ: {x!r} vs {y!r}")
    if x.dtype != y.dtype:
      notes.append(f"{x.dtype} vs {y.dtype}")
  return "yes" if not notes else "ids; dtype " + ", ".join(notes)


# -- jaxseg's numpy / numba versions before it moved to fastremap (the "before" column) ---------


@numba.njit(cache=True, nogil=True)
def _first_appearance_ids(flat, keys, out_ids):
  next_id = 1
  for i in range(flat.shape[0]):
    v = flat[i]
    if v == 0:
      continue
    lo, hi = 0, keys.shape[0]
    while lo < hi:
      mid = (lo + hi) >> 1
      if keys[mid] < v:
        lo = mid + 1
      else:
        hi = mid
    if out_ids[lo] == 0:
      out_ids[lo] = next_id
      next_id += 1


def numpy_apply_lut(seg, keys, values, out_dtype):
  flat = seg.ravel()
  pos = np.minimum(np.searchsorted(keys, flat), keys.size - 1)
  found = keys[pos] == flat
  return np.where(found, values[pos], 0).astype(out_dtype, copy=False).reshape(seg.shape)


def numpy_relabel_sequential(seg, min_size=0):
  flat = np.ascontiguousarray(seg).ravel()
  keys, counts = np.unique(flat, return_counts=True)
  if keys.size and keys[0] == 0:
    keys, counts = keys[1:], counts[1:]
  if min_size > 1 and (counts < min_size).any():
    flat = numpy_apply_lut(flat, keys, np.where(counts < min_size, 0, keys), flat.dtype)
    keys = keys[counts >= min_size]
  ids = np.zeros(keys.size, np.int64)
  if keys.size:
    _first_appearance_ids(flat, keys, ids)
  dtype = labels.smallest_uint_dtype(keys.size)
  return numpy_apply_lut(flat, keys, ids, dtype).reshape(seg.shape)


# -- the comparisons ------------------------------------------------------------------------------


def rows(seg: np.ndarray, min_size: int) -> list[tuple]:
  """(function, numpy-before call or None, jaxseg call or None, fastremap call) on ``seg``."""
  keys = np.unique(seg)
  keys = keys[keys != 0]
  rng = np.random.default_rng(1)
  values = rng.integers(1, max(2, keys.size // 4), keys.size).astype(seg.dtype)
  part = np.sort(rng.choice(keys, keys.size * 9 // 10, replace=False))  # 10% of ids missing
  part_values = values[: part.size]
  roots = labels.merge_components(
    keys.size,
    rng.integers(0, keys.size, keys.size // 2),
    rng.integers(0, keys.size, keys.size // 2),
  )

  def fast_relabel_min_size():
    ids, counts = fastremap.unique(seg, return_counts=True)
    small = ids[(counts < min_size) & (ids != 0)]
    return fastremap.renumber(fastremap.mask(seg, small.tolist()), preserve_zero=True)[0]

  def fast_remap(k, v, partial):
    table = dict(zip(k.tolist(), v.tolist(), strict=True))
    masked = fastremap.mask_except(seg, k.tolist()) if partial else seg
    return fastremap.remap(masked, table, preserve_missing_labels=True)

  def fast_unique():
    ids, counts = fastremap.unique(seg, return_counts=True)
    return ids, counts.astype(np.int64)

  return [
    (
      "relabel_sequential / renumber",
      lambda: numpy_relabel_sequential(seg),
      lambda: labels.relabel_sequential(seg)[0],
      lambda: fastremap.renumber(seg, start=1, preserve_zero=True)[0],
    ),
    (
      f"relabel_sequential(min_size={min_size}) / unique + mask + renumber",
      lambda: numpy_relabel_sequential(seg, min_size),
      lambda: labels.relabel_sequential(seg, min_size=min_size)[0],
      fast_relabel_min_size,
    ),
    (
      "np.unique(counts) / unique(counts)",
      lambda: np.unique(seg, return_counts=True),
      None,
      fast_unique,
    ),
    (
      "apply_lut, every id in the table / remap (dict built)",
      lambda: numpy_apply_lut(seg, keys, values, seg.dtype),
      lambda: labels.apply_lut(seg, keys, values, out_dtype=seg.dtype),
      lambda: fast_remap(keys, values, False),
    ),
    (
      "apply_lut, 10% of ids not in it / mask_except + remap",
      lambda: numpy_apply_lut(seg, part, part_values, seg.dtype),
      lambda: labels.apply_lut(seg, part, part_values, out_dtype=seg.dtype),
      lambda: fast_remap(part, part_values, True),
    ),
    (
      f"compact_roots / renumber ({keys.size:,} roots)",
      None,
      lambda: labels.compact_roots(roots)[0],
      lambda: fastremap.renumber(roots, start=1, preserve_zero=False)[0],
    ),
  ]


def volumes():
  """(name, segmentation) pairs, made one at a time (the large one needs the memory)."""
  yield "256^3 uint32, ~10k ids", segmentation((256, 256, 256), 10_000, np.uint32, 0)
  yield "256^3 uint32, ~100k ids", segmentation((256, 256, 256), 100_000, np.uint32, 1)
  pinky = _decode.load_pinky()
  if pinky is not None:
    yield "pinky40 512^3 uint32 (real)", pinky
  if _LARGE.value:
    yield "512^3 uint64, ~100k ids > 2^32", segmentation((512, 512, 512), 100_000, np.uint64, 2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  info = {
    **_machine.host_info(),
    **_machine.numba_info(),
    "fastremap": _machine.package_version("fastremap"),
  }
  print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
  print(f"best of {_BEST_OF.value}, after one warm-up run; seconds\n")
  print("| segmentation | function (jaxseg / fastremap) | numpy (before) | jaxseg | fastremap "
        "| before / fastremap | jaxseg / fastremap | same output |")  # fmt: skip
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for name, seg in volumes():
    n_ids = int(fastremap.unique(seg).size) - 1
    for what, *calls in rows(seg, _MIN_SIZE.value):
      timed = [best_time(c, _BEST_OF.value) if c else (None, None) for c in calls]
      ref = timed[-1]
      notes = {same(r, ref[1]) for _, r in timed[:-1] if r is not None}
      cells = [f"{t:.3f}" if t is not None else "-" for t, _ in timed]
      ratios = [f"{t / ref[0]:.2f}" if t is not None else "-" for t, _ in timed[:-1]]
      print(
        f"| {name} ({n_ids:,} ids) | {what} | {' | '.join(cells)} | {' | '.join(ratios)} | "
        f"{'; '.join(sorted(notes))} |",
        flush=True,
      )
    del seg


if __name__ == "__main__":
  app.run(main)
