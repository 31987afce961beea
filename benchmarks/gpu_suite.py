r"""The GPU suite: every number issue 17 asks of a GPU, in one process, within a time budget.

Owns the list of cases, their shapes (full and ``--smoke``), the time guard, and the two outputs
(``gpu_suite.json``, ``gpu_suite.md``). The measuring pieces come from the sibling scripts:
``predict.py`` (random images, timed ``predict_volumes``, the model-only timer), ``decode.py``
(Voronoi labels, membrane affinities, the SNEMI decode settings), ``train_step.py`` (blocky
training labels, dense bf16 peaks), ``torch_nets.py`` (the PyTorch nets), ``memory_probe.py``
(host RSS) and ``machine.py`` (the host). ``docs/gpu_suite.md`` says what each number means.

Cases, in the order they run (``--cases`` picks some):

* ``train_rsunet``, ``train_rsunet_pytorch``: a training step of the SNEMI RSUNet at the recipe's
  shape (batch 4 x 16 x 224 x 224), jaxseg's real step (``train_lib.make_train_step``,
  augmentation off) and a PyTorch step of the same net (``torch_nets.py``; parameter counts
  checked equal) on the same batch shape: seconds per step, voxels/s, peak memory, MFU.
* ``predict_snemi``: a SNEMI3D-sized volume (100 x 1024 x 1024 uint8) through ``predict_volumes``
  with the SNEMI preset and random weights: a first run (compiles), then timed runs against the
  10 s goal.
* ``predict_mednext``: MedNeXt-L (NISB preset) on ``[8, 128, 128, 128, 1]`` windows through the
  jitted apply alone: voxels/s.
* ``train_mednext_pytorch``, ``train_mednext``: as for RSUNet, MedNeXt-L at 128^3, batch 2.
* ``decode_waterz``, ``decode_cc``, ``metrics``: on the host CPU of the same machine, a Voronoi
  volume (100 x 512 x 512) with membranes drawn in: the SNEMI waterz decode of its boundary
  affinities, the NISB connected-components decode of its perfect affinities, and adapted Rand +
  VOI of the waterz segmentation against the labels.

On a GPU the nets compute in bf16 (PyTorch: autocast, ``channels_last_3d``); on CPU in float32.
The PyTorch cases run when torch imports and sees CUDA (``--smoke``: any torch, CPU or GPU), and
are recorded as skipped with the reason otherwise. Every case is independent: one that fails
(out of memory, say) records its error and the suite goes on; one that no longer fits in the
budget (``--budget_s``, 8 minutes) is skipped with the reason. The JSON is rewritten after every
case, so a run cut short still leaves what it measured. Usage::

  python benchmarks/gpu_suite.py --output=/tmp/gpu_suite          # on the GPU machine
  .venv/bin/python benchmarks/gpu_suite.py --smoke --output=/tmp/s  # tiny shapes, CPU, < 2 min
"""

import argparse
import dataclasses
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from a checkout: configs/ and jaxseg/ importable

from jaxseg.common.config_util import load_config, load_sibling  # noqa: E402

_machine = load_sibling(__file__, "machine")
_memory = load_sibling(__file__, "memory_probe")

SNEMI = os.path.join(REPO, "configs", "snemi.py")
NISB = os.path.join(REPO, "configs", "nisb_base.py")
GOAL_SNEMI_S = 10.0
SNEMI_VOLUME = (100, 1024, 1024)
GB = 1e9


@dataclasses.dataclass(frozen=True)
class Shapes:
  """Every size the suite uses; ``FULL`` on the GPU, ``SMOKE`` to check the code anywhere."""

  rsunet_train: tuple  # (batch, (z, y, x))
  mednext_train: tuple
  mednext_size: str  # MedNeXt-L in the full run; S in the smoke run (L compiles for minutes)
  snemi_volume: tuple
  snemi_infer: dict  # config overrides for the SNEMI prediction
  mednext_infer: dict
  decode_volume: tuple
  warmup: int  # untimed training steps after compiling (allocation, autotuning)
  steps: int  # timed training steps
  predict_runs: int  # timed predict_volumes runs after the first
  model_calls: int  # timed MedNeXt apply calls
  repeats: int  # decode and metric repetitions (the best is reported)


FULL = Shapes(
  rsunet_train=(4, (16, 224, 224)),
  mednext_train=(2, (128, 128, 128)),
  mednext_size="L",
  snemi_volume=SNEMI_VOLUME,
  snemi_infer={},  # the preset: 16 x 224 x 224 windows, batch 16, one block holds the volume
  mednext_infer={},  # the preset: 128^3 windows, sw_batch_size 8
  decode_volume=(100, 512, 512),
  warmup=2,
  steps=5,
  predict_runs=2,
  model_calls=8,
  repeats=3,
)

