"""README "Coming from PyTC": every row of its two tables, run on the demo data, so they stay true.

The commands run as the README writes them, with the SNEMI recipe swapped for the demo one, the
tiny settings of the other tests appended and the placeholders (``W``, ``P``, ``Q``, ``AFF``,
``E``, ``last.ckpt``) pointed into a temporary folder. A config override is applied to the recipe
the tutorial row is about, and must set what the row says (the command rows parse overrides with
absl, as users do). With torch installed (the
``pytc`` extra) the checkpoint row imports a PyTC-style checkpoint; without it a jaxseg work dir
stands in for the imported one.
"""

import ast
import glob
import importlib
import os
import re
import shlex
import subprocess
import sys

import h5py
import pytest

from jaxseg.common.config_util import load_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO_ROOT, "README.md")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
# As tests/checkpoint_flag_test.py: a model and data that train in seconds on a CPU.
TINY = [
  "--config.data.synth.shape=(24,48,48)",
  "--config.data.synth.chunks=(24,48,48)",
  "--config.data.synth.train_seeds=(0,)",
  "--config.data.patch_size=(8,24,24)",
  "--config.data.prefetch=1",
  "--config.model.widths=(4,8)",
  "--config.model.norm_groups=2",
  "--config.train.batch_size=2",
  "--config.train.mesh_devices=1",
  "--config.train.num_steps=2",
  "--config.train.eval_every=0",
  "--config.train.eval_batches=0",
  "--config.train.checkpoint_every=2",
  "--config.run.decoders=('cc',)",
  "--config.run.baselines=False",
  "--config.qc.enabled=False",
  "--config.tune.cc.threshold_grid=(0.4,0.6,0.1)",
  "--config.infer.window=(8,24,24)",
  "--config.infer.block_shape=(24,48,48)",
  "--noprogress",
]


def _section() -> str:
  with open(README) as f:
    text = f.read()
  start = text.index("## Coming from PyTC")
  return text[start : text.index("\n## ", start + 1)]


def _tables() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
  """The two tables' ``(left, right)`` cells, header and rule rows left out."""
  tables, rows = [], []
  for line in [*_section().splitlines(), ""]:
    if line.startswith("|"):
      cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
      rows.append((cells[0], cells[1]))
    elif rows:
      tables.append(rows[2:])
      rows = []
  assert len(tables) == 2, tables
  return tables[0], tables[1]


def _snippets(cell: str) -> list[str]:
  return re.findall(r"`([^`]+)`", cell)


def _run(command: str, places: dict[str, str]) -> subprocess.CompletedProcess:
  words = shlex.split(command)
  assert words[:2] == ["python", "-m"], command
  out = []
  for word in words[2:]:
    for name, path in places.items():
      word = re.sub(rf"(?<=[=/]){re.escape(name)}(?=/|$)", path, word)
    out.append(word.replace("configs/snemi.py", os.path.join("configs", "demo.py")))
  is_chain = out[0] in ("jaxseg.run", "jaxseg.import_checkpoint")
  extra = [*TINY, f"--config.data.root={places['DATA']}"] if is_chain else []
  if out[0] != "jaxseg.run":
    extra = [e for e in extra if e != "--noprogress" and not e.startswith("--config.run")]
  if out[0] == "jaxseg.import_checkpoint":
    extra = [e for e in extra if e.startswith("--config.model")]
  return subprocess.run(
    [sys.executable, "-m", *out, *extra],
    capture_output=True,
    text=True,
    cwd=REPO_ROOT,
    env=ENV,
    timeout=600,
  )


def _ok(proc: subprocess.CompletedProcess) -> None:
  assert proc.returncode == 0, (proc.args, proc.stderr[-3000:])


def _override(recipe: str, flag: str):
  """``configs/<recipe>.py`` with ``flag`` applied as ml_collections applies an override: the value
  read as a Python literal where it is one (a tuple, a number, ``True``), else as text."""
  key, _, text = shlex.split(flag)[0].partition("=")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  return load_config(
    os.path.join(REPO_ROOT, "configs", recipe), {key.removeprefix("--config."): value}
  )


