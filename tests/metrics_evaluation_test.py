"""Tests for jaxseg.evaluate: the library call (jaxseg.metrics.evaluation) and the command line, end
to end on HDF5 inputs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA, require_shared

from jaxseg.common import files
from jaxseg.metrics import adapted_rand, voi
from jaxseg.metrics import evaluation as evaluate_module
from jaxseg.metrics.evaluation import evaluate

DATA = SHARED_DATA
EM_ERL = DATA / "em_erl_testcase"
GALA = DATA / "gala_fibsem_example"


def _cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "jaxseg.evaluate", *args], capture_output=True, text=True, timeout=120
  )


def test_evaluate_does_not_import_jax():
  code = (
    "import jaxseg.evaluate, sys\n"
    "assert not any(m == 'jax' or m.startswith('jax.') for m in sys.modules)\n"
  )
  subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.realdata
def test_library_call_on_arrays_and_volumes(monkeypatch):
  require_shared(GALA / "test-gt.lzf.h5")
  h5py = pytest.importorskip("h5py")
  with h5py.File(GALA / "test-gt.lzf.h5") as f:
    gt = f["stack"][...]
  with h5py.File(GALA / "test-ws.lzf.h5") as f:
    ws = f["stack"][...]
  out = evaluate(ws, gt, arand="pairs", crop_fraction=0.33)
  assert out["adapted_rand"] == pytest.approx(
    adapted_rand(gt, ws, method="pairs", crop_fraction=0.33).error
  )
  full = evaluate(ws, gt)
  want = voi(gt, ws)
  assert (full["voi_split"], full["voi_merge"]) == pytest.approx((want.split, want.merge))
  assert full["adapted_rand"] == pytest.approx(adapted_rand(gt, ws).error)
  assert "erl_nm" not in full
  # Paths are opened lazily and streamed in slabs; force many slabs.
  monkeypatch.setattr(evaluate_module, "_SLAB_VOXELS", 100 * 200 * 3)
  streamed = evaluate(f"{GALA / 'test-ws.lzf.h5'}:stack", f"{GALA / 'test-gt.lzf.h5'}:stack")
  for key in ("adapted_rand", "adapted_rand_precision", "voi_split", "voi_merge"):
    assert streamed[key] == pytest.approx(full[key], rel=1e-12)
  with pytest.raises(ValueError, match="needs dense GT"):
    evaluate(ws)
  with pytest.raises(ValueError, match="shape"):
    evaluate(ws, gt[:10])


@pytest.mark.realdata
@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
  require_shared(EM_ERL / "gt_graph.npz")
  out = tmp_path / "metrics.json"
  args = [
    f"--seg={EM_ERL / 'vol_pred.h5'}:main",
    f"--gt={EM_ERL / 'vol_gt.h5'}:main",
    f"--skeleton={EM_ERL / 'gt_graph.npz'}",
    "--resolution=30,30,30",
    f"--output={out}",
  ]
  done = _cli(*args)
  assert done.returncode == 0, done.stderr
  assert "NERL" in done.stdout and "adapted Rand" in done.stdout
  metrics = json.loads(out.read_text())
  for key in (
    "adapted_rand",
    "voi_split",
    "voi_merge",
    "erl_nm",
    "max_erl_nm",
    "nerl",
    "n_mergers",
  ):
    assert key in metrics
  assert metrics["erl_nm"] == pytest.approx(2952.016, abs=1e-3)
  assert metrics["nerl"] == pytest.approx(0.7085, abs=1e-4)
  assert metrics["voi_merge"] == pytest.approx(0.0, abs=1e-12)

  # The same evaluation again is reused; one of other settings is never written over the
  # existing output without --overwrite.
  before = out.read_text()
  again = _cli(*args)
  assert again.returncode == 0 and "reused" in again.stdout and out.read_text() == before
  refused = _cli(*args, "--merge_threshold=2")
  assert refused.returncode != 0 and "--overwrite" in refused.stderr
  assert "merge_threshold: 1 -> 2" in refused.stderr and out.read_text() == before
  assert _cli(*args, "--overwrite", "--merge_threshold=2").returncode == 0
  assert json.loads(out.read_text())["merge_threshold"] == 2


@pytest.mark.realdata
def test_cli_skeleton_only_and_errors(tmp_path):
  require_shared(EM_ERL / "gt_graph.npz")
  require_shared(GALA / "test-gt.lzf.h5")
  out = tmp_path / "nerl.json"
  done = _cli(
    f"--seg={EM_ERL / 'vol_gt.h5'}:main",
    f"--skeleton={EM_ERL / 'gt_graph.npz'}",
    "--resolution=30,30,30",
    f"--output={out}",
  )
  assert done.returncode == 0, done.stderr
  metrics = json.loads(out.read_text())
  assert metrics["nerl"] == pytest.approx(1.0) and "adapted_rand" not in metrics

  mismatch = _cli(f"--seg={EM_ERL / 'vol_pred.h5'}:main", f"--gt={GALA / 'test-gt.lzf.h5'}:stack")
  assert mismatch.returncode != 0
  assert "vol_pred.h5" in mismatch.stderr and "test-gt.lzf.h5" in mismatch.stderr
  assert "(100, 205, 205)" in mismatch.stderr and "(50, 100, 200)" in mismatch.stderr

  # Without a resolution the nm nodes land outside the volume: the error names both.
  wrong = _cli(
    f"--seg={EM_ERL / 'vol_pred.h5'}:main",
    f"--skeleton={EM_ERL / 'gt_graph.npz'}",
    "--resolution=3,3,3",
  )
  assert wrong.returncode != 0
  assert "gt_graph.npz" in wrong.stderr and "vol_pred.h5" in wrong.stderr


def test_json_has_no_nan(tmp_path):
  seg = np.ones((2, 3, 3), np.uint8)
  metrics = evaluate(seg, np.zeros_like(seg))  # empty GT foreground: NaN scores
  path = tmp_path / "m.json"
  files.write_json(path, files.json_ready(metrics))  # as the CLI writes its --output
  assert json.loads(path.read_text())["adapted_rand"] is None


@pytest.mark.realdata
def test_cli_takes_defaults_from_a_config(tmp_path):
  """--config supplies eval defaults and the resolution; explicit flags win; config is saved."""
  require_shared(EM_ERL / "gt_graph.npz")
  config = Path(__file__).resolve().parents[1] / "configs" / "snemi.py"
  out = tmp_path / "metrics.json"
  done = _cli(
    f"--seg={EM_ERL / 'vol_pred.h5'}:main",
    f"--skeleton={EM_ERL / 'gt_graph.npz'}",
    f"--config={config}",
    "--config.data.resolution=(30.0, 30.0, 30.0)",
    "--config.eval.merge_threshold=3",
    "--crop_fraction=0.5",
    f"--output={out}",
  )
  assert done.returncode == 0, done.stderr
  metrics = json.loads(out.read_text())
  assert metrics["nerl"] == pytest.approx(0.7085, abs=1e-4)  # nm nodes placed with 30 nm voxels
  assert metrics["inputs"]["merge_threshold"] == 3
  assert metrics["inputs"]["crop_fraction"] == 0.5
  saved = json.loads((tmp_path / "metrics.config.json").read_text())
  assert saved["eval"]["merge_threshold"] == 3 and saved["data"]["resolution"] == [30.0, 30.0, 30.0]

  typo = _cli(
    f"--seg={EM_ERL / 'vol_pred.h5'}:main",
    f"--skeleton={EM_ERL / 'gt_graph.npz'}",
    f"--config={config}",
    "--config.eval.merge_treshold=3",
  )
  assert typo.returncode != 0 and "merge_treshold" in typo.stderr
