r"""Training-step throughput: jaxseg vs a PyTorch implementation of the same net and batch.

Times jaxseg's real training step (``jaxseg.training.train_lib.make_train_step``: targets made on
the device, forward / backward, per-channel BCE, clipping, AdamW, EMA when the recipe has it;
augmentation off so both sides do the same arithmetic) for the two recipe networks at their recipe
shapes, and in the same run a PyTorch step of the same net (``benchmarks/torch_nets.py``, same
parameter count, checked) on the same batch: forward, per-channel BCE, backward, clipping, AdamW.

  python benchmarks/train_step.py                       # both nets, recipe shapes, + PyTorch
  python benchmarks/train_step.py --nets=rsunet --steps=3 --no_torch

Reports steps/s, voxels/s, the jaxseg/PyTorch time ratio, peak device memory (GPU) and model
FLOP utilisation (GPU: XLA's FLOP count of the jitted step over the device's dense bf16 peak).
On GPU both sides use bf16 mixed precision (PyTorch: autocast, channels_last_3d); on CPU both run
float32, where bf16 convolutions are emulated and slow.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from a checkout: configs/ and jaxseg/ importable

_NETS = flags.DEFINE_list("nets", ["rsunet", "mednext_l"], "rsunet and/or mednext_l.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per implementation.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first (compilation, autotuning).")
_TORCH = flags.DEFINE_bool("torch", True, "Also time the PyTorch implementation.")
_TORCH_COMPILE = flags.DEFINE_bool("torch_compile", False, "torch.compile the PyTorch net.")
_BATCH = flags.DEFINE_integer("batch", 0, "Override the recipe batch (0 = recipe).")
_OUTPUT = flags.DEFINE_string("output", "", "Append one JSON line per result to this file.")

# Dense bf16 peak FLOP/s of the GPUs the device tool lends (NVIDIA datasheets, SXM parts).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

RECIPES = {
  # net: (config file, PyTorch constructor kwargs)
  "rsunet": ("configs/snemi.py", {"kind": "rsunet"}),
  "mednext_l": ("configs/nisb_base.py", {"kind": "mednext", "size": "L", "kernel": 3}),
}


def _config(net: str, on_gpu: bool):
  from jaxseg.common.config_util import load_config

  path, _ = RECIPES[net]
  config = load_config(os.path.join(REPO, path))
  config.data.aug.name = "none"  # both sides do the same arithmetic
  config.train.mixed_precision = on_gpu
  config.model.compute_dtype = "bfloat16" if on_gpu else "float32"
  if _BATCH.value:
    config.train.batch_size = _BATCH.value
  return config


def _labels(shape, rng) -> np.ndarray:
  """Blocky random ids (objects of ~8-16 voxels per side): realistic affinity statistics."""
  b, z, y, x = shape
  coarse = rng.integers(1, 50, size=(b, z // 4 + 1, y // 16 + 1, x // 16 + 1), dtype=np.int32)
  return coarse.repeat(4, 1).repeat(16, 2).repeat(16, 3)[:, :z, :y, :x].copy()


def step_and_batch(config) -> tuple:
  """jaxseg's real train step for ``config`` on one device, with a batch of random image and
  blocky labels on it: ``(step_fn, graphdef, state, image, labels)``."""
  import jax

  from jaxseg.data import targets
  from jaxseg.training import optim, sharding, train_lib

  shard = sharding.create_sharding(1)
  tx = optim.create_optimizer(config.optim, int(config.train.num_steps))
  graphdef, state = train_lib.create_train_state(config, tx, shard)
  read_shape = targets.read_shape_for(config)
  step_fn = train_lib.make_train_step(config, graphdef, tx, shard, read_shape)
  batch = int(config.train.batch_size)
  rng = np.random.default_rng(0)
  labels = _labels((batch, *read_shape), rng)
  image = rng.random((batch, *read_shape, 1), dtype=np.float32)
  image, labels = jax.device_put(image, shard.batch), jax.device_put(labels, shard.batch)
  return step_fn, graphdef, state, image, labels


def time_jaxseg(net: str) -> dict:
  import jax

  from jaxseg.models import count_params

  device = jax.devices()[0]
  on_gpu = device.platform == "gpu"
  config = _config(net, on_gpu)
  step_fn, graphdef, state, image, labels = step_and_batch(config)
  batch = image.shape[0]
  n_params = count_params(nnx_model(graphdef, state))

  compiled = step_fn.lower(state, image, labels).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0

  for _ in range(_WARMUP.value):
    state, _ = step_fn(state, image, labels)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = step_fn(state, image, labels)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - t0) / _STEPS.value
  stats = device.memory_stats() if on_gpu else None
  patch = tuple(int(p) for p in config.data.patch_size)
  return {
    "impl": "jaxseg",
    "net": net,
    "device": device.device_kind,
    "batch": batch,
    "patch": patch,
    "params": n_params,
    "dtype": config.model.compute_dtype,
    "step_s": seconds,
    "steps_per_s": 1.0 / seconds,
    "voxels_per_s": batch * int(np.prod(patch)) / seconds,
    "flops_per_step": flops,
    "peak_mem_gb": stats["peak_bytes_in_use"] / 1e9 if stats else None,
    "loss": float(metrics["loss"]),
  }


def nnx_model(graphdef, state):
  from flax import nnx

  return nnx.merge(graphdef, state["params"], state["rest"])


def time_torch(net: str, jax_result: dict) -> dict:
  import torch

  from jaxseg.common.config_util import load_sibling

  torch_nets = load_sibling(__file__, "torch_nets")  # benchmarks/ is not a package

  on_gpu = torch.cuda.is_available()
  dev = torch.device("cuda" if on_gpu else "cpu")
  _, kwargs = RECIPES[net]
  if kwargs["kind"] == "rsunet":
    model = torch_nets.RSUNet(in_channels=1, out_channels=12)
    n_out = 12
  else:
    model = torch_nets.MedNeXt(in_channels=1, out_channels=6, size=kwargs["size"],
                               kernel=kwargs["kernel"])  # fmt: skip
    n_out = 6
  n_params = torch_nets.count_params(model)
  if n_params != jax_result["params"]:
    raise AssertionError(f"{net}: PyTorch has {n_params} parameters, jaxseg {jax_result['params']}")
  model = model.to(dev)
  if on_gpu:
    model = model.to(memory_format=torch.channels_last_3d)
  step_model = torch.compile(model) if _TORCH_COMPILE.value else model
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
  b, patch = jax_result["batch"], jax_result["patch"]
  g = torch.Generator().manual_seed(0)
  x = torch.rand((b, 1, *patch), generator=g).to(dev)
  target = (torch.rand((b, n_out, *patch), generator=g) > 0.3).float().to(dev)
  if on_gpu:
    x = x.to(memory_format=torch.channels_last_3d)

  def step():
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=on_gpu):
      logits = step_model(x)
    loss = torch_affinity_loss(logits, target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss

  def sync():
    if on_gpu:
      torch.cuda.synchronize()

  for _ in range(_WARMUP.value):
    step()
  sync()
  if on_gpu:
    torch.cuda.reset_peak_memory_stats()
  t0 = time.perf_counter()
  for _ in range(_STEPS.value):
    loss = step()
  sync()
  seconds = (time.perf_counter() - t0) / _STEPS.value
  return {
    "impl": "pytorch" + ("+compile" if _TORCH_COMPILE.value else ""),
    "net": net,
    "device": torch.cuda.get_device_name() if on_gpu else "cpu",
    "batch": b,
    "patch": patch,
    "params": n_params,
    "dtype": "bfloat16" if on_gpu else "float32",
    "step_s": seconds,
    "steps_per_s": 1.0 / seconds,
    "voxels_per_s": b * int(np.prod(patch)) / seconds,
    "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if on_gpu else None,
    "loss": loss.item(),
  }


def torch_affinity_loss(logits, target):
  """PyTC's affinity loss in PyTorch, the reference step's: per-channel BCE of float32 logits
  (clamped to +-20) with the positive weight capped at 10, summed over channels.

  ``logits``, ``target``: ``(batch, channels, z, y, x)``; ``target`` 0 / 1 floats.
  """
  import torch
  import torch.nn.functional as F

  logits = logits.float().clamp(-20, 20)
  pos = target.sum(dim=(0, 2, 3, 4))
  neg = target[0].numel() * target.shape[0] - pos
  pos_weight = torch.where(pos > 0, (neg / pos.clamp(min=1)).clamp(max=10), torch.ones_like(pos))
  per = F.binary_cross_entropy_with_logits(
    logits, target, pos_weight=pos_weight.view(1, -1, 1, 1, 1), reduction="none"
  )
  return per.mean(dim=(0, 2, 3, 4)).sum()


def _mfu(result: dict) -> float | None:
  for name, peak in PEAK_BF16.items():
    if name in str(result["device"]) and result.get("flops_per_step"):
      return result["flops_per_step"] / result["step_s"] / peak
  return None


def main(argv):
  del argv
  rows = []
  for net in _NETS.value:
    if net not in RECIPES:
      raise app.UsageError(f"unknown net {net!r}; choose from {sorted(RECIPES)}")
    jax_result = time_jaxseg(net)
    jax_result["mfu"] = _mfu(jax_result)
    rows.append(jax_result)
    if _TORCH.value:
      torch_result = time_torch(net, jax_result)
      if jax_result.get("flops_per_step"):
        torch_result["mfu"] = _mfu({**torch_result, "flops_per_step": jax_result["flops_per_step"]})
      torch_result["jaxseg_speedup"] = torch_result["step_s"] / jax_result["step_s"]
      rows.append(torch_result)
    for row in rows[-2:] if _TORCH.value else rows[-1:]:
      print(json.dumps(row))
      if _OUTPUT.value:
        with open(_OUTPUT.value, "a") as f:
          f.write(json.dumps(row) + "\n")
  print("\n| net | impl | device | batch x patch | dtype | s/step | voxels/s | peak GB | MFU |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    mem = f"{r['peak_mem_gb']:.1f}" if r.get("peak_mem_gb") else "-"
    mfu = f"{100 * r['mfu']:.0f}%" if r.get("mfu") else "-"
    print(
      f"| {r['net']} | {r['impl']} | {r['device']} | {r['batch']} x {r['patch']} | {r['dtype']} "
      f"| {r['step_s']:.3f} | {r['voxels_per_s']:.3g} | {mem} | {mfu} |"
    )
  for r in rows:
    if "jaxseg_speedup" in r:
      print(f"{r['net']}: PyTorch step / jaxseg step = {r['jaxseg_speedup']:.2f}")


if __name__ == "__main__":
  app.run(main)
