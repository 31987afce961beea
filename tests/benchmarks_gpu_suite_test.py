"""The GPU suite (``benchmarks/gpu_suite.py``): its smoke run, and its time guard and error capture.

The smoke run is the suite's own code on tiny shapes on the CPU, in a subprocess as it is run on
the GPU machine: every case must come back with its headline number, or (the PyTorch cases, where
torch is not installed) with the reason it was skipped; both outputs must be written.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(REPO_ROOT, "benchmarks", "gpu_suite.py")
CASES = [
  "train_rsunet",
  "train_rsunet_pytorch",
  "predict_snemi",
  "predict_mednext",
  "train_mednext_pytorch",
  "train_mednext",
  "decode_waterz",
  "decode_cc",
  "metrics",
]


def _suite_module():
  """``benchmarks/gpu_suite.py`` as a module (``benchmarks/`` is a folder of scripts)."""
  spec = importlib.util.spec_from_file_location("jaxseg_benchmarks_gpu_suite", SUITE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_smoke_run_measures_every_case(tmp_path):
  out = tmp_path / "suite"
  # A generous budget: the test checks that every case runs, not how fast a shared CPU is.
  command = [sys.executable, SUITE, "--smoke", f"--output={out}", "--budget_s=900"]
  proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

  doc = json.loads((out / "gpu_suite.json").read_text())
  assert doc["smoke"] is True
  assert doc["machine"]["jax"] and doc["machine"]["device_kind"]
  assert list(doc["cases"]) == CASES
  for name, result in doc["cases"].items():
    if name.endswith("_pytorch") and result["status"] == "skipped":
      assert result["reason"], name  # torch not installed, say
      continue
    assert result["status"] == "ok", f"{name}: {result.get('reason')}\n{result.get('traceback')}"
    value = result[result["metric"]]
    assert isinstance(value, float | int) and math.isfinite(value) and value > 0, (name, value)
  train = doc["cases"]["train_rsunet"]
  assert train["flops_per_step"] > 0 and train["xla_step_gb"] > 0 and train["peak_gb"] > 0
  assert doc["cases"]["predict_snemi"]["windows_computed"] > 0

  md = (out / "gpu_suite.md").read_text()
  assert doc["machine"]["device_kind"] in md and doc["machine"]["date"] in md
  assert f"jax {doc['machine']['jax']}" in md
  for name in CASES:
    assert f"| {name} |" in md


def test_cases_out_of_time_are_skipped_and_failures_recorded():
  suite_lib = _suite_module()
  suite = suite_lib.Suite(smoke=False, budget_s=0.0)
  skipped = suite_lib.run_case(suite, suite_lib.CASES[0])
  assert skipped["status"] == "skipped" and skipped["reason"].startswith("time budget")

  def fail(suite):
    raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")

  suite = suite_lib.Suite(smoke=True, budget_s=60.0)
  failed = suite_lib.run_case(suite, suite_lib.Case("oom", fail, 0.0, "fails"))
  assert failed["status"] == "error"
  assert failed["reason"] == "RuntimeError: RESOURCE_EXHAUSTED: out of memory"
  assert "traceback" in failed
