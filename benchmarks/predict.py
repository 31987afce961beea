r"""Inference benchmarks: window plans, host memory against volume size, streaming overhead, GPU.

Cases (each prints a markdown table; ``--output`` saves all numbers as one JSON document):

* ``plan``: no model, the plan alone: windows of the volume, windows computed, model calls, for
  the demo setting and a NISB-shaped one (``--plan_volume``, 128^3 windows at overlap 0.5 in
  512^3 blocks, batch 8), beside what predicting every block on its own (each window once per
  block it touches, a partly empty last batch per block) would run. Goal: computed / windows
  <= 1.02 and model calls = ceil(windows / batch).
* ``memory``: peak host RSS of a child process predicting a volume V and a volume 8V (2x per
  axis) with the same block shape and a tiny RSUNet on CPU. Goal: 8V within 1.25x of V, because
  the streamer holds a few blocks, never the volume. Each child resets its RSS high-water mark
  after start-up (``/proc/self/clear_refs``), so the peak of the prediction itself is reported
  beside the process peak, and samples its RSS on a thread (the highest value in each quarter of
  the run shows whether memory keeps climbing with the blocks done).
* ``overhead``: with the same tiny net on CPU, ``predict_volumes`` wall time (after a warm-up run
  in the same process) against pure model time: the same number of model calls with the same
  batch shape (``[sw_batch_size, *window, 1]`` float32) through the jitted ``apply``, dispatched
  one after the other as the engine's steps are. Each repetition times both back to back and the
  median ratio is reported (other processes may share the CPU). ``predict_volumes`` traces its
  engine again on every call; with ``--compilation_cache`` (the default, as the entry points
  run) XLA's executables come from the persistent cache the warm-up filled. The tracing and
  compile seconds inside each timed run are measured (``jax.monitoring``) and the overhead is
  given with and without them. Also reported: windows, windows computed, model calls, and a
  serial breakdown of one pass: hull read, normalisation, engine (hulls to the device, window
  cutting and packing, model, blending, folds and carries, finalize) against the bare model,
  copy back, write. Goal: total / model - 1 <= 20%.
* ``snemi`` (GPU): a SNEMI3D-sized volume (100 x 1024 x 1024 uint8) with the SNEMI RSUNet preset
  (``configs/snemi.py``, random weights, bf16 compute as configured): seconds, windows/s and
  compile time. Goal: under 10 s.
* ``mednext`` (GPU): MedNeXt-L (``configs/nisb_base.py``) on 128^3 windows: model voxels/s on
  ``[sw_batch_size, 128, 128, 128, 1]`` batches, and end to end on a 256 x 512 x 512 volume.

The CPU cases run in child processes of this script (``JAX_PLATFORMS=cpu``) so their memory and
compile caches are their own; the GPU cases run in this process (a first run that compiles, then
two timed runs). Usage::

  .venv/bin/python benchmarks/predict.py --output=/tmp/predict.json    # plan, memory, overhead
  python benchmarks/predict.py --gpu --cases= --output=gpu.json         # snemi, mednext only
  .venv/bin/python benchmarks/predict.py --cases= --gpu_smoke          # GPU code, tiny shapes

Shapes are ``(z, y, x)``; input images are random uint8 zarr ``[1, z, y, x]`` written to a
temporary folder (``/dev/shm`` for the GPU cases when it has room, so the outputs are written to
memory too); outputs are the library's affinity zarrs.
"""

from __future__ import annotations

import functools
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from a checkout: configs/ and jaxseg/ importable

from jaxseg.common.config_util import load_sibling  # noqa: E402

_memory = load_sibling(__file__, "memory_probe")
_machine = load_sibling(__file__, "machine")

DEMO = os.path.join(REPO, "configs", "demo.py")
SNEMI = os.path.join(REPO, "configs", "snemi.py")
NISB = os.path.join(REPO, "configs", "nisb_base.py")
CPU_CASES = ("plan", "memory", "overhead")

