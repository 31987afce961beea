"""Configs: every recipe loads, carries the PyTC numbers, and rejects unknown override keys."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxseg.common import config_util
from jaxseg.tuning import search

REPO_ROOT = Path(__file__).resolve().parents[1]

RECIPES = [
  "snemi.py",
  "nisb_base.py",
  "liconn.py",
  "demo.py",
  "own_data_example.py",
  "fibsem.py",
  "fibsem.py:gpu",
]
SECTIONS = (
  "data",
  "target",
  "model",
  "optim",
  "train",
  "infer",
  "decode",
  "qc",
  "eval",
  "tune",
  "run",
)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_has_every_section(name):
  config = config_util.load_config(str(REPO_ROOT / "configs" / name))
  for section in SECTIONS:
    assert section in config, f"{name} lacks the {section!r} section"


def test_snemi_recipe_numbers():
  c = config_util.load_config(str(REPO_ROOT / "configs" / "snemi.py"))
  assert (c.model.name, c.model.widths, c.model.out_channels) == (
    "rsunet",
    (18, 36, 48, 64, 80),
    12,
  )
  assert (c.target.preset, c.target.convention, c.target.erosion) == ("aff12", "target", 1)
  assert (c.optim.lr, c.optim.weight_decay, c.optim.schedule) == (3e-4, 0.01, "warmup_cosine")
  assert (c.train.num_steps, c.train.batch_size, c.optim.grad_clip) == (100_000, 4, 1.0)
  assert (c.infer.window, c.infer.blending, c.infer.sw_batch_size) == ((16, 224, 224), "bump", 16)
  # PyTC's crop (7, 8, 127, 128, 127, 128) plus its deepem crop of one leading voxel = the pad.
  assert c.infer.pad == (8, 128, 128)
  assert c.infer.crop_pad == (8, 8, 128, 128, 128, 128)
  assert (c.decode.merge_function, c.decode.thresholds) == ("aff85_his256", (0.5,))
  assert (c.decode.aff_threshold_low, c.decode.aff_threshold_high) == (0.1, 0.999)
  assert (c.decode.dust.size, c.decode.dust.affinity, c.decode.dust.remove_size) == (800, 0.3, 600)
  assert c.decode.branch_merge.one_sided_threshold == 0.8
  assert c.decode.branch_merge.one_sided_min_size == 100
  wz = c.tune.waterz
  assert (wz.n_trials, wz.n_startup_trials, c.tune.trial_timeout_s) == (25, 10, 300)
  assert wz.merge_functions[0] == "aff85_his256" and len(wz.merge_functions) == 5
  assert (wz.aff_threshold_low, wz.aff_threshold_high) == ((0.0, 0.5, 0.1), (0.7, 1.0, 0.1))
  assert c.tune.split == "val" and not c.tune.force_test
  aug = c.data.aug
  assert (aug.name, aug.elastic_p, aug.elastic_sigma, aug.gamma) == (
    "aug_em_neuron",
    0.7,
    (4.0, 8.0),
    (0.5, 1.5),
  )
  assert (aug.defects.misalignment_max_shift, aug.defects.missing_parts_p) == (17, 0.2)
  pytc = config_util.load_config(str(REPO_ROOT / "configs" / "snemi.py") + ":pytc")
  assert pytc.tune.split == "test" and pytc.tune.force_test
  assert not pytc.decode.branch_merge.enabled


def test_nisb_and_liconn_recipe_numbers():
  base = config_util.load_config(str(REPO_ROOT / "configs" / "nisb_base.py"))
  liconn = config_util.load_config(str(REPO_ROOT / "configs" / "liconn.py"))
  assert (base.model.name, base.model.size, base.model.kernel_size) == ("mednext", "L", 3)
  assert (base.target.preset, base.target.convention) == ("banis6", "source")
  assert (base.target.erosion, base.target.target_context) == (2, (10, 10, 10))
  assert (base.optim.lr, base.optim.schedule, base.train.num_steps) == (1e-3, "cosine", 200_000)
  assert (base.train.ema.decay, base.train.ema.warmup_steps) == (0.999, 500)
  assert (base.infer.blending, base.infer.temperature, base.infer.output_dtype) == (
    "distance",
    5.0,
    "float16",
  )
  assert (base.decode.method, base.decode.threshold) == ("cc", 0.75)
  # The NISB / LICONN tutorial's grid and study name.
  assert (base.tune.cc.threshold_grid, base.tune.cc.objective) == ((0.40, 0.94, 0.06), "nerl")
  assert search.grid_values(base.tune.cc.threshold_grid, "g")[-1] == 0.94
  assert search.study_name(base, "cc") == "nisb_base_banis_cc_tuning"
  snemi = config_util.load_config(str(REPO_ROOT / "configs" / "snemi.py"))
  assert search.study_name(snemi, "waterz") == "snemi_waterz_tuning"
  assert base.run.decoders == ("cc",)
  aug = base.data.aug
  assert (aug.name, aug.slice_shift_max, aug.affine_shear, aug.noise_std) == (
    "aug_banis",
    10,
    0.5,
    (0.0, 0.5),
  )
  # LICONN changes only data paths and resolution.
  diff = _diff(config_util.config_to_dict(base), config_util.config_to_dict(liconn))
  assert set(diff) == {
    "name",
    "data.root",
    "data.val_seeds",
    "data.test_seeds",
    "data.resolution",
  }


def _diff(a, b, prefix=""):
  keys = set(a) | set(b)
  out = []
  for k in sorted(keys):
    path = f"{prefix}{k}"
    if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
      out += _diff(a[k], b[k], path + ".")
    elif a.get(k) != b.get(k):
      out.append(path)
  return out


def test_overrides_and_unknown_keys():
  path = str(REPO_ROOT / "configs" / "nisb_base.py")
  c = config_util.load_config(path, {"optim.lr": 1e-4, "train.ema.decay": 0.99})
  assert (c.optim.lr, c.train.ema.decay) == (1e-4, 0.99)
  with pytest.raises(KeyError, match=r"optim\.lrr"):
    config_util.load_config(path, {"optim.lrr": 1e-4})
  with pytest.raises(KeyError, match="nope"):
    config_util.load_config(path, {"nope.lr": 1e-4})
  with pytest.raises(AttributeError):
    c.optim.new_key = 1  # locked


def test_resolved_config_is_written(tmp_path):
  c = config_util.load_config(str(REPO_ROOT / "configs" / "snemi.py"))
  path = config_util.save_config(c, str(tmp_path))
  with open(path) as f:
    assert json.load(f)["model"]["widths"] == [18, 36, 48, 64, 80]


def test_entry_point_rejects_unknown_override(tmp_path):
  """The absl flag path: a typo in --config.x.y fails before anything runs."""
  cmd = [
    sys.executable,
    "-m",
    "jaxseg.synth",
    f"--output={tmp_path / 'out'}",
    f"--config={REPO_ROOT / 'configs' / 'demo.py'}",
    "--config.data.synth.no_such_key=1",
  ]
  result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
  assert result.returncode != 0
  assert "no_such_key" in result.stderr
  assert not (tmp_path / "out").exists()


def test_own_recipe_builds_on_a_shipped_one(tmp_path):
  """``configs`` is a package: a recipe kept outside the repository imports a shipped one, both
  from Python and through an entry point started in the recipe's own folder."""
  (tmp_path / "mine.py").write_text(
    "from configs import common, nisb_base\n\n\n"
    "def get_config(arg=None):\n"
    "  config = nisb_base.get_config(arg)\n"
    "  config.name = 'mine'\n"
    "  config.run = common.run_defaults(decoders=('cc', 'waterz'))\n"
    "  return config\n"
  )
  config = config_util.load_config(str(tmp_path / "mine.py"))
  assert (config.name, config.run.decoders) == ("mine", ("cc", "waterz"))
  assert config.model.name == "mednext"  # everything else is nisb_base's
  cmd = [sys.executable, "-m", "jaxseg.synth", "--output=out", "--config=mine.py"]
  result = subprocess.run(
    [*cmd, "--config.data.synth.no_such_key=1"], capture_output=True, text=True, cwd=tmp_path
  )
  assert result.returncode != 0
  # The recipe loaded (the error is about the override, not an import).
  assert "no_such_key" in result.stderr and "ModuleNotFoundError" not in result.stderr


def test_watershed_thresholds_sit_on_each_recipe_s_activation():
  """waterz's 0.1 / 0.999 are plain-sigmoid probabilities; a recipe that tempers its outputs
  (sigmoid(x / T)) states the same logits on its own scale."""
  from configs import common

  assert common.tempered(0.999, 1.0) == 0.999 and common.tempered(0.5, 5.0) == 0.5
  for name in RECIPES:
    c = config_util.load_config(str(REPO_ROOT / "configs" / name))
    t = c.infer.temperature if c.infer.activation == "scale_sigmoid" else 1.0
    got = (c.decode.aff_threshold_low, c.decode.aff_threshold_high)
    assert got == (common.tempered(0.1, t), common.tempered(0.999, t)), (name, got)
