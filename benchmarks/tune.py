r"""Tuning benchmark: one long-lived trial worker against a fresh process per trial (PyTC's way).

``jaxseg.tune`` runs all trials of a study in one spawned child process
(:class:`jaxseg.tuning.trials.TrialWorker`) that loads the split's affinities, masks, labels and
skeletons once (:func:`~jaxseg.tuning.trials.load_state`) and then decodes and scores one
parameter set per message (:func:`~jaxseg.tuning.trials.run_trial`). PyTC starts a fresh child per
trial (that is how it gets its per-trial timeout), which must start Python, import the decoding
stack, load the data and only then decode and score. Both are timed here on the same cached
affinities, with the same library code, in one run:

* ``worker``: one ``TrialWorker`` for the whole case. Its start (spawn, imports, loading) is timed
  once; then every ``worker.run(params)`` as the parent sees it (decode + score + the pipe round
  trip). The first trial also pays the lazy imports of the decoders and metrics and the numba
  cache loads, so the steady per-trial time is the median of the later trials.
* ``fresh``: for every trial a new ``TrialWorker`` (spawned child, ``trial_setup`` /
  ``load_state`` / ``run_trial`` as above), timed in the parent from its start until the trial's
  result is back. Closing it afterwards (``TrialWorker.close``: 0.2 s grace, then kill) is
  reported apart and left out of every ratio, which favours the fresh process.

The two alternate trial by trial with the same parameters (which one goes first alternates too),
and each trial's objective must come out identical in both. Decoders (``--decoders``):

* ``cc``: one threshold per trial, spread over the config's ``tune.cc.threshold_grid``.
* ``waterz``: ``aff85_his256`` with all 9 merge thresholds of ``tune.waterz.thresholds`` decoded
  in one pass per trial, dust and branch merge on; the trials spread over the
  ``aff_threshold_low`` x ``aff_threshold_high`` grid.

Reported per data set and decoder: the worker's start and first trial; over the later trials
(2nd to last, same parameters in both kinds: a waterz trial's time depends on them) the median
worker trial, the median fresh process, and the medians of their paired difference and ratio;
the whole run's ratio (every trial, the worker's start included); and a study of the config's
trial budget B (cc: the grid size; waterz: ``tune.waterz.n_trials``) from the means,
``B * fresh`` against ``start + first + (B - 1) * worker``. A second table splits a trial (means
of the later trials) into process start + imports (what ``load_state`` imports included), loading
the data (``load_state``), decode (``decode_array``: all thresholds) and scoring
(``evaluate_loaded``: every threshold), clocked inside the child by wrapping those two library
functions (module attributes, looked up by ``run_trial`` at call time) while the trials run.

Data (``--cases``; a case whose files are absent is skipped with a message):

* ``snemi_mini``: ``gala_snemi_mini`` dense labels, 32 x 160 x 160 (27 ids, SNEMI3D geometry).
* ``gala_fibsem``: ``gala_fibsem_example`` test GT, 50 x 100 x 200 (FIB-SEM, 0 = membrane).
* ``demo``: the demo run's cached predictions (``runs/demo/predictions/<key>/seed100.zarr``, a
  trained net's affinities on the generated val cube, with its QC mask), set up as
  ``python -m jaxseg.tune`` does for ``configs/demo.py`` (cc: NERL against the skeletons;
  waterz: adapted Rand against the dense labels). Read only: nothing is written under the run.
* ``pinky40`` (only when named: its waterz trials take tens of seconds): the centred
  ``--pinky_size`` crop (default 64 x 256 x 256) of the pinky40 automatic segmentation as
  stand-in GT, for a larger volume.

For ``snemi_mini``, ``gala_fibsem`` and ``pinky40`` the affinities are made from the labels:
membranes of 2 voxels or more (every voxel with a face neighbour of another value), blurred
(``--blur`` voxels sd in y / x, half in z) into a boundary map ``p``, an edge's affinity the lower
``p`` of its ends, plus spatially correlated noise of sd ``--noise``, clipped to [0, 1]
(:func:`label_affinities`). With the defaults and the config's own decode settings the best
adapted Rand error is about 0.17 (SNEMI-mini) and 0.04 (FIB-SEM) for waterz, 0.25 and 0.17 for cc
(at 0.6), so the tuned ranges hold the optimum (waterz trials: 2-3 us per voxel here, 8 us on
the demo net's real predictions). They are written as ``<name>.zarr/affinities`` the way
``jaxseg.predict`` writes a NISB net's output (float16, ``source`` convention, channels x, y, z
with ``offsets`` / ``convention`` / ``channels`` attributes); the labels are read from the
original files (crops: from an lzf HDF5 copy), so loading costs what it would in a real run.
These cases use ``configs/snemi.py`` (the waterz path PyTC tunes) with the data overridden, the
decode convention set to ``source`` and the cc objective to adapted Rand (no skeletons).

Usage::

  .venv/bin/python benchmarks/tune.py --output=/tmp/tune_bench.json   # default cases (~3 min)
  .venv/bin/python benchmarks/tune.py --quick                          # smoke run, tiny crops
  .venv/bin/python benchmarks/tune.py --cases=demo --decoders=waterz --trials=8

The spawned children import this script (the ``spawn`` start method runs the main module), so
its top level imports only numpy and absl, like ``python -m jaxseg.tune``'s. Nothing here
imports JAX.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from a checkout: configs/ and jaxseg/ importable

from jaxseg.common.config_util import load_sibling  # noqa: E402

_machine = load_sibling(__file__, "machine")

SNEMI = os.path.join(REPO, "configs", "snemi.py")
DEMO = os.path.join(REPO, "configs", "demo.py")
DATA = Path(REPO).parent / "shared" / "data"
CASES = ("snemi_mini", "gala_fibsem", "demo", "pinky40")
DEFAULT_CASES = ("snemi_mini", "gala_fibsem", "demo")
QUICK_CASES = ("snemi_mini", "gala_fibsem")
DECODERS = ("cc", "waterz")
WATERZ_MERGE = "aff85_his256"
# jaxseg.predict's NISB layout: channels +x, +y, +z, each edge stored at its lower end.
SOURCE_XYZ = {
  "offsets": [[0, 0, 1], [0, 1, 0], [1, 0, 0]],
  "convention": "source",
  "channels": [0, 1, 2],
}

_CASES = flags.DEFINE_list(
  "cases", list(DEFAULT_CASES), f"Data sets: {', '.join(CASES)} (pinky40 only when named)."
)
_DECODERS = flags.DEFINE_list("decoders", list(DECODERS), "Decoders: cc, waterz.")
_OUTPUT = flags.DEFINE_string("output", "", "Write all results as one JSON document here.")
_QUICK = flags.DEFINE_bool(
  "quick",
  False,
  f"Smoke run: 2 trials, volumes cropped to 16 x 64 x 64, cases {', '.join(QUICK_CASES)} unless "
  "--cases is given.",
)
_TRIALS = flags.DEFINE_integer("trials", 6, "Timed trials per decoder and kind (worker, fresh).")
_DATA = flags.DEFINE_string("data", str(DATA), "The shared data folder.")
_DEMO_RUN = flags.DEFINE_string(
  "demo_run", os.path.join(REPO, "runs", "demo"), "The demo run (checkpoints, predictions/)."
)
_PINKY_SIZE = flags.DEFINE_list("pinky_size", ["64", "256", "256"], "pinky40: crop (z,y,x).")
_BLUR = flags.DEFINE_float("blur", 1.0, "Label affinities: gaussian sd in y / x voxels (z: half).")
_NOISE = flags.DEFINE_float("noise", 0.1, "Label affinities: sd of the correlated noise.")
_TIMEOUT = flags.DEFINE_float("timeout", 600.0, "Per-trial timeout (s) of both kinds.")

QUICK_SHAPE = (16, 64, 64)
QUICK_TRIALS = 2


# -- what the trial children run -------------------------------------------------------------------
#
# Module-level, so they pickle by name; the spawned child finds them by importing this script.
# They call the library's load_state / run_trial unchanged and only add clocks.

_STAGES = {"decode": 0.0, "score": 0.0}


def _clocked(stage: str, fn):
  def wrapper(*args, **kwargs):
    t0 = time.perf_counter()
    try:
      return fn(*args, **kwargs)
    finally:
      _STAGES[stage] += time.perf_counter() - t0

  wrapper.bench_clock = True
  return wrapper


def timed_load(setup):
  """:func:`trials.load_state`, noting when the child got here and how long loading took."""
  entered = time.time()  # wall clock: compared with the parent's
  t0 = time.perf_counter()
  # What load_state imports, imported first so that "load" is reading the data only.
  import ml_collections  # noqa: F401

  import jaxseg.decoding.decode_lib
  import jaxseg.decoding.settings
  import jaxseg.io.datasets
  import jaxseg.io.skeleton  # noqa: F401
  from jaxseg.tuning import trials

  t1 = time.perf_counter()
  state = trials.load_state(setup)
  state["bench"] = {
    "entered": entered,
    "imports_s": t1 - t0,
    "load_s": time.perf_counter() - t1,
    "pid": os.getpid(),
  }
  return state


def timed_trial(state, params):
  """:func:`trials.run_trial` with decode and scoring clocked."""
  from jaxseg.decoding import decode_lib, scoring
  from jaxseg.tuning import trials

  if not getattr(decode_lib.decode_array, "bench_clock", False):
    decode_lib.decode_array = _clocked("decode", decode_lib.decode_array)
    scoring.evaluate_loaded = _clocked("score", scoring.evaluate_loaded)
  _STAGES.update(decode=0.0, score=0.0)
  t0 = time.perf_counter()
  result = trials.run_trial(state, params)
  result["bench"] = {
    **state["bench"],
    "trial_s": time.perf_counter() - t0,
    "decode_s": _STAGES["decode"],
    "score_s": _STAGES["score"],
  }
  return result


# -- data ------------------------------------------------------------------------------------------


def _ints(values) -> tuple[int, ...]:
  return tuple(int(v) for v in values)


def _crop(shape) -> tuple[slice, ...] | None:
  """The centred ``--quick`` crop of a volume of ``shape``, or None."""
  if not _QUICK.value:
    return None
  return tuple(
    slice((n - s) // 2, (n - s) // 2 + s) for s, n in zip(QUICK_SHAPE, shape, strict=True)
  )


def label_affinities(labels: np.ndarray, blur: float, noise: float, seed: int = 0) -> np.ndarray:
  """Degraded affinities of ``labels`` ``[z, y, x]``: ``[3, z, y, x]`` float16, channels +x, +y,
  +z, ``source`` convention (the edge v -> v + e is stored at v; 0 where v + e is outside).

  A boundary map first, so that boundaries are as strong in every orientation (as a net predicts
  them): ``inside`` is 1 on voxels with an id (> 0) whose face neighbours all carry the same
  value, so touching segments get a membrane of 2 voxels and a membrane of id 0 grows by one
  voxel on each side (as in ``benchmarks/decode.py``). ``p`` is ``inside`` blurred (``blur``
  voxels sd in y / x, half in z); an edge's affinity is the lower ``p`` of its two ends, plus
  spatially correlated noise (sd ``noise``; correlation 1.5 voxels in y / x), clipped to [0, 1].
  """
  from scipy import ndimage

  inside = labels > 0
  for axis in range(3):
    lo = [slice(None)] * 3
    hi = [slice(None)] * 3
    lo[axis], hi[axis] = slice(None, -1), slice(1, None)
    differ = labels[tuple(lo)] != labels[tuple(hi)]
    inside[tuple(lo)] &= ~differ
    inside[tuple(hi)] &= ~differ
  p = inside.astype(np.float32)
  if blur > 0:
    p = ndimage.gaussian_filter(p, (blur / 2, blur, blur), mode="nearest")
  rng = np.random.default_rng(seed)
  out = np.zeros((3, *labels.shape), np.float16)
  for channel, axis in enumerate((2, 1, 0)):
    here = [slice(None)] * 3
    there = [slice(None)] * 3
    here[axis], there[axis] = slice(0, -1), slice(1, None)
    edge = np.zeros(labels.shape, np.float32)
    edge[tuple(here)] = np.minimum(p[tuple(here)], p[tuple(there)])
    if noise > 0:
      field = ndimage.gaussian_filter(
        rng.standard_normal(labels.shape, dtype=np.float32), (0.5, 1.5, 1.5), mode="wrap"
      )
      edge[tuple(here)] += (field * (noise / max(float(field.std()), 1e-6)))[tuple(here)]
    out[channel] = np.clip(edge, 0.0, 1.0)
  return out


def write_affinities(path: str, aff: np.ndarray, resolution) -> str:
  """``aff`` as ``jaxseg.predict`` writes a NISB net's prediction (``<name>.zarr/affinities``)."""
  from jaxseg.io import create_zarr

  array = create_zarr(
    path, aff.shape, np.float16, resolution=resolution, attributes=dict(SOURCE_XYZ), overwrite=True
  )
  array.write((0, 0, 0, 0), aff).result()
  return path


