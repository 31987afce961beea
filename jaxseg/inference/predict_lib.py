"""Batch prediction: volumes in, affinity zarrs out, block by block, resumable, on many devices.

For each input volume ``[c,] z, y, x`` this writes ``<output>/<name>.zarr/affinities``, a
``[C, z, y, x]`` float16 (or configured) zarr covering the input voxel for voxel, plus
``<name>.zarr/blocks_done`` (one uint8 per block, 1 once the block is durable),
``<name>_predict.json`` (what was run, timings) and ``<name>_preview.png`` (the middle section and
its affinities).

Normalisation (``jaxseg.data.normalize``): the settings must be the training run's (checked
against the work dir's resolved ``config.json``, :func:`check_trained_normalization`); the
statistics are the input volume's own, computed once per input (a sample of a huge one for
``zscore`` / ``percentile``) and recorded in the affinities' attributes (``jaxseg_predict.stats``)
and in ``<name>_predict.json`` (``normalization``).

The output is cut into chunk-aligned blocks (``infer.block_shape``). Every window is computed
once, by the block its start lies in (``jaxseg.inference.schedule``): blocks run in C order, each
folding its own windows, and the partial sums that spill past a block's far faces are carried into
the next block along that axis (on the device along x; through carry files in
``<name>.zarr/scratch`` along y and z). Windows of consecutive blocks share the model's batches,
so only an input's last batch can be partly empty. Four things run at the same time: a reader
thread fetches and normalises the next blocks' input hulls, another loads the carries they need,
the device computes, and a writer thread copies finished blocks off the device and writes them
with their carries (:mod:`jaxseg.inference.streaming`). Host memory is a few hulls, blocks and
carries, whatever the size of the volume.

Resume: a block is marked done only after its output and its carries are durable, so a killed run
restarts at the first unmarked block (recomputing the x carry from its row predecessor's windows
that reach it) and writes the same bytes an uninterrupted run would: every voxel's sum is the
same sequence of float additions for any blocking. The scratch folder goes once every block is
done. Each input's output is an entry of the folder's jaxseg manifest
(:mod:`jaxseg.common.outputs`): one made with other settings or another checkpoint is refused
unless ``overwrite`` (which deletes only that entry's files), one of an image changed in place is
predicted again, and a folder holding the user's files or the inputs is refused.

Many hosts: process ``i`` of ``n`` predicts a contiguous range of slabs of blocks along z
(:func:`~jaxseg.inference.schedule.slab_range`). Blocks own whole chunks, so processes never
write the same file; a process whose first slab needs z carries that are not on disk yet computes
them itself from the previous slab's windows that reach it (a halo: one or a few planes of
windows). Process 0 creates the outputs and the others wait for them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jaxseg.common import config_util, outputs
from jaxseg.common.errors import ConfigError
from jaxseg.common.files import write_json
from jaxseg.common.outputs import (
  Decision,
  StageOutput,
  check_outside_inputs,
  input_identity,
  prepare_folder,
)
from jaxseg.data.normalize import (
  VolumeStats,
  normalization_stats,
  normalize_settings,
)
from jaxseg.inference import engine as engine_lib
from jaxseg.inference import layout, streaming
from jaxseg.inference import schedule as schedule_lib
from jaxseg.inference import tta as tta_lib
from jaxseg.inference.geometry import Geometry
from jaxseg.inference.settings import InferenceSettings, inference_settings
from jaxseg.io import Volume, VolumeError, block_chunks, create_zarr, open_volume, reopen_zarr
from jaxseg.io.datasets import dataset_volumes, nisb_cube
from jaxseg.training import sharding as sharding_lib
from jaxseg.training.paths import checkpoint_dir

AFFINITIES = layout.AFFINITIES
BLOCKS_DONE = layout.BLOCKS_DONE
ATTR_KEY = "jaxseg_predict"
SPLIT_PREFIX = "split:"
# How long processes other than 0 wait for process 0 to create the outputs.
_CREATE_TIMEOUT_S = 600.0


@dataclasses.dataclass
class PredictInput:
  """One volume to predict: a short name (output file names) and the lazy image."""

  name: str
  volume: Volume


# -- inputs ----------------------------------------------------------------------------------------


def _name_from_path(spec: str) -> str:
  """A short output name: ``.../seed101/data.zarr/img`` -> ``seed101``, ``a/test.h5:raw`` ->
  ``test``, ``x/vol.zarr`` -> ``vol``."""
  path = spec
  for ext in (".h5:", ".hdf5:"):
    if ext in path:
      path = path[: path.index(ext) + len(ext) - 1]
  parts = os.path.normpath(path).split(os.sep)
  # NISB cube: .../seed101/data.zarr/img -> seed101.
  if len(parts) >= 3 and parts[-2].endswith(".zarr") and parts[-2] == "data.zarr":
    return parts[-3]
  base = parts[-1]
  for suffix in (".zarr", ".zarr3", ".n5", ".h5", ".hdf5", ".tif", ".tiff"):
    if base.lower().endswith(suffix):
      return base[: -len(suffix)]
  return base


def resolve_inputs(
  config, specs: Sequence[str], *, axis_order: str | None = None
) -> list[PredictInput]:
  """Opens every input lazily.

  Each spec is a volume path / tensorstore spec that :func:`jaxseg.io.open_volume` takes, a NISB
  cube folder (holding ``data.zarr``), or ``split:<train|val|test>`` for the images of a split
  of ``config.data``.

  Raises:
    VolumeError: a missing or unreadable input, or two inputs that would share an output name.
  """
  out: list[PredictInput] = []
  resolution = tuple(config.data.get("resolution", (1.0, 1.0, 1.0)))
  for spec in specs:
    if spec.startswith(SPLIT_PREFIX):
      split = spec[len(SPLIT_PREFIX) :]
      volumes = dataset_volumes(config.data, split)
      if not volumes:
        raise VolumeError(f"{spec}: config.data has no volumes in split {split!r}")
      # A held-out z range (SNEMI3D's validation sections) is predicted on its own.
      out.extend(
        PredictInput(v.name, v.image.z_window(*v.z_range) if v.z_range else v.image)
        for v in volumes
      )
    elif os.path.isdir(os.path.join(spec, "data.zarr")):
      cube = nisb_cube(spec, resolution)
      out.append(PredictInput(cube.name, cube.image))
    else:
      default = "xyzc" if spec.rstrip("/").endswith("data.zarr/img") else None
      volume = open_volume(spec, axis_order=axis_order, default_axis_order=default)
      if "resolution" not in volume.attrs and not spec.startswith("precomputed://"):
        volume.resolution = tuple(float(r) for r in resolution)
      out.append(PredictInput(_name_from_path(spec), volume))
  names = [p.name for p in out]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise VolumeError(
      f"inputs {list(specs)} give the output name(s) {dupes} more than once; predict them "
      "into different --output folders"
    )
  return out


def _check_input(volume: Volume, settings: InferenceSettings) -> None:
  channels = volume.shape[0] if volume.has_channels else 1
  if channels != settings.in_channels:
    raise VolumeError(
      f"{volume.path}: the image has {channels} channel(s) (canonical shape {volume.shape}, "
      f"[c,] z, y, x) but the model takes {settings.in_channels} (model.in_channels); check the "
      "input and its axis order"
    )
  if not (np.issubdtype(volume.dtype, np.integer) or np.issubdtype(volume.dtype, np.floating)):
    raise VolumeError(f"{volume.path}: image dtype {volume.dtype} is not an intensity type")


# -- one output ------------------------------------------------------------------------------------


def _wait_for(path: str, what: str) -> None:
  deadline = time.monotonic() + _CREATE_TIMEOUT_S
  while not os.path.exists(path):
    if time.monotonic() > deadline:
      raise TimeoutError(f"waited {_CREATE_TIMEOUT_S:.0f} s for process 0 to create {what}")
    time.sleep(1.0)


def predict_output(output_dir: str, source: PredictInput, fingerprint: dict | None) -> StageOutput:
  """One input's entry in the output folder's manifest: its zarr group, summary and preview.

  The fingerprint gains the identity of the image and of the checkpoint's step folder (their
  files' sizes and times), so an image changed in place, or a model retrained into the same work
  dir, is predicted again instead of being taken as done. ``fingerprint=None`` describes the
  place alone (for :meth:`StageOutput.check_free` before the model is read): no input's files
  are walked for it.
  """
  name = source.name
  inputs = {}
  if fingerprint is not None:
    inputs["image"] = input_identity(source.volume.path)
    model = fingerprint.get("model") or {}
    if model.get("checkpoint_dir") and model.get("step") is not None:
      # Retraining into the same work dir writes the same step numbers: their files tell.
      step_folder = os.path.join(model["checkpoint_dir"], str(model["step"]))
      inputs["checkpoint"] = input_identity(step_folder)
  return StageOutput(
    output_dir,
    name=layout.entry_name(name),
    stage="predict",
    fingerprint={**(fingerprint or {}), "inputs": inputs},
    paths=[layout.group_name(name), layout.summary_name(name), layout.preview_name(name)],
    inputs=[source.volume.path],
    what="--output folder",
  )


def _open_outputs(
  source: PredictInput,
  stage: StageOutput,
  geometry: Geometry,
  settings: InferenceSettings,
  fingerprint: dict,
  *,
  overwrite: bool,
  process_index: int,
  data_config,
) -> tuple[Any, Any, VolumeStats | None]:
  """Creates (process 0) or reopens the affinity and completion arrays.

  Process 0 asks :mod:`jaxseg.common.outputs` what to do with what is there: reuse or resume
  (reopen; finished blocks are kept), create, or replace (only this input's own files). The
  other processes wait for process 0's arrays and reopen them.

  Returns:
    ``(affinities, blocks_done, stats)``: the two arrays and the image statistics the output was
    (or is now) made with: those of this input volume (not of the training volume), recorded in
    the attributes (``jaxseg_predict.stats``) so a user sees them and a resumed run does not
    recompute them.
  """
  group = stage.path(layout.group_name(source.name))
  aff_path = os.path.join(group, AFFINITIES)
  done_path = os.path.join(group, BLOCKS_DONE)
  shape = (len(settings.output_channels), *geometry.output_shape)
  if process_index != 0:
    _wait_for(os.path.join(done_path, ".zarray"), done_path)
  else:
    decision = stage.open(overwrite=overwrite)
    if decision is Decision.REPLACE and stage.replaced_because:
      logging.warning("%s: predicting again (%s)", group, "; ".join(stage.replaced_because))
    if decision in (Decision.REUSE, Decision.RESUME) and not os.path.exists(
      os.path.join(done_path, ".zarray")
    ):
      stage.remove_own(
        layout.group_name(source.name)
      )  # killed before its arrays existed: start again
  if os.path.exists(aff_path):
    existing = reopen_zarr(aff_path)
    if existing.shape != shape or existing.dtype != settings.output_dtype:
      raise VolumeError(
        f"{aff_path}: holds shape {existing.shape} and dtype {existing.dtype}, but predicting "
        f"{source.volume.path} makes shape {shape} and dtype {np.dtype(settings.output_dtype)}"
      )
    saved_stats = existing.attrs.get(ATTR_KEY, {}).get("stats")
    stats = VolumeStats.from_record(saved_stats) if saved_stats is not None else None
    return existing, reopen_zarr(done_path), stats

  # A pass over the image (or a sample of a huge one), done once: resumed runs and other
  # processes read the result.
  stats = normalization_stats(source.volume, data_config)
  attrs = {
    ATTR_KEY: {**fingerprint, "stats": stats.to_dict() if stats is not None else None},
    "offsets": [list(o) for o in settings.output_offsets],
    "convention": settings.convention,
    "channels": list(settings.output_channels),
  }
  chunks = settings.chunk_shape or block_chunks(geometry.block_shape)
  affinities = create_zarr(
    aff_path,
    shape,
    settings.output_dtype,
    chunks=(shape[0], *chunks),
    resolution=source.volume.resolution,
    source=source.volume.path,
    attributes=attrs,
  )
  # The completion array is created last: its presence tells other processes the outputs exist.
  done = create_zarr(done_path, geometry.grid, np.uint8, chunks=(1, 1, 1), compression=None)
  return affinities, done, stats


def _fingerprint(config, settings: InferenceSettings, source: PredictInput, views, model_info):
  """What one input's output is made with: settings, views, weights and the input image."""
  image = {
    "path": str(source.volume.path),
    "shape": list(source.volume.shape),
    "dtype": np.dtype(source.volume.dtype).name,
    "normalize": config.data.get("normalize", None),
    "normalize_scope": config.data.get("normalize_scope", None),
  }
  normalization = normalize_settings(config.data)
  if normalization.mode == "percentile":  # only the mode that reads them: others stay as they were
    image["normalize_percentiles"] = list(normalization.percentiles)
  return {
    "infer": settings.fingerprint(),
    "views": [v.name for v in views],
    "model": model_info,
    "input": image,
  }


def _open_job(
  config,
  settings: InferenceSettings,
  source: PredictInput,
  output_dir: str,
  *,
  model_info: dict,
  overwrite: bool,
  process_index: int,
  process_count: int,
) -> streaming.Job:
  """Plans one input, opens (or creates) its outputs and lists this process's blocks to do."""
  _check_input(source.volume, settings)
  geometry = settings.plan(source.volume.spatial_shape, where=source.volume.path)
  views = tta_lib.tta_views(settings.tta, settings.window, source.volume.resolution)
  fingerprint = _fingerprint(config, settings, source, views, model_info)
  stage = predict_output(output_dir, source, fingerprint)
  group = stage.path(layout.group_name(source.name))
  open_outputs = functools.partial(
    _open_outputs,
    source,
    stage,
    geometry,
    settings,
    fingerprint,
    overwrite=overwrite,
    process_index=process_index,
    data_config=config.data,
  )
  if jax.process_count() > 1:
    # One jax.distributed job: process 0 creates (or replaces) the outputs before anyone opens
    # them. Separate jobs splitting the blocks by hand wait for the files instead.
    if process_index == 0:
      opened = open_outputs()
    multihost_utils.sync_global_devices(f"jaxseg.predict: outputs of {source.name}")
    if process_index != 0:
      opened = open_outputs()
  else:
    opened = open_outputs()
  affinities, done, stats = opened
  finished = done.read().astype(bool)
  scratch = os.path.join(group, layout.SCRATCH)
  tasks = schedule_lib.plan_tasks(
    geometry,
    finished,
    process_index=process_index,
    process_count=process_count,
    carry_exists=lambda key: os.path.exists(os.path.join(scratch, f"{key}.npy")),
  )
  z0, z1 = schedule_lib.slab_range(geometry.grid[0], process_index, process_count)
  return streaming.Job(
    source=source,
    geometry=geometry,
    views=views,
    stats=stats,
    normalization=normalize_settings(config.data).record(),
    group=group,
    affinities=affinities,
    done=done,
    tasks=tasks,
    skipped=int(finished[z0:z1].sum()),
    stage=stage,
  )


# -- the run ---------------------------------------------------------------------------------------


def _job_summary(
  job: streaming.Job,
  settings: InferenceSettings,
  devices: int,
  process_index: int,
  process_count: int,
) -> dict:
  """One input's summary: output, shape, blocks written / already done, timing, completeness."""
  complete = streaming.all_done(job)
  aff_path = os.path.join(job.group, AFFINITIES)
  voxels = int(np.prod(job.geometry.output_shape))
  # Wall time from the first dispatch to the last durable write (the first input's includes
  # compilation); blocks of one input overlap with the neighbours' reads and writes.
  seconds = job.finished - job.started if job.started and job.finished else 0.0
  summary = {
    "name": job.source.name,
    "input": str(job.source.volume.path),
    "output": aff_path,
    "shape": [len(settings.output_channels), *job.geometry.output_shape],
    "dtype": np.dtype(settings.output_dtype).name,
    "offsets": [list(o) for o in settings.output_offsets],
    "convention": settings.convention,
    "blocks": job.geometry.num_blocks,
    "blocks_written": job.blocks_written,
    "blocks_already_done": job.skipped,
    # The windows covering the output; each is computed once, by the block it starts in.
    "windows": job.geometry.num_windows,
    # Windows run by this call (halo windows included), in model_calls batches of batch_size.
    "windows_computed": job.windows_computed,
    "halo_windows": job.halo_windows,
    "model_calls": job.model_calls,
    "batch_size": settings.batch_size * devices,
    "views": len(job.views),
    "devices": devices,
    "process": [process_index, process_count],
    "seconds": round(seconds, 3),
    "complete": complete,
    # How this input was normalised, and with which of its own statistics.
    "normalization": {
      **job.normalization,
      "stats": job.stats.to_dict() if job.stats is not None else None,
    },
  }
  if job.blocks_written and seconds > 0:
    share = job.blocks_written / max(1, job.geometry.num_blocks)
    summary["voxels_per_second"] = round(voxels * share / seconds, 1)
  return summary


def _summarize_jobs(
  jobs: list[streaming.Job],
  settings: InferenceSettings,
  data_config,
  output_dir: str,
  *,
  devices: int,
  process_index: int,
  process_count: int,
) -> list[dict]:
  """The summaries; a complete input also gets its preview, summary file and finished entry."""
  writes_summary = jax.process_count() == 1 or process_index == 0
  results = []
  for job in jobs:
    summary = _job_summary(job, settings, devices, process_index, process_count)
    if summary["complete"]:
      # Every block is durable: the partial sums between blocks are no longer needed (another
      # process finishing at the same time may remove them first).
      shutil.rmtree(streaming.scratch_dir(job), ignore_errors=True)
    if summary["complete"] and writes_summary:
      preview = os.path.join(output_dir, layout.preview_name(job.source.name))
      streaming.write_preview(job, settings, data_config, preview)
      summary["preview"] = preview
      write_json(os.path.join(output_dir, layout.summary_name(job.source.name)), summary)
      job.stage.finish()
    results.append(summary)
  return results


@outputs.writes_outputs
def predict_volumes(
  config,
  apply: engine_lib.ApplyFn,
  variables: Any,
  inputs: Sequence[PredictInput],
  output_dir: str,
  *,
  model_info: dict | None = None,
  overwrite: bool = False,
  num_devices: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  show_progress: bool = True,
  max_blocks: int | None = None,
) -> list[dict]:
  """Predicts every input into ``output_dir`` (see the module docstring for the layout).

  Args:
    config: the run config (``infer``, ``model``, ``target``, ``data`` normalisation).
    apply: ``apply(variables, x[b, z, y, x, cin]) -> logits[b, z, y, x, C]``.
    variables: the model variables for ``apply``.
    inputs: from :func:`resolve_inputs`.
    output_dir: folder for the outputs (created).
    model_info: what the weights are (checkpoint folder, step, EMA or not); recorded in the
      output's attributes, and a resumed run must match it.
    overwrite: replace outputs made with other settings instead of refusing.
    num_devices: local devices to use (0 = all).
    process_index, process_count: this process's share of the blocks, a range of slabs
      (default: JAX's).
    show_progress: a progress bar over all tasks of all inputs (rate and ETA).
    max_blocks: stop after this many blocks are written (tests of resume; ``None`` = all).

  Returns:
    One summary dict per input: output path, shape, blocks written / already done, seconds,
    voxels per second, and ``complete`` (every block of every process is done).
  """
  settings = inference_settings(config)
  process_index = jax.process_index() if process_index is None else int(process_index)
  process_count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside 0..{process_count - 1}")
  if process_index == 0:
    # Before anything is written: the folder is jaxseg's (or new) and holds none of the inputs.
    check_outside_inputs(output_dir, [s.volume.path for s in inputs], what="--output folder")
    prepare_folder(output_dir, what="--output folder")
  else:
    os.makedirs(output_dir, exist_ok=True)
  sharding = sharding_lib.create_sharding(num_devices, local=True)
  variables = jax.device_put(variables, sharding.replicated)
  engines: dict[tuple, engine_lib.WindowEngine] = {}
  model_info = dict(model_info or {})

  jobs: list[streaming.Job] = []
  for source in inputs:
    job = _open_job(
      config,
      settings,
      source,
      output_dir,
      model_info=model_info,
      overwrite=overwrite,
      process_index=process_index,
      process_count=process_count,
    )
    jobs.append(job)
    views, geometry = job.views, job.geometry
    if views not in engines:
      engines[views] = engine_lib.WindowEngine(apply, variables, settings, views, sharding)
    logging.info(
      "%s: %s -> %s, %d of %d blocks to do (%d windows in all; %d to compute here)",
      source.name,
      source.volume.shape,
      os.path.join(job.group, AFFINITIES),
      sum(t.write for t in job.tasks),
      geometry.num_blocks,
      geometry.num_windows,
      sum(t.num_windows for t in job.tasks),
    )

  work = [(job, task) for job in jobs for task in job.tasks]
  if max_blocks is not None:
    # Up to the max_blocks-th block written (the halos before it included).
    keep = written = 0
    for i, (_, task) in enumerate(work):
      if written == int(max_blocks):
        break
      keep, written = i + 1, written + int(task.write)
    work = work[:keep]
  data_config = config.data
  streaming.Streamer(work, engines, settings, data_config).run(show_progress)

  for job in jobs:
    job.affinities.flush()
  if jax.process_count() > 1:  # every process's blocks are durable before process 0 checks
    multihost_utils.sync_global_devices("jaxseg.predict: blocks written")
  return _summarize_jobs(
    jobs,
    settings,
    data_config,
    output_dir,
    devices=sharding.num_devices,
    process_index=process_index,
    process_count=process_count,
  )


def check_trained_normalization(config, checkpoint: str) -> None:
  """Refuses to normalise inputs otherwise than the model's training run did.

  The normalisation (``data.normalize``, ``normalize_scope``, ``normalize_percentiles``) travels
  with the model in the training run's resolved config (``<workdir>/config.json``, beside the
  ``checkpoints`` folder; a work dir never holds checkpoints of other training settings). Only
  the settings travel: ``zscore`` / ``percentile`` inputs are normalised with their own
  statistics. A work dir without that file (or from before these keys) is not checked.

  Raises:
    ConfigError: the config's settings differ from the training's (one line naming the keys and
      the overrides that restore them).
  """
  workdir = os.path.dirname(checkpoint_dir(checkpoint))
  path = os.path.join(workdir, config_util.RESOLVED_CONFIG_NAME)
  if not os.path.isfile(path):
    return
  try:
    with open(path) as f:
      trained_data = json.load(f).get("data") or {}
  except (OSError, ValueError, AttributeError):
    return  # not a resolved config jaxseg wrote: nothing to compare with
  if trained_data.get("normalize") is None:
    return
  trained = normalize_settings(trained_data).record()
  settings = normalize_settings(config.data)
  asked = settings.record()
  if trained != asked:
    # The flags that restore the training's values (a key left at its default needs none).
    effective = {
      "normalize": settings.mode,
      "normalize_scope": settings.scope,
      "normalize_percentiles": list(settings.percentiles),
    }
    fix = " ".join(
      f"--config.data.{key}={tuple(value) if isinstance(value, list) else value}".replace(" ", "")
      for key, value in trained.items()
      if effective[key] != value
    )
    raise ConfigError(
      f"data.normalize: the model in {workdir} was trained with {trained} but the config asks "
      f"for {asked}; predict with the training's normalisation ({fix})"
    )


def predict(
  config,
  checkpoint: str,
  inputs: Sequence[str],
  output_dir: str,
  *,
  step: int | str | None = "best",
  use_ema: bool = True,
  axis_order: str | None = None,
  **kwargs,
) -> list[dict]:
  """Restores the trained model from ``checkpoint`` and runs :func:`predict_volumes`.

  ``inputs`` are specs for :func:`resolve_inputs`; ``kwargs`` go to :func:`predict_volumes`.
  """
  from jaxseg.training.train_lib import restore_inference_model

  # Bad settings and missing inputs fail before the checkpoint is read.
  inference_settings(config)
  check_trained_normalization(config, checkpoint)
  sources = resolve_inputs(config, inputs, axis_order=axis_order)
  # The output folder is checked before the checkpoint is read: refused at once, not after it.
  check_outside_inputs(output_dir, [checkpoint_dir(checkpoint)], what="--output folder")
  for source in sources:
    predict_output(output_dir, source, None).check_free()
  model, info = restore_inference_model(config, checkpoint, step, use_ema=use_ema)
  apply, variables = engine_lib.model_apply(model)
  model_info = {
    "checkpoint_dir": os.path.abspath(info["checkpoint_dir"]),
    "step": int(info["step"]),
    "weights": info["weights"],
    "name": str(config.model.name),
  }
  return predict_volumes(
    config, apply, variables, sources, output_dir, model_info=model_info, **kwargs
  )
