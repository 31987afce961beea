"""Blockwise decoding for volumes larger than memory, scheduled by daisy.

Every stage is a daisy task over a grid of ``block_shape`` blocks (the last ones shrunk to the
volume); each block reads only its box plus a little context, so memory is bounded by the block.
Between stages the main process joins small per-block summaries into a global lookup table.
Scratch files live in ``<output>/_blockwise`` and are removed when the job finishes.

Connected components (exactly the whole-volume result, bit for bit, ids included):
  1. ``fragments``: per block, the edge bits of the block and of the one plane before it on each
     axis (so a voxel whose only active edge comes from the previous block is still foreground),
     components inside the block, each named by the global linear index of its first voxel + 1
     (unique without coordination). Written to a uint64 scratch zarr; the block's ids, sizes and
     incoming-edge faces go to a small ``.npz``.
  2. ``faces``: per block, the previous blocks' last planes (from the scratch zarr) against the
     block's first planes, where the edge across is active: pairs of fragment ids.
  3. global: union-find over the pairs. A component's id order is its least fragment id, which is
     its first voxel in scan order: the same ids as the whole-volume decode. ``min_size`` acts on
     summed sizes. The table maps fragment ids to final ids.
  4. ``relabel``: per block, fragment ids through the table into the output.

waterz (approximate at block faces; see ``docs`` in the README and ``benchmarks/RESULTS.md``):
  1. ``fragments``: per block with ``context`` voxels around it, waterz's watershed (no merging),
     cropped to the block, ids as above. Basins that cross a block face are split in two there.
  2. ``edges``: per block, region-graph statistics of every voxel pair with its higher voxel in
     the block (the face to the previous blocks included, so each pair is counted once).
  3. global: the waterz agglomeration on the fragment graph (``graph_agglomeration``), dust merge
     on the surviving graph, per threshold.
  4. ``overlaps`` (branch merge only): per block, slice-pair overlap tables of the agglomerated
     labels; global: the branch-merge stages on the summed table.
  5. ``relabel``: per block and threshold, into the outputs.

Workers: ``num_workers`` daisy worker processes on this machine (1 = in this process), or, with
``worker_command`` (e.g. ``srun -N1 -n1 -c4``), processes started by that command, which connect
back to this scheduler. A killed run resumes: daisy's block tracking skips finished blocks and the
global tables are files written atomically.

The block helpers both drivers share (:class:`BlockJob`, block boxes, scratch ``.npz`` files, face
planes) are ``block_io``'s; the waterz stages are ``blockwise_waterz``'s, called from here.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import pickle
import shlex
import subprocess
import sys
import time

import numpy as np

from jaxseg.common import runtime
from jaxseg.common.errors import ConfigError, JaxsegError
from jaxseg.common.files import atomic_output, write_json
from jaxseg.data.affinity import convert_convention
from jaxseg.decoding import cc, labels
from jaxseg.decoding.block_io import (
  BlockJob,
  block_box,
  block_name,
  cached_volume,
  global_ids,
  last_planes,
  load_nodes,
  previous_last_plane,
  read_affinities,
  save_npz,
)
from jaxseg.decoding.segmentation_io import create_output, output_names
from jaxseg.decoding.settings import DecodeSettings
from jaxseg.io import create_zarr, reopen_zarr

SCRATCH = "_blockwise"


class BlocksFailedError(JaxsegError, RuntimeError):
  """Worker processes failed some blocks (the message has the last worker error); a rerun
  retries only those."""


def _read_source_affinities(job: BlockJob, start, stop) -> np.ndarray:
  """:func:`read_affinities` in the ``source`` convention the connected components take.

  ``target`` volumes are read one voxel further on each axis (where the volume goes on) and
  converted: the edge ``v <-> v + e_c`` is stored at ``v + e_c`` there. The mask applies before
  the conversion, in the stored convention, as in the whole-volume decoder.
  """
  if job.convention == "source":
    return read_affinities(job, start, stop)
  more = [min(e + 1, m) for e, m in zip(stop, job.shape, strict=True)]
  aff = read_affinities(job, start, more)
  aff, _ = convert_convention(aff, ((1, 0, 0), (0, 1, 0), (0, 0, 1)), "target", "source")
  return np.ascontiguousarray(
    aff[:, : stop[0] - start[0], : stop[1] - start[1], : stop[2] - start[2]]
  )


# -- connected components -------------------------------------------------------------------------


def _cc_fragments(job: BlockJob, block) -> None:
  start, stop = block_box(block, job.shape)
  lead = tuple(1 if s > 0 else 0 for s in start)
  aff = _read_source_affinities(job, [s - ld for s, ld in zip(start, lead, strict=True)], stop)
  bits = cc.edge_bits(aff, job.settings.threshold)
  lz, ly, lx = lead
  core = np.ascontiguousarray(bits[lz:, ly:, lx:])
  # Active edges from the previous block's last plane make this block's first plane foreground.
  incoming = [
    (bits[0, ly:, lx:] & 1) if lz else None,
    (bits[lz:, 0, lx:] & 2) if ly else None,
    (bits[lz:, ly:, 0] & 4) if lx else None,
  ]
  faces = {}
  for axis, active in enumerate(incoming):
    if active is None:
      continue
    active = active.astype(bool)
    plane = [slice(None)] * 3
    plane[axis] = 0
    core[tuple(plane)] |= np.where(active, 8, 0).astype(np.uint8)
    faces[f"active_{axis}"] = active
  seg, count = cc.label_edge_bits(core)
  first = cc.component_first_index(seg, count)
  sizes = cc.component_sizes(seg, count)
  ids = global_ids(first, start, core.shape, job.shape)
  table = np.concatenate([np.zeros(1, np.uint64), ids])
  fragments = table[seg]
  for axis in range(3):
    if f"active_{axis}" in faces:
      plane = [slice(None)] * 3
      plane[axis] = 0
      faces[f"ids_{axis}"] = fragments[tuple(plane)]
  faces.update(last_planes(fragments, stop, job.shape))
  cached_volume(os.path.join(job.scratch, "fragments"), True).write(start, fragments).result()
  save_npz(
    os.path.join(job.scratch, "fragments_npz", block_name(start) + ".npz"),
    ids=ids,
    sizes=sizes.astype(np.int64),
    **faces,
  )


def _cc_faces(job: BlockJob, block) -> None:
  """Pairs of fragment ids joined by active edges across the block's leading faces.

  The previous block's last plane comes from its ``.npz`` (stage 1 saved it), not from the
  scratch zarr, whose chunks would have to be decoded whole for one plane.
  """
  start, _ = block_box(block, job.shape)
  saved = np.load(os.path.join(job.scratch, "fragments_npz", block_name(start) + ".npz"))
  a_all, b_all = [], []
  for axis in range(3):
    if f"active_{axis}" not in saved:
      continue
    last = previous_last_plane(job, start, axis)
    active = saved[f"active_{axis}"]
    a_all.append(last[active])
    b_all.append(saved[f"ids_{axis}"][active])
  pairs = np.zeros((0, 2), np.uint64)
  if a_all:
    pairs = np.unique(np.stack([np.concatenate(a_all), np.concatenate(b_all)], 1), axis=0)
  save_npz(os.path.join(job.scratch, "faces_npz", block_name(start) + ".npz"), pairs=pairs)


def _cc_lookup(job: BlockJob) -> tuple[np.ndarray, np.ndarray, int]:
  """Fragment ids -> final ids (scan order of first voxels), and the segment count."""
  ids, sizes = load_nodes(job.scratch)
  pairs = [np.load(p)["pairs"] for p in glob.glob(os.path.join(job.scratch, "faces_npz", "*"))]
  pairs = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.uint64)
  a = np.searchsorted(ids, pairs[:, 0])
  b = np.searchsorted(ids, pairs[:, 1])
  roots = labels.merge_components(ids.size, a, b)
  keep = None
  if job.settings.min_size > 1:
    totals = np.bincount(roots, weights=sizes, minlength=ids.size)
    keep = totals >= job.settings.min_size
  new_ids, count = labels.compact_roots(roots, keep)
  return ids, new_ids, count


# -- the final pass -------------------------------------------------------------------------------


def _relabel(job: BlockJob, block) -> None:
  start, stop = block_box(block, job.shape)
  box = tuple(slice(s, e) for s, e in zip(start, stop, strict=True))
  fragments = np.asarray(cached_volume(os.path.join(job.scratch, "fragments"))[box])
  for k, output in enumerate(job.outputs):
    with np.load(os.path.join(job.scratch, f"lut_{k}.npz")) as lut:
      keys, values = lut["keys"], lut["values"]
    out = cached_volume(output, True)
    out.write(start, labels.apply_lut(fragments, keys, values, out_dtype=out.dtype)).result()


# -- scheduling -----------------------------------------------------------------------------------


def _process_block(function, job: BlockJob, block) -> None:
  """One block in any worker: the stage's function between malloc housekeeping calls, so that
  resident memory stays at about one block's worth however many blocks a worker runs."""
  runtime.limit_malloc_arenas()
  try:
    function(job, block)
  finally:
    runtime.release_free_memory()


