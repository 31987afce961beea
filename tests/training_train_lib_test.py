"""Training loop: demo run learns, exact resume in a fresh process, 1 vs 2 devices, checkpoints.

Everything runs on a tiny generated NISB-layout dataset with a tiny RSUNet, so each
``train_and_evaluate`` call is dominated by compilation. The straight reference run is shared by
the resume, 2-device and inference-restore tests (module fixture).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.common.config_util import load_config
from jaxseg.common.errors import OutputError
from jaxseg.data import pipeline
from jaxseg.synthesis import generate_dataset
from jaxseg.training import checkpoint as ckpt_lib
from jaxseg.training import optim, paths, summary, train_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO_ROOT, "configs", "demo.py")

# A tiny demo: 2-level RSUNet, 8 x 24 x 24 patches (+10 voxels of target context per axis).
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
  "train.ema.warmup_steps": 2,  # so the EMA has both phases within 4 steps
  "optim.lr": 3e-3,
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny_nisb")
  config = load_config(DEMO, TINY)
  generate_dataset(config.data.synth, str(root), show_progress=False)
  return str(root)


def _config(root, **overrides):
  return load_config(DEMO, {**TINY, "data.root": root, **overrides})


def _final_state(workdir, config):
  """Params, EMA, optimizer state and step of the latest checkpoint in ``workdir``."""
  manager = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"))
  try:
    step = manager.latest_step()
    _, params, rest = train_lib.model_graphdef(config)
    tx = optim.create_optimizer(config.optim, config.train.num_steps)
    train = {
      "step": jax.ShapeDtypeStruct((), jnp.int32),
      "opt_state": jax.eval_shape(tx.init, params),
      "rest": rest,
    }
    out = manager.restore(step, params=params, train=train, ema=params)
  finally:
    manager.close()
  return step, out


def _assert_trees_close(a, b, atol, rtol=0.0):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), atol=atol, rtol=rtol, err_msg=jax.tree_util.keystr(path)
    )


@pytest.fixture(scope="module")
def straight_run(data_root, tmp_path_factory):
  """4 steps on 1 device, global batch 2: the reference for resume and 2-device runs."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  config = _config(data_root)
  result = train_lib.train_and_evaluate(config, workdir)
  return workdir, config, result


@pytest.mark.slow
def test_straight_run_outputs(straight_run):
  workdir, config, result = straight_run
  assert result["step"] == 4 and result["resumed_from"] is None
  assert np.isfinite(result["train_loss"])
  # Saved at 2 and 4 (checkpoint_every=2, the end); monitored val_loss never computed, so only
  # the latest is kept.
  assert sorted(os.listdir(result["checkpoint_dir"])) == ["4"]
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["model"]["widths"] == [4, 8] and saved["train"]["num_steps"] == 4
  records = summary.read_metrics(workdir, "train")
  assert [r["step"] for r in records] == [2, 4]
  assert {"loss", "lr", "steps_per_s", "voxels_per_s", "loss_c0", "loss_c5"} <= set(records[0])
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(f"{workdir}/tensorboard"))
  # The EMA warmed up for 2 updates and then averaged: it differs from the raw parameters.
  step, state = _final_state(workdir, config)
  assert step == 4 and int(state["train"]["step"]) == 4
  diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state["params"], state["ema"])
  assert max(jax.tree.leaves(diff)) > 0


