"""Batch prediction end to end: exact blending, streaming, resume, devices, hosts, bad input, CLI.

The blending tests use a "model" whose output depends on the position inside the window, so the
blending weights matter, and compare with a direct numpy evaluation of the same windows (float64).
The streaming tests use a tiny random RSUNet; they compare bytes, not tolerances.
"""

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxseg.common.config_util import load_config
from jaxseg.common.errors import OutputError
from jaxseg.data.affinity import compute_affinities
from jaxseg.inference import engine as engine_lib
from jaxseg.inference import predict_lib, streaming
from jaxseg.io import VolumeError, create_zarr, open_volume
from jaxseg.models import build_model

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO_ROOT, "configs", "demo.py")
SNEMI = os.path.join(REPO_ROOT, "configs", "snemi.py")

# demo RSUNet widths (4, 8): windows must be multiples of (1, 2, 2).
TINY_MODEL = {"model.widths": (4, 8), "model.norm_groups": 2}


def _config(path=DEMO, **overrides):
  return load_config(path, {**TINY_MODEL, **overrides})


def _ramp_logits(x, channels):
  """A position-dependent 'model': logits[c] = (c + 1) * image + ramp over the window."""
  _, z, y, x_ = x.shape[:4]
  ramp = (
    np.arange(z)[:, None, None] * 0.5 + np.arange(y)[None, :, None] * 0.25 - np.arange(x_) * 0.125
  )
  scale = np.arange(1, channels + 1, dtype=np.float32)
  return x[..., :1] * scale + ramp[None, ..., None].astype(np.float32)


def _ramp_apply(channels):
  def apply(variables, x):
    return jnp.asarray(_ramp_logits(x, channels))

  return apply


def _write_image(path, image, resolution=(20.0, 9.0, 9.0)):
  vol = create_zarr(path, image.shape, image.dtype, chunks=image.shape, resolution=resolution)
  vol.write((0,) * image.ndim, image)
  vol.flush()
  return path


def _predict(config, apply, variables, image_path, out_dir, **kwargs):
  sources = predict_lib.resolve_inputs(config, [image_path])
  kwargs.setdefault("show_progress", False)
  kwargs.setdefault("num_devices", 1)
  return predict_lib.predict_volumes(config, apply, variables, sources, out_dir, **kwargs)


def _read_output(out_dir, name="image"):
  return open_volume(os.path.join(out_dir, f"{name}.zarr", "affinities")).read()


def _starts(size, window, stride):
  """PyTC's grid, written out: 0, stride, ... while inside, plus a final window flush at the end."""
  starts = list(range(0, size - window + 1, stride))
  if starts[-1] != size - window:
    starts.append(size - window)
  return starts


def _bump(n):
  u = 2.0 * (np.arange(n) + 1) / (n + 1) - 1.0
  k = np.exp(-1.0 / (1.0 - u**2))
  return k / k.max()


def _distance(window):
  grids = np.meshgrid(*[np.arange(n) for n in window], indexing="ij")
  per_axis = [np.minimum(g + 1, n - g) for g, n in zip(grids, window, strict=True)]
  return np.minimum(np.minimum(per_axis[0], per_axis[1]), per_axis[2]).astype(np.float64)