def _worker_main(command: str, spec: str, *, context=None) -> None:
  """A daisy worker function: starts one block worker through the cluster command."""
  env = dict(os.environ)
  if context is not None:
    env[context.ENV_VARIABLE] = context.to_env()
  argv = [*shlex.split(command), sys.executable, "-m", "jaxseg.decoding.worker", spec]
  subprocess.run(argv, env=env, check=True)


def _run_stage(job: BlockJob, name: str, function, show_progress: bool) -> int:
  """Runs ``function(job, block)`` over every block with daisy; finished blocks are skipped.

  Blocks read their own context (clipped to the volume) and write only their own box, so daisy
  sees read ROI = write ROI and may run any blocks at once.
  """
  import daisy
  import daisy.logging

  # Worker logs beside the scratch data (daisy's default is ./daisy_logs in the working folder).
  daisy.logging.set_log_basedir(os.path.join(job.scratch, "daisy_logs"))
  settings = job.settings
  total = daisy.Roi((0, 0, 0), job.shape)
  write = daisy.Roi((0, 0, 0), settings.block_shape)
  process = functools.partial(_process_block, function, job)
  if settings.worker_command:
    # Each cluster worker unpickles the job and the block function from this file.
    spec = os.path.join(job.scratch, f"worker_{name}.pkl")
    with atomic_output(spec) as tmp, open(tmp, "wb") as f:
      pickle.dump((job, function), f)
    process = functools.partial(_worker_main, settings.worker_command, spec)
  task = daisy.Task(
    f"decode_{name}",
    total_roi=total,
    read_roi=write,
    write_roi=write,
    process_function=process,
    read_write_conflict=False,
    fit="shrink",
    max_workers=settings.num_workers,
    max_retries=2,
    tracking_path=os.path.join(job.scratch, f"daisy_{name}"),
  )
  multiprocessing = settings.num_workers > 1 or bool(settings.worker_command)
  states = daisy.run_blockwise(
    [task], multiprocessing=multiprocessing, progress=show_progress, summary=False,
    return_states=True,
  )  # fmt: skip
  state = states[f"decode_{name}"]
  if state.completed_count != state.total_block_count:
    error = state.last_worker_error or f"worker logs in {os.path.join(job.scratch, 'daisy_logs')}"
    raise BlocksFailedError(
      f"blockwise decode, stage {name}: {state.failed_count} of {state.total_block_count} "
      f"blocks failed ({error}); run again to retry them"
    )
  return state.total_block_count