@pytest.mark.slow
def test_resume_in_fresh_process_matches_straight_run(straight_run, data_root, tmp_path):
  ref_dir, config, _ = straight_run
  workdir = str(tmp_path / "resumed")
  # First half in this process, stopped at step 2 as a preempted job would be (the cosine
  # schedule still spans 4 steps)...
  first = train_lib.train_and_evaluate(config, workdir, stop_at=2)
  assert first["step"] == 2 and sorted(os.listdir(first["checkpoint_dir"])) == ["2"]
  # ... the rest in a fresh process through the command-line entry point.
  flags = [f"--config.{k}={v}" for k, v in {**TINY, "data.root": data_root}.items()]
  run = subprocess.run(
    [sys.executable, "-m", "jaxseg.train", f"--config={DEMO}", f"--workdir={workdir}", *flags],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    check=False,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert "trained to step 4" in run.stdout
  step_a, a = _final_state(ref_dir, config)
  step_b, b = _final_state(workdir, config)
  assert step_a == step_b == 4
  # Same crops, same augmentation keys, same optimizer and EMA state: the same numbers.
  _assert_trees_close(a, b, atol=1e-6)
  # The resumed run appended its log records after the first half's.
  assert [r["step"] for r in summary.read_metrics(workdir, "train")] == [2, 4]


@pytest.mark.slow
def test_two_devices_match_one_device(straight_run, data_root, tmp_path):
  ref_dir, config, ref = straight_run
  assert len(jax.devices()) >= 2, "conftest sets 2 simulated CPU devices"
  # Same global batch of 2: 1 per device on 2 devices instead of 2 on 1.
  two = _config(data_root, **{"train.batch_size": 1, "train.mesh_devices": 2})
  result = train_lib.train_and_evaluate(two, str(tmp_path))
  assert result["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)
  _, a = _final_state(ref_dir, config)
  _, b = _final_state(str(tmp_path), two)
  # Only the order of the cross-device sums differs.
  _assert_trees_close(a["params"], b["params"], atol=2e-5)
  _assert_trees_close(a["ema"], b["ema"], atol=2e-5)


@pytest.mark.slow
def test_restore_inference_model_carries_ema_weights(straight_run):
  workdir, config, _ = straight_run
  model, info = train_lib.restore_inference_model(config, workdir)
  assert info["step"] == 4 and info["weights"] == "ema"
  _, state = _final_state(workdir, config)
  from flax import nnx

  _assert_trees_close(nnx.to_pure_dict(nnx.state(model, nnx.Param)), state["ema"], atol=0)
  raw, raw_info = train_lib.restore_inference_model(config, workdir, "best", use_ema=False)
  assert raw_info["weights"] == "params"
  _assert_trees_close(nnx.to_pure_dict(nnx.state(raw, nnx.Param)), state["params"], atol=0)
  logits = model(jnp.zeros((1, 8, 24, 24, 1)))
  assert logits.shape == (1, 8, 24, 24, 6) and bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.slow
def test_different_model_in_workdir_is_refused(straight_run, data_root):
  workdir, _, _ = straight_run
  with open(os.path.join(workdir, "config.json")) as f:
    before = f.read()
  wider = _config(data_root, **{"model.widths": (4, 16)})
  with pytest.raises(OutputError, match=r"model\.widths: \[4, 8\] -> \[4, 16\].*--overwrite"):
    train_lib.train_and_evaluate(wider, workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    assert f.read() == before  # refused before writing anything
  # Compute dtype and rematerialisation do not change the parameters: accepted.
  manager = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"))
  manager.check_model(4, _config(data_root, **{"model.remat": True}).model)
  manager.close()


@pytest.mark.slow
def test_overwrite_starts_afresh_and_keeps_what_jaxseg_did_not_write(data_root, tmp_path):
  """Case 5 of the safe outputs: --overwrite in a work dir of other training settings removes only
  that run's own files (config, checkpoints, logs) and trains from step 0."""
  workdir = str(tmp_path / "run")
  config = _config(data_root, **{"train.num_steps": 2, "train.checkpoint_every": 2})
  train_lib.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "notes.txt"), "w") as f:
    f.write("lr sweep, run 3\n")
  other = _config(data_root, **{"train.num_steps": 2, "optim.lr": 0.01})
  with pytest.raises(OutputError, match=r"optim\.lr"):
    train_lib.train_and_evaluate(other, workdir)
  result = train_lib.train_and_evaluate(other, workdir, overwrite=True)
  assert result["resumed_from"] is None and result["step"] == 2
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["optim"]["lr"] == 0.01
  with open(os.path.join(workdir, "notes.txt")) as f:
    assert f.read() == "lr sweep, run 3\n"


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_root, tmp_path, monkeypatch):
  original = pipeline.TrainData.batch

  def poisoned(self, step, batch_size):
    batch = original(self, step, batch_size)
    if self.split == "train" and step >= 3:
      batch["image"][...] = np.nan
    return batch

  monkeypatch.setattr(pipeline.TrainData, "batch", poisoned)
  config = _config(data_root, **{"train.num_steps": 6})
  with pytest.raises(
    train_lib.NonFiniteLossError, match=r"step 3 .*last good checkpoint is step 2"
  ):
    train_lib.train_and_evaluate(config, str(tmp_path))
  manager = ckpt_lib.CheckpointManager(str(tmp_path / "checkpoints"))
  assert manager.all_steps() == [2]
  manager.close()