def _direct_blend(image, window, stride, pad, weights, channels, act_before, act):
  """The blended output computed window by window in float64 over the padded volume."""
  padded = np.pad(image, [(p, p) for p in pad], mode="reflect") if any(pad) else image
  acc = np.zeros((channels, *padded.shape))
  wsum = np.zeros(padded.shape)
  for z in _starts(padded.shape[0], window[0], stride[0]):
    for y in _starts(padded.shape[1], window[1], stride[1]):
      for x in _starts(padded.shape[2], window[2], stride[2]):
        box = (slice(z, z + window[0]), slice(y, y + window[1]), slice(x, x + window[2]))
        logits = _ramp_logits(padded[box][None, ..., None], channels)[0].astype(np.float64)
        values = np.moveaxis(act(logits) if act_before else logits, -1, 0)
        acc[(slice(None), *box)] += weights * values
        wsum[box] += weights
  out = acc / np.maximum(wsum, 1e-6)
  if not act_before:
    out = act(out)
  crop = tuple(slice(p, n - p) for p, n in zip(pad, padded.shape, strict=True))
  return out[(slice(None), *crop)]


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def test_snemi_preset_blending_matches_direct_numpy(tmp_path):
  """SNEMI: reflect pad, bump weights, logits blended then sigmoid, cropped back to the input."""
  rng = np.random.default_rng(0)
  image = rng.random((9, 21, 19)).astype(np.float32)
  window, pad = (4, 8, 8), (2, 4, 4)
  config = _config(
    SNEMI,
    **{
      "model.widths": (4, 8),
      "model.norm_groups": 2,
      "infer.window": window,
      "infer.pad": pad,
      "infer.crop_pad": (2, 2, 4, 4, 4, 4),
      "infer.sw_batch_size": 3,
      "infer.block_shape": (4, 8, 8),
    },
  )
  assert config.infer.blending == "bump" and not config.infer.activation_before_blend
  path = _write_image(str(tmp_path / "image.zarr"), image)
  (summary,) = _predict(config, _ramp_apply(12), None, path, str(tmp_path / "out"))
  got = _read_output(str(tmp_path / "out"))
  assert got.shape == (12, *image.shape) and got.dtype == np.float32
  weights = _bump(4)[:, None, None] * _bump(8)[None, :, None] * _bump(8)[None, None, :]
  # minmax over the whole volume: the test image is already in [0, 1] but not exactly 0..1.
  normalised = (image - image.min()) / (image.max() - image.min())
  want = _direct_blend(normalised, window, (2, 4, 4), pad, weights, 12, False, _sigmoid)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
  assert summary["blocks"] == 3 * 3 * 3 and summary["complete"]


def test_nisb_preset_blending_matches_direct_numpy(tmp_path):
  """NISB: no pad, snapped 50% windows, distance weights, sigmoid(x / 5) blended, float16."""
  rng = np.random.default_rng(1)
  image = (rng.random((1, 13, 20, 18)) * 255).astype(np.uint8)  # NISB images are [c, z, y, x]
  window = (8, 8, 8)
  config = _config(
    **{"infer.window": window, "infer.sw_batch_size": 2, "infer.block_shape": (8, 8, 8)}
  )
  assert config.infer.blending == "distance" and config.infer.activation_before_blend
  assert config.infer.activation == "scale_sigmoid" and config.infer.temperature == 5.0
  path = _write_image(str(tmp_path / "image.zarr"), image)
  _predict(config, _ramp_apply(6), None, path, str(tmp_path / "out"))
  got = _read_output(str(tmp_path / "out"))
  assert got.shape == (3, 13, 20, 18) and got.dtype == np.float16
  want = _direct_blend(
    image[0] / 255.0,
    window,
    (4, 4, 4),
    (0, 0, 0),
    _distance(window),
    6,
    True,
    lambda x: _sigmoid(x / 5.0),
  )[:3]
  np.testing.assert_allclose(got.astype(np.float64), want, rtol=0, atol=1e-3)  # float16 output


# -- streaming with a real (tiny, random) network ------------------------------------------------


@pytest.fixture(scope="module")
def tiny_net():
  config = _config()
  model = build_model(config.model, rngs=nnx.Rngs(0))
  return engine_lib.model_apply(model)


@pytest.fixture(scope="module")
def volume_path(tmp_path_factory):
  rng = np.random.default_rng(2)
  image = rng.integers(0, 256, (1, 12, 40, 36), dtype=np.uint8)
  return _write_image(str(tmp_path_factory.mktemp("vol") / "image.zarr"), image)


STREAM = {
  "infer.window": (8, 16, 16),
  "infer.sw_batch_size": 2,
  "infer.block_shape": (8, 16, 16),
}