def decode_blockwise(
  settings: DecodeSettings,
  source,
  mask,
  output: str,
  fingerprint: dict,
  *,
  verbose: bool = False,
  show_progress: bool = True,
):
  """Runs the blockwise decoder (module docstring) into ``output``.

  Returns:
    ``(output arrays, segment counts per threshold, info dict)``.
  """
  if tuple(source.distances) != (1, 1, 1):
    raise ConfigError(
      f"blockwise decoding takes nearest-neighbour edges only, not {source.offsets}; use "
      "config.decode.blockwise='never' for long-range channels"
    )
  if settings.method == "waterz":
    # Checked before anything is written, not in the edges stage after the fragments.
    from jaxseg.decoding import graph_agglomeration, waterz_ops

    scoring, _ = waterz_ops.scoring_function(settings.merge_function)
    try:
      graph_agglomeration.parse_merge_function(scoring)
    except NotImplementedError as e:
      raise ConfigError(
        f"blockwise waterz: {e}; use config.decode.blockwise='never' for this merge function"
      ) from e
  scratch = os.path.join(output, SCRATCH)
  os.makedirs(scratch, exist_ok=True)
  state_path = os.path.join(scratch, "job.json")
  if not os.path.exists(state_path):
    write_json(state_path, {"fingerprint": fingerprint, "complete": False})
  shape = tuple(source.spatial_shape)
  job = BlockJob(
    settings=settings,
    affinities=source.volume.path,
    axis_order=source.volume.axis_order,
    positions=source.positions,
    distances=source.distances,
    convention=source.convention,
    mask=mask.path if mask is not None else "",
    shape=shape,
    scratch=scratch,
  )
  timings = {}
  fragments_path = os.path.join(scratch, "fragments")
  if not os.path.exists(fragments_path):
    create_zarr(fragments_path, shape, np.uint64, chunks=_scratch_chunks(settings, shape))
  for sub in ("fragments_npz", "faces_npz", "edges_npz", "overlaps_npz"):
    os.makedirs(os.path.join(scratch, sub), exist_ok=True)

  t = time.perf_counter()
  if settings.method == "cc":
    blocks = _run_stage(job, "fragments", _cc_fragments, show_progress)
    timings["fragments_s"] = time.perf_counter() - t
    t = time.perf_counter()
    _run_stage(job, "faces", _cc_faces, show_progress)
    timings["faces_s"] = time.perf_counter() - t
    t = time.perf_counter()
    luts = [_cc_lookup(job)]
  else:
    from jaxseg.decoding import blockwise_waterz

    blocks = _run_stage(job, "fragments", blockwise_waterz.fragments, show_progress)
    timings["fragments_s"] = time.perf_counter() - t
    t = time.perf_counter()
    luts = blockwise_waterz.lookup_tables(job, _run_stage, show_progress, verbose)
  timings["global_s"] = time.perf_counter() - t

  names = output_names(settings)
  paths = tuple(os.path.join(output, n) for n in names)
  dtypes = [labels.smallest_uint_dtype(count) for _, _, count in luts]
  counts = [count for _, _, count in luts]
  for k, (keys, values, _) in enumerate(luts):
    save_npz(os.path.join(scratch, f"lut_{k}.npz"), keys=keys, values=values)
  arrays = [
    reopen_zarr(path)
    if os.path.exists(path)
    else create_output(output, name, threshold, dtype, source, settings, fingerprint)
    for path, name, threshold, dtype in zip(paths, names, settings.thresholds, dtypes, strict=True)
  ]
  job = dataclasses.replace(job, outputs=paths)
  t = time.perf_counter()
  _run_stage(job, "relabel", _relabel, show_progress)
  timings["relabel_s"] = time.perf_counter() - t
  info = {"blocks": blocks, "timings": {k: round(v, 3) for k, v in timings.items()}}
  return arrays, counts, info


def _scratch_chunks(settings: DecodeSettings, shape) -> tuple[int, ...]:
  # One chunk per block: every block write is chunk aligned, whatever the block shape.
  return tuple(min(b, s) for b, s in zip(settings.block_shape, shape, strict=True))
