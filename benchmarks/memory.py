r"""Training memory: XLA's buffer assignment of the real train step, per voxel of the batch.

Compiles, never runs, ``jaxseg.training.train_lib.make_train_step`` for a config at a given patch
and batch. The inputs are abstract, so no parameter or batch is allocated and any shape can be
asked for on a small machine. It reads ``compiled.memory_analysis()``:

- ``temp_bytes``: XLA's temporaries at their peak: the activations kept for the backward pass,
  the parameter gradients and the scratch of the op running at the peak. This is what grows with
  the batch and patch.
- ``argument_bytes``: the train state (parameters, AdamW moments, EMA) and the batch. The state
  is donated, so the new state reuses its buffers (``alias_bytes``).
- ``temp_bytes_per_voxel``: ``temp_bytes`` over the voxels of the batch (``batch x patch``).

A step needs about ``temp_bytes + argument_bytes`` of device memory. ``--predict`` extrapolates
that to another shape from the per-voxel figure, which errs high because the gradients do not
grow with the batch; compiling that shape directly (``--patch`` / ``--batch``) gives the exact
figure at the same cost. ``docs/memory.md`` compares the numbers with a hand count.

  python benchmarks/memory.py --config=configs/liconn.py --patch=64,64,64 --batch=1
  python benchmarks/memory.py --config=configs/liconn.py --patch=128,128,128 --batch=2
  python benchmarks/memory.py --config=configs/snemi.py --set=model.remat=true

Prints one JSON object as its last line. The figures are those of the backend it runs on. On CPU
(the reference for ``docs/memory.md``) XLA computes bf16 dots and convolutions in float32, with
float32 copies of their operands, which a GPU does not need.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from a checkout: configs/ and jaxseg/ importable

FLAGS = flags.FLAGS


def _define_flags():
  """Defined only when run as a script, so that a test can import this file next to the CLIs
  (absl flags are process-wide, and ``--config`` is theirs too)."""
  flags.DEFINE_string("config", "configs/liconn.py", "Config file (path[:arg]).")
  flags.DEFINE_list("patch", [], "Patch z,y,x (default: the config's data.patch_size).")
  flags.DEFINE_integer("batch", 0, "Per-device batch (0: the config's train.batch_size).")
  flags.DEFINE_list("predict", [], "Also extrapolate to batch,z,y,x (e.g. 2,128,128,128).")
  flags.DEFINE_multi_string("set", [], "Config override key=value (e.g. model.remat=false).")


def _parse_value(text: str):
  """``--set`` values: JSON where they parse (``false``, ``2``, ``[64, 64, 64]``), else a string."""
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def load(config_path: str, overrides=()):
  """The config at ``config_path`` (``path[:arg]``, relative to the checkout) with ``key=value``
  overrides applied."""
  from jaxseg.common.config_util import load_config

  path, _, arg = config_path.partition(":")
  path = path if os.path.isabs(path) else os.path.join(REPO, path)
  items = {}
  for item in overrides:
    key, _, value = item.partition("=")
    items[key] = _parse_value(value)
  return load_config(f"{path}:{arg}" if arg else path, items or None)


def train_step_memory(config, patch=None, batch=None, compiler_options=None) -> dict:
  """``memory_analysis()`` of the train step for ``config`` on one device, compiled only.

  ``patch`` ``(z, y, x)`` and ``batch`` (per device) override the config's (which is changed in
  place); ``compiler_options`` go to XLA. Returns the settings measured and ``temp_bytes``,
  ``argument_bytes``, ``output_bytes``, ``alias_bytes``, ``voxels`` (``batch x prod(patch)``),
  ``temp_bytes_per_voxel`` and ``compile_s``.
  """
  import jax
  import numpy as np

  from jaxseg.data import targets
  from jaxseg.training import optim, sharding, train_lib

  if patch is not None:
    config.data.patch_size = tuple(int(p) for p in patch)
  if batch:
    config.train.batch_size = int(batch)
  batch = int(config.train.batch_size)
  patch = tuple(int(p) for p in config.data.patch_size)
  shard = sharding.create_sharding(1)
  tx = optim.create_optimizer(config.optim, int(config.train.num_steps))
  graphdef, state = train_lib.abstract_train_state(config, tx)
  read_shape = targets.read_shape_for(config)
  step_fn = train_lib.make_train_step(config, graphdef, tx, shard, read_shape)
  in_channels = int(config.model.in_channels)
  image = jax.ShapeDtypeStruct((batch, *read_shape, in_channels), np.float32)
  labels = jax.ShapeDtypeStruct((batch, *read_shape), np.int32)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, image, labels).compile(compiler_options=compiler_options)
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  voxels = batch * int(np.prod(patch))
  temp = int(mem.temp_size_in_bytes)
  return {
    "model": str(config.model.name),
    "size": str(config.model.get("size", "")),
    "dtype": train_lib.compute_dtype(config),
    "remat": bool(config.model.get("remat", False)),
    "batch": batch,
    "patch": list(patch),
    "backend": jax.default_backend(),
    "compile_s": round(compile_s, 1),
    "argument_bytes": int(mem.argument_size_in_bytes),
    "output_bytes": int(mem.output_size_in_bytes),
    "alias_bytes": int(mem.alias_size_in_bytes),
    "temp_bytes": temp,
    "voxels": voxels,
    "temp_bytes_per_voxel": temp / voxels,
  }


def main(argv):
  del argv
  config = load(FLAGS.config, FLAGS.set)
  result = train_step_memory(config, FLAGS.patch or None, FLAGS.batch or None)
  if FLAGS.predict:
    b, z, y, x = (int(v) for v in FLAGS.predict)
    # Per-voxel temporaries times the voxels there, plus the state once. Slightly high: the
    # parameter gradients and other fixed temporaries are counted as if they grew with the batch.
    result["predict_shape"] = [b, z, y, x]
    result["predicted_bytes"] = int(
      result["temp_bytes_per_voxel"] * b * z * y * x + result["argument_bytes"]
    )
  print(json.dumps(result))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