def _write_h5(path: str, array: np.ndarray) -> str:
  import h5py

  with h5py.File(path, "w") as f:
    f.create_dataset("stack", data=array, compression="lzf", chunks=True)
  return path


def _read_labels(case: str) -> tuple[np.ndarray, str, str | None, tuple, str] | None:
  """``(labels [z, y, x], labels file, image file or None, resolution nm, what)`` or None."""
  data = Path(_DATA.value)
  if case == "snemi_mini":
    folder = data / "gala_snemi_mini"
    labels, image = folder / "train-labels.tif", folder / "train-probabilities.tif"
    if not labels.exists() or not image.exists():
      return None
    import tifffile

    # No raw image is staged: the probability map stands in (trials never read the image).
    what = "gala SNEMI-mini train labels"
    return tifffile.imread(labels), str(labels), str(image), (30.0, 6.0, 6.0), what
  if case == "gala_fibsem":
    folder = data / "gala_fibsem_example"
    labels, image = folder / "test-gt.lzf.h5", folder / "test-image.h5"
    if not labels.exists() or not image.exists():
      return None
    import h5py

    with h5py.File(labels) as f:
      gt = np.asarray(f["stack"])
    return gt, str(labels), str(image), (10.0, 10.0, 10.0), "gala FIB-SEM test GT"
  if case == "pinky40":
    path = data / "pinky40_autoseg_512" / "connectomics.npy.ckl.gz"
    if not path.exists():
      return None
    import crackle

    xyz = crackle.decompress(gzip.decompress(path.read_bytes()))  # x, y, z
    size = _ints(_PINKY_SIZE.value)
    origin = [(n - s) // 2 for s, n in zip(size, xyz.shape[::-1], strict=True)]
    z, y, x = (slice(o, o + s) for o, s in zip(origin, size, strict=True))
    labels = np.ascontiguousarray(xyz[x, y, z].T)
    what = f"pinky40 automatic segmentation (not GT), centred crop at {tuple(origin)}"
    return labels, "", None, (40.0, 32.0, 32.0), what
  raise ValueError(case)


def labels_case(case: str, work: str) -> dict | str:
  """Writes a label-derived case's affinities; its config, setup pieces and description.

  Returns the reason as a string when the data is absent.
  """
  from jaxseg.common.config_util import load_config
  from jaxseg.inference.cache import CachedAffinities
  from jaxseg.io.datasets import dataset_volumes

  found = _read_labels(case)
  if found is None:
    return f"{case}: its files are not in {_DATA.value}; skipped"
  labels, labels_file, image_file, resolution, what = found
  folder = os.path.join(work, case)
  os.makedirs(folder)
  crop = _crop(labels.shape)
  if crop is not None:
    labels = np.ascontiguousarray(labels[crop])
    what += f", quick crop {tuple(s.start for s in crop)} + {QUICK_SHAPE}"
  # The snemi layout names the volume after its image file: symlinks give it the case's name.
  if crop is None and labels_file:
    labels_name = f"{case}-labels{''.join(Path(labels_file).suffixes)}"
    os.symlink(labels_file, os.path.join(folder, labels_name))
  else:
    labels_name = f"{case}-labels.h5"
    _write_h5(os.path.join(folder, labels_name), labels)
  if crop is None and image_file:
    image_name = f"{case}{''.join(Path(image_file).suffixes)}"
    os.symlink(image_file, os.path.join(folder, image_name))
  else:  # never read by a trial; only its shape and dtype are checked
    image_name = f"{case}.h5"
    _write_h5(os.path.join(folder, image_name), np.zeros(labels.shape, np.uint8))
  aff = label_affinities(labels, _BLUR.value, _NOISE.value)
  affinities = write_affinities(os.path.join(folder, f"{case}.zarr", "affinities"), aff, resolution)
  config = load_config(
    SNEMI,
    {
      "data.root": folder,
      "data.train_image": image_name,
      "data.train_labels": labels_name,
      "data.test_image": image_name,
      "data.test_labels": labels_name,
      "data.val_sections": 0,
      "data.resolution": resolution,
      "decode.convention": "source",
      "tune.cc.objective": "adapted_rand",
    },
  )
  (volume,) = dataset_volumes(config.data, "train")
  volume = volume.windowed()
  ids = np.unique(labels)
  return {
    "config": config,
    "split": "train",
    "cached": [CachedAffinities(name=volume.name, affinities=affinities, volume=volume)],
    "info": {
      "data": what,
      "shape": list(labels.shape),
      "ids": int(ids.size - (1 if ids[0] == 0 else 0)),
      "affinities": f"from the labels, blur {_BLUR.value:g}, noise {_NOISE.value:g}",
      "config": "configs/snemi.py",
    },
  }


def _predicted(folder: str, name: str) -> bool:
  """Whether ``folder`` holds a complete ``jaxseg.predict`` output of volume ``name``."""
  path = os.path.join(folder, f"{name}_predict.json")
  if not os.path.isdir(os.path.join(folder, f"{name}.zarr", "affinities")):
    return False
  try:
    with open(path) as f:
      return bool(json.load(f).get("complete"))
  except (OSError, ValueError):
    return False


def demo_case() -> dict | str:
  """The demo run's cached val predictions, as ``python -m jaxseg.tune`` finds them (read only).

  Returns the reason as a string when they are absent.
  """
  from jaxseg.common.config_util import load_config
  from jaxseg.inference import cache
  from jaxseg.io.datasets import dataset_volumes

  run = _DEMO_RUN.value
  root = os.path.join(run, "predictions")
  config = load_config(DEMO, {"data.root": os.path.join(REPO, "demo_data")})
  split = str(config.tune.split)
  try:
    volumes = [v.windowed() for v in dataset_volumes(config.data, split)]
  except Exception as e:  # the demo data was never generated
    return f"demo: cannot open the demo's {split} volumes ({type(e).__name__}: {e}); skipped"
  key, _ = cache.cache_key(config, run, split)
  folders = [os.path.join(root, key)]
  if os.path.isdir(root):  # a later checkpoint changes the key: any complete val prediction
    for name in sorted(os.listdir(root)):
      path = os.path.join(root, name, cache.CACHE_FILE)
      if name != key and os.path.exists(path):
        with open(path) as f:
          if json.load(f).get("split") == split:
            folders.append(os.path.dirname(path))
  folder = next((f for f in folders if all(_predicted(f, v.name) for v in volumes)), None)
  if folder is None:
    return (
      f"demo: no complete cached {split} predictions under {root} (run python -m jaxseg.run "
      "--config=configs/demo.py --workdir=runs/demo first); skipped"
    )
  cached = []
  for v in volumes:
    mask = os.path.join(folder, f"{v.name}_qc", "mask.zarr")
    use_mask = config.qc.get("enabled", False) and os.path.isdir(mask)
    cached.append(
      cache.CachedAffinities(
        name=v.name,
        affinities=os.path.join(folder, f"{v.name}.zarr", "affinities"),
        volume=v,
        mask=mask if use_mask else None,
      )
    )
  shape = list(volumes[0].spatial_shape)
  return {
    "config": config,
    "split": split,
    "cached": cached,
    "info": {
      "data": f"demo run's cached {split} predictions ({', '.join(c.name for c in cached)})",
      "shape": shape,
      "predictions": folder,
      "mask": [c.mask for c in cached],
      "affinities": "predicted by the demo's trained net",
      "config": "configs/demo.py",
    },
  }


# -- timing ----------------------------------------------------------------------------------------


def trial_params(space, n: int) -> list[dict]:
  """``n`` parameter sets spread over the search space's grid (waterz: ``aff85_his256`` only)."""
  points = space.grid_points()
  if space.decoder == "waterz":
    points = [p for p in points if p["merge_function"] == WATERZ_MERGE]
  picks = np.linspace(0, len(points) - 1, n).round().astype(int)
  return [
    {k: (v if isinstance(v, str) else float(v)) for k, v in points[int(i)].items()} for i in picks
  ]


def _same(a: float, b: float) -> bool:
  return (math.isnan(a) and math.isnan(b)) or a == b


def _median(values) -> float:
  return float(statistics.median(values))


def _mean(values) -> float:
  return float(statistics.fmean(values))


def fresh_trial(setup: dict, params: dict) -> dict:
  """One trial in its own spawned process: start (spawn, imports, load), run, close."""
  from jaxseg.tuning import trials

  t0 = time.perf_counter()
  wall0 = time.time()
  worker = trials.TrialWorker(setup, _TIMEOUT.value, load=timed_load, trial=timed_trial)
  try:
    worker.start()
    t1 = time.perf_counter()
    result = worker.run(params)
    t2 = time.perf_counter()
  finally:
    worker.close()
  t3 = time.perf_counter()
  bench = result["bench"]
  return {
    "value": result["value"],
    "threshold": result["threshold"],
    "total_s": t2 - t0,  # until the result is back; closing is apart
    "start_s": t1 - t0,
    "spawn_s": bench["entered"] - wall0,
    "imports_s": bench["imports_s"],
    "spawn_import_s": bench["entered"] - wall0 + bench["imports_s"],
    "load_s": bench["load_s"],
    "run_s": t2 - t1,
    "decode_s": bench["decode_s"],
    "score_s": bench["score_s"],
    "close_s": t3 - t2,
  }


def worker_trial(worker, params: dict) -> dict:
  t0 = time.perf_counter()
  result = worker.run(params)
  run = time.perf_counter() - t0
  bench = result["bench"]
  return {
    "value": result["value"],
    "threshold": result["threshold"],
    "run_s": run,
    "decode_s": bench["decode_s"],
    "score_s": bench["score_s"],
    "pid": bench["pid"],
    "entered": bench["entered"],
    "imports_s": bench["imports_s"],
    "load_s": bench["load_s"],
  }


def time_decoder(case: dict, decoder: str, n_trials: int) -> dict:
  """Worker and fresh processes, alternating, on the same parameter sets."""
  from jaxseg.decoding import scoring
  from jaxseg.tuning import search, trials, tune_lib

  config = scoring.decoder_config(case["config"], decoder)
  space = search.search_space(config, decoder)
  setup = tune_lib.trial_setup(config, space, case["cached"], case["split"])
  params = trial_params(space, n_trials)
  budget = space.grid_size if space.sampler == "grid" else space.n_trials
  fresh, steady = [], []
  t0 = time.perf_counter()
  wall0 = time.time()
  worker = trials.TrialWorker(setup, _TIMEOUT.value, load=timed_load, trial=timed_trial)
  try:
    worker.start()
    start_s = time.perf_counter() - t0
    for i, p in enumerate(params):
      if i % 2:
        steady.append(worker_trial(worker, p))
        fresh.append(fresh_trial(setup, p))
      else:
        fresh.append(fresh_trial(setup, p))
        steady.append(worker_trial(worker, p))
      w, f = steady[-1], fresh[-1]
      shown = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())
      print(
        f"  {decoder} trial {i + 1}/{len(params)} [{shown}]: {space.objective} {w['value']:.4f} "
        f"(best threshold {w['threshold']:g}); worker {w['run_s']:.3f} s, fresh process "
        f"{f['total_s']:.3f} s",
        flush=True,
      )
    starts = worker.starts
  finally:
    worker.close()
  first = steady[0]
  return {
    "decoder": decoder,
    "objective": space.objective,
    "merge_function": WATERZ_MERGE if decoder == "waterz" else None,
    "thresholds": list(space.thresholds) if decoder == "waterz" else None,
    "params": params,
    "values_match": all(_same(w["value"], f["value"]) for w, f in zip(steady, fresh, strict=True)),
    "one_worker_process": starts == 1 and len({w["pid"] for w in steady}) == 1,
    "worker_start_s": start_s,
    "worker_spawn_import_s": first["entered"] - wall0 + first["imports_s"],
    "worker_load_s": first["load_s"],
    **summarize(steady, fresh, start_s, budget),
    "worker": steady,
    "fresh": fresh,
  }


