"""The waterz stages of the blockwise decoder (the LSD / volara pattern; see ``blockwise.py``).

Per block (daisy): waterz's watershed with ``context`` voxels around the block, cropped to the
block, fragments named by their first voxel's global linear index + 1; then the region-graph
statistics of every voxel pair whose higher voxel lies in the block (``graph_agglomeration``).
Globally: waterz's agglomeration on the fragment graph, dust merge on the surviving graph, and,
when configured, branch merge on slice-overlap tables that blocks measure from the agglomerated
labels. The result per threshold is a lookup table from fragment ids to final ids.

What is exact and what is not, against whole-volume waterz on the same affinities:
  * exact: the agglomeration, given the fragments (the same priority queue, statistics and
    merge order: ``graph_agglomeration`` reproduces waterz on a fragment graph), dust merge,
    branch merge and the size filter;
  * approximate: the fragments. A watershed basin is decided by steepest-ascent paths that can
    run far; each block sees ``context`` voxels past its faces, and a basin crossing a face is cut
    in two there (the two halves are usually joined early, by their high shared affinity, but
    with one more histogram count on the way). ``benchmarks/RESULTS.md`` measures the difference.

Arrays: affinities ``[3, z, y, x]`` as stored (z, y, x edges), converted per block to waterz's
layout (float32, edge p - e_c <-> p stored at p); fragments uint64 ``[z, y, x]``. The block
helpers (boxes, scratch files, the face planes) are ``block_io``'s, shared with ``blockwise``,
which calls the stages here. Never imports JAX.
"""

from __future__ import annotations

import glob
import os

import numpy as np

from jaxseg.decoding import (
  branch_merge,
  branch_overlaps,
  dust,
  graph_agglomeration,
  labels,
  waterz_ops,
)
from jaxseg.decoding.block_io import (
  block_box,
  block_name,
  cached_volume,
  global_ids,
  last_planes,
  load_nodes,
  read_affinities,
  save_npz,
  with_leading_planes,
)

_OFFSETS = ((1, 0, 0), (0, 1, 0), (0, 0, 1))


def _scoring(job) -> str:
  return waterz_ops.scoring_function(job.settings.merge_function)[0]


def _waterz_box(job, start, stop) -> np.ndarray:
  """Waterz-layout affinities of a box; one more leading voxel is read to convert ``source``."""
  extra = 1 if job.convention == "source" else 0
  lead = [min(extra, s) for s in start]
  aff = read_affinities(job, [s - ld for s, ld in zip(start, lead, strict=True)], stop)
  aff_w = waterz_ops.to_waterz_affinities(aff, _OFFSETS, job.convention)
  return np.ascontiguousarray(aff_w[:, lead[0] :, lead[1] :, lead[2] :])


def fragments(job, block) -> None:
  """daisy stage 1: the block's watershed fragments (with context), cropped, uniquely named."""
  start, stop = block_box(block, job.shape)
  context = job.settings.context
  rstart = [max(s - c, 0) for s, c in zip(start, context, strict=True)]
  rstop = [min(e + c, m) for e, c, m in zip(stop, context, job.shape, strict=True)]
  aff_w = _waterz_box(job, rstart, rstop)
  s = job.settings
  (watershed,) = waterz_ops.agglomerate(
    aff_w,
    [-np.inf],  # no merging: the watershed alone
    low=s.aff_threshold_low,
    high=s.aff_threshold_high,
    merge_function=_scoring(job),
    discretize_queue=s.discretize_queue,
    region_graphs=False,
  )
  core = tuple(slice(a - r, b - r) for a, b, r in zip(start, stop, rstart, strict=True))
  seg = np.ascontiguousarray(watershed.segmentation[core])
  ids, first, sizes = np.unique(seg.ravel(), return_index=True, return_counts=True)
  if ids.size and ids[0] == 0:
    ids, first, sizes = ids[1:], first[1:], sizes[1:]
  names = global_ids(first, start, seg.shape, job.shape)
  frag = labels.apply_lut(seg, ids, names, out_dtype=np.uint64)
  cached_volume(os.path.join(job.scratch, "fragments"), True).write(start, frag).result()
  order = np.argsort(names)
  save_npz(
    os.path.join(job.scratch, "fragments_npz", block_name(start) + ".npz"),
    ids=names[order],
    sizes=sizes[order].astype(np.int64),
    **last_planes(frag, stop, job.shape),
  )


def edges(job, block) -> None:
  """daisy stage 2: statistics of the pairs whose higher voxel is in the block."""
  start, stop = block_box(block, job.shape)
  lead = [1 if s > 0 else 0 for s in start]
  rstart = [s - ld for s, ld in zip(start, lead, strict=True)]
  frag = with_leading_planes(job, start, stop, lead)
  aff_w = _waterz_box(job, rstart, stop)
  table = graph_agglomeration.edge_statistics(frag, aff_w, _scoring(job), lead=lead)
  arrays = {
    k: v
    for k, v in vars(table).items()
    if isinstance(v, np.ndarray)  # the optional histograms are None without them
  }
  save_npz(
    os.path.join(job.scratch, "edges_npz", block_name(start) + ".npz"),
    hist_bins=np.int64(table.hist_bins),
    **arrays,
  )


def _load_edges(scratch: str) -> graph_agglomeration.EdgeTable:
  tables = []
  for path in sorted(glob.glob(os.path.join(scratch, "edges_npz", "*.npz"))):
    with np.load(path) as f:
      fields = {k: f[k] for k in f.files if k != "hist_bins"}
      tables.append(graph_agglomeration.EdgeTable(**fields, hist_bins=int(f["hist_bins"])))
  return graph_agglomeration.reduce_edges(tables)


