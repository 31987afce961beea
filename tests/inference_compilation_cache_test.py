"""The persistent compilation cache (``runtime.enable_compilation_cache``): a predict repeated in a
new process loads every compiled step instead of compiling it."""

import json
import os
import subprocess
import sys

import pytest

from jaxseg.common import runtime

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Predicts a small random volume with the tiny demo net, as ``python -m jaxseg.predict`` would
# (the cache turned on after JAX is imported); prints the cache folder and JAX's cache events.
_PREDICT = r"""
import json, os, sys
import jax
import numpy as np
from flax import nnx
from jaxseg.common import runtime
from jaxseg.common.config_util import load_config
from jaxseg.inference import engine as engine_lib, predict_lib
from jaxseg.io import create_zarr
from jaxseg.models import build_model

directory = runtime.enable_compilation_cache()
events = {"hits": 0, "misses": 0}

def listen(event, **kwargs):
  if event.endswith("/cache_hits"):
    events["hits"] += 1
  elif event.endswith("/cache_misses"):
    events["misses"] += 1

jax.monitoring.register_event_listener(listen)
image, out = sys.argv[1], sys.argv[2]
if not os.path.exists(image):
  array = np.random.default_rng(0).integers(0, 256, (12, 40, 36), dtype=np.uint8)
  create_zarr(image, array.shape, array.dtype, chunks=array.shape).write((0, 0, 0), array)
config = load_config(
  sys.argv[3],
  {"model.widths": (4, 8), "model.norm_groups": 2, "infer.window": (8, 16, 16),
   "infer.block_shape": (8, 16, 16), "infer.sw_batch_size": 2},
)
apply, variables = engine_lib.model_apply(build_model(config.model, rngs=nnx.Rngs(0)))
sources = predict_lib.resolve_inputs(config, [image])
(summary,) = predict_lib.predict_volumes(
  config, apply, variables, sources, out, num_devices=1, show_progress=False
)
assert summary["complete"]
print(json.dumps({"directory": directory, **events}))
"""


def _env(tmp_path, **more):
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  return {**env, "JAX_PLATFORMS": "cpu", "JAXSEG_CACHE_DIR": str(tmp_path / "cache"), **more}


@pytest.mark.slow
def test_a_repeated_predict_compiles_nothing(tmp_path):
  demo = os.path.join(REPO_ROOT, "configs", "demo.py")
  image = str(tmp_path / "image.zarr")
  runs = []
  for n in range(2):
    done = subprocess.run(
      [sys.executable, "-c", _PREDICT, image, str(tmp_path / f"out{n}"), demo],
      capture_output=True, text=True, env=_env(tmp_path), cwd=REPO_ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
  first, second = runs
  assert first["directory"] == second["directory"] == str(tmp_path / "cache" / "jax")
  assert first["misses"] > 10  # the model, the window batches, the folds
  assert second["misses"] == 0 and second["hits"] >= first["misses"]
  assert len(os.listdir(first["directory"])) >= first["misses"]


def test_before_jax_is_imported_the_environment_carries_the_cache(tmp_path):
  """An entry point that may not need JAX (tune) sets JAX's variables instead of importing it."""
  code = (
    "import sys; from jaxseg.common import runtime; d = runtime.enable_compilation_cache(); "
    "assert 'jax' not in sys.modules; import jax; "
    "print(d, jax.config.jax_compilation_cache_dir, "
    "jax.config.jax_persistent_cache_min_compile_time_secs)"
  )
  done = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, env=_env(tmp_path)
  )
  assert done.returncode == 0, done.stderr[-2000:]
  directory = str(tmp_path / "cache" / "jax")
  assert done.stdout.split() == [directory, directory, "0.0"]
  off = subprocess.run(
    [sys.executable, "-c", code.replace("assert", "assert d is None and")],
    capture_output=True, text=True, env=_env(tmp_path, JAXSEG_COMPILATION_CACHE="0"),
  )  # fmt: skip
  assert off.returncode == 0, off.stderr[-2000:]


def test_cache_folder_rules(tmp_path):
  assert runtime.compilation_cache_dir({"JAXSEG_CACHE_DIR": "/data/c"}) == "/data/c/jax"
  assert runtime.compilation_cache_dir({"XDG_CACHE_HOME": "/xdg"}) == "/xdg/jaxseg/jax"
  home = os.path.expanduser("~")
  assert runtime.compilation_cache_dir({}) == os.path.join(home, ".cache", "jaxseg", "jax")
  assert runtime.enable_compilation_cache(environ={"JAXSEG_COMPILATION_CACHE": "off"}) is None
  blocked = tmp_path / "file"
  blocked.write_text("not a folder")
  assert runtime.enable_compilation_cache(str(blocked / "jax"), environ={}) is None
