"""``--checkpoint`` of ``predict`` / ``tune`` / ``run``: a work dir, its checkpoints folder or a step
folder, and a work dir standing in for ``--config`` (its resolved ``config.json``).

One tiny model is trained once (steps 2 and 4 kept); the commands run in fresh processes (absl
flags are process-global), the checks of the path forms in this one. The checkpoint's work dir
must come out of every command byte for byte as it went in.
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from cli_asserts import one_line as _one_line

from jaxseg.common import cli, config_util
from jaxseg.common.config_util import load_config
from jaxseg.common.errors import ConfigError, MissingInputError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO_ROOT, "configs", "demo.py")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
# As tests/training_train_lib_test.py: a model and data that train in seconds on a CPU.
TINY = {
  "data.synth.shape": (24, 48, 48),
  "data.synth.chunks": (24, 48, 48),
  "data.synth.train_seeds": (0,),
  "data.patch_size": (8, 24, 24),
  "data.prefetch": 1,
  "model.widths": (4, 8),
  "model.norm_groups": 2,
  "train.batch_size": 2,
  "train.mesh_devices": 1,
  "train.num_steps": 4,
  "train.log_every": 2,
  "train.eval_every": 0,
  "train.eval_batches": 0,
  "train.checkpoint_every": 2,
  "train.keep_every": 2,  # steps 2 and 4 both stay
  "run.decoders": ("cc",),
  "run.baselines": False,
  "qc.enabled": False,
}
# Inference on the small volumes: given on the command line, on top of either config.
INFER = ["--config.infer.window=(8,24,24)", "--config.infer.block_shape=(24,48,48)"]


def _flags(overrides: dict) -> list[str]:
  def text(value):
    return value if isinstance(value, str) else repr(value).replace(" ", "")

  return [f"--config.{k}={text(v)}" for k, v in overrides.items()]


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", module, *args]
  return subprocess.run(
    command, capture_output=True, text=True, cwd=REPO_ROOT, env=ENV, timeout=300
  )


def _model(folder, name: str = "seed101") -> dict:
  """What ``predict`` recorded of the weights of ``name`` in ``folder`` (its jaxseg manifest)."""
  manifest = json.loads((folder / ".jaxseg.json").read_text())
  return manifest["entries"][f"predict:{name}"]["fingerprint"]["model"]


def _snapshot(root: str) -> dict:
  """Every file under ``root`` with its bytes' hash and its modification time."""
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = (
          hashlib.sha256(f.read()).hexdigest(),
          os.stat(path).st_mtime_ns,
        )
  return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """``(workdir, overrides)``: a tiny model trained for 4 steps on generated data."""
  from jaxseg.synthesis import generate_dataset
  from jaxseg.training.train_lib import train_and_evaluate

  base = tmp_path_factory.mktemp("checkpoint_flag")
  root = str(base / "data")
  overrides = {**TINY, "data.root": root}
  config = load_config(DEMO, overrides)
  generate_dataset(config.data.synth, root, show_progress=False)
  workdir = str(base / "trained")
  train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  return workdir, overrides


# -- the forms of --checkpoint --------------------------------------------------------------------


def test_a_work_dir_its_checkpoints_folder_and_a_step_folder_resolve(trained):
  workdir, _ = trained
  folder = os.path.join(workdir, "checkpoints")
  for value, step in ((workdir, None), (folder, None), (os.path.join(folder, "2"), 2)):
    found = cli.resolve_checkpoint(value)
    assert (found.folder, found.workdir, found.step) == (folder, workdir, step)
    assert found.config_path == os.path.join(workdir, "config.json")


def test_what_is_not_a_checkpoint_is_refused_naming_the_forms(trained, tmp_path):
  with pytest.raises(MissingInputError, match="does not exist; name a work dir"):
    cli.resolve_checkpoint(str(tmp_path / "nope"))
  (tmp_path / "ckpts" / "7").mkdir(parents=True)
  with pytest.raises(MissingInputError, match="is not a checkpoint step folder"):
    cli.resolve_checkpoint(str(tmp_path / "ckpts" / "7"))
  with pytest.raises(MissingInputError, match="holds no checkpoints"):
    cli.resolve_checkpoint(str(tmp_path))


def test_the_saved_config_equals_the_one_that_trained(trained):
  workdir, overrides = trained
  saved = os.path.join(workdir, "config.json")
  argv = cli.with_saved_config(["prog", f"--checkpoint={workdir}/checkpoints/2"], ["checkpoint"])
  loader, _, path = argv[1].removeprefix("--config=").partition(":")
  assert path == saved
  config = config_util._load_module(loader).get_config(path)
  assert config_util.config_to_dict(config) == config_util.config_to_dict(
    load_config(DEMO, overrides)
  )
  assert config.infer.window == (32, 64, 64)  # tuples again, as the recipe wrote them
  # A --config given wins; no source flag leaves argv as it is.
  given = ["prog", f"--config={DEMO}", f"--checkpoint={workdir}"]
  assert cli.with_saved_config(given, ["checkpoint"]) == given
  assert cli.with_saved_config(["prog", "--x=1"], ["checkpoint"]) == ["prog", "--x=1"]


def test_a_work_dir_without_config_json_asks_for_config(trained, tmp_path):
  (tmp_path / "checkpoints" / "3" / "params").mkdir(parents=True)
  with pytest.raises(ConfigError, match=r"has no config\.json"):
    cli.with_saved_config(["prog", f"--checkpoint={tmp_path}"], ["checkpoint"])