def _later(trials: list) -> list:
  """The trials after the worker's first (which also pays its lazy imports): compared in pairs."""
  return trials[1:] or trials[:1]


def summarize(steady: list[dict], fresh: list[dict], start_s: float, budget: int) -> dict:
  """Per-trial and per-study comparisons; trial i of both kinds had the same parameters.

  Per trial: medians over the worker's later trials and the fresh processes of the same
  parameters (a waterz trial's time depends on them), their paired difference and ratio. This
  run: every trial, the worker's start included. A study of ``budget`` trials: the means of those
  later trials, ``budget * fresh`` against ``start + first + (budget - 1) * worker``.
  """
  w = [t["run_s"] for t in _later(steady)]
  f = [t["total_s"] for t in _later(fresh)]
  first = steady[0]["run_s"]
  study_fresh = budget * _mean(f)
  study_worker = start_s + first + (budget - 1) * _mean(w)
  run_fresh = sum(t["total_s"] for t in fresh)
  run_worker = start_s + sum(t["run_s"] for t in steady)
  return {
    "worker_first_s": first,
    "worker_trial_s": _median(w),
    "fresh_trial_s": _median(f),
    "extra_s": _median([b - a for a, b in zip(w, f, strict=True)]),
    "ratio": _median([b / a for a, b in zip(w, f, strict=True)]),
    "run_fresh_s": run_fresh,
    "run_worker_s": run_worker,
    "run_ratio": run_fresh / run_worker,
    "study_trials": budget,
    "study_fresh_s": study_fresh,
    "study_worker_s": study_worker,
    "study_ratio": study_fresh / study_worker,
  }