@pytest.fixture(scope="module")
def reference(tiny_net, volume_path, tmp_path_factory):
  """The tiny net's prediction with one block covering the whole volume."""
  out = str(tmp_path_factory.mktemp("ref"))
  config = _config(**{**STREAM, "infer.block_shape": (12, 40, 36)})
  _predict(config, *tiny_net, volume_path, out)
  return _read_output(out)


def test_blocks_and_two_devices_give_the_same_bytes(tiny_net, volume_path, reference, tmp_path):
  config = _config(**STREAM)
  one = str(tmp_path / "one")
  (summary,) = _predict(config, *tiny_net, volume_path, one, show_progress=True)
  assert summary["blocks"] == 2 * 3 * 3 and summary["blocks_written"] == 18
  np.testing.assert_array_equal(_read_output(one), reference)
  two = str(tmp_path / "two")
  (summary,) = _predict(config, *tiny_net, volume_path, two, num_devices=2)
  assert summary["devices"] == 2
  np.testing.assert_array_equal(_read_output(two), reference)
  assert os.path.exists(summary["preview"])
  with open(os.path.join(two, "image_predict.json")) as f:
    saved = json.load(f)
  assert saved["complete"] and saved["shape"] == [3, 12, 40, 36]


def test_killed_run_resumes_to_the_same_bytes(
  tiny_net, volume_path, reference, tmp_path, monkeypatch
):
  config = _config(**STREAM)
  out = str(tmp_path / "out")
  (first,) = _predict(config, *tiny_net, volume_path, out, max_blocks=5)
  assert first["blocks_written"] == 5 and not first["complete"]
  # Now die inside the writer after two more blocks, with work still in flight.
  real_write = streaming._write_task
  calls = {"n": 0}

  def dying_write(job, finished, written):
    calls["n"] += finished.task.write
    if calls["n"] == 3:
      raise KeyboardInterrupt("killed")
    real_write(job, finished, written)

  monkeypatch.setattr(streaming, "_write_task", dying_write)
  with pytest.raises(KeyboardInterrupt):
    _predict(config, *tiny_net, volume_path, out)
  monkeypatch.setattr(streaming, "_write_task", real_write)
  done = open_volume(os.path.join(out, "image.zarr", "blocks_done")).read()
  assert 5 < done.sum() < 18
  (last,) = _predict(config, *tiny_net, volume_path, out)
  assert last["complete"] and last["blocks_already_done"] == done.sum()
  assert last["blocks_written"] == 18 - done.sum()
  np.testing.assert_array_equal(_read_output(out), reference)