@pytest.mark.slow
def test_demo_training_lowers_validation_loss(data_root, tmp_path):
  config = _config(
    data_root,
    **{
      "train.num_steps": 40,
      "train.log_every": 10,
      "train.eval_every": 20,
      "train.eval_batches": 2,
      "train.checkpoint_every": 0,
      "train.ema.warmup_steps": 10,
      "train.ema.decay": 0.9,
      "train.keep_top_k": 1,
      "optim.lr": 1e-2,
    },
  )
  result = train_lib.train_and_evaluate(config, str(tmp_path))
  val = summary.read_metrics(str(tmp_path), "val")
  assert [r["step"] for r in val] == [0, 20, 40]
  assert val[-1]["loss"] < 0.75 * val[0]["loss"], [r["loss"] for r in val]
  assert val[-1]["accuracy"] > val[0]["accuracy"]
  assert result["val_loss"] == pytest.approx(val[-1]["loss"])
  # Checkpoints at each validation (monitor val_loss): the best one plus the latest are kept.
  kept = sorted(int(s) for s in os.listdir(result["checkpoint_dir"]))
  assert kept == sorted({result["best_step"], 40})
  assert any(f.startswith("events.out") for f in os.listdir(tmp_path / "tensorboard"))


# -- checkpoint retention, summaries, entry point (no training) ------------------------------------


def _tiny_tree(value):
  return {"w": jnp.full((2, 3), value, jnp.float32), "blocks": {0: {"b": jnp.zeros(3)}}}


@pytest.mark.parametrize(
  ("mode", "keep_every", "expected"),
  [("min", 0, [2, 4, 6]), ("max", 0, [1, 5, 6]), ("min", 3, [2, 3, 4, 6])],
)
def test_checkpoint_retention_top_k_plus_latest(tmp_path, mode, keep_every, expected):
  values = {1: 5.0, 2: 1.0, 3: 3.0, 4: 2.0, 5: 4.0, 6: None}  # step 6: no metric (latest)
  manager = ckpt_lib.CheckpointManager(
    str(tmp_path), keep_top_k=2, monitor="val_loss", monitor_mode=mode, keep_every=keep_every
  )
  for step, value in values.items():
    metrics = {} if value is None else {"val_loss": value}
    manager.save(step, params=_tiny_tree(step), train={"step": jnp.int32(step)}, metrics=metrics)
  manager.close()
  # Top-2 by val_loss (min: steps 2, 4; max: 1, 5), the latest (6), milestones (3, 6).
  fresh = ckpt_lib.CheckpointManager(str(tmp_path), keep_top_k=2, monitor_mode=mode)
  assert fresh.all_steps() == expected
  assert fresh.best_step() == (2 if mode == "min" else 1)
  assert fresh.resolve_step("best") == fresh.best_step() and fresh.resolve_step(None) == 6
  restored = fresh.restore(6, params=_tiny_tree(0.0))["params"]
  np.testing.assert_array_equal(restored["w"], np.full((2, 3), 6.0))
  assert list(restored["blocks"]) == [0]  # integer keys (NNX lists) survive the round trip
  with pytest.raises(FileNotFoundError, match="no EMA"):
    fresh.restore(6, params=_tiny_tree(0.0), ema=_tiny_tree(0.0))
  fresh.close()
  assert paths.checkpoint_dir(str(tmp_path)) == str(tmp_path)
  assert paths.checkpoint_dir(str(tmp_path.parent)) == str(tmp_path.parent / "checkpoints")