def stage_rows(r: dict) -> list[dict]:
  """Mean seconds per stage over the later trials: in the worker, and in fresh processes."""
  later = _later(r["worker"])
  w = {k: _mean([t[k] for t in later]) for k in ("run_s", "decode_s", "score_s")}
  stages = ("total_s", "spawn_import_s", "load_s", "decode_s", "score_s", "close_s")
  f = {k: _mean([t[k] for t in _later(r["fresh"])]) for k in stages}
  return [
    {
      "kind": "worker (later trials)",
      "spawn_import_s": None,
      "load_s": None,
      "decode_s": w["decode_s"],
      "score_s": w["score_s"],
      "rest_s": w["run_s"] - w["decode_s"] - w["score_s"],
      "total_s": w["run_s"],
      "close_s": None,
    },
    {
      "kind": "fresh process",
      "spawn_import_s": f["spawn_import_s"],
      "load_s": f["load_s"],
      "decode_s": f["decode_s"],
      "score_s": f["score_s"],
      "rest_s": f["total_s"] - f["spawn_import_s"] - f["load_s"] - f["decode_s"] - f["score_s"],
      "total_s": f["total_s"],
      "close_s": f["close_s"],
    },
  ]


# -- main ------------------------------------------------------------------------------------------


def machine_info() -> dict:
  """CPU count, memory, load, versions, numba threads, date."""
  return {
    **_machine.host_info(),
    **_machine.numba_info(),
    "optuna": _machine.package_version("optuna"),
    "waterz": _machine.package_version("waterz"),
    "dont_write_bytecode": bool(sys.dont_write_bytecode),
    "quick": _QUICK.value,
  }