def _lut_path(job, k: int) -> str:
  return os.path.join(job.scratch, f"agglomerated_{k}.npz")


def overlaps(job, block) -> None:
  """daisy stage 3 (branch merge): slice-pair overlaps of the agglomerated labels."""
  start, stop = block_box(block, job.shape)
  trail = 1 if stop[0] < job.shape[0] else 0  # the next block's first slice, for the pair across
  box = (
    slice(start[0], stop[0] + trail),
    *(slice(a, b) for a, b in zip(start[1:], stop[1:], strict=True)),
  )
  frag = np.asarray(cached_volume(os.path.join(job.scratch, "fragments"))[box])
  z_aff = None
  if job.settings.branch_merge.affinity_threshold > 0:
    rstop = (stop[0] + trail, stop[1], stop[2])
    z_aff = _waterz_box(job, start, rstop)[0]
  out = {}
  for k in range(len(job.settings.thresholds)):
    with np.load(_lut_path(job, k)) as lut:
      seg = labels.apply_lut(frag, lut["keys"], lut["values"], out_dtype=np.uint64)
    table = branch_overlaps.slice_overlaps(
      seg, z_aff, z0=start[0], last_plane_is_context=bool(trail)
    )
    ids, first_z, last_z = branch_overlaps.id_ranges(seg[: seg.shape[0] - trail], z0=start[0])
    for name, value in vars(table).items():
      out[f"{k}_{name}"] = np.asarray(value)
    out[f"{k}_ids"], out[f"{k}_first_z"], out[f"{k}_last_z"] = ids, first_z, last_z
  save_npz(os.path.join(job.scratch, "overlaps_npz", block_name(start) + ".npz"), **out)


def _branch_merge_lut(job, k: int, keys: np.ndarray, values: np.ndarray):
  tables, ranges = [], []
  fields = [f.name for f in branch_overlaps.OverlapTable.__dataclass_fields__.values()]
  for path in sorted(glob.glob(os.path.join(job.scratch, "overlaps_npz", "*.npz"))):
    with np.load(path) as f:
      tables.append(
        branch_overlaps.OverlapTable(
          **{n: (bool(f[f"{k}_{n}"]) if n == "has_affinity" else f[f"{k}_{n}"]) for n in fields}
        )
      )
      ranges.append((f[f"{k}_ids"], f[f"{k}_first_z"], f[f"{k}_last_z"]))
  table = branch_overlaps.concat_overlaps(tables)
  ids, first_z, last_z = branch_overlaps.merge_ranges(ranges)
  a, b = branch_merge.branch_merge_pairs(
    table, ids, first_z, last_z, **job.settings.branch_merge.as_kwargs()
  )
  # Segment ids (values) are 1..K: union them, then renumber by smallest member.
  count = int(values.max()) if values.size else 0
  roots = labels.merge_components(count + 1, a.astype(np.int64), b.astype(np.int64))
  new_id, _ = labels.compact_roots(roots, keep=np.arange(count + 1) > 0)
  return new_id[values]


def lookup_tables(job, run_stage, show_progress: bool, verbose: bool):
  """Stages 2-4 and the global steps: ``[(fragment ids, final ids, count)]`` per threshold."""
  del verbose  # waterz runs inside the block stages, always quietly
  s = job.settings
  run_stage(job, "edges", edges, show_progress)
  node_ids, sizes = load_nodes(job.scratch)
  # All thresholds in one pass, each equal to its own waterz call (region-graph extraction does
  # not disturb the next threshold here, unlike in waterz 0.10.1; see graph_agglomeration).
  levels = graph_agglomeration.agglomerate_graph(
    node_ids, _load_edges(job.scratch), s.thresholds, _scoring(job), s.discretize_queue
  )
  luts = []
  for level in levels:
    if s.dust is not None:
      region_ids = node_ids[np.unique(level.roots)]
      region_sizes = np.bincount(level.roots, weights=sizes, minlength=node_ids.size)
      region_sizes = region_sizes[np.unique(level.roots)].astype(np.int64)
      region_new, _ = dust.dust_merge_lut(
        region_ids,
        region_sizes,
        level.rg_u,
        level.rg_v,
        level.rg_score,
        threshold=level.threshold,
        size=s.dust.size,
        affinity=s.dust.affinity,
        remove_size=s.dust.remove_size,
      )
      values = region_new[np.searchsorted(region_ids, node_ids[level.roots])]
    else:
      values, _ = labels.compact_roots(level.roots)
    luts.append(values.astype(np.int64))
  if s.branch_merge is not None:
    for k, values in enumerate(luts):
      save_npz(_lut_path(job, k), keys=node_ids, values=values)
    run_stage(job, "overlaps", overlaps, show_progress)
    luts = [_branch_merge_lut(job, k, node_ids, v) for k, v in enumerate(luts)]
  out = []
  for values in luts:
    values = _size_filter_and_compact(values, sizes, s.min_size)
    out.append((node_ids, values, int(values.max()) if values.size else 0))
  return out


def _size_filter_and_compact(values: np.ndarray, sizes: np.ndarray, min_size: int) -> np.ndarray:
  """Drops segments under ``min_size`` voxels and renumbers 1..K by smallest fragment."""
  count = int(values.max()) if values.size else 0
  totals = np.bincount(values, weights=sizes, minlength=count + 1)
  keep = totals >= max(min_size, 1)
  keep[0] = False
  # Order segments by their first fragment (node order = scan order of first voxels).
  first = np.full(count + 1, values.size, np.int64)
  np.minimum.at(first, values, np.arange(values.size))
  order = np.argsort(first[1:], kind="stable") + 1
  new = np.zeros(count + 1, np.int64)
  kept = order[keep[order]]
  new[kept] = np.arange(1, kept.size + 1)
  return new[values]