def test_restore_model_needs_no_optimizer(tmp_path):
  """Inference restores the weights and the non-parameter state without the optimizer's tree."""
  manager = ckpt_lib.CheckpointManager(str(tmp_path), async_save=False)
  rest = {"stats": {"mean": jnp.arange(3.0)}}
  opt_state = ({"count": jnp.int32(2), "mu": _tiny_tree(0.5)}, None)  # unknown to the restore
  train = {"step": jnp.int32(2), "opt_state": opt_state, "rest": rest}
  manager.save(2, params=_tiny_tree(1.0), train=train, ema=_tiny_tree(2.0))
  manager.close()
  fresh = ckpt_lib.CheckpointManager(str(tmp_path))
  abstract_rest = jax.eval_shape(lambda: rest)
  out = fresh.restore_model(2, params=_tiny_tree(0.0), rest=abstract_rest)
  assert out["weights"] == "ema"
  np.testing.assert_array_equal(out["params"]["w"], np.full((2, 3), 2.0))
  np.testing.assert_array_equal(out["rest"]["stats"]["mean"], np.arange(3.0))
  raw = fresh.restore_model(2, params=_tiny_tree(0.0), rest={}, use_ema=False)
  assert raw["weights"] == "params" and raw["rest"] == {}
  np.testing.assert_array_equal(raw["params"]["w"], np.full((2, 3), 1.0))
  fresh.close()


def test_metric_writer_and_preview(tmp_path):
  writer = summary.MetricWriter(str(tmp_path))
  writer.write_scalars(2, {"loss": 1.5, "lr": np.float32(0.1)}, kind="train")
  writer.write_scalars(2, {"loss": 1.25, "lr": 0.1}, kind="train")  # re-logged after a resume
  writer.write_scalars(4, {"loss": float("nan")}, kind="val")
  grid = summary.preview_grid(
    np.random.default_rng(0).random((8, 10)), np.ones((8, 10, 6)), np.zeros((8, 10, 6))
  )
  assert grid.shape == (2 * 8 + 2, 4 * 10 + 3 * 2) and grid.dtype == np.uint8
  assert grid[0, 10 + 2] == 255 and grid[8 + 2, 10 + 2] == 0  # target ch0 = 1, prediction = 0
  writer.write_image(4, "val/preview", grid)
  writer.close()
  train = summary.read_metrics(str(tmp_path), "train")
  assert [(r["step"], r["loss"]) for r in train] == [(2, 1.25)]
  (val,) = summary.read_metrics(str(tmp_path), "val")
  assert np.isnan(val["loss"])


def test_distributed_switch():
  from jaxseg.common import runtime

  config = _config("unused")
  assert not runtime.wants_distributed(config, environ={})
  assert runtime.wants_distributed(config, environ={"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
  config.train.distributed = True
  assert runtime.wants_distributed(config, environ={})


def test_training_previews_without_validation(data_root, tmp_path, monkeypatch):
  """``train.preview_every`` (SNEMI has no validation; PyTC logs image previews): a fixed,
  unaugmented training crop, its targets and the current prediction, as TensorBoard images and
  ``previews/train_preview.png``; the crop stays the same while the prediction changes."""
  images = []
  original = summary.MetricWriter.write_image

  def recording(self, step, tag, image):
    images.append((step, tag, np.asarray(image)))
    original(self, step, tag, image)

  monkeypatch.setattr(summary.MetricWriter, "write_image", recording)
  config = _config(data_root, **{"train.num_steps": 4, "train.preview_every": 2})
  train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  assert [(step, tag) for step, tag, _ in images] == [(2, "train/preview"), (4, "train/preview")]
  (_, _, first), (_, _, last) = images
  half = first.shape[0] // 2  # top row: image and targets; bottom row: image and prediction
  assert np.array_equal(first[:half], last[:half]) and first[:half].std() > 0
  assert not np.array_equal(first[half:], last[half:])
  assert os.path.getsize(tmp_path / "run" / "previews" / "train_preview.png") > 200
  # With validation on, its own preview is enough: no training preview.
  images.clear()
  config = _config(data_root, **{"train.num_steps": 2, "train.preview_every": 1,
                                 "train.eval_every": 2, "train.eval_batches": 1})  # fmt: skip
  train_lib.train_and_evaluate(config, str(tmp_path / "with_val"))
  assert {tag for _, tag, _ in images} == {"val/preview"}
