"""PyTC checkpoints into jaxseg (``jaxseg.training.pytc_import``, ``jaxseg.import_checkpoint``).

The fixture networks (``pytc_fixture_nets.py``) carry PyTC's module names and shapes; a converted
jaxseg network must compute what they compute (float32, 1e-4), and the imported work dir must be
what ``predict`` restores.
"""

import importlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxseg.common.config_util import load_config
from jaxseg.common.errors import InputError, OutputError
from jaxseg.training import pytc_import, train_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO_ROOT, "configs")
TORCH_REASON = (
  "importing PyTC checkpoints needs torch, the optional extra: pip install -e '.[pytc]'"
)
TOLERANCE = 1e-4
# The demo RSUNet, small: windows must be multiples of (1, 2, 2).
TINY = {"model.widths": (4, 8), "model.norm_groups": 2}


@pytest.fixture(scope="module")
def fx():
  pytest.importorskip("torch", reason=TORCH_REASON)
  # Imported only once torch is there (the module is torch code); tests/ is on sys.path.
  return importlib.import_module("pytc_fixture_nets")


def _numpy_state(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _random(fx, module, seed):
  import torch

  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(torch.rand(p.shape, generator=generator) * 0.4 - 0.2)
  fx.randomize_norms(module, generator)
  return module.eval()


def _compare(fx, config, lightning, shape, params):
  """Max |torch - jaxseg| of the two networks on one random ``[1, c, *shape]`` input."""
  import torch

  graphdef, _, rest = train_lib.model_graphdef(config, "float32")
  model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, params), rest)
  x = torch.randn(
    1, int(config.model.in_channels), *shape, generator=torch.Generator().manual_seed(1)
  )
  with torch.no_grad():
    want = lightning(x).numpy()
  got = np.asarray(
    nnx.jit(lambda m, v: m(v))(model, jnp.asarray(x.numpy().transpose(0, 2, 3, 4, 1)))
  )
  return float(np.abs(got.transpose(0, 4, 1, 2, 3) - want).max()), float(np.abs(want).max())


def _convert(config, state):
  _, abstract, _ = train_lib.model_graphdef(config, "float32")
  return pytc_import.convert(state, config.model, abstract)


def test_snemi_rsunet_matches_pytc(fx):
  import torch

  config = load_config(os.path.join(CONFIGS, "snemi.py"))
  net = fx.RSUNet(1, 12, list(config.model.widths), groups=4, depth_2d=1)
  lightning = fx.LightningLike(net).eval()
  fx.randomize_norms(net, torch.Generator().manual_seed(0))
  state = _numpy_state(lightning)
  assert "model.input_conv.pre.1.weight" in state and "model.up_blocks.0.up.weight" in state
  diff, scale = _compare(fx, config, lightning, (4, 16, 16), _convert(config, state))
  assert scale > 0.1 and diff < TOLERANCE, (diff, scale)


@pytest.mark.parametrize("size", ["S", "L"])
def test_mednext_matches_pytc(fx, size):
  import torch

  config = load_config(os.path.join(CONFIGS, "nisb_base.py"))
  config.model.size, config.model.kernel_size, config.model.remat = size, 3, False
  net = fx.MedNeXt(1, int(config.model.out_channels), size, 3)
  lightning = fx.LightningLike(fx.MedNeXtWrapper(net)).eval()
  fx.randomize_norms(net, torch.Generator().manual_seed(0))
  state = _numpy_state(lightning)
  assert "model.model.up_3.conv1.weight" in state and "model.model.dummy_tensor" in state
  # 32^3 is the least input with two voxels per channel at the bottleneck, which PyTorch's
  # per-channel GroupNorm needs.
  diff, scale = _compare(fx, config, lightning, (32, 32, 32), _convert(config, state))
  assert scale > 0.1 and diff < TOLERANCE, (diff, scale)


def test_unknown_missing_and_misshaped_keys_are_named_and_nothing_is_written(fx, tmp_path):
  import torch

  config = load_config(os.path.join(CONFIGS, "demo.py"), TINY)
  lightning = fx.LightningLike(fx.RSUNet(1, 6, [4, 8], groups=2))
  state = lightning.state_dict()
  state["model.extra.weight"] = state["model.output_head.bias"].clone()
  del state["model.final_norm.norm.bias"]
  state["model.output_head.weight"] = state["model.output_head.weight"][:5]
  path = str(tmp_path / "bad.ckpt")
  torch.save({"state_dict": state, "global_step": 3}, path)
  workdir = tmp_path / "run"
  with pytest.raises(InputError) as e:
    pytc_import.import_checkpoint(config, path, str(workdir))
  message = str(e.value)
  assert "\n" not in message
  assert "unknown keys" in message and "model.extra.weight" in message
  assert "missing keys" in message and "model.final_norm.norm.bias" in message
  assert "mis-shaped" in message and "model.output_head.weight (5, 4, 1, 1, 1)" in message
  assert not workdir.exists() or not os.listdir(workdir)