@pytest.mark.parametrize(
  "block, count, order",
  [((8, 16, 16), 2, (0, 1)), ((8, 16, 16), 2, (1, 0)), ((4, 16, 16), 3, (2, 0, 1))],
)
def test_hosts_split_the_slabs(tiny_net, volume_path, reference, tmp_path, block, count, order):
  """Processes predict contiguous slabs of blocks. One that runs before its predecessor computes
  the z carries into its first slab itself (a halo); one that runs after finds them on disk."""
  config = _config(**{**STREAM, "infer.block_shape": block})
  out = str(tmp_path / "out")
  # Process 0 makes the outputs (the others wait for them), here without predicting yet.
  (made,) = _predict(config, *tiny_net, volume_path, out, process_count=count, max_blocks=0)
  assert made["blocks_written"] == 0 and made["windows_computed"] == 0
  grid_z = -(-12 // block[0])
  for n, p in enumerate(order):
    (summary,) = _predict(config, *tiny_net, volume_path, out, process_index=p, process_count=count)
    slabs = grid_z * (p + 1) // count - grid_z * p // count
    assert summary["blocks_written"] == slabs * 3 * 3
    assert summary["complete"] == (n == len(order) - 1)
    predecessor_done = p == 0 or (p - 1) in order[:n]
    assert (summary["halo_windows"] == 0) == predecessor_done, summary
  np.testing.assert_array_equal(_read_output(out), reference)
  assert not os.path.exists(os.path.join(out, "image.zarr", "scratch"))


@pytest.mark.parametrize("block", [(8, 16, 16), (4, 8, 8), (12, 8, 36), (4, 40, 20), (12, 24, 4)])
def test_each_window_is_computed_once_in_full_batches(
  tiny_net, volume_path, reference, tmp_path, block
):
  """Any block shape (blocks smaller than the window included): every window once, model calls
  = ceil(windows / batch), and the bytes of the one-block run."""
  config = _config(**{**STREAM, "infer.block_shape": block})
  out = str(tmp_path / "out")
  (summary,) = _predict(config, *tiny_net, volume_path, out)
  np.testing.assert_array_equal(_read_output(out), reference)
  assert summary["windows"] == 2 * 4 * 4  # starts z 0, 4; y 0, 8, 16, 24; x 0, 8, 16, 20
  assert summary["windows_computed"] == summary["windows"] and summary["halo_windows"] == 0
  assert summary["model_calls"] == math.ceil(summary["windows"] / 2)
  with open(os.path.join(out, "image_predict.json")) as f:
    saved = json.load(f)
  assert saved["windows_computed"] == saved["windows"] == 32 and saved["model_calls"] == 16
  assert not os.path.exists(os.path.join(out, "image.zarr", "scratch"))


# A child process predicting the volume that kills itself (SIGKILL) at a given point of the
# writer: before the n-th block is written, while the n-th carry file is half written, after the
# n-th block is marked done but before the carries it consumed are deleted.
_KILLED_CHILD = r"""
import json, os, signal, sys
from flax import nnx
from jaxseg.common.config_util import load_config
from jaxseg.inference import engine as engine_lib, predict_lib, streaming
from jaxseg.models import build_model

spec = json.loads(sys.argv[1])
config = load_config(spec["config"], spec["overrides"])
apply, variables = engine_lib.model_apply(build_model(config.model, rngs=nnx.Rngs(0)))
where, at = spec["kill"], spec["at"]
seen = {"blocks": 0, "carries": 0}
write_task, save_carry, remove = streaming._write_task, streaming._save_carry, os.remove

def die():
  os.kill(os.getpid(), signal.SIGKILL)

def write(job, finished, written):
  seen["blocks"] += finished.task.write
  if where == "before_block" and seen["blocks"] == at and finished.task.write:
    die()
  write_task(job, finished, written)

def save(job, key, array):
  seen["carries"] += 1
  if where == "saving_carry" and seen["carries"] == at:
    scratch = streaming.scratch_dir(job)
    os.makedirs(scratch, exist_ok=True)
    with open(os.path.join(scratch, key + ".half.tmp"), "wb") as f:
      f.write(b"NUMPY-half-written" + bytes(100))
    die()
  save_carry(job, key, array)

def removing(path):
  if where == "after_done" and seen["blocks"] >= at and path.endswith(".npy"):
    die()
  remove(path)

streaming._write_task, streaming._save_carry, os.remove = write, save, removing
sources = predict_lib.resolve_inputs(config, [spec["image"]])
predict_lib.predict_volumes(
  config, apply, variables, sources, spec["out"], num_devices=1, show_progress=False
)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
  "kill, at, lose_scratch",
  [("before_block", 8, False), ("saving_carry", 5, False), ("after_done", 4, False),
   ("after_done", 7, True)],
)  # fmt: skip
def test_kill_9_then_resume_writes_the_same_bytes(
  tiny_net, volume_path, reference, tmp_path, kill, at, lose_scratch
):
  """SIGKILL at points of the writer, then a resumed run: the bytes of an uninterrupted run.
  With the scratch folder deleted by hand in between, the lost carries are computed again."""
  overrides = {**TINY_MODEL, **STREAM}
  out = str(tmp_path / "out")
  spec = {"config": DEMO, "overrides": overrides, "image": volume_path, "out": out}
  spec.update(kill=kill, at=at)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  child = subprocess.run(
    [sys.executable, "-c", _KILLED_CHILD, json.dumps(spec)],
    capture_output=True, text=True, env=env, cwd=REPO_ROOT,
  )  # fmt: skip
  assert child.returncode == -9, child.stderr[-3000:]
  done = open_volume(os.path.join(out, "image.zarr", "blocks_done")).read()
  assert 0 < done.sum() < 18
  scratch = os.path.join(out, "image.zarr", "scratch")
  if lose_scratch:
    shutil.rmtree(scratch)
  config = _config(**STREAM)
  (summary,) = _predict(config, *tiny_net, volume_path, out)
  assert summary["complete"] and summary["blocks_already_done"] == done.sum()
  assert summary["blocks_written"] == 18 - done.sum()
  np.testing.assert_array_equal(_read_output(out), reference)
  assert not os.path.exists(scratch)
  if lose_scratch:
    assert summary["halo_windows"] > 0  # finished blocks computed again for their carries


def test_tta_of_an_equivariant_model_equals_plain_prediction(tmp_path):
  """A 'model' that returns the affinities of the label ids it is given is equivariant by
  construction: 16 flip/rot90 views through the full pipeline must give the plain output."""
  rng = np.random.default_rng(3)
  labels = rng.integers(1, 4, (10, 20, 20)).astype(np.uint8)
  labels[:, 5:9, :] = 7  # some long structures, so affinities are not all 0
  labels[3:6] = 9
  config = _config(
    SNEMI,
    **{
      "model.widths": (4, 8),
      "model.norm_groups": 2,
      "data.normalize": "divide_255",
      "infer.window": (4, 8, 8),
      "infer.pad": (2, 4, 4),
      "infer.crop_pad": (),
      "infer.block_shape": (8, 16, 16),
      "infer.sw_batch_size": 4,
      "infer.activation": "none",
    },
  )
  offsets = ((0, 0, 1), (0, 1, 0), (1, 0, 0), (2, 0, 0), (3, 0, 0), (4, 0, 0), (0, 0, 3),
             (0, 0, 9), (0, 0, 27), (0, 3, 0), (0, 9, 0), (0, 27, 0))  # fmt: skip

  def label_affinities(variables, x):
    ids = jnp.round(x[..., 0] * 255.0).astype(jnp.int32)
    aff = jax.vmap(lambda v: compute_affinities(v, offsets, "target")[0])(ids)
    return jnp.moveaxis(aff.astype(jnp.float32), 1, -1)

  path = _write_image(str(tmp_path / "image.zarr"), labels)
  plain_dir, tta_dir = str(tmp_path / "plain"), str(tmp_path / "tta")
  _predict(config, label_affinities, None, path, plain_dir)
  config.infer.tta.enabled = True
  config.infer.tta.views = "zyx16"  # every flip and yx turn (SNEMI's default, "xy8", has no z flip)
  (summary,) = _predict(config, label_affinities, None, path, tta_dir)
  assert summary["views"] == 16
  plain, tta = _read_output(plain_dir), _read_output(tta_dir)
  assert 0.1 < plain[:3].mean() < 0.9
  np.testing.assert_array_equal(tta, plain)


# -- bad input ------------------------------------------------------------------------------------


def test_window_larger_than_the_volume_is_refused(tmp_path):
  path = _write_image(str(tmp_path / "small.zarr"), np.zeros((1, 6, 40, 40), np.uint8))
  config = _config(**{"infer.window": (8, 16, 16)})
  with pytest.raises(ValueError, match=r"small\.zarr.*window"):
    _predict(config, _ramp_apply(6), None, path, str(tmp_path / "out"))


def test_wrong_input_channels_are_refused(tmp_path):
  path = _write_image(str(tmp_path / "two.zarr"), np.zeros((2, 8, 16, 16), np.uint8))
  config = _config(**{"infer.window": (8, 16, 16)})
  with pytest.raises(VolumeError, match=r"two\.zarr.*2 channel.*model takes 1"):
    _predict(config, _ramp_apply(6), None, path, str(tmp_path / "out"))


def test_nan_in_the_image_is_named(tmp_path):
  image = np.zeros((8, 16, 16), np.float32)
  image[3, 4, 5] = np.nan
  path = _write_image(str(tmp_path / "nan.zarr"), image)
  config = _config(**{"infer.window": (8, 16, 16), "data.normalize": "divide_255"})
  with pytest.raises(VolumeError, match=r"nan\.zarr.*NaN"):
    _predict(config, _ramp_apply(6), None, path, str(tmp_path / "out"))


def test_existing_output_with_other_shape_or_settings_is_kept(tmp_path):
  path = _write_image(str(tmp_path / "image.zarr"), np.ones((1, 8, 16, 16), np.uint8))
  out = str(tmp_path / "out")
  config = _config(**{"infer.window": (8, 16, 16)})
  _predict(config, _ramp_apply(6), None, path, out)
  before = _read_output(out)
  wider = _config(**{"infer.window": (8, 16, 16), "infer.output_channels": (0, 1, 2, 3)})
  with pytest.raises(OutputError, match=r"made differently.*output_channels.*--overwrite"):
    _predict(wider, _ramp_apply(6), None, path, out)
  other = _config(**{"infer.window": (8, 16, 16), "infer.blending": "constant"})
  with pytest.raises(OutputError, match=r"made differently.*blending"):
    _predict(other, _ramp_apply(6), None, path, out)
  np.testing.assert_array_equal(_read_output(out), before)  # nothing was touched
  (summary,) = _predict(wider, _ramp_apply(6), None, path, out, overwrite=True)
  assert summary["complete"] and _read_output(out).shape == (4, 8, 16, 16)


# -- the command line, from a trained checkpoint ------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """Two training steps of the tiny demo net on a tiny generated dataset."""
  from jaxseg.synthesis import generate_dataset
  from jaxseg.training import train_lib

  root = str(tmp_path_factory.mktemp("data"))
  overrides = {
    **TINY_MODEL,
    "data.root": root,
    "data.synth.shape": (24, 48, 48),
    "data.synth.chunks": (24, 48, 48),
    "data.synth.train_seeds": (0,),
    "data.synth.test_seeds": (101, 102),
    "data.patch_size": (8, 24, 24),
    "train.batch_size": 1,
    "train.mesh_devices": 1,
    "train.num_steps": 2,
    "train.eval_every": 0,
    "train.eval_batches": 0,
    "train.checkpoint_every": 2,
  }
  config = load_config(DEMO, overrides)
  generate_dataset(config.data.synth, root, show_progress=False)
  workdir = str(tmp_path_factory.mktemp("run"))
  train_lib.train_and_evaluate(config, workdir)
  return overrides, workdir


@pytest.mark.slow
def test_predict_command_on_a_split_and_a_mismatched_checkpoint(trained, tmp_path):
  overrides, workdir = trained
  out = str(tmp_path / "pred")
  flags = [f"--config.{k}={v!r}" if not isinstance(v, str) else f"--config.{k}={v}"
           for k, v in overrides.items()]  # fmt: skip
  flags = [f.replace(" ", "") for f in flags]
  command = [
    sys.executable, "-m", "jaxseg.predict", f"--config={DEMO}", *flags,
    "--config.infer.window=(8,16,16)", "--config.infer.block_shape=(16,32,32)",
    f"--checkpoint={workdir}", "--input=split:test", f"--output={out}",
  ]  # fmt: skip
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
  assert done.returncode == 0, done.stderr[-3000:]
  for seed in ("seed101", "seed102"):
    aff = open_volume(os.path.join(out, f"{seed}.zarr", "affinities"))
    assert aff.shape == (3, 24, 48, 48) and aff.dtype == np.float16
    values = aff.read().astype(np.float32)
    assert np.all((values > 0) & (values < 1))
    assert os.path.exists(os.path.join(out, f"{seed}_preview.png"))
    assert f"{seed}: " in done.stdout
  # Again: everything is done, nothing is recomputed.
  again = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
  assert again.returncode == 0 and "0 block(s) predicted, 8 already done" in again.stdout
  # A config asking for a different net must not load these weights.
  wrong = [
    c.replace("--config.model.widths=(4,8)", "--config.model.widths=(4,16)") for c in command
  ]
  failed = subprocess.run(wrong, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
  assert failed.returncode != 0 and "different shape" in failed.stderr


def test_inputs_are_named_and_opened_in_canonical_order(tmp_path):
  """A NISB cube folder (x, y, z, c on disk), an HDF5 dataset and a zarr array, one name each."""
  import h5py

  from jaxseg.synthesis import generate_dataset

  config = _config(
    **{
      "data.synth.shape": (8, 16, 24),
      "data.synth.chunks": (8, 16, 24),
      "data.synth.train_seeds": (),
    }
  )
  config.data.synth.val_seeds = ()
  generate_dataset(config.data.synth, str(tmp_path / "data"), show_progress=False)
  with h5py.File(tmp_path / "stack.h5", "w") as f:
    f["raw"] = np.zeros((5, 6, 7), np.uint8)
  zarr = _write_image(str(tmp_path / "vol.zarr"), np.zeros((4, 5, 6), np.uint8))
  cube = str(tmp_path / "data" / "test" / "seed101")
  sources = predict_lib.resolve_inputs(config, [cube, f"{tmp_path}/stack.h5:raw", zarr])
  assert [s.name for s in sources] == ["seed101", "stack", "vol"]
  assert [s.volume.shape for s in sources] == [(1, 8, 16, 24), (5, 6, 7), (4, 5, 6)]
  assert sources[1].volume.resolution == tuple(config.data.resolution)  # HDF5 names none
  with pytest.raises(VolumeError, match="more than once"):
    predict_lib.resolve_inputs(config, [zarr, zarr])


def test_held_out_snemi_sections_are_predicted_alone(tmp_path):
  """``split:val`` of SNEMI3D is the last ``val_sections`` of the training volume, nothing more."""
  import tifffile

  image = np.arange(10 * 6 * 7, dtype=np.uint16).reshape(10, 6, 7)
  tifffile.imwrite(tmp_path / "train-input.tif", image)
  tifffile.imwrite(tmp_path / "train-labels.tif", np.ones((10, 6, 7), np.uint16))
  config = load_config(SNEMI, {"data.root": str(tmp_path), "data.val_sections": 3})
  (val,) = predict_lib.resolve_inputs(config, ["split:val"])
  (train,) = predict_lib.resolve_inputs(config, ["split:train"])
  assert val.name == "train-input-val" and val.volume.shape == (3, 6, 7)
  np.testing.assert_array_equal(val.volume[...], image[7:])
  assert train.volume.shape == (7, 6, 7)


# -- normalisation: each volume by its own statistics, the training's settings ---------------------


@pytest.mark.parametrize("mode", ["zscore", "percentile"])
def test_each_volume_is_normalised_by_its_own_statistics(mode, tmp_path):
  """A volume at 0.6x contrast (and brighter) predicts what the original does, and each output
  records the statistics of its own volume."""
  rng = np.random.default_rng(5)
  smooth = rng.normal(0, 1, (1, 12, 20, 18)).cumsum(2).cumsum(3)
  image = (100 + 20 * (smooth - smooth.mean()) / smooth.std()).astype(np.float32)
  mean = float(image.mean(dtype=np.float64))
  other = (mean + 0.6 * (image - mean) + 15).astype(np.float32)
  config = _config(
    **{
      "data.normalize": mode,
      "infer.window": (8, 8, 8),
      "infer.sw_batch_size": 2,
      "infer.block_shape": (8, 8, 8),
      "infer.output_dtype": "float32",
    }
  )
  outputs = {}
  for name, array in (("original", image), ("other", other)):
    path = _write_image(str(tmp_path / f"{name}.zarr"), array)
    out = str(tmp_path / f"out_{name}")
    (summary,) = _predict(config, _ramp_apply(6), None, path, out)
    outputs[name] = _read_output(out, name)
    recorded = summary["normalization"]
    assert recorded["normalize"] == mode and recorded["normalize_scope"] == "volume"
    stats = recorded["stats"]
    assert stats["voxels"] == array.size and not stats["sampled"]
    assert stats["mean"] == pytest.approx(np.mean(array, dtype=np.float64), rel=1e-9)
    assert stats["std"] == pytest.approx(np.std(array, dtype=np.float64), rel=1e-9)
    if mode == "percentile":
      assert recorded["normalize_percentiles"] == [1.0, 99.0]
      width = float(array.max() - array.min()) / 2**16
      np.testing.assert_allclose(
        [stats["p_low"], stats["p_high"]], np.percentile(array, (1, 99)), atol=width
      )
    attrs = open_volume(os.path.join(out, f"{name}.zarr", "affinities")).attrs
    assert attrs["jaxseg_predict"]["stats"] == stats
    with open(os.path.join(out, f"{name}_predict.json")) as f:
      assert json.load(f)["normalization"] == recorded
    # Done already: the recorded statistics are read back, not recomputed.
    (again,) = _predict(config, _ramp_apply(6), None, path, out)
    assert again["blocks_written"] == 0 and again["normalization"] == recorded
  assert outputs["original"].std() > 0.01
  np.testing.assert_allclose(outputs["other"], outputs["original"], rtol=0, atol=2e-3)
  if mode == "percentile":  # other percentiles make other outputs
    config.data.unlock()
    config.data.normalize_percentiles = (2.0, 98.0)
    path = str(tmp_path / "other.zarr")
    with pytest.raises(OutputError, match=r"made differently.*normalize_percentiles"):
      _predict(config, _ramp_apply(6), None, path, str(tmp_path / "out_other"))


def test_predict_refuses_another_normalisation_than_the_training_run(tmp_path):
  from jaxseg.common.config_util import save_config
  from jaxseg.common.errors import ConfigError

  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "2").mkdir(parents=True)
  trained = _config(**{"data.normalize": "zscore"})
  predict_lib.check_trained_normalization(trained, str(workdir))  # no config.json: not checked
  save_config(trained, str(workdir))
  for where in (workdir, workdir / "checkpoints"):
    predict_lib.check_trained_normalization(trained, str(where))
  plain = _config()  # divide_255
  with pytest.raises(
    ConfigError,
    match=r"^data\.normalize: the model in .*trained with .*zscore.*"
    r"\(--config\.data\.normalize=zscore\)$",
  ) as e:
    predict_lib.predict(plain, str(workdir), ["nowhere.zarr"], str(tmp_path / "out"))
  assert "\n" not in str(e.value)


def test_affinity_cache_key_includes_the_percentiles(tmp_path):
  from jaxseg.inference import cache
  from jaxseg.synthesis import generate_dataset

  config = _config(
    **{
      "data.root": str(tmp_path / "data"),
      "data.synth.shape": (8, 16, 24),
      "data.synth.chunks": (8, 16, 24),
      "data.synth.train_seeds": (),
    }
  )
  config.data.synth.val_seeds = ()
  generate_dataset(config.data.synth, config.data.root, show_progress=False)
  (tmp_path / "run" / "checkpoints" / "2").mkdir(parents=True)
  run = str(tmp_path / "run")

  def key(mode, levels=None):
    config.data.unlock()
    config.data.normalize = mode
    if levels is None:
      if "normalize_percentiles" in config.data:
        del config.data["normalize_percentiles"]
    else:
      config.data.normalize_percentiles = levels
    return cache.cache_key(config, run, "test")

  plain, ingredients = key("percentile")
  assert ingredients["normalize"] == ["percentile", None, [1.0, 99.0]]
  assert key("percentile", (1.0, 99.0))[0] == plain
  assert key("percentile", (2.0, 98.0))[0] != plain
  # The other modes do not read them: their keys stay what they were.
  zscore, ingredients = key("zscore")
  assert ingredients["normalize"] == ["zscore", None]
  assert key("zscore", (2.0, 98.0))[0] == zscore != plain