# -- the commands ---------------------------------------------------------------------------------


def test_predict_without_config_equals_predict_with_it_and_a_step_folder_picks_its_step(
  trained, tmp_path
):
  workdir, overrides = trained
  before = _snapshot(workdir)
  name = "seed101"
  given = _run(
    "jaxseg.predict", f"--config={DEMO}", *_flags(overrides), *INFER, f"--checkpoint={workdir}",
    "--step=latest", "--input=split:test", f"--output={tmp_path / 'a'}",
  )  # fmt: skip
  assert given.returncode == 0, given.stderr[-3000:]
  saved = _run(
    "jaxseg.predict", *INFER, f"--checkpoint={workdir}/checkpoints/2", "--input=split:test",
    f"--output={tmp_path / 'b'}",
  )  # fmt: skip
  assert saved.returncode == 0, saved.stderr[-3000:]
  from jaxseg.io import open_volume

  folder = os.path.join(workdir, "checkpoints")
  assert _model(tmp_path / "a") == {
    "checkpoint_dir": folder, "name": "rsunet", "step": 4, "weights": "ema"
  }  # fmt: skip
  assert _model(tmp_path / "b") == {**_model(tmp_path / "a"), "step": 2}
  aff_a, aff_b = (
    open_volume(str(tmp_path / out / f"{name}.zarr" / "affinities")).read() for out in "ab"
  )
  assert aff_a.shape == aff_b.shape and not np.array_equal(aff_a, aff_b)  # other weights

  # Without --config, the same step: the same bytes, and the same fingerprint (reused as is).
  again = _run(
    "jaxseg.predict", *INFER, f"--checkpoint={workdir}", "--step=latest", "--input=split:test",
    f"--output={tmp_path / 'a'}",
  )  # fmt: skip
  assert again.returncode == 0, again.stderr[-3000:]
  assert "0 block(s) predicted" in again.stdout, again.stdout
  assert _snapshot(workdir) == before


def test_predict_refuses_a_contradicting_step_and_a_bad_checkpoint_in_one_line(trained, tmp_path):
  workdir, _ = trained
  out = f"--output={tmp_path / 'out'}"
  proc = _run(
    "jaxseg.predict", f"--checkpoint={workdir}/checkpoints/2", "--step=4", "--input=x", out
  )
  _one_line(proc, "jaxseg.predict", "--step=4", "contradicts", "step 2")
  proc = _run("jaxseg.predict", f"--checkpoint={tmp_path / 'nope'}", "--input=x", out)
  _one_line(proc, "jaxseg.predict", "nope", "does not exist")
  (tmp_path / "ck" / "checkpoints" / "9").mkdir(parents=True)
  proc = _run(
    "jaxseg.predict", f"--config={DEMO}", f"--checkpoint={tmp_path / 'ck' / 'checkpoints' / '9'}",
    "--input=x", out,
  )  # fmt: skip
  _one_line(proc, "jaxseg.predict", "not a checkpoint step folder")
  assert not os.path.exists(tmp_path / "out")


def test_run_test_with_a_checkpoint_does_not_train_and_leaves_it_untouched(trained, tmp_path):
  workdir, _ = trained
  before = _snapshot(workdir)
  new = tmp_path / "eval"
  proc = _run(
    "jaxseg.run", f"--checkpoint={workdir}/checkpoints/2", *INFER, f"--workdir={new}",
    "--mode=test", "--noprogress",
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "[train]" not in proc.stdout and "[test] ran" in proc.stdout, proc.stdout
  assert not (new / "checkpoints").exists() and not (new / "config.json").exists()
  (key,) = os.listdir(new / "predictions")
  assert _model(new / "predictions" / key)["step"] == 2
  assert (new / "results" / "report.md").exists()
  assert _snapshot(workdir) == before

  # --mode=train with a checkpoint is a contradiction: one line, nothing written.
  proc = _run(
    "jaxseg.run", f"--checkpoint={workdir}", f"--workdir={tmp_path / 'x'}", "--mode=train"
  )
  _one_line(proc, "jaxseg.run", "--mode=train", "--checkpoint")
  assert not (tmp_path / "x").exists()
  # Overrides with neither --config nor a --checkpoint have no config to apply to.
  proc = _run("jaxseg.run", *INFER, f"--workdir={tmp_path / 'x'}")
  _one_line(proc, "jaxseg.run", "config.infer.window", "need --config")
  # A step folder and another step number in the config contradict each other: one line each.
  for module in ("jaxseg.run", "jaxseg.tune"):
    proc = _run(
      module, f"--checkpoint={workdir}/checkpoints/2", "--config.run.checkpoint_step=4",
      f"--workdir={tmp_path / 'x'}",
    )  # fmt: skip
    _one_line(proc, module, "config.run.checkpoint_step=4", "contradicts", "step 2")
  assert not (tmp_path / "x").exists()


def test_tune_with_a_step_folder_and_no_config_tunes_that_step(trained, tmp_path):
  workdir, _ = trained
  before = _snapshot(workdir)
  proc = _run(
    "jaxseg.tune", f"--checkpoint={workdir}/checkpoints/2", f"--workdir={tmp_path / 'tune'}",
    *INFER, "--n_trials=1", "--noprogress",
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / "tune" / "tune" / "cc" / "best_params.json").exists()
  (key,) = os.listdir(tmp_path / "tune" / "predictions")
  assert _model(tmp_path / "tune" / "predictions" / key, "seed100")["step"] == 2
  assert _snapshot(workdir) == before