def test_a_folder_of_the_users_files_is_refused(fx, tmp_path):
  config = load_config(os.path.join(CONFIGS, "demo.py"), TINY)
  path = str(tmp_path / "ok.ckpt")
  fx.save_lightning_checkpoint(path, fx.LightningLike(fx.RSUNet(1, 6, [4, 8], groups=2)))
  workdir = tmp_path / "mine"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("mine")
  with pytest.raises(OutputError):
    pytc_import.import_checkpoint(config, path, str(workdir))
  assert os.listdir(workdir) == ["notes.txt"]


def test_without_torch_the_error_names_the_extra(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
  path = tmp_path / "x.ckpt"
  path.write_bytes(b"")
  with pytest.raises(ImportError, match=r'pip install -e "\.\[pytc\]"'):
    pytc_import.read_pytc_checkpoint(str(path))


def _image(path, shape=(8, 32, 32)):
  from jaxseg.io import create_zarr

  image = np.random.default_rng(0).integers(0, 255, shape).astype(np.uint8)
  volume = create_zarr(path, shape, image.dtype, chunks=shape, resolution=(20.0, 9.0, 9.0))
  volume.write((0, 0, 0), image)
  volume.flush()
  return path


def test_imported_work_dir_is_restored_and_predicted_with_the_ema_weights(fx, tmp_path):
  from jaxseg.inference import predict_lib

  config = load_config(os.path.join(CONFIGS, "demo.py"), TINY)
  raw = _random(fx, fx.LightningLike(fx.RSUNet(1, 6, [4, 8], groups=2)), 0)
  ema = _random(fx, fx.LightningLike(fx.RSUNet(1, 6, [4, 8], groups=2)), 1)
  # PyTC's EMA callback averages pl_module.model.state_dict(): names without the "model." prefix.
  callbacks = {"EMAWeightsCallback": {"ema_state": ema.model.state_dict()}}
  path = str(tmp_path / "last.ckpt")
  fx.save_lightning_checkpoint(path, raw, global_step=1234, callbacks=callbacks)
  workdir = str(tmp_path / "run")
  result = pytc_import.import_checkpoint(config, path, workdir)
  assert result["step"] == 1234 and result["ema"] and result["prefix"] == "model."

  model, info = train_lib.restore_inference_model(config, workdir, "best")
  assert info["step"] == 1234 and info["weights"] == "ema"
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  diff, _ = _compare(fx, config, ema, (4, 16, 16), params)
  assert diff < TOLERANCE
  raw_model, raw_info = train_lib.restore_inference_model(config, workdir, use_ema=False)
  assert raw_info["weights"] == "params"
  diff, _ = _compare(
    fx, config, raw, (4, 16, 16), nnx.to_pure_dict(nnx.state(raw_model, nnx.Param))
  )
  assert diff < TOLERANCE

  config.infer.window, config.infer.block_shape = (8, 16, 16), (8, 32, 32)
  image = _image(str(tmp_path / "image.zarr"))
  predict_lib.predict(
    config, workdir, [image], str(tmp_path / "pred"), show_progress=False, num_devices=1
  )
  from jaxseg.io import open_volume

  affinities = open_volume(str(tmp_path / "pred" / "image.zarr" / "affinities"))
  assert affinities.shape[1:] == (8, 32, 32) and np.isfinite(affinities.read()).all()

  with pytest.raises(OutputError, match="already holds checkpoints"):
    pytc_import.import_checkpoint(config, path, workdir)


def test_command_line(fx, tmp_path):
  path = str(tmp_path / "last.ckpt")
  fx.save_lightning_checkpoint(
    path, fx.LightningLike(fx.RSUNet(1, 6, [4, 8], groups=2)), global_step=7
  )
  flags = ["--config.model.widths=(4,8)", "--config.model.norm_groups=2"]
  command = [
    sys.executable, "-m", "jaxseg.import_checkpoint", "--from=pytc", f"--checkpoint={path}",
    f"--config={os.path.join(CONFIGS, 'demo.py')}", *flags, f"--workdir={tmp_path / 'run'}",
  ]  # fmt: skip
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "as step 7" in done.stdout
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["7"]