_CASES = flags.DEFINE_list("cases", list(CPU_CASES), f"CPU cases to run: {', '.join(CPU_CASES)}.")
_GPU = flags.DEFINE_bool(
  "gpu", None, "Run the GPU cases (snemi, mednext); default: when JAX's backend is 'gpu'."
)
_GPU_SMOKE = flags.DEFINE_bool(
  "gpu_smoke", False, "Run the GPU cases with tiny shapes on any backend (checks the code path)."
)
_OUTPUT = flags.DEFINE_string("output", "", "Write all results as one JSON document here.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "overhead: timed repetitions (median).")
_WIDTHS = flags.DEFINE_list("widths", ["4", "8"], "RSUNet widths of the tiny CPU net.")
_MEM_VOLUME = flags.DEFINE_list("mem_volume", ["64", "192", "192"], "memory: volume V (z,y,x).")
_MEM_BLOCK = flags.DEFINE_list("mem_block", ["32", "64", "64"], "memory: block shape.")
_MEM_WINDOW = flags.DEFINE_list("mem_window", ["16", "32", "32"], "memory: window.")
_MEM_OVERLAP = flags.DEFINE_float("mem_overlap", 0.25, "memory: window overlap.")
_OH_VOLUME = flags.DEFINE_list("oh_volume", ["64", "192", "192"], "overhead: volume (z,y,x).")
_OH_BLOCK = flags.DEFINE_list("oh_block", ["64", "96", "96"], "overhead: block (demo's).")
_OH_WINDOW = flags.DEFINE_list("oh_window", ["32", "64", "64"], "overhead: window (demo's).")
_OH_OVERLAP = flags.DEFINE_float("oh_overlap", 0.5, "overhead: window overlap (demo's).")
_OH_BATCH = flags.DEFINE_integer("oh_batch", 4, "overhead: sw_batch_size (demo's).")
_BREAKDOWN = flags.DEFINE_bool("breakdown", True, "overhead: also time each stage serially.")
_SNEMI_VOLUME = flags.DEFINE_list("snemi_volume", ["100", "1024", "1024"], "snemi: volume.")
_MEDNEXT_VOLUME = flags.DEFINE_list("mednext_volume", ["256", "512", "512"], "mednext: volume.")
_MEDNEXT_CALLS = flags.DEFINE_integer("mednext_calls", 8, "mednext: timed model-only calls.")
_PLAN_VOLUME = flags.DEFINE_list("plan_volume", ["1024", "1024", "1024"], "plan: NISB volume.")
_CACHE = flags.DEFINE_bool(
  "compilation_cache", True, "CPU children: JAX's persistent compilation cache (a fresh folder)."
)
_CHILD = flags.DEFINE_string("child", "", "Internal: run one CPU case from this JSON spec file.")

MB = 1024 * 1024
GOAL_RSS_RATIO = 1.25
GOAL_OVERHEAD = 0.20
GOAL_SNEMI_S = 10.0
GOAL_REDUNDANCY = 1.02


def _ints(values) -> tuple[int, ...]:
  return tuple(int(v) for v in values)


def _median(values) -> float:
  return float(statistics.median(values))


# -- helpers shared by all cases ------------------------------------------------------------------


def write_image(path: str, shape, seed: int = 0) -> str:
  """Writes a random uint8 image ``[1, z, y, x]`` as a chunked zarr, slab by slab along z."""
  from jaxseg.io import create_zarr

  z, y, x = shape
  chunks = (1, min(z, 32), min(y, 256), min(x, 256))
  volume = create_zarr(path, (1, z, y, x), np.uint8, chunks=chunks)
  rng = np.random.default_rng(seed)
  for z0 in range(0, z, chunks[1]):
    depth = min(chunks[1], z - z0)
    volume.write((0, z0, 0, 0), rng.integers(0, 256, (1, depth, y, x), dtype=np.uint8))
  volume.flush()
  return path


def window_counts(config, volume_shape) -> dict:
  """The volume's windows, the windows the planned tasks compute and the model calls they take.

  ``windows_per_block`` is what a streamer that predicts every block on its own would run (each
  window once per block it touches): the scheme before windows were owned by one block.
  """
  from jaxseg.inference.schedule import plan_tasks
  from jaxseg.inference.settings import inference_settings

  s = inference_settings(config)
  g = s.plan(volume_shape)
  tasks = plan_tasks(g, np.zeros(g.grid, bool))
  computed = sum(t.num_windows for t in tasks)
  per_block = []  # windows touching each block
  for block in g.blocks():
    count = 1
    for axis in range(3):
      lo, hi = g.useful[axis]
      starts = g.starts[axis][lo:hi]
      p0, p1 = block.region_start[axis], block.region_stop[axis]
      count *= int(np.sum((starts < p1) & (starts + g.window[axis] > p0)))
    per_block.append(count)
  return {
    "volume": list(volume_shape),
    "window": list(s.window),
    "stride": list(g.stride),
    "block": list(g.block_shape),
    "frame_shape": list(g.frame_shape),
    "carry_shape": list(g.carry_shape),
    "batch": s.batch_size,
    "blocks": g.num_blocks,
    "windows": g.num_windows,
    "windows_computed": computed,
    "redundancy": computed / g.num_windows,
    "model_calls": math.ceil(computed / s.batch_size),
    "model_calls_min": math.ceil(g.num_windows / s.batch_size),
    "windows_per_block": sum(per_block),
    "model_calls_per_block": sum(math.ceil(n / s.batch_size) for n in per_block),
  }


class CompileClock:
  """Sums JAX's tracing, lowering and XLA compile durations while active (``jax.monitoring``)."""

  def __init__(self):
    self.seconds = 0.0

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    del kwargs
    if event.startswith("/jax/core/compile/"):
      self.seconds += float(duration)

  def __enter__(self):
    import jax

    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc):
    import jax

    jax.monitoring.unregister_event_duration_listener(self._listen)