def _s(value: float | None, once: bool = False) -> str:
  if value is None:
    return "-"
  return f"(once) {value:.2f}" if once else f"{value:.3f}"


def print_tables(results: dict) -> None:
  cases = results["cases"]
  print("\n### per-trial wall time: one worker process vs a fresh process per trial\n")
  print("| data (z, y, x) | decoder | objective | trials | worker start s | worker 1st trial s "
        "| worker later trials s | fresh process, same trials s | extra per trial s "
        "| fresh / worker per trial | this run: fresh / worker | study of B trials: fresh / worker "
        "|")  # fmt: skip
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for name, case in cases.items():
    for decoder, r in case["decoders"].items():
      what = (
        decoder if decoder == "cc" else f"waterz {r['merge_function']}, {len(r['thresholds'])} thr"
      )
      print(
        f"| {name} {tuple(case['shape'])} | {what} | {r['objective']} | {len(r['worker'])} "
        f"| {r['worker_start_s']:.2f} | {r['worker_first_s']:.3f} | {r['worker_trial_s']:.3f} "
        f"| {r['fresh_trial_s']:.3f} | {r['extra_s']:.3f} | **{r['ratio']:.1f}x** "
        f"| {r['run_fresh_s']:.1f} s / {r['run_worker_s']:.1f} s = {r['run_ratio']:.2f}x "
        f"| B={r['study_trials']}: {r['study_fresh_s']:.1f} s / {r['study_worker_s']:.1f} s = "
        f"**{r['study_ratio']:.2f}x** |"
      )
  print(
    "\nlater trials: the 2nd to the last, medians; extra and fresh / worker are medians of the "
    "pairs (same parameters). worker start = spawn + imports + load_state, once per study. This "
    "run: all trials, worker start included. Study: B x mean fresh against start + 1st + "
    "(B - 1) x mean worker (later trials)."
  )
  print("\n### one trial by stage (mean s)\n")
  print("| data | decoder | kind | process start + imports | load data | decode | score | rest "
        "| per trial | then closing the process |")  # fmt: skip
  print("|---|---|---|---|---|---|---|---|---|---|")
  for name, case in cases.items():
    for decoder, r in case["decoders"].items():
      for row in stage_rows(r):
        worker = row["kind"].startswith("worker")
        spawn = r["worker_spawn_import_s"] if worker else row["spawn_import_s"]
        load = r["worker_load_s"] if worker else row["load_s"]
        print(
          f"| {name} | {decoder} | {row['kind']} | {_s(spawn, worker)} | {_s(load, worker)} "
          f"| {row['decode_s']:.3f} | {row['score_s']:.3f} | {row['rest_s']:.3f} "
          f"| {row['total_s']:.3f} | {_s(row['close_s'])} |"
        )
  print(
    "\nrest: the pipe round trips and run_trial's bookkeeping. A fresh process's trial counts "
    "until its result is back; closing it (TrialWorker.close: 0.2 s grace, then kill) is not "
    "counted in any ratio."
  )
  checks = [
    f"{name}/{d}: values match {r['values_match']}, one worker process {r['one_worker_process']}"
    for name, case in cases.items()
    for d, r in case["decoders"].items()
  ]
  if checks:
    print("checks: " + "; ".join(checks))
  for reason in results["skipped"].values():
    print(f"skipped: {reason}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for values, known, what in (
    (_CASES.value, CASES, "cases"),
    (_DECODERS.value, DECODERS, "decoders"),
  ):
    unknown = sorted(set(values) - set(known))
    if unknown:
      raise app.UsageError(f"unknown {what} {unknown}; choose from {', '.join(known)}")
  cases = list(_CASES.value)
  if _QUICK.value and not flags.FLAGS["cases"].present:
    cases = list(QUICK_CASES)
  n_trials = QUICK_TRIALS if _QUICK.value else _TRIALS.value
  if n_trials < 2:
    raise app.UsageError("--trials must be >= 2 (the worker's first trial is reported apart)")
  info = machine_info()
  print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
  results = {"machine": info, "trials": n_trials, "cases": {}, "skipped": {}}
  work = tempfile.mkdtemp(prefix="jaxseg_tune_bench_")
  try:
    for name in cases:
      case = demo_case() if name == "demo" else labels_case(name, work)
      if isinstance(case, str):
        print(case)
        results["skipped"][name] = case
        continue
      info = case["info"]
      print(f"\n{name}: {info['data']}, {tuple(info['shape'])}; affinities {info['affinities']}")
      out = {**info, "decoders": {}}
      for decoder in _DECODERS.value:
        out["decoders"][decoder] = time_decoder(case, decoder, n_trials)
      results["cases"][name] = out
  finally:
    shutil.rmtree(work, ignore_errors=True)
  print_tables(results)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(results, f, indent=1)
    print(f"\nwrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