SMOKE = Shapes(
  rsunet_train=(1, (4, 32, 32)),  # RSUNet needs y, x multiples of 16
  # MedNeXt needs multiples of 16; PyTorch's GroupNorm wants more than one value per channel at
  # the 1/16 bottleneck, so z is 32.
  mednext_train=(1, (32, 16, 16)),
  mednext_size="S",
  snemi_volume=(8, 32, 64),
  snemi_infer={  # 24 windows in 6 model calls over 2 blocks (RSUNet: y, x multiples of 16)
    "infer.window": (4, 32, 32),
    "infer.overlap": 0.25,
    "infer.pad": (2, 8, 8),
    "infer.crop_pad": (2, 2, 8, 8, 8, 8),
    "infer.block_shape": (8, 32, 32),
    "infer.sw_batch_size": 4,
  },
  mednext_infer={"infer.window": (16, 16, 16), "infer.sw_batch_size": 1},
  decode_volume=(16, 64, 64),
  warmup=0,
  steps=1,
  predict_runs=1,
  model_calls=1,
  repeats=1,
)


# -- the suite's state ----------------------------------------------------------------------------


class Suite:
  """The run's settings, clock, device and the sibling scripts and host data it loaded."""

  def __init__(self, smoke: bool, budget_s: float):
    import jax

    self.smoke = smoke
    self.shapes = SMOKE if smoke else FULL
    self.start = time.perf_counter()
    self.budget_s = budget_s
    self.device = jax.devices()[0]
    self.on_gpu = self.device.platform == "gpu"
    self._scripts: dict = {}
    self.data: dict = {}  # host volumes shared by the decode and metric cases
    if self.on_gpu:
      # One convolution first, so XLA loads its own cuDNN before any PyTorch case can load
      # PyTorch's: both use the library's one soname, the first loaded serves both, and XLA
      # refuses a cuDNN older than the one it was built with (PyTorch is less strict).
      x = jax.numpy.ones((1, 8, 8, 8, 1), jax.numpy.bfloat16)
      w = jax.numpy.ones((3, 3, 3, 1, 1), jax.numpy.bfloat16)
      dims = ("NDHWC", "DHWIO", "NDHWC")
      jax.block_until_ready(jax.lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", None, None, dims))

  def left(self) -> float:
    return self.budget_s - (time.perf_counter() - self.start)

  def script(self, name: str):
    """A sibling benchmark script as a module.

    The scripts define their absl flags when imported, and several share names (``--output``,
    ``--cases``); absl refuses a second definition unless the first allows overriding. The suite
    parses none of their flags and calls only functions that read none, so it lets a later
    definition replace an earlier one.
    """
    if name not in self._scripts:
      from absl import flags

      for flag in list(flags.FLAGS):
        flags.FLAGS[flag].allow_override = True
      self._scripts[name] = load_sibling(__file__, name)
    return self._scripts[name]

  def peak_flops(self) -> float | None:
    """The card's dense bf16 peak FLOP/s (``train_step.py``'s table of SXM datasheet figures);
    None for a CPU or a card not in the table."""
    if not self.on_gpu:
      return None
    for name, peak in self.script("train_step").PEAK_BF16.items():
      if name in self.device.device_kind:
        return float(peak)
    return None

  def dtype(self) -> str:
    # bf16 convolutions are emulated, and slow, on a CPU.
    return "bfloat16" if self.on_gpu else "float32"

  def timed_loop(self, step: Callable[[], None], count: int) -> list[float]:
    """Runs ``step`` (which waits for its result) up to ``count`` times, at least once, while
    the budget lasts; each run's seconds."""
    times = []
    for _ in range(count):
      if times and self.left() < 2 * max(times) + 5:
        break
      t0 = time.perf_counter()
      step()
      times.append(time.perf_counter() - t0)
    return times


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  run: Callable[[Suite], dict]
  need_s: float  # full run: the least time left with which it starts (else skipped)
  what: str


class MemoryWatch:
  """Peak memory of one case: the device's allocator on a GPU, the host RSS on a CPU.

  JAX's ``peak_bytes_in_use`` is the process's peak and cannot be reset, so a case's peak is known
  only when the case raises it; below an earlier case's peak it is reported as unknown.
  """

  def __init__(self, suite: Suite):
    self.suite = suite
    if suite.on_gpu:
      self.before = suite.device.memory_stats().get("peak_bytes_in_use", 0)
    else:
      self.reset = _memory.reset_peak()

  def result(self) -> dict:
    if self.suite.on_gpu:
      peak = self.suite.device.memory_stats().get("peak_bytes_in_use", 0)
      if peak > self.before:
        return {"peak_gb": peak / GB, "peak_source": "device"}
      return {
        "peak_gb": None,
        "peak_source": f"below an earlier case's device peak, {self.before / GB:.1f} GB",
      }
    # The high-water mark is reset at the case start where the kernel allows; else it is the
    # process's peak so far.
    source = "host RSS" if self.reset else "host RSS, process peak"
    return {"peak_gb": _memory.status_mb("VmHWM") * 2**20 / GB, "peak_source": source}


# -- training -------------------------------------------------------------------------------------


TRAIN = {
  # net: (config, shapes attribute)
  "rsunet": (SNEMI, "rsunet_train"),
  "mednext": (NISB, "mednext_train"),
}


def train_config(suite: Suite, net: str):
  """The recipe's config at the suite's shape, augmentation off (both sides do the same work)."""
  path, attr = TRAIN[net]
  batch, patch = getattr(suite.shapes, attr)
  overrides = {
    "data.aug.name": "none",
    "train.mixed_precision": suite.on_gpu,
    "model.compute_dtype": suite.dtype(),
    "data.patch_size": patch,
    "train.batch_size": batch,
  }
  if net == "mednext":
    overrides["model.size"] = suite.shapes.mednext_size
  return load_config(path, overrides)


def _cost_flops(cost) -> float:
  """The FLOP count of a ``cost_analysis()`` (a dict, or a list of one in older JAX)."""
  if isinstance(cost, list | tuple):
    cost = cost[0] if cost else None
  return float(cost.get("flops", 0.0)) if cost else 0.0


def train_jaxseg(suite: Suite, net: str) -> dict:
  """jaxseg's training step: compile ahead of time, warm up, time ``steps`` steps."""
  import jax

  from jaxseg.models import count_params
  from jaxseg.training import train_lib

  config = train_config(suite, net)
  watch = MemoryWatch(suite)
  train_step = suite.script("train_step")
  step_fn, graphdef, state, image, labels = train_step.step_and_batch(config)
  batch, read_shape = image.shape[0], image.shape[1:4]
  params = count_params(train_step.nnx_model(graphdef, state))

  t0 = time.perf_counter()
  lowered = step_fn.lower(state, image, labels)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  # XLA's count of the optimised step; the unoptimised one where a backend reports none.
  flops, flops_source = _cost_flops(compiled.cost_analysis()), "compiled"
  if not flops:
    flops, flops_source = _cost_flops(lowered.cost_analysis()), "lowered"
  mem = compiled.memory_analysis()

  holder = {"state": state}
  del state

  def step():
    # The compiled step itself: calling ``step_fn`` would compile again (AOT results are not
    # shared with the jit cache). The state is donated, so each step takes the previous result.
    holder["state"], holder["metrics"] = compiled(holder["state"], image, labels)
    jax.block_until_ready(holder["metrics"])

  for _ in range(suite.shapes.warmup):
    step()
  times = suite.timed_loop(step, suite.shapes.steps)
  step_s = float(np.median(times))
  patch = tuple(int(p) for p in config.data.patch_size)
  peak = suite.peak_flops()
  xla = {
    "argument_bytes": int(mem.argument_size_in_bytes),
    "output_bytes": int(mem.output_size_in_bytes),
    "alias_bytes": int(mem.alias_size_in_bytes),
    "temp_bytes": int(mem.temp_size_in_bytes),
  }
  need = xla["argument_bytes"] + xla["output_bytes"] - xla["alias_bytes"] + xla["temp_bytes"]
  return {
    "metric": "step_s",
    "impl": "jaxseg",
    "net": f"{config.model.name}" + (f"-{config.model.size}" if net == "mednext" else ""),
    "device": suite.device.device_kind,
    "batch": batch,
    "patch": list(patch),
    "read_shape": list(read_shape),
    "dtype": train_lib.compute_dtype(config),
    "remat": bool(config.model.get("remat", False)),
    "params": params,
    "compile_s": compile_s,
    "steps_timed": len(times),
    "step_times_s": times,
    "step_s": step_s,
    "voxels_per_s": batch * math.prod(patch) / step_s,
    "flops_per_step": flops,
    "flops_source": flops_source,
    "peak_bf16_flops": peak,
    "mfu": flops / step_s / peak if peak and flops else None,
    "mfu_note": None if peak else f"no dense bf16 peak known for {suite.device.device_kind}",
    "xla_memory": xla,
    "xla_step_gb": need / GB,
    **watch.result(),
    "loss": float(holder["metrics"]["loss"]),
  }


def train_torch(suite: Suite, net: str) -> dict:
  """A PyTorch step of the same net on the same batch shape: forward (bf16 autocast on a GPU),
  per-channel BCE with the positive weight capped at 10, backward, clipping, AdamW."""
  try:
    import torch
  except ImportError as e:
    return {"skipped": f"torch is not importable ({e})"}
  if not suite.smoke and not torch.cuda.is_available():
    return {"skipped": f"torch {torch.__version__} sees no CUDA device"}
  import jax

  from jaxseg.training import train_lib

  torch_nets = suite.script("torch_nets")
  config = train_config(suite, net)
  _, abstract_params, _ = train_lib.model_graphdef(config)
  expected = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract_params))
  m = config.model
  if net == "rsunet":
    model = torch_nets.RSUNet(1, int(m.out_channels), tuple(m.widths), int(m.norm_groups))
  else:
    model = torch_nets.MedNeXt(1, int(m.out_channels), m.size, int(m.kernel_size), bool(m.remat))
  params = torch_nets.count_params(model)
  if params != expected:
    raise AssertionError(f"{net}: PyTorch has {params} parameters, jaxseg {expected}")
  on_gpu = torch.cuda.is_available()
  dev = torch.device("cuda" if on_gpu else "cpu")
  watch = None if on_gpu else MemoryWatch(suite)
  torch.backends.cudnn.benchmark = True  # a tuned PyTorch script picks its convolutions
  fmt = torch.channels_last_3d if on_gpu else torch.contiguous_format
  model = model.to(dev).to(memory_format=fmt)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
  batch = int(config.train.batch_size)
  patch = tuple(int(p) for p in config.data.patch_size)
  n_out = int(m.out_channels)
  g = torch.Generator().manual_seed(0)
  x = torch.rand((batch, 1, *patch), generator=g).to(dev).to(memory_format=fmt)
  target = (torch.rand((batch, n_out, *patch), generator=g) > 0.3).float().to(dev)
  affinity_loss = suite.script("train_step").torch_affinity_loss
  holder = {}

  def step():
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=on_gpu):
      logits = model(x)
    loss = affinity_loss(logits, target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    holder["loss"] = loss.item()  # waits for the step

  for _ in range(suite.shapes.warmup):
    step()
  if on_gpu:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
  times = suite.timed_loop(step, suite.shapes.steps)
  if on_gpu:
    memory = {
      "peak_gb": torch.cuda.max_memory_allocated() / GB,
      "peak_source": "torch allocator",
    }
  else:
    memory = watch.result()
  step_s = float(np.median(times))
  return {
    "metric": "step_s",
    "impl": "pytorch",
    "torch": torch.__version__,
    "device": torch.cuda.get_device_name() if on_gpu else "cpu",
    "batch": batch,
    "patch": list(patch),
    "dtype": "bfloat16" if on_gpu else "float32",
    "params": params,
    "steps_timed": len(times),
    "step_times_s": times,
    "step_s": step_s,
    "voxels_per_s": batch * math.prod(patch) / step_s,
    **memory,
    "loss": holder["loss"],
  }


# -- prediction -----------------------------------------------------------------------------------


def predict_snemi(suite: Suite) -> dict:
  """``predict_volumes`` on a SNEMI3D-sized random volume with the SNEMI preset, random weights.

  The first run traces and compiles the engine; the timed runs after it load XLA's executables
  from the persistent cache (as a second ``jaxseg-predict`` would) and still trace. Both are
  reported, with the compile seconds inside each run.
  """
  import jax

  from jaxseg.inference.settings import inference_settings

  p = suite.script("predict")
  config = load_config(SNEMI, {"model.compute_dtype": suite.dtype(), **suite.shapes.snemi_infer})
  volume = suite.shapes.snemi_volume
  s = inference_settings(config)
  watch = MemoryWatch(suite)
  t0 = time.perf_counter()
  apply, variables = p.build_apply(config)
  jax.block_until_ready(variables)
  build_s = time.perf_counter() - t0
  voxels = math.prod(volume)
  out_bytes = voxels * len(s.output_channels) * np.dtype(s.output_dtype).itemsize
  work = p.fast_dir(voxels + 2 * out_bytes)
  try:
    image = p.write_image(os.path.join(work, "image.zarr"), volume)
    first = p.timed_predict(config, apply, variables, image, os.path.join(work, "first"))
    shutil.rmtree(os.path.join(work, "first"))
    runs = []

    def run():
      out = os.path.join(work, f"run{len(runs)}")
      runs.append(p.timed_predict(config, apply, variables, image, out))
      shutil.rmtree(out)

    suite.timed_loop(run, suite.shapes.predict_runs)
    tmpfs = work.startswith("/dev/shm")
  finally:
    shutil.rmtree(work, ignore_errors=True)
  seconds = float(np.median([r["wall"] for r in runs]))
  compile_s = float(np.median([r["compile"] for r in runs]))
  counts = p.window_counts(config, volume)
  return {
    "metric": "seconds",
    "device": suite.device.device_kind,
    "dtype": str(config.model.compute_dtype),
    "volume": list(volume),
    "window": counts["window"],
    "block": counts["block"],
    "sw_batch_size": counts["batch"],
    "windows": counts["windows"],
    "windows_computed": counts["windows_computed"],
    "model_calls": counts["model_calls"],
    "build_s": build_s,
    "first_run_s": first["wall"],
    "first_compile_s": first["compile"],
    "runs_s": [r["wall"] for r in runs],
    "seconds": seconds,
    "compile_in_run_s": compile_s,
    "seconds_no_compile": seconds - compile_s,
    "voxels_per_s": voxels / seconds,
    "output_gb": out_bytes / GB,
    "tmpfs": tmpfs,
    "goal_s": GOAL_SNEMI_S,
    "goal_met": None if suite.smoke else seconds < GOAL_SNEMI_S,  # the goal is for the full size
    **watch.result(),
  }


def predict_mednext(suite: Suite) -> dict:
  """MedNeXt (NISB preset, random weights) on full window batches, jitted apply only."""
  import jax

  from jaxseg.inference.settings import inference_settings

  p = suite.script("predict")
  overrides = {
    "model.compute_dtype": suite.dtype(),
    "model.size": suite.shapes.mednext_size,
    **suite.shapes.mednext_infer,
  }
  config = load_config(NISB, overrides)
  s = inference_settings(config)
  watch = MemoryWatch(suite)
  apply, variables = p.build_apply(config)
  jax.block_until_ready(variables)
  batch = (s.batch_size, *s.window, 1)  # float32 windows, as the engine feeds them
  t0 = time.perf_counter()
  timer = p.ModelTimer(apply, variables, batch)  # compiles and runs once
  compile_s = time.perf_counter() - t0
  times = suite.timed_loop(lambda: timer(1), suite.shapes.model_calls)
  call_s = float(np.median(times))
  window_voxels = math.prod(s.window)
  return {
    "metric": "voxels_per_s",
    "net": f"mednext-{config.model.size}",
    "device": suite.device.device_kind,
    "dtype": str(config.model.compute_dtype),
    "model_batch": list(batch),
    "compile_s": compile_s,
    "calls_timed": len(times),
    "call_times_s": times,
    "call_s": call_s,
    "windows_per_s": s.batch_size / call_s,
    "voxels_per_s": s.batch_size * window_voxels / call_s,
    **watch.result(),
  }


# -- decoding and metrics (host) ------------------------------------------------------------------


def host_volume(suite: Suite) -> dict:
  """Voronoi labels with 2-voxel membranes between cells, and two sets of affinities from them:
  ``boundary`` (``target``, float32: a boundary map rising linearly to 1 at 3 voxels from the
  membranes, as ``decode.py``'s waterz case makes) and ``mask`` (``source``, float16: what a
  perfect NISB net predicts). Made once; the seconds it took are reported."""
  if "labels" not in suite.data:
    from scipy import ndimage

    d = suite.script("decode")
    t0 = time.perf_counter()
    labels = d.voronoi_labels(suite.shapes.decode_volume)
    interior = d.interior_mask(labels)
    distance = ndimage.distance_transform_edt(interior, sampling=(1.25, 1.0, 1.0))
    suite.data.update(
      labels=labels,
      boundary=d.boundary_affinities(np.clip(distance.astype(np.float32) / 3.0, 0.0, 1.0)),
      mask=d.mask_affinities(interior),
      data_s=time.perf_counter() - t0,
    )
  return suite.data


def _decode(suite: Suite, settings, aff: np.ndarray) -> dict:
  """A warm-up decode of a corner (numba caches, libraries), then the best of ``repeats``."""
  from jaxseg.decoding import decode_lib

  corner = aff[:, :8, :64, :64]
  decode_lib.decode_array(np.ascontiguousarray(corner), settings)
  result = {}

  def run():
    (_, result["seg"]), *_ = decode_lib.decode_array(aff, settings)

  times = suite.timed_loop(run, suite.shapes.repeats)
  seg = result["seg"]
  voxels = math.prod(seg.shape)
  seconds = min(times)
  return {
    "metric": "seconds",
    "volume": list(seg.shape),
    "method": settings.method,
    "seconds": seconds,
    "runs_s": times,
    "voxels_per_s": voxels / seconds,
    "snemi_volume_s_estimate": seconds * math.prod(SNEMI_VOLUME) / voxels,
    "segments": int(seg.max()),
    "seg": seg,
  }


def decode_waterz(suite: Suite) -> dict:
  data = host_volume(suite)
  settings = suite.script("decode").snemi_settings()
  result = _decode(suite, settings, data["boundary"])
  suite.data["seg"] = result.pop("seg")
  return {**result, "data_s": data["data_s"], "settings": "configs/snemi.py"}


def decode_cc(suite: Suite) -> dict:
  from jaxseg.decoding.settings import decode_settings

  data = host_volume(suite)
  result = _decode(suite, decode_settings(load_config(NISB)), data["mask"])
  suite.data.setdefault("seg", result.pop("seg"))  # for the metrics when waterz did not run
  return {**result, "data_s": data["data_s"], "settings": "configs/nisb_base.py"}


def metrics(suite: Suite) -> dict:
  """Adapted Rand (SNEMI3D definition) and VOI of the decoded segmentation against the labels,
  each as a user calls it (each builds its own contingency table)."""
  from jaxseg.metrics import adapted_rand, voi

  data = host_volume(suite)
  labels = data["labels"]
  seg = data.get("seg")
  if seg is None:  # no decode case ran: a segmentation with the labels' ids, split along z
    seg = labels + (np.arange(labels.shape[0])[:, None, None] >= labels.shape[0] // 2) * labels
  adapted_rand(labels[:4, :32, :32], seg[:4, :32, :32])  # compiles the numba kernels
  voi(labels[:4, :32, :32], seg[:4, :32, :32])
  out = {}

  def run():
    t0 = time.perf_counter()
    out["arand"] = adapted_rand(labels, seg, method="snemi")
    t1 = time.perf_counter()
    out["voi"] = voi(labels, seg)
    out.setdefault("times", []).append((t1 - t0, time.perf_counter() - t1))

  suite.timed_loop(run, suite.shapes.repeats)
  arand_s = min(t[0] for t in out["times"])
  voi_s = min(t[1] for t in out["times"])
  voxels = labels.size
  return {
    "metric": "seconds",
    "volume": list(labels.shape),
    "seconds": arand_s + voi_s,
    "adapted_rand_s": arand_s,
    "voi_s": voi_s,
    "voxels_per_s": voxels / (arand_s + voi_s),
    "snemi_volume_s_estimate": (arand_s + voi_s) * math.prod(SNEMI_VOLUME) / voxels,
    "adapted_rand_error": float(out["arand"].error),
    "voi_split": float(out["voi"].split),
    "voi_merge": float(out["voi"].merge),
  }


CASES = (
  Case("train_rsunet", lambda s: train_jaxseg(s, "rsunet"), 60, "RSUNet training step, jaxseg"),
  Case("train_rsunet_pytorch", lambda s: train_torch(s, "rsunet"), 20, "RSUNet step, PyTorch"),
  Case("predict_snemi", predict_snemi, 60, "SNEMI3D volume, predict_volumes"),
  Case("predict_mednext", predict_mednext, 40, "MedNeXt apply on 128^3 windows"),
  Case("train_mednext_pytorch", lambda s: train_torch(s, "mednext"), 30, "MedNeXt step, PyTorch"),
  Case("train_mednext", lambda s: train_jaxseg(s, "mednext"), 90, "MedNeXt training step, jaxseg"),
  Case("decode_waterz", decode_waterz, 40, "waterz decode (SNEMI), host"),
  Case("decode_cc", decode_cc, 10, "connected components decode (NISB), host"),
  Case("metrics", metrics, 10, "adapted Rand + VOI, host"),
)
# Smoke: every case starts unless the run is far over its budget.
SMOKE_NEED_S = 5.0


def run_case(suite: Suite, case: Case) -> dict:
  """One case, never raising: its numbers, or a skip or error with the reason."""
  need = SMOKE_NEED_S if suite.smoke else case.need_s
  left = suite.left()
  if left < need:
    return {
      "status": "skipped",
      "reason": f"time budget: {left:.0f} s of {suite.budget_s:.0f} s left, the case needs ~"
      f"{need:.0f} s",
    }
  t0 = time.perf_counter()
  try:
    result = case.run(suite)
  except Exception as e:  # one case failing (out of memory, say) must not stop the others
    result = {
      "status": "error",
      "reason": f"{type(e).__name__}: {str(e)[:2000]}",
      "traceback": traceback.format_exc(limit=6)[-4000:],
    }
  if "skipped" in result:
    result = {"status": "skipped", "reason": result.pop("skipped")}
  result.setdefault("status", "ok")
  result["wall_s"] = time.perf_counter() - t0
  release_memory()
  return result


def release_memory() -> None:
  """Frees what the case left (the arrays of one that failed, out of memory say) and hands
  PyTorch's cached blocks back to the driver, so the cases after it can have the memory."""
  gc.collect()
  torch = sys.modules.get("torch")
  if torch is not None and torch.cuda.is_available():
    torch.cuda.empty_cache()


def compare(results: dict) -> None:
  """PyTorch rows get jaxseg's speed-up and an MFU from jaxseg's FLOP count (same arithmetic)."""
  for net in ("rsunet", "mednext"):
    ours, theirs = results.get(f"train_{net}", {}), results.get(f"train_{net}_pytorch", {})
    if ours.get("status") != "ok" or theirs.get("status") != "ok":
      continue
    theirs["jaxseg_speedup"] = theirs["step_s"] / ours["step_s"]
    ours["pytorch_step_s"] = theirs["step_s"]
    if ours.get("mfu") is not None:
      theirs["mfu"] = ours["flops_per_step"] / theirs["step_s"] / ours["peak_bf16_flops"]


# -- output ---------------------------------------------------------------------------------------


def machine_info(suite: Suite) -> dict:
  import jax

  # The installed version only: importing torch here would load its CUDA libraries before JAX's
  # (see ``Suite.__init__``).
  return {
    **_machine.host_info(),
    "jax": jax.__version__,
    "jaxlib": _machine.package_version("jaxlib"),
    "backend": jax.default_backend(),
    "device_kind": suite.device.device_kind,
    "devices": jax.device_count(),
    "peak_bf16_flops": suite.peak_flops(),
    "torch": _machine.package_version("torch"),
  }


def _num(value, spec: str = ".3g", unit: str = "") -> str:
  return "-" if value is None else f"{value:{spec}}{unit}"


def _shape(values) -> str:
  return " x ".join(str(v) for v in values)


def _row(name: str, r: dict) -> list[str]:
  """| case | shape | time | throughput | memory | MFU | against |"""
  mem = "-"
  if r.get("peak_gb") is not None:
    mem = f"{r['peak_gb']:.2f} GB ({r['peak_source']})"
  elif r.get("peak_source"):
    mem = r["peak_source"]
  if r.get("xla_step_gb") is not None:
    mem += f"; XLA step {r['xla_step_gb']:.2f} GB"
  mfu = _num(100 * r["mfu"], ".1f", "%") if r.get("mfu") is not None else "-"
  if name.startswith("train"):
    shape = f"{r['batch']} x {_shape(r['patch'])}, {r['dtype']}"
    time_s = f"{r['step_s']:.3f} s/step"
    if "compile_s" in r:
      time_s += f" (compile {r['compile_s']:.0f} s)"
    against = "-"
    if r.get("pytorch_step_s"):
      against = f"PyTorch {r['pytorch_step_s']:.3f} s/step"
    if r.get("jaxseg_speedup"):
      against = f"PyTorch / jaxseg = {r['jaxseg_speedup']:.2f}"
    return [shape, time_s, f"{r['voxels_per_s']:.3g} voxels/s", mem, mfu, against]
  if name == "predict_snemi":
    shape = f"{_shape(r['volume'])}, {r['dtype']}"
    time_s = (
      f"{r['seconds']:.2f} s ({r['seconds_no_compile']:.2f} s without compile; first run "
      f"{r['first_run_s']:.1f} s)"
    )
    verdict = {True: "met", False: "missed", None: "for the full volume only"}[r["goal_met"]]
    goal = f"goal < {r['goal_s']:.0f} s: {verdict}"
    return [shape, time_s, f"{r['voxels_per_s']:.3g} voxels/s", mem, mfu, goal]
  if name == "predict_mednext":
    shape = f"{r['net']}, {_shape(r['model_batch'][:4])}, {r['dtype']}"
    time_s = f"{r['call_s']:.3f} s/call (compile {r['compile_s']:.0f} s)"
    return [shape, time_s, f"{r['voxels_per_s']:.3g} voxels/s", mem, mfu, "-"]
  time_s = f"{r['seconds']:.2f} s"
  against = f"SNEMI volume ~{r['snemi_volume_s_estimate']:.0f} s"
  return [_shape(r["volume"]), time_s, f"{r['voxels_per_s']:.3g} voxels/s", mem, mfu, against]


def markdown(doc: dict) -> str:
  m = doc["machine"]
  lines = [
    f"# jaxseg GPU suite{' (smoke)' if doc['smoke'] else ''}",
    "",
    f"Device: **{m['device_kind']}** ({m['backend']}), jax {m['jax']} (jaxlib {m['jaxlib']}), "
    f"torch {m['torch'] or 'not installed'}; date {m['date']}; host {m['cpu_count']} CPUs, "
    f"{m['memory_gb']} GB; suite {doc['wall_s']:.0f} s of a {doc['budget_s']:.0f} s budget.",
    "",
    *(
      [
        "Smoke run: tiny shapes (MedNeXt-S), XLA's optimisations off. The numbers check the code "
        "path; they measure nothing.",
        "",
      ]
      if doc["smoke"]
      else []
    ),
    "| case | shape | time | throughput | peak memory | MFU | against |",
    "|---|---|---|---|---|---|---|",
  ]
  for name, r in doc["cases"].items():
    if r["status"] == "ok":
      cells = _row(name, r)
    else:
      cells = [f"**{r['status']}**: {r['reason'].splitlines()[0][:200]}"] + ["-"] * 5
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines += [
    "",
    "Training: median of the timed steps after compiling and warming up. MFU: XLA's FLOP count "
    "of the compiled jaxseg step over the step time and the card's dense bf16 peak (PyTorch rows: "
    "the same count over PyTorch's time). predict_snemi: median of the runs after the first, "
    "which compiled. Host rows: best of the runs. docs/gpu_suite.md explains every number.",
  ]
  return "\n".join(lines) + "\n"


def _plain(value):
  """numpy scalars and arrays (shapes from the inference plan) as JSON values."""
  if isinstance(value, np.generic | np.ndarray):
    return value.tolist()
  return str(value)


def write(doc: dict, output: str) -> None:
  if not output:
    return
  os.makedirs(output, exist_ok=True)
  with open(os.path.join(output, "gpu_suite.json"), "w") as f:
    json.dump(doc, f, indent=1, default=_plain)
  with open(os.path.join(output, "gpu_suite.md"), "w") as f:
    f.write(markdown(doc))


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="Tiny shapes (CPU, under 2 minutes).")
  parser.add_argument("--output", default="", help="Write gpu_suite.json and gpu_suite.md here.")
  parser.add_argument(
    "--budget_s", type=float, default=0.0, help="Time budget (default 480 s; 150 s with --smoke)."
  )
  names = [c.name for c in CASES]
  parser.add_argument("--cases", default=",".join(names), help="Comma-separated subset of cases.")
  args = parser.parse_args(argv)
  args.cases = [c for c in args.cases.split(",") if c]
  unknown = sorted(set(args.cases) - set(names))
  if unknown:
    parser.error(f"unknown cases {unknown}; choose from {', '.join(names)}")
  args.budget_s = args.budget_s or (150.0 if args.smoke else 480.0)
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  # Before JAX starts: no preallocated 75% of the card, so PyTorch can run in the same process and
  # a case's peak is its own; the smoke run times nothing, so XLA's slower optimisations only
  # cost it compile time.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if args.smoke:
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  from jaxseg.common import runtime

  cache = tempfile.mkdtemp(prefix="jaxseg_gpu_suite_xla_")
  # A fresh persistent compilation cache: compile times are cold, and the timed predict runs
  # load the executables the first run compiled, as a second jaxseg-predict would.
  runtime.enable_compilation_cache(cache)
  try:
    suite = Suite(args.smoke, args.budget_s)
    doc = {
      "suite": "gpu_suite",
      "smoke": args.smoke,
      "budget_s": args.budget_s,
      "shapes": dataclasses.asdict(suite.shapes),
      "machine": machine_info(suite),
      "cases": {},
      "wall_s": 0.0,
    }
    print(f"device {doc['machine']['device_kind']}, jax {doc['machine']['jax']}", flush=True)
    for case in CASES:
      if case.name not in args.cases:
        continue
      print(f"{case.name}: {case.what} ...", flush=True)
      result = run_case(suite, case)
      doc["cases"][case.name] = result
      compare(doc["cases"])
      doc["wall_s"] = time.perf_counter() - suite.start
      print(f"{case.name}: {result['status']} ({result['wall_s']:.1f} s)", flush=True)
      if result["status"] != "ok":
        print(f"  {result['reason']}", flush=True)
      write(doc, args.output)
  finally:
    shutil.rmtree(cache, ignore_errors=True)
  print()
  print(markdown(doc))
  return doc


if __name__ == "__main__":
  main()