def timed_predict(config, apply, variables, image: str, out_dir: str) -> dict:
  """One ``predict_volumes`` call: wall and process CPU seconds, compile seconds inside it."""
  from jaxseg.inference import predict_lib

  sources = predict_lib.resolve_inputs(config, [image])
  with CompileClock() as clock:
    t0, c0 = time.perf_counter(), time.process_time()
    (summary,) = predict_lib.predict_volumes(
      config, apply, variables, sources, out_dir, num_devices=1, show_progress=False
    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  if not summary["complete"]:
    raise RuntimeError(f"prediction of {image} did not complete: {summary}")
  return {"wall": wall, "cpu": cpu, "compile": clock.seconds, "summary": summary}


class ModelTimer:
  """Times jitted ``apply`` calls on one float32 ``batch_shape`` input, one after the other.

  Calls are dispatched asynchronously, as the engine dispatches its steps, and each call's input
  depends on the previous call's output (``x + 0 * previous``), so they run in sequence as the
  engine's steps do (each adds into the accumulator the previous one returned) without the host
  waiting for each.
  """

  def __init__(self, apply, variables, batch_shape):
    import jax

    def chained(variables, x, previous):
      logits = apply(variables, x + previous)
      return logits, logits[0, 0, 0, 0, 0] * 0.0

    self._fn = jax.jit(chained)
    self._variables = variables
    self._x = jax.device_put(np.random.default_rng(0).random(batch_shape, dtype=np.float32))
    self._zero = jax.device_put(np.float32(0.0))
    jax.block_until_ready(self._fn(variables, self._x, self._zero))  # compile

  def __call__(self, calls: int) -> tuple[float, float]:
    """``calls`` calls: (wall seconds, process CPU seconds)."""
    import jax

    t0, c0 = time.perf_counter(), time.process_time()
    previous = self._zero
    logits = None
    for _ in range(calls):
      logits, previous = self._fn(self._variables, self._x, previous)
    jax.block_until_ready(logits)
    return time.perf_counter() - t0, time.process_time() - c0


def tiny_config(overrides: dict):
  """``configs/demo.py`` with a tiny float32 RSUNet (``overrides["widths"]``) and ``overrides``."""
  from jaxseg.common.config_util import load_config

  widths = _ints(overrides.pop("widths"))
  base = {"model.widths": widths, "model.norm_groups": 2, "model.compute_dtype": "float32"}
  return load_config(DEMO, {**base, **overrides})


def build_apply(config):
  """``(apply, variables)`` of ``config.model`` with random weights (seed 0)."""
  from flax import nnx

  from jaxseg.inference import engine as engine_lib
  from jaxseg.models import build_model

  return engine_lib.model_apply(build_model(config.model, rngs=nnx.Rngs(0)))


def _peak_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# -- child processes (CPU cases) ------------------------------------------------------------------


def child_memory(spec: dict) -> dict:
  """Predicts one volume once; RSS before, peak of the prediction, peak of the process."""
  config = tiny_config(dict(spec["overrides"]))
  apply, variables = build_apply(config)
  import jax

  jax.block_until_ready(variables)
  before = _memory.status_mb("VmRSS")
  startup_peak = _peak_mb()
  reset = _memory.reset_peak()
  with _memory.RssSampler() as sampler:
    run = timed_predict(config, apply, variables, spec["image"], spec["out_dir"])
  predict_peak = _peak_mb()
  summary = run["summary"]
  return {
    "rss_quarters_mb": sampler.quarters(),
    "rss_before_mb": before,
    "startup_peak_mb": startup_peak,
    "predict_peak_mb": predict_peak if reset else None,
    "process_peak_mb": max(startup_peak, predict_peak),
    "peak_reset": reset,
    "seconds": run["wall"],
    "compile_s": run["compile"],
    **window_counts(config, spec["volume"]),
    "output_mb": float(np.prod(summary["shape"])) * np.dtype(summary["dtype"]).itemsize / MB,
  }


def child_overhead(spec: dict) -> dict:
  """Warm-up, then ``repeats`` x (timed predict into a fresh output, timed model-only calls).

  The two timings of a repetition run back to back, so their ratio compares work done under the
  same load from other processes; the median over repetitions is reported.
  """
  config = tiny_config(dict(spec["overrides"]))
  apply, variables = build_apply(config)
  counts = window_counts(config, spec["volume"])
  work = spec["out_dir"]
  warm = timed_predict(config, apply, variables, spec["image"], f"{work}/w")
  timer = ModelTimer(apply, variables, (counts["batch"], *counts["window"], 1))
  runs = []
  for r in range(spec["repeats"]):
    run = timed_predict(config, apply, variables, spec["image"], f"{work}/run{r}")
    shutil.rmtree(f"{work}/run{r}")
    run["model_wall"], run["model_cpu"] = timer(counts["model_calls"])
    run.pop("summary")
    runs.append(run)
  calls, minimal = counts["model_calls"], counts["model_calls_min"]

  def median(fn):
    return _median([fn(r) for r in runs])

  model_call_s = median(lambda r: r["model_wall"] / calls)
  result = {
    **counts,
    "voxels": int(np.prod(spec["volume"])),
    "warmup_s": warm["wall"],
    "warmup_compile_s": warm["compile"],
    "runs": runs,
    "total_s": median(lambda r: r["wall"]),
    "compile_in_run_s": median(lambda r: r["compile"]),
    "model_s": median(lambda r: r["model_wall"]),
    "model_call_s": model_call_s,
    "overhead": median(lambda r: r["wall"] / r["model_wall"]) - 1.0,
    "overhead_no_compile": median(lambda r: (r["wall"] - r["compile"]) / r["model_wall"]) - 1.0,
    "overhead_cpu_time": median(lambda r: r["cpu"] / r["model_cpu"]) - 1.0,
    # Against the volume's own windows, each run once in full batches (what the plan runs,
    # unless it computes halos).
    "overhead_vs_volume_windows": median(lambda r: r["wall"] * calls / (r["model_wall"] * minimal))
    - 1.0,
    "overhead_vs_volume_windows_no_compile": median(
      lambda r: (r["wall"] - r["compile"]) * calls / (r["model_wall"] * minimal)
    )
    - 1.0,
  }
  if spec["breakdown"]:
    result["breakdown"] = breakdown(config, apply, variables, spec["image"], work, timer)
  return result


def breakdown(config, apply, variables, image: str, work: str, timer: ModelTimer) -> dict:
  """One serial pass over every task, each stage timed on its own (nothing overlaps).

  Uses the library's pieces in the order ``predict_lib`` runs them: read every task's padded
  hull and normalise it into the zero-filled hull-shaped array; run the engine (hulls to the
  device, windows cut and packed into batches, model, blending, the folds and carries, finalize)
  and wait for every output; copy the blocks and carries back; write them (blocks, completion
  markers, carry files). The pass runs twice; the second is timed (the first compiles).
  """
  import jax

  from jaxseg.data.normalize import normalize_image
  from jaxseg.inference import engine as engine_lib
  from jaxseg.inference import predict_lib, tta
  from jaxseg.inference.geometry import read_padded
  from jaxseg.inference.schedule import plan_tasks, task_layout
  from jaxseg.inference.settings import inference_settings
  from jaxseg.io import block_chunks, create_zarr
  from jaxseg.training import sharding as sharding_lib

  s = inference_settings(config)
  (source,) = predict_lib.resolve_inputs(config, [image])
  volume = source.volume
  g = s.plan(volume.spatial_shape)
  engine = engine_lib.WindowEngine(
    apply, variables, s, (tta.IDENTITY,), sharding_lib.create_sharding(1, local=True)
  )
  channels = len(s.output_channels)
  out = create_zarr(
    f"{work}/breakdown.zarr/affinities",
    (channels, *g.output_shape),
    s.output_dtype,
    chunks=(channels, *block_chunks(g.block_shape)),
  )
  done = create_zarr(f"{work}/breakdown.zarr/done", g.grid, np.uint8, chunks=(1, 1, 1))
  os.makedirs(f"{work}/breakdown.zarr/scratch", exist_ok=True)
  tasks = plan_tasks(g, np.zeros(g.grid, bool))
  stages = {}
  for _ in range(2):  # the first pass compiles
    t = [time.perf_counter()]
    raws = []
    for task in tasks:
      lay = task_layout(g, task)
      raws.append(read_padded(volume, lay.hull_start, lay.hull_stop, g.pad, s.pad_mode))
    t.append(time.perf_counter())
    hulls = []
    for raw in raws:
      values = normalize_image(raw, config.data, None)
      hull = np.zeros((*g.hull_shape, values.shape[0]), np.float32)
      hz, hy, hx = values.shape[1:]
      hull[:hz, :hy, :hx] = np.moveaxis(values, 0, -1)
      hulls.append(hull)
    t.append(time.perf_counter())
    finished = []
    carries = {}

    def keep(f, carries=carries, finished=finished):
      finished.append(f)
      carries.update({f.task.y_out: f.y_out, f.task.z_out: f.z_out})

    def carries_of(task, carries=carries):
      return carries.get(task.y_in), carries.get(task.z_in)

    stream = engine.stream(g, 1, keep)
    for task, hull in zip(tasks, hulls, strict=True):
      stream.push(task, hull, functools.partial(carries_of, task))
    stream.close()
    jax.block_until_ready([[f.block, f.y_out, f.z_out] for f in finished])
    t.append(time.perf_counter())
    host = [(f.task, *(None if a is None else np.asarray(a) for a in f[1:])) for f in finished]
    t.append(time.perf_counter())
    for task, block, y_out, z_out in host:
      b = task.block
      size = [e - a for a, e in zip(b.out_start, b.out_stop, strict=True)]
      out.write((0, *b.out_start), block[:, : size[0], : size[1], : size[2]]).result()
      done.write(tuple(b.index), np.ones((1, 1, 1), np.uint8)).result()
      for key, array in ((task.y_out, y_out), (task.z_out, z_out)):
        if key is not None:
          np.save(f"{work}/breakdown.zarr/scratch/{key}.npy", array)
    t.append(time.perf_counter())
    names = ("read", "normalise", "engine", "fetch", "write")
    stages = {name: b - a for name, a, b in zip(names, t[:-1], t[1:], strict=True)}
  # The same calls of the bare model, right after the engine's (under the same load).
  stages["model_only"] = timer(stream.model_calls)[0]
  stages["engine_beyond_model"] = stages["engine"] - stages["model_only"]
  stages["serial_total"] = sum(stages[k] for k in names)
  return stages


def run_child(case: str, spec: dict, work: str) -> dict:
  """Runs one CPU case in a fresh ``JAX_PLATFORMS=cpu`` process of this script."""
  spec = {**spec, "case": case, "result": os.path.join(work, f"{case}_{time.time_ns()}.json")}
  spec_path = spec["result"] + ".spec"
  if _CACHE.value:
    spec["compilation_cache"] = os.path.join(work, f"xla_cache_{case}")
  with open(spec_path, "w") as f:
    json.dump(spec, f)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  command = [sys.executable, os.path.abspath(__file__), f"--child={spec_path}"]
  done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
  if done.returncode != 0:
    raise RuntimeError(f"{case} child failed ({done.returncode}):\n{done.stderr[-4000:]}")
  with open(spec["result"]) as f:
    return json.load(f)


# -- the CPU cases --------------------------------------------------------------------------------


def memory_case(work: str) -> dict:
  """V and 8V, each predicted in its own child process; prints the table."""
  small = _ints(_MEM_VOLUME.value)
  large = tuple(2 * n for n in small)
  overrides = {
    "widths": _WIDTHS.value,
    "infer.window": _ints(_MEM_WINDOW.value),
    "infer.overlap": _MEM_OVERLAP.value,
    "infer.block_shape": _ints(_MEM_BLOCK.value),
  }
  rows = {}
  for name, shape in (("V", small), ("8V", large)):
    image = write_image(os.path.join(work, f"mem_{name}.zarr"), shape)
    spec = {"overrides": overrides, "image": image, "volume": shape, "out_dir": f"{work}/m{name}"}
    rows[name] = run_child("memory", spec, work)
    shutil.rmtree(spec["out_dir"])
  v, v8 = rows["V"], rows["8V"]
  result = {
    "V": v,
    "8V": v8,
    "process_peak_ratio": v8["process_peak_mb"] / v["process_peak_mb"],
    "goal_ratio": GOAL_RSS_RATIO,
  }
  if v["predict_peak_mb"] and v8["predict_peak_mb"]:
    result["predict_peak_ratio"] = v8["predict_peak_mb"] / v["predict_peak_mb"]
    result["predict_growth_ratio"] = (v8["predict_peak_mb"] - v8["rss_before_mb"]) / max(
      1e-9, v["predict_peak_mb"] - v["rss_before_mb"]
    )
  print("\n### memory: peak host RSS, tiny RSUNet on CPU, same block shape\n")
  print("| volume | voxels | blocks | windows (computed) | RSS before | predict peak "
        "| process peak "
        "| output size | s |")  # fmt: skip
  print("|---|---|---|---|---|---|---|---|---|")
  for name, r in rows.items():
    peak = f"{r['predict_peak_mb']:.0f} MB" if r["predict_peak_mb"] else "-"
    print(
      f"| {name} {tuple(r['volume'])} | {np.prod(r['volume']) / 1e6:.1f} M | {r['blocks']} "
      f"| {r['windows']} ({r['windows_computed']}) | {r['rss_before_mb']:.0f} MB | {peak} "
      f"| {r['process_peak_mb']:.0f} MB | {r['output_mb']:.0f} MB | {r['seconds']:.1f} |"
    )
  for name, r in rows.items():
    quarters = ", ".join(f"{q:.0f}" for q in r["rss_quarters_mb"])
    print(
      f"{name}: frame {tuple(r['frame_shape'])}, carries {tuple(r['carry_shape'])}; highest RSS "
      f"in each quarter of the "
      f"prediction time: {quarters} MB"
    )
  line = f"8V / V process peak = {result['process_peak_ratio']:.3f} (goal <= {GOAL_RSS_RATIO})"
  if "predict_peak_ratio" in result:
    line += (
      f"; prediction peak ratio {result['predict_peak_ratio']:.3f}, growth over the RSS before "
      f"predicting {result['predict_growth_ratio']:.3f}"
    )
  print(line)
  return result


def plan_case() -> dict:
  """Windows, windows computed and model calls of the demo and NISB-shaped plans (no model)."""
  from jaxseg.common.config_util import load_config

  cases = {
    "demo": (load_config(DEMO), _ints(_OH_VOLUME.value)),
    "nisb": (load_config(NISB, {"infer.block_shape": (512, 512, 512)}), _ints(_PLAN_VOLUME.value)),
  }
  rows = {name: window_counts(config, volume) for name, (config, volume) in cases.items()}
  print("\n### plan: each window computed once, batches filled (no model run)\n")
  print("| setting | volume | window, stride | block | batch | windows | computed | model calls "
        "| block by block: windows, calls |")  # fmt: skip
  print("|---|---|---|---|---|---|---|---|---|")
  for name, r in rows.items():
    print(
      f"| {name} | {tuple(r['volume'])} | {tuple(r['window'])}, {tuple(r['stride'])} "
      f"| {tuple(r['block'])} | {r['batch']} | {r['windows']} | {r['windows_computed']} "
      f"({r['redundancy']:.3f}x) | {r['model_calls']} (min {r['model_calls_min']}) "
      f"| {r['windows_per_block']} ({r['windows_per_block'] / r['windows']:.2f}x), "
      f"{r['model_calls_per_block']} |"
    )
    r["goal_met"] = r["redundancy"] <= GOAL_REDUNDANCY and r["model_calls"] == r["model_calls_min"]
  print(f"goal: computed / windows <= {GOAL_REDUNDANCY}, model calls = ceil(windows / batch)")
  return rows


def overhead_case(work: str) -> dict:
  """The overhead child; prints the table and the breakdown."""
  volume = _ints(_OH_VOLUME.value)
  overrides = {
    "widths": _WIDTHS.value,
    "infer.window": _ints(_OH_WINDOW.value),
    "infer.overlap": _OH_OVERLAP.value,
    "infer.block_shape": _ints(_OH_BLOCK.value),
    "infer.sw_batch_size": _OH_BATCH.value,
  }
  image = write_image(os.path.join(work, "overhead.zarr"), volume)
  spec = {
    "overrides": overrides,
    "image": image,
    "volume": volume,
    "out_dir": f"{work}/oh",
    "repeats": _REPEATS.value,
    "breakdown": _BREAKDOWN.value,
  }
  r = run_child("overhead", spec, work)
  print("\n### overhead: predict_volumes vs pure model time, tiny RSUNet on CPU\n")
  print(
    f"volume {tuple(r['volume'])}, block {tuple(r['block'])}, window {tuple(r['window'])}, "
    f"stride {tuple(r['stride'])}, sw_batch_size {r['batch']}: {r['blocks']} blocks, "
    f"{r['windows']} windows, {r['windows_computed']} computed ({r['redundancy']:.2f}x) in "
    f"{r['model_calls']} model calls (the volume's windows in full batches: "
    f"{r['model_calls_min']}; block by block it was {r['windows_per_block']} windows in "
    f"{r['model_calls_per_block']} calls)\n"
  )
  print("| what | median of runs |")
  print("|---|---|")
  rows = [
    ("predict_volumes wall s", f"{r['total_s']:.2f}"),
    ("of which tracing + compiling s", f"{r['compile_in_run_s']:.2f}"),
    (f"model only, {r['model_calls']} calls, wall s", f"{r['model_s']:.2f}"),
    ("overhead = total / model - 1", f"**{100 * r['overhead']:.1f}%**"),
    ("overhead without the compilation", f"{100 * r['overhead_no_compile']:.1f}%"),
    ("overhead in process CPU time", f"{100 * r['overhead_cpu_time']:.1f}%"),
    (
      f"over the volume's windows ({r['model_calls_min']} calls)",
      f"{100 * r['overhead_vs_volume_windows']:.1f}% "
      f"({100 * r['overhead_vs_volume_windows_no_compile']:.1f}% without compilation)",
    ),
  ]
  for name, value in rows:
    print(f"| {name} | {value} |")
  print(
    f"goal: overhead <= {100 * GOAL_OVERHEAD:.0f}%. Runs (wall s, compile s, model s): "
    + ", ".join(f"({x['wall']:.2f}, {x['compile']:.2f}, {x['model_wall']:.2f})" for x in r["runs"])
  )
  if "breakdown" in r:
    b = r["breakdown"]
    print("\nserial breakdown of one pass (s): " + ", ".join(f"{k} {v:.2f}" for k, v in b.items()))
  return r


# -- the GPU cases --------------------------------------------------------------------------------


def fast_dir(need_bytes: int) -> str:
  """A temporary folder on tmpfs (``/dev/shm``) when it has room, else the default temp dir."""
  shm = "/dev/shm"
  if os.path.isdir(shm) and shutil.disk_usage(shm).free > 1.5 * need_bytes:
    return tempfile.mkdtemp(prefix="jaxseg_bench_", dir=shm)
  return tempfile.mkdtemp(prefix="jaxseg_bench_")


def _gpu_predict(name: str, config, volume, model_batches: int, repeats: int) -> dict:
  """Random-weight model: a first prediction (compiles), ``repeats`` timed ones, model-only calls.

  Every ``predict_volumes`` call traces and compiles its engine again; the compile seconds inside
  each timed run are measured (``CompileClock``) and reported beside the wall time.
  """
  import jax

  from jaxseg.inference.settings import inference_settings

  s = inference_settings(config)
  t0 = time.perf_counter()
  apply, variables = build_apply(config)
  jax.block_until_ready(variables)
  build_s = time.perf_counter() - t0
  counts = window_counts(config, volume)
  out_bytes = int(np.prod(volume)) * len(s.output_channels) * np.dtype(s.output_dtype).itemsize
  work = fast_dir(int(np.prod(volume)) + 2 * out_bytes)
  runs = []
  try:
    image = write_image(os.path.join(work, "image.zarr"), volume)
    first = timed_predict(config, apply, variables, image, f"{work}/first")
    shutil.rmtree(f"{work}/first")
    for r in range(repeats):
      runs.append(timed_predict(config, apply, variables, image, f"{work}/run{r}"))
      shutil.rmtree(f"{work}/run{r}")
  finally:
    shutil.rmtree(work, ignore_errors=True)
  # float32 windows, as the engine feeds them (the model casts to its compute dtype itself).
  batch = (s.batch_size, *s.window, 1)
  model_s, _ = ModelTimer(apply, variables, batch)(model_batches)
  per_call = model_s / model_batches
  seconds = _median([r["wall"] for r in runs])
  compile_s = _median([r["compile"] for r in runs])
  window_voxels = int(np.prod(s.window))
  device = jax.devices()[0]
  stats = device.memory_stats() if device.platform == "gpu" else None
  return {
    "case": name,
    "device": device.device_kind,
    **counts,
    "build_s": build_s,
    "first_run_s": first["wall"],
    "compile_s": first["compile"],
    "seconds": seconds,
    "runs_s": [r["wall"] for r in runs],
    "compile_in_run_s": compile_s,
    "seconds_no_compile": seconds - compile_s,
    "windows_per_s": counts["windows"] / (seconds - compile_s),
    "windows_computed_per_s": counts["windows_computed"] / (seconds - compile_s),
    "voxels_per_s": int(np.prod(volume)) / (seconds - compile_s),
    "model_batch": list(batch),
    "model_calls_timed": model_batches,
    "model_s_per_call": per_call,
    "model_windows_per_s": s.batch_size / per_call,
    "model_voxels_per_s": s.batch_size * window_voxels / per_call,
    "model_s_for_run": per_call * counts["model_calls"],
    "model_s_for_volume_windows": per_call * counts["model_calls_min"],
    "output_dtype": first["summary"]["dtype"],
    "output_gb": out_bytes / 1e9,
    "tmpfs": work.startswith("/dev/shm"),
    "peak_device_gb": stats["peak_bytes_in_use"] / 1e9 if stats else None,
  }


def snemi_case(smoke: bool) -> dict:
  """SNEMI3D-sized volume, SNEMI RSUNet preset; ``smoke``: the same code on tiny shapes."""
  from jaxseg.common.config_util import load_config

  volume = _ints(_SNEMI_VOLUME.value)
  overrides = {}
  if smoke:  # the real net and settings, tiny shapes (windows must be multiples of (1, 16, 16))
    volume = (8, 64, 64)
    overrides = {
      "model.compute_dtype": "float32",  # bf16 is emulated (slow) on CPU
      "infer.window": (4, 32, 32),
      "infer.pad": (2, 8, 8),
      "infer.crop_pad": (2, 2, 8, 8, 8, 8),
      "infer.block_shape": (8, 32, 64),
      "infer.sw_batch_size": 2,
    }
  config = load_config(SNEMI, overrides)
  r = _gpu_predict("snemi", config, volume, 2 if smoke else 20, 1 if smoke else 2)
  r["goal_s"] = GOAL_SNEMI_S
  return r


def mednext_case(smoke: bool) -> dict:
  """MedNeXt-L (NISB preset) on 128^3 windows; ``smoke``: the same code on tiny shapes."""
  from jaxseg.common.config_util import load_config

  volume = _ints(_MEDNEXT_VOLUME.value)
  overrides = {}
  if smoke:
    volume = (32, 32, 64)
    overrides = {
      "model.compute_dtype": "float32",
      "infer.window": (32, 32, 32),
      "infer.block_shape": (32, 32, 32),
      "infer.sw_batch_size": 1,
    }
  config = load_config(NISB, overrides)
  calls = 1 if smoke else _MEDNEXT_CALLS.value
  return _gpu_predict("mednext", config, volume, calls, 1 if smoke else 2)


def print_gpu(rows: list[dict]) -> None:
  """The GPU table."""
  print("\n### GPU: random-weight recipe nets, compute dtype as configured\n")
  print("| net | device | volume | block | windows (computed) | first run s (compile s) "
        "| predict s "
        "| of which compile s | windows/s | voxels/s | model voxels/s | model share "
        "| peak GB |")  # fmt: skip
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    peak = f"{r['peak_device_gb']:.1f}" if r["peak_device_gb"] else "-"
    share = r["model_s_for_run"] / r["seconds_no_compile"]
    print(
      f"| {r['case']} | {r['device']} | {tuple(r['volume'])} | {tuple(r['block'])} "
      f"| {r['windows']} ({r['windows_computed']}) | {r['first_run_s']:.1f} ({r['compile_s']:.1f}) "
      f"| {r['seconds']:.2f} | {r['compile_in_run_s']:.2f} | {r['windows_per_s']:.1f} "
      f"| {r['voxels_per_s']:.3g} | {r['model_voxels_per_s']:.3g} | {100 * share:.0f}% | {peak} |"
    )
  print(
    "windows/s, voxels/s and the model share exclude the compilation inside the timed run; "
    "model voxels/s: jitted apply alone on [sw_batch_size, *window, 1] batches."
  )
  for r in rows:
    if r["case"] == "snemi":
      print(
        f"snemi: {r['seconds_no_compile']:.2f} s without compilation, {r['seconds']:.2f} s with "
        f"(goal < {r['goal_s']:.0f} s)"
      )


# -- main -----------------------------------------------------------------------------------------


def machine_info() -> dict:
  """CPU count, memory, load, versions, JAX backend and device kind, date."""
  import jax

  device = jax.devices()[0]
  return {
    **_machine.host_info(),
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "device_kind": device.device_kind,
    "devices": jax.device_count(),
  }


def child_main(spec_path: str) -> None:
  """Entry point of a child process: runs the case its spec names, writes the result JSON."""
  with open(spec_path) as f:
    spec = json.load(f)
  if spec.get("compilation_cache"):
    from jaxseg.common import runtime

    runtime.enable_compilation_cache(spec["compilation_cache"])
  run = {"memory": child_memory, "overhead": child_overhead}[spec["case"]]
  result = run(spec)
  with open(spec["result"], "w") as f:
    json.dump(result, f)


def main(argv):
  del argv
  if _CHILD.value:
    child_main(_CHILD.value)
    return
  unknown = sorted(set(_CASES.value) - set(CPU_CASES))
  if unknown:
    raise app.UsageError(f"unknown cases {unknown}; choose from {', '.join(CPU_CASES)}")
  info = machine_info()
  print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
  results = {"machine": info}
  work = tempfile.mkdtemp(prefix="jaxseg_predict_bench_")
  try:
    if "plan" in _CASES.value:
      results["plan"] = plan_case()
    if "memory" in _CASES.value:
      results["memory"] = memory_case(work)
    if "overhead" in _CASES.value:
      results["overhead"] = overhead_case(work)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  gpu = _GPU.value if _GPU.value is not None else info["backend"] == "gpu"
  if gpu or _GPU_SMOKE.value:
    smoke = _GPU_SMOKE.value
    rows = [snemi_case(smoke), mednext_case(smoke)]
    for row in rows:
      row["smoke"] = smoke
      results[row["case"]] = row
    print_gpu(rows)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(results, f, indent=1)
    print(f"\nwrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