def test_every_override_row_sets_what_the_tutorial_flag_sets():
  commands, _ = _tables()
  overrides = {left: right for left, right in commands if right.startswith("`--config.")}
  assert len(overrides) == 6, overrides
  for left, right in overrides.items():
    (flag,) = _snippets(right)
    key, _, value = flag.partition("=")
    config = _override("snemi.py", flag)
    node = config
    for part in key.removeprefix("--config.").split("."):
      node = node[part]
    tutorial_value = _snippets(left)[0].partition("=")[2]
    # The tutorial's value, in jaxseg's syntax: numbers, booleans, lists, null.
    wanted = {
      "2": 2,
      "'[6, 9, 4]'": (6, 9, 4),
      "true": True,
      "null": "null",
      "0.8": 0.8,
    }[tutorial_value]
    assert node == wanted, (left, right, node)
    assert value  # a value is given
  # "null" reaches the decoder as no mask at all.
  from jaxseg.decoding.settings import decode_settings

  config = _override("snemi.py", "--config.decode.affinity_mask_path=null")
  assert decode_settings(config).affinity_mask_path == ""


@pytest.mark.slow
def test_every_command_row_runs_on_the_demo_data(tmp_path):
  commands, files = _tables()
  places = {name: str(tmp_path / name) for name in ("W", "P", "Q", "E", "DATA")}
  synth = subprocess.run(
    [sys.executable, "-m", "jaxseg.synth", f"--config={os.path.join('configs', 'demo.py')}",
     f"--output={places['DATA']}", *TINY[:3]],
    capture_output=True, text=True, cwd=REPO_ROOT, env=ENV, timeout=600,
  )  # fmt: skip
  _ok(synth)
  rows = {left: _snippets(right) for left, right in commands}

  # Train and run the chain: the tutorial's first command.
  (chain,) = rows["`python scripts/main.py --config tutorials/snemi.yaml`"]
  places["W"] = str(tmp_path / "trained")
  _ok(_run(chain, places))
  assert glob.glob(os.path.join(places["W"], "checkpoints", "2"))

  # A PyTC checkpoint: imported with torch, else the trained work dir stands in for it.
  importing, testing = rows[
    "`python scripts/main.py --config CFG --mode test --checkpoint last.ckpt`"
  ]
  try:
    fixture_nets = importlib.import_module("pytc_fixture_nets")
  except ImportError:  # no torch: the import row has its own test (import_checkpoint_test.py)
    places["P"] = places["W"]
  else:
    ckpt = str(tmp_path / "last.ckpt")
    net = fixture_nets.RSUNet(1, 6, [4, 8], groups=2)
    fixture_nets.save_lightning_checkpoint(ckpt, fixture_nets.LightningLike(net), global_step=2)
    places["last.ckpt"] = ckpt
    _ok(_run(importing, places))
  places["W"] = str(tmp_path / "tested")
  _ok(_run(testing, places))
  assert os.path.isfile(os.path.join(places["W"], "results", "report.md"))
  assert not os.path.exists(os.path.join(places["W"], "checkpoints"))  # not trained here
  (tuning,) = rows["`python scripts/main.py --config CFG --mode tune --checkpoint last.ckpt`"]
  _ok(_run(tuning, places))
  assert os.path.isfile(os.path.join(places["W"], "tune", "cc", "best_params.json"))

  # TensorBoard reads the work dir's event files.
  (board,) = rows["`just tensorboard NAME`"]
  logdir = board.split("--logdir ")[1].replace("W/", str(tmp_path / "trained") + "/")
  assert glob.glob(os.path.join(logdir, "*tfevents*"))

  # QC of a prediction, then the mask rebuilt from its report.
  affinities = sorted(glob.glob(os.path.join(places["W"], "predictions", "*", "seed*.zarr")))[0]
  places["AFF"] = affinities
  (qc,) = rows["`python dev/nisb/check_aff.py ...`"]
  _ok(_run(qc.replace("--output=Q", "--output=Q --noprogress"), places))
  (rebuild,) = rows["`python dev/nisb/build_aff_mask.py --report report.md`"]
  _ok(_run(rebuild, places))
  assert os.path.isdir(os.path.join(places["Q"], "mask.zarr"))

  # The files table: the export writes PyTC's names and layout.
  export_row = dict(files)["`raw_x1_ch0-1-2.h5`, float16, (C, X, Y, Z)"]
  export = next(s for s in _snippets(export_row) if s.startswith("python -m jaxseg.export"))
  name = os.path.basename(affinities).removesuffix(".zarr")
  key = os.path.basename(os.path.dirname(affinities))
  export = export.replace("<key>", key).replace("<name>", name)
  _ok(_run(export, places))
  with h5py.File(os.path.join(places["E"], name, "raw_x1_ch0-1-2.h5"), "r") as f:
    assert f["main"].dtype == "float16" and f["main"].shape[0] == 3
