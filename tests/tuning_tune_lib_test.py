"""Tests for jaxseg.tuning and ``python -m jaxseg.tune``: cache, resumable studies, trial worker.

No training and no JAX: tiny generated cubes (16 x 32 x 32, NISB layout, with skeletons) get
affinities made from their labels plus noise, written where ``jaxseg.predict`` would write them
with a ``_predict.json`` that says ``complete``, so the cache finds them.
"""

import functools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest

from jaxseg.common import config_util, outputs
from jaxseg.common.config_util import load_config
from jaxseg.common.errors import ConfigError, JaxsegError, OutputError
from jaxseg.common.files import write_json
from jaxseg.decoding import scoring
from jaxseg.inference import cache, layout
from jaxseg.io import create_zarr, open_volume
from jaxseg.io.datasets import dataset_volumes
from jaxseg.synthesis import generate_cube, resolve_config, write_cube
from jaxseg.tuning import search, trials, tune_lib

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.py")
SHAPE = (16, 32, 32)
GRID = (0.3, 0.4, 0.5, 0.6, 0.7)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  """A val and a test cube in the NISB layout."""
  root = tmp_path_factory.mktemp("data")
  params = resolve_config(load_config(DEMO, {"data.synth.shape": SHAPE}).data.synth)
  for split, seed in (("val", 100), ("test", 101)):
    img, seg, graph = generate_cube(params, seed)
    write_cube(
      str(root / split / f"seed{seed}"), img, seg, graph, params.resolution, chunks=SHAPE,
      preview=False,
    )  # fmt: skip
  return root


def make_config(root, **overrides):
  values = {
    "data.root": str(root),
    "qc.enabled": False,
    "tune.cc.threshold_grid": (0.3, 0.7, 0.1),
    "tune.trial_timeout_s": 60.0,
    "tune.waterz.n_trials": 4,
    "tune.waterz.n_startup_trials": 2,
    "tune.waterz.merge_functions": ("aff50_his256", "aff85_his256"),
    "tune.waterz.aff_threshold_low": (0.0, 0.2, 0.1),
    "tune.waterz.aff_threshold_high": (0.8, 1.0, 0.1),
    "tune.waterz.thresholds": (0.3, 0.6),
    # waterz's own plain-sigmoid watershed thresholds (the demo states them on its tempered
    # scale, 0.392 / 0.799): trial 0 runs them, 0.999 between grid steps.
    "decode.aff_threshold_low": 0.1,
    "decode.aff_threshold_high": 0.999,
  }
  values.update({k.replace("__", "."): v for k, v in overrides.items()})
  return load_config(DEMO, values)


def make_checkpoint(path, steps=(100, 200)):
  """Step folders of a training run, recorded in the work dir as jaxseg.train records them."""
  entry = outputs.StageOutput(
    str(path), name="train", stage="training run", fingerprint={}, paths=("checkpoints",)
  )
  entry.open()
  for step in steps:
    os.makedirs(os.path.join(path, "checkpoints", str(step)), exist_ok=True)
  return str(path)


def affinities_from_labels(seg, rng, noise=0.1):
  """``[3, z, y, x]`` float16 x, y, z edges (source convention) of ``seg``, blurred by noise."""
  aff = np.zeros((3, *seg.shape), np.float32)
  for channel, axis in enumerate((2, 1, 0)):  # channels 0, 1, 2 = +x, +y, +z (banis6)
    here = [slice(None)] * 3
    there = [slice(None)] * 3
    here[axis], there[axis] = slice(0, -1), slice(1, None)
    a, b = seg[tuple(here)], seg[tuple(there)]
    aff[(channel, *here)] = (a == b) & (a > 0)
  aff = 0.15 + 0.7 * aff + rng.normal(0, noise, aff.shape)
  return np.clip(aff, 0, 1).astype(np.float16)


def write_predictions(config, checkpoint, split, cache_root, seed=0):
  """What ``jaxseg.predict`` leaves in the cache folder, without a model."""
  key, _ = cache.cache_key(config, checkpoint, split)
  out = os.path.join(cache_root, key)
  rng = np.random.default_rng(seed)
  for v in dataset_volumes(config.data, split):
    seg = v.labels.read()
    # Recorded in the folder's manifest as jaxseg.predict records it.
    entry = outputs.StageOutput(
      out,
      name=layout.entry_name(v.name),
      stage="predict",
      fingerprint={"seed": seed},
      paths=(layout.group_name(v.name), layout.summary_name(v.name)),
    )
    entry.open(overwrite=True)
    array = create_zarr(
      os.path.join(out, f"{v.name}.zarr", "affinities"),
      (3, *seg.shape),
      np.float16,
      resolution=v.image.resolution,
      attributes={
        "offsets": [[0, 0, 1], [0, 1, 0], [1, 0, 0]],
        "convention": "source",
        "channels": [0, 1, 2],
      },
      overwrite=True,
    )
    array.write((0, 0, 0, 0), affinities_from_labels(seg, rng)).result()
    write_json(os.path.join(out, f"{v.name}_predict.json"), {"name": v.name, "complete": True})
    entry.finish()
  return out


class FakePredict:
  """Stands in for ``jaxseg.inference.predict_lib.predict`` (which imports JAX)."""

  def __init__(self):
    self.calls = []
    self.error = None

  def predict(self, config, checkpoint, inputs, output_dir, *, step, use_ema, show_progress):
    if self.error:
      raise self.error
    self.calls.append({"inputs": inputs, "output_dir": output_dir, "step": step, "ema": use_ema})
    split = inputs[0].split(":")[1]
    write_predictions(config, checkpoint, split, os.path.dirname(output_dir))
    return []


@pytest.fixture
def fake_predict(monkeypatch):
  """A :class:`FakePredict` that the cache is given as its ``predict``, also when ``tune_lib``
  opens the cache."""
  fake = FakePredict()
  with_fake = functools.partial(cache.cached_predictions, predict=fake.predict)
  monkeypatch.setattr(cache, "cached_predictions", with_fake)
  return fake


def test_grid_values_are_inclusive_and_exact():
  grid = search.grid_values((0.50, 0.90, 0.02), "g")
  assert len(grid) == 21 and grid[0] == 0.5 and grid[-1] == 0.9
  assert 0.66 in grid and 0.7 in grid  # no 0.6600000000000001
  assert search.grid_values((0.3, 0.8, 0.05), "g")[3] == 0.45
  with pytest.raises(ConfigError, match="step > 0"):  # the CLIs report it in one line
    search.grid_values((0.5, 0.9, 0.0), "tune.cc.threshold_grid")


def test_listed_grid_values_make_an_uneven_grid_tpe_samples_on():
  """("values", ...) keeps exactly the listed values (a logit-like grid of probabilities); TPE
  samples among them, and the flat rule's neighbours are the adjacent listed values."""
  assert search.grid_values(("values", 1.0, 0.9, 0.999, 0.99), "g") == (0.9, 0.99, 0.999, 1.0)
  with pytest.raises(ConfigError, match=r"tune.waterz.aff_threshold_high.*distinct"):
    search.grid_values(("values", 0.9, 0.9), "tune.waterz.aff_threshold_high")
  with pytest.raises(ConfigError, match=r"tune.waterz.aff_threshold_high must be"):
    search.grid_values(("vals", 0.9, 0.99), "tune.waterz.aff_threshold_high")
  config = load_config(DEMO)
  with config.unlocked():
    config.tune.waterz.sampler = "tpe"
    config.tune.waterz.aff_threshold_high = ("values", 0.9, 0.99, 0.999, 1.0)
  space = search.search_space(config, "waterz")
  dist = space.distributions()
  assert tuple(dist["aff_threshold_high"].choices) == (0.9, 0.99, 0.999, 1.0)
  assert dist["aff_threshold_low"].step == pytest.approx(0.1)  # an even grid stays stepped
  study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=3))
  for _ in range(8):
    trial = study.ask(dist)
    assert trial.params["aff_threshold_high"] in (0.9, 0.99, 0.999, 1.0)
    study.tell(trial, trial.params["aff_threshold_high"])
  with config.unlocked():
    config.tune.waterz.aff_threshold_high = ("values", 0.3, 0.99)  # reaches the low grid
  with pytest.raises(ConfigError, match="must lie below every aff_threshold_high"):
    search.search_space(config, "waterz")


def test_cache_predicts_once_then_reuses(data_root, tmp_path, fake_predict):
  config = make_config(data_root)
  ckpt = make_checkpoint(tmp_path / "run")
  root = str(tmp_path / "predictions")
  (first,) = cache.cached_predictions(config, ckpt, "val", root, show_progress=False)
  assert not first.reused and first.name == "seed100" and first.mask is None
  assert fake_predict.calls[0]["inputs"] == ["split:val"]
  assert fake_predict.calls[0]["step"] == "best" and fake_predict.calls[0]["ema"] is True
  assert os.path.isdir(first.affinities) and first.volume.labels is not None

  fake_predict.error = AssertionError("predicted again")
  (second,) = cache.cached_predictions(config, ckpt, "val", root, show_progress=False)
  assert second.reused and second.affinities == first.affinities

  # A new checkpoint is a new key: predicted again, into another folder.
  fake_predict.error = None
  make_checkpoint(tmp_path / "run", steps=(300,))
  (third,) = cache.cached_predictions(config, ckpt, "val", root, show_progress=False)
  assert not third.reused and len(fake_predict.calls) == 2
  assert os.path.dirname(os.path.dirname(third.affinities)) != os.path.dirname(
    os.path.dirname(first.affinities)
  )


def test_cache_runs_qc_and_hands_its_mask_on(data_root, tmp_path, fake_predict):
  config = make_config(data_root, qc__enabled=True)
  ckpt = make_checkpoint(tmp_path / "run")
  (cached,) = cache.cached_predictions(
    config, ckpt, "val", str(tmp_path / "p"), show_progress=False
  )
  assert cached.mask is not None and os.path.isdir(cached.mask)
  # The last section's +z edges have no partner (0.15 + noise): QC finds it and masks it out.
  assert cached.qc["low_z"] == 0 and cached.qc["high_z"] == SHAPE[0] - 1
  mask = open_volume(cached.mask).read()
  ring = config.qc.border_width  # dark image pixels in the XY ring are dropped too
  assert mask[:-1, ring:-ring, ring:-ring].all() and not mask[-1].any()
  space = search.search_space(config, "cc")
  setup = tune_lib.trial_setup(config, space, [cached], "val")
  assert setup["volumes"][0]["mask"] == cached.mask

  # Scores made with this mask are reused only while the mask stays what it was: other QC
  # settings redo the QC in place and the decode is scored again.
  first = scoring.decode_and_evaluate(config, cached, str(tmp_path / "d"), show_progress=False)
  again = scoring.decode_and_evaluate(config, cached, str(tmp_path / "d"), show_progress=False)
  assert again["reused"] and again["results"] == first["results"]
  lenient = make_config(data_root, qc__enabled=True, qc__drift_thresh=0.9)  # keeps every z
  (recut,) = cache.cached_predictions(
    lenient, ckpt, "val", str(tmp_path / "p"), show_progress=False
  )
  assert recut.mask == cached.mask and open_volume(recut.mask).read()[-1].any()
  redone = scoring.decode_and_evaluate(
    lenient, recut, str(tmp_path / "d"), overwrite=True, show_progress=False
  )
  assert not redone["reused"]


@pytest.fixture(scope="module")
def cc_run(data_root, tmp_path_factory):
  """A cc grid study stopped after 2 trials, then killed with a trial RUNNING, then resumed."""
  workdir = str(tmp_path_factory.mktemp("cc_run"))
  config = make_config(data_root)
  ckpt = make_checkpoint(workdir)
  write_predictions(config, ckpt, "val", os.path.join(workdir, "predictions"))
  write_predictions(config, ckpt, "test", os.path.join(workdir, "predictions"))
  first = tune_lib.tune(config, workdir, checkpoint=ckpt, decoder="cc", n_trials=2,
                        show_progress=False)  # fmt: skip
  # A job killed mid-trial leaves a RUNNING trial holding the next grid point.
  space = search.search_space(config, "cc")
  study = optuna.load_study(
    study_name="jaxseg-cc",
    storage=f"sqlite:///{workdir}/tune/cc/study.db",
    sampler=search.make_sampler(space, config.seed),
  )
  running = study.ask(space.distributions())
  second = tune_lib.tune(config, workdir, checkpoint=ckpt, decoder="cc", show_progress=False)
  return {
    "workdir": workdir,
    "config": config,
    "ckpt": ckpt,
    "first": first,
    "first_trials": [(t.number, t.params["threshold"], t.value) for t in study.trials[:2]],
    "running": (running.number, running.params["threshold"]),
    "second": second,
  }


def test_grid_study_resumes_without_redoing_finished_trials(cc_run):
  assert cc_run["first"]["n_complete"] == 2 and not cc_run["first"]["skipped"]
  second = cc_run["second"]
  assert second["interrupted"] == 1 and second["trials_run"] == len(GRID) - 2
  study = optuna.load_study(
    study_name="jaxseg-cc", storage=f"sqlite:///{cc_run['workdir']}/tune/cc/study.db"
  )
  complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
  # Every grid point exactly once: nothing finished was redone, the interrupted point was rerun.
  assert sorted(t.params["threshold"] for t in complete) == list(GRID)
  assert [(t.number, t.params["threshold"], t.value) for t in complete[:2]] == cc_run[
    "first_trials"
  ]
  number, threshold = cc_run["running"]
  killed = study.trials[number]
  assert killed.state == optuna.trial.TrialState.FAIL and killed.user_attrs["interrupted"]
  assert any(t.params["threshold"] == threshold and t.number > number for t in complete)
  with open(second["best_params_path"]) as f:
    best = json.load(f)
  assert best["n_complete"] == len(GRID) and best["params"]["threshold"] in GRID
  assert math.isclose(best["best_value"], max(t.value for t in complete))
  assert os.path.exists(second["plot"]) and os.path.getsize(second["plot"]) > 1000
  with open(second["trials_csv"]) as f:
    assert len(f.read().strip().splitlines()) == 1 + len(study.trials)
  # NERL's skeletons are parsed into the tuner's own cache, never beside the user's data.
  assert os.listdir(os.path.join(cc_run["workdir"], "cache", "erl"))
  root = cc_run["config"].data.root
  assert not [n for _, _, names in os.walk(root) for n in names if "erl_cache" in n]


def test_finished_study_is_not_rerun(cc_run, monkeypatch):
  def no_predictions(*args, **kwargs):
    raise AssertionError("a finished study opened its predictions")

  monkeypatch.setattr(cache, "cached_predictions", no_predictions)
  result = tune_lib.tune(cc_run["config"], cc_run["workdir"], checkpoint=cc_run["ckpt"],
                         decoder="cc", show_progress=False)  # fmt: skip
  assert result["skipped"] and result["trials_run"] == 0
  assert result["best_params"] == cc_run["second"]["best_params"]
  # --overwrite replaces only a study of other settings: an identical finished one is kept.
  study_db = os.path.join(cc_run["workdir"], "tune", "cc", "study.db")
  stamp = os.stat(study_db).st_mtime_ns
  kept = tune_lib.tune(cc_run["config"], cc_run["workdir"], checkpoint=cc_run["ckpt"],
                       decoder="cc", overwrite=True, show_progress=False)  # fmt: skip
  assert kept["skipped"] and os.stat(study_db).st_mtime_ns == stamp


def test_study_of_other_settings_is_refused(cc_run):
  config = cc_run["config"].copy_and_resolve_references()
  config.eval.merge_threshold = 5
  with pytest.raises(OutputError, match=r"eval\.merge_threshold: 1 -> 5"):
    tune_lib.tune(config, cc_run["workdir"], checkpoint=cc_run["ckpt"], decoder="cc",
                  show_progress=False)  # fmt: skip


def test_tuned_params_beat_a_bad_default_on_the_test_volume(cc_run):
  workdir, ckpt = cc_run["workdir"], cc_run["ckpt"]
  bad = cc_run["config"].copy_and_resolve_references()
  bad.decode.threshold = 0.97  # nearly every edge cut: thousands of fragments
  (tuned,) = tune_lib.tune_test(bad, workdir, checkpoint=ckpt, decoder="cc", show_progress=False)
  assert tuned["volume"] == "seed101" and not tuned["reused"]
  row = tuned["results"][tuned["best"]]
  assert row["threshold"] == cc_run["second"]["best_params"]["threshold"]
  assert os.path.exists(os.path.join(workdir, "tune", "cc", "test", "seed101", "metrics.json"))
  (cached,) = cache.cached_predictions(bad, ckpt, "test", os.path.join(workdir, "predictions"))
  default = scoring.decode_and_evaluate(bad, cached, os.path.join(workdir, "bad"),
                                        show_progress=False)  # fmt: skip
  assert row["nerl"] > default["results"][0]["nerl"] + 0.3
  assert row["adapted_rand"] < default["results"][0]["adapted_rand"] - 0.3
  again = tune_lib.tune_test(bad, workdir, checkpoint=ckpt, decoder="cc", show_progress=False)
  assert again[0]["reused"] and again[0]["results"] == tuned["results"]


def test_decode_cli_applies_a_work_dir_s_tuned_settings(cc_run, data_root, tmp_path):
  """``jaxseg.decode --tuned=W`` decodes a new volume with what W's tuning kept, over a config
  whose own threshold is bad; W's config.json stands in for --config; an untuned decoder is
  refused in one line naming the file."""
  best = cc_run["second"]["best_params"]["threshold"]
  (cached,) = cache.cached_predictions(
    cc_run["config"], cc_run["ckpt"], "test", os.path.join(cc_run["workdir"], "predictions")
  )
  work = tmp_path / "tuned"
  shutil.copytree(os.path.join(cc_run["workdir"], "tune", "cc"), work / "tune" / "cc")
  config_util.save_config(cc_run["config"], str(work))

  def decode(*args):
    return subprocess.run(
      [sys.executable, "-m", "jaxseg.decode", f"--affinities={cached.affinities}", *args],
      capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip

  for name, config_args in (("with_config", [f"--config={DEMO}"]), ("saved_config", [])):
    out = tmp_path / name
    proc = decode(
      *config_args, f"--tuned={work}", f"--config.data.root={data_root}",
      "--config.decode.threshold=0.97", "--config.decode.method=cc", f"--output={out}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"cc settings tuned in {work}" in proc.stdout
    with open(out / "decode.json") as f:
      assert json.load(f)["thresholds"] == [best] != [0.97]
  proc = decode(f"--tuned={work}", "--config.decode.method=waterz", f"--output={tmp_path / 'w'}")
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1 and len(lines) == 1, proc.stderr
  assert os.path.join("tune", "waterz", "best_params.json") in lines[0] and "not tuned" in lines[0]
  assert not (tmp_path / "w").exists()


def test_tpe_samples_only_inside_the_space(data_root, tmp_path):
  config = make_config(data_root)
  ckpt = make_checkpoint(tmp_path)
  write_predictions(config, ckpt, "val", str(tmp_path / "predictions"))
  result = tune_lib.tune(config, str(tmp_path), checkpoint=ckpt, decoder="waterz",
                         show_progress=False)  # fmt: skip
  assert result["n_complete"] == 4 and result["objective"] == "adapted_rand"
  study = optuna.load_study(
    study_name="jaxseg-waterz", storage=f"sqlite:///{tmp_path}/tune/waterz/study.db"
  )
  trials_ = study.trials
  # Trial 0 runs the config's own decode settings (0.999 lies between grid steps: kept as is).
  assert trials_[0].user_attrs["defaults"]
  assert trials_[0].params == {
    "merge_function": "aff85_his256", "aff_threshold_low": 0.1, "aff_threshold_high": 0.999
  }  # fmt: skip
  for t in trials_[1:]:
    assert t.params["merge_function"] in ("aff50_his256", "aff85_his256")
    assert min(abs(t.params["aff_threshold_low"] - v) for v in (0.0, 0.1, 0.2)) < 1e-9
    assert min(abs(t.params["aff_threshold_high"] - v) for v in (0.8, 0.9, 1.0)) < 1e-9
  for i, t in enumerate(trials_):
    earlier = [u for u in trials_[:i] if u.params == t.params]
    if earlier:  # a repeated point is not decoded again
      assert t.user_attrs["repeat_of"] == earlier[0].number and t.value == earlier[0].value
    assert t.user_attrs["threshold"] in (0.3, 0.6)
    assert [r["threshold"] for r in t.user_attrs["thresholds"]] == [0.3, 0.6]
  best = result["best_params"]
  assert set(best) == {"merge_function", "aff_threshold_low", "aff_threshold_high", "thresholds"}
  assert best["thresholds"] == [result["best_threshold"]]
  tuned = scoring.decoder_config(config, "waterz", best)
  assert tuned.decode.method == "waterz" and tuned.decode.thresholds == tuple(best["thresholds"])


class InProcessWorker:
  """``TrialWorker`` without a child: runs trials here; threshold 0.5 needs 100 s, so it "times
  out" under a shorter timeout."""

  def __init__(self, setup, timeout_s):
    self.state = trials.load_state(setup)
    self.timeout_s = timeout_s
    self.starts = 1

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    pass

  def run(self, params):
    if params.get("threshold") == 0.5 and self.timeout_s < 100:
      raise trials.TrialTimeout(f"a trial took longer than {self.timeout_s:g} s")
    return trials.run_trial(self.state, params)


def test_timed_out_trial_scores_worst_and_is_not_rerun(data_root, tmp_path, monkeypatch):
  monkeypatch.setattr(tune_lib.trials_lib, "TrialWorker", InProcessWorker)
  config = make_config(data_root)
  ckpt = make_checkpoint(tmp_path)
  write_predictions(config, ckpt, "val", str(tmp_path / "predictions"))
  result = tune_lib.tune(config, str(tmp_path), checkpoint=ckpt, decoder="cc",
                         show_progress=False)  # fmt: skip
  assert result["timed_out"] == 1 and result["n_complete"] == len(GRID)
  assert result["best_params"]["threshold"] != 0.5 and math.isfinite(result["best_value"])
  study = optuna.load_study(
    study_name="jaxseg-cc", storage=f"sqlite:///{tmp_path}/tune/cc/study.db"
  )
  (slow,) = [t for t in study.trials if t.params["threshold"] == 0.5]
  assert slow.state == optuna.trial.TrialState.COMPLETE and slow.value == -math.inf  # NERL: max
  assert slow.user_attrs["timed_out"]
  again = tune_lib.tune(config, str(tmp_path), checkpoint=ckpt, decoder="cc", show_progress=False)
  assert again["skipped"] and len(study.trials) == len(GRID)
  # With a longer timeout the point that ran out of time runs again, and only that one.
  patient = make_config(data_root, tune__trial_timeout_s=600.0)
  third = tune_lib.tune(patient, str(tmp_path), checkpoint=ckpt, decoder="cc",
                        show_progress=False)  # fmt: skip
  assert not third["skipped"] and third["trials_run"] == 1 and third["timed_out"] == 0
  reran = [t for t in study.trials if t.params["threshold"] == 0.5]
  assert len(reran) == 2 and math.isfinite(reran[-1].value)
  assert len(study.trials) == len(GRID) + 1


class ScoreByFormula:
  """``TrialWorker`` without a child or a decode: a waterz trial's adapted Rand is a fixed
  function of its parameters (cheap and deterministic, so two studies can be compared)."""

  def __init__(self, setup, timeout_s):
    self.starts = 1

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    pass

  def run(self, params):
    value = abs(params["aff_threshold_low"] - 0.1) + abs(params["aff_threshold_high"] - 0.9)
    value += 0.05 * (params["merge_function"] == "aff50_his256")
    thresholds = [{"threshold": t, "value": value} for t in (0.3, 0.6)]
    return {"value": value, "threshold": 0.3, "per_volume": {}, "thresholds": thresholds,
            "seconds": 0.0}  # fmt: skip


def test_resumed_tpe_study_draws_what_an_uninterrupted_one_draws(data_root, tmp_path, monkeypatch):
  """Killed after k trials (one left RUNNING) and resumed, a TPE study runs the very trials, in
  the same order, that one run straight through with the same seed runs: the killed trial's
  point is asked again, and the draws after it are not reseeded."""
  monkeypatch.setattr(tune_lib.trials_lib, "TrialWorker", ScoreByFormula)
  config = make_config(data_root, tune__waterz__n_startup_trials=3)
  total, stop = 9, 4

  def run(workdir, n_trials):
    ckpt = make_checkpoint(workdir)
    if not os.path.exists(workdir / "predictions"):
      write_predictions(config, ckpt, "val", str(workdir / "predictions"))
    tune_lib.tune(config, str(workdir), checkpoint=ckpt, decoder="waterz", n_trials=n_trials,
                  show_progress=False)  # fmt: skip
    return optuna.load_study(
      study_name="jaxseg-waterz", storage=f"sqlite:///{workdir}/tune/waterz/study.db"
    )

  def completed(study):
    return [t.params for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]

  straight = completed(run(tmp_path / "straight", total))
  assert len(straight) == total and len({_key(p) for p in straight}) > 3

  study = run(tmp_path / "killed", stop)
  assert completed(study) == straight[:stop]
  space = search.search_space(config, "waterz")
  study.sampler = search.make_sampler(space, config.seed)
  running = study.ask(space.distributions())  # the kill leaves this trial RUNNING
  assert running.params == straight[stop]
  resumed = run(tmp_path / "killed", total)
  killed = resumed.trials[running.number]
  assert killed.state == optuna.trial.TrialState.FAIL and killed.user_attrs["interrupted"]
  assert completed(resumed) == straight


def _key(params):
  return tuple(sorted(params.items()))


def _load_nothing(setup):
  return {"pid": os.getpid()}


def _sleepy_trial(state, params):
  if params.get("fail"):
    raise ValueError("bad params")
  if params.get("mistake"):
    raise ConfigError("decode.threshold: expected a number in [0, 1]")
  time.sleep(params.get("sleep", 0.0))
  return {"pid": state["pid"]}


def test_trial_worker_kills_a_slow_trial_and_restarts():
  with trials.TrialWorker({}, timeout_s=1.5, load=_load_nothing, trial=_sleepy_trial) as worker:
    first = worker.run({})["pid"]
    assert first != os.getpid()
    # A bug in the trial keeps its traceback (not a one-line JaxsegError); a user's mistake is
    # one line.
    with pytest.raises(trials.TrialCrash, match="ValueError: bad params") as error:
      worker.run({"fail": True})
    assert not isinstance(error.value, JaxsegError)
    assert "_sleepy_trial" in error.value.details and "_sleepy_trial" in str(error.value)
    with pytest.raises(trials.TrialError, match=r"decode\.threshold: expected") as error:
      worker.run({"mistake": True})
    assert "_sleepy_trial" in error.value.details and "\n" not in str(error.value)
    assert worker.run({})["pid"] == first  # an error does not cost the worker
    start = time.monotonic()
    with pytest.raises(trials.TrialTimeout):
      worker.run({"sleep": 60})
    assert time.monotonic() - start < 10 and not worker.alive
    assert worker.run({})["pid"] != first and worker.starts == 2


def _load_broken(setup):
  if setup["mistake"]:
    raise ConfigError("data.root: no such folder")
  raise KeyError("a bug while loading")


@pytest.mark.parametrize("mistake", [True, False])
def test_loading_the_tuning_data_tells_a_mistake_from_a_bug(mistake):
  worker = trials.TrialWorker({"mistake": mistake}, timeout_s=30, load=_load_broken)
  with worker, pytest.raises((trials.TrialError, trials.TrialCrash)) as error:
    worker.start()
  assert isinstance(error.value, JaxsegError) == mistake
  assert "loading the tuning data failed" in str(error.value)
  assert "_load_broken" in error.value.details
  if mistake:
    assert "data.root: no such folder" in str(error.value) and "\n" not in str(error.value)
  else:
    assert "KeyError" in str(error.value) and "_load_broken" in str(error.value)


def _gone(pid):
  """The process has exited (a zombie counts: nobody may be left to reap it here)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] == "Z"
  except FileNotFoundError:
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_the_tuner_ends_its_trial_process():
  """A tuner killed with SIGKILL mid-trial leaves no process decoding on."""
  script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import tuning_tune_lib_test as this_test
from jaxseg.tuning import trials
worker = trials.TrialWorker({{}}, 600, load=this_test._load_nothing, trial=this_test._sleepy_trial)
print(worker.run({{}})["pid"], flush=True)
worker.run({{"sleep": 600}})
"""
  tuner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                           cwd=REPO)  # fmt: skip
  child = int(tuner.stdout.readline())
  time.sleep(0.3)  # the child is in its sleeping trial
  assert not _gone(child)
  tuner.kill()
  tuner.wait()
  deadline = time.monotonic() + 10
  while not _gone(child) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert _gone(child)


def test_refuses_the_test_split(data_root, tmp_path, fake_predict):
  config = make_config(data_root, tune__split="test")
  ckpt = make_checkpoint(tmp_path)
  with pytest.raises(ValueError, match="force_test"):
    tune_lib.tune(config, str(tmp_path), checkpoint=ckpt, decoder="cc", show_progress=False)
  assert not fake_predict.calls and not os.path.exists(tmp_path / "tune")
  # Forced, it goes on to predict the test volume.
  fake_predict.error = RuntimeError("predicting split:test")
  with pytest.raises(RuntimeError, match="predicting split:test"):
    tune_lib.tune(config, str(tmp_path), checkpoint=ckpt, decoder="cc", force_test=True,
                  show_progress=False)  # fmt: skip


def test_decoder_config_applies_tuned_params(data_root):
  config = make_config(data_root)
  cc = scoring.decoder_config(config, "cc", {"threshold": 0.62})
  assert cc.decode.method == "cc" and cc.decode.threshold == 0.62
  wz = scoring.decoder_config(
    config,
    "waterz",
    {"merge_function": "aff50_his256", "aff_threshold_high": 1.0, "threshold": 0.4},
  )
  assert wz.decode.method == "waterz" and wz.decode.thresholds == (0.4,)
  assert wz.decode.merge_function == "aff50_his256" and wz.decode.aff_threshold_high == 1.0
  assert config.decode.threshold == 0.5 and config.decode.merge_function == "aff85_his256"
  with pytest.raises(ValueError, match="not cc parameters"):
    scoring.decoder_config(config, "cc", {"merge_function": "aff50_his256"})


def test_tuning_reuses_the_cache_without_importing_jax(cc_run):
  """Trials and a complete cache need no JAX (a CPU-only or accelerator-free tuning job)."""
  script = f"""
import sys
from jaxseg.common.config_util import load_config
from jaxseg.inference import cache
from jaxseg.tuning import search, trials, tune_lib
config = load_config({DEMO!r}, {{"data.root": {str(cc_run["config"].data.root)!r},
                                "qc.enabled": False}})
cached = cache.cached_predictions(config, {cc_run["ckpt"]!r}, "val",
                                  {os.path.join(cc_run["workdir"], "predictions")!r})
assert cached[0].reused
space = search.search_space(config, "cc")
state = trials.load_state(tune_lib.trial_setup(config, space, cached, "val"))
print(trials.run_trial(state, {{"threshold": 0.5}})["value"] > 0.5, "jax" in sys.modules)
"""
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ["True", "False"]


def test_cli_says_what_is_wrong_in_one_line(data_root, tmp_path):
  out = subprocess.run(
    [sys.executable, "-m", "jaxseg.tune", f"--config={DEMO}", f"--workdir={tmp_path}",
     "--mode=tune-test", f"--config.data.root={data_root}"],
    capture_output=True, text=True, cwd=REPO,
  )  # fmt: skip
  assert out.returncode == 1
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and "not tuned yet" in lines[0] and "Traceback" not in out.stderr


def test_volumes_larger_than_a_block_are_tuned_blockwise_with_the_same_scores(data_root, tmp_path):
  """A NISB cube (12 G voxels) does not fit in a trial's memory: it is decoded blockwise into
  scratch and scored lazily. Connected components blockwise equal the whole-volume decode, so
  every trial scores exactly as in memory."""
  config = make_config(data_root)
  ckpt = make_checkpoint(tmp_path)
  cache_root = str(tmp_path / "predictions")
  write_predictions(config, ckpt, "val", cache_root)
  cached = cache.cached_predictions(config, ckpt, "val", cache_root, show_progress=False)
  space = search.search_space(config, "cc")
  whole = tune_lib.trial_setup(config, space, cached, "val")
  blocks = load_config(DEMO, {"decode.block_shape": (8, 16, 32)})
  config.decode.block_shape = blocks.decode.block_shape  # 4 blocks of the 16 x 32 x 32 cube
  blockwise = tune_lib.trial_setup(config, space, cached, "val", str(tmp_path / "scratch"))
  in_memory, lazy = trials.load_state(whole), trials.load_state(blockwise)
  assert "aff" in in_memory["volumes"][0] and lazy["volumes"][0].get("lazy")
  for threshold in (0.4, 0.6):
    a = trials.run_trial(in_memory, {"threshold": threshold})
    b = trials.run_trial(lazy, {"threshold": threshold})
    assert a["value"] == b["value"] and a["per_volume"] == b["per_volume"]
    assert 0.05 < a["value"] <= 1.0  # a real score, not an empty segmentation's
  assert os.listdir(tmp_path / "scratch") == ["seed100"]  # one trial's decode at a time


def test_refusals_come_before_the_prediction(data_root, tmp_path, monkeypatch):
  """Missing ground truth, or a study another tuner holds, is said at once, not after hours of
  predicting the validation split."""
  import fcntl
  import shutil

  def no_predictions(*args, **kwargs):
    raise AssertionError("predicted before refusing")

  monkeypatch.setattr(cache, "cached_predictions", no_predictions)
  root = tmp_path / "data"
  shutil.copytree(data_root, root)
  os.remove(root / "val" / "seed100" / "skeleton.pkl")
  config = make_config(root)  # cc: NERL needs skeletons
  ckpt = make_checkpoint(tmp_path / "run")
  with pytest.raises(ValueError, match=r"needs skeleton\.pkl.*seed100"):
    tune_lib.tune(config, str(tmp_path / "run"), checkpoint=ckpt, decoder="cc")
  config = make_config(data_root)
  folder = tmp_path / "run" / "tune" / "cc"
  folder.mkdir(parents=True, exist_ok=True)
  with open(folder / outputs.LOCK, "w") as held:
    fcntl.flock(held, fcntl.LOCK_EX)
    with pytest.raises(OutputError, match=r"another jaxseg\.tune is running on this folder"):
      tune_lib.tune(config, str(tmp_path / "run"), checkpoint=ckpt, decoder="cc")


def test_ground_truth_or_checkpoint_changed_in_place_makes_the_tuning_stale(data_root, tmp_path):
  """A corrected skeleton at the same path redoes the study; parameters tuned for an older
  checkpoint are not applied to the test volumes, and the report shows no stale scores."""
  import shutil

  root = tmp_path / "data"
  shutil.copytree(data_root, root)
  config = make_config(root)
  work = str(tmp_path / "run")
  ckpt = make_checkpoint(work)
  write_predictions(config, ckpt, "val", os.path.join(work, "predictions"))
  write_predictions(config, ckpt, "test", os.path.join(work, "predictions"))
  first = tune_lib.tune(config, work, checkpoint=ckpt, decoder="cc", show_progress=False)
  assert not first["skipped"]
  assert tune_lib.tune(config, work, checkpoint=ckpt, decoder="cc", show_progress=False)["skipped"]
  tune_lib.tune_test(config, work, checkpoint=ckpt, decoder="cc", show_progress=False)
  assert outputs.is_complete(os.path.join(work, "tune", "cc", "test", "seed101"), "scores")
  skeleton = root / "val" / "seed100" / "skeleton.pkl"
  skeleton.write_bytes(skeleton.read_bytes())  # the same graph, rewritten: a new file
  again = tune_lib.tune(config, work, checkpoint=ckpt, decoder="cc", show_progress=False)
  assert not again["skipped"] and again["trials_run"] == len(GRID)
  # Retrained into the same work dir: the tuned parameters are refused until tuned again.
  make_checkpoint(work, steps=(300,))
  write_predictions(config, ckpt, "test", os.path.join(work, "predictions"))
  with pytest.raises(OutputError, match="tune again"):
    tune_lib.tune_test(config, work, checkpoint=ckpt, decoder="cc", show_progress=False)


class SpikeAndPlateau:
  """``TrialWorker`` without a decode: cc threshold 0.3 scores best by a lone spike, 0.5-0.7 form
  a plateau that is almost as good (the shape of a small validation crop's noise)."""

  def __init__(self, setup, timeout_s):
    self.starts = 1
    self.values = {0.3: 0.05, 0.4: 0.30, 0.5: 0.12, 0.6: 0.10, 0.7: 0.16}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    pass

  def run(self, params):
    t = params["threshold"]
    return {"value": self.values[t], "threshold": t, "per_volume": {}, "seconds": 0.0}


def test_flat_selection_keeps_the_plateau_not_the_spike(data_root, tmp_path, monkeypatch):
  monkeypatch.setattr(tune_lib.trials_lib, "TrialWorker", SpikeAndPlateau)
  config = make_config(data_root, tune__cc__objective="adapted_rand")
  ckpt = make_checkpoint(tmp_path)
  write_predictions(config, ckpt, "val", str(tmp_path / "predictions"))
  best = tune_lib.tune(config, str(tmp_path), checkpoint=ckpt, decoder="cc", show_progress=False)
  assert best["best_params"] == {"threshold": 0.3} and best["best_value"] == 0.05
  flat = make_config(data_root, tune__cc__objective="adapted_rand", tune__selection="flat")
  # Another selection is another result: the finished study is not silently reused for it.
  with pytest.raises(OutputError, match="selection"):
    tune_lib.tune(flat, str(tmp_path), checkpoint=ckpt, decoder="cc", show_progress=False)
  result = tune_lib.tune(flat, str(tmp_path), checkpoint=ckpt, decoder="cc", overwrite=True,
                         show_progress=False)  # fmt: skip
  assert result["best_params"] == {"threshold": 0.6} and result["best_value"] == 0.10
  with open(result["best_params_path"]) as f:
    saved = json.load(f)
  assert saved["selection"] == "flat"
  assert saved["neighbourhood_value"] == pytest.approx((0.12 + 0.10 + 0.16) / 3)
  with pytest.raises(ConfigError, match=r"config\.tune\.selection must be one of"):
    search.search_space(make_config(data_root, tune__selection="smooth"), "cc")


def test_flat_selection_spans_waterz_parameters_and_merge_thresholds(data_root):
  """A waterz point's neighbours differ by one grid step in the low and high watershed
  thresholds and the merge threshold, never in the merge function; an enqueued default between
  grid steps (0.999) reaches the grid values on either side."""
  config = make_config(data_root, tune__selection="flat", tune__waterz__thresholds=(0.3, 0.6))
  space = search.search_space(config, "waterz")
  assert space.choices["aff_threshold_high"] == (0.8, 0.9, 1.0)

  def trial(number, merge, low, high, values):
    params = {"merge_function": merge, "aff_threshold_low": low, "aff_threshold_high": high}
    thresholds = [{"threshold": t, "value": v} for t, v in zip((0.3, 0.6), values, strict=True)]
    best = min(thresholds, key=lambda r: r["value"])
    return {"number": number, "params": params, "value": best["value"],
            "threshold": best["threshold"], "thresholds": thresholds}  # fmt: skip

  rows = [
    trial(0, "aff85_his256", 0.1, 0.999, (0.20, 0.21)),  # the config's default, off the grid
    trial(1, "aff50_his256", 0.0, 0.8, (0.01, 0.90)),  # a spike: its threshold neighbour is bad
    trial(2, "aff85_his256", 0.0, 1.0, (0.06, 0.07)),
    trial(3, "aff85_his256", 0.0, 0.9, (0.08, 0.07)),
    trial(4, "aff85_his256", 0.2, 1.0, (0.30, 0.30)),  # two steps from 0.0: not a neighbour of 2
    trial(5, "aff85_his256", 0.0, 0.8, (0.50, 0.50)),  # a neighbour of 3, two steps from 2
  ]
  chosen = tune_lib.select_point(rows, space)
  assert chosen["params"] == {
    "merge_function": "aff85_his256", "aff_threshold_low": 0.0, "aff_threshold_high": 1.0,
  }  # fmt: skip
  # Trial 2's neighbours: itself, trial 3 and the default (within a step of low 0.0 and of high
  # 1.0), at both merge thresholds; its own best threshold is reported with the neighbourhood's
  # mean, though trial 1 scores best.
  assert chosen["number"] == 2 and chosen["threshold"] == 0.3 and chosen["value"] == 0.06
  assert chosen["neighbourhood_value"] == pytest.approx(
    (0.20 + 0.21 + 0.06 + 0.07 + 0.08 + 0.07) / 6
  )
  best = tune_lib.select_point(rows, search.search_space(make_config(data_root), "waterz"))
  assert best["number"] == 1 and best["threshold"] == 0.3


def test_a_study_under_another_name_is_another_study(cc_run):
  """``tune.study_name`` (the tutorials' ``snemi_waterz_tuning``): a work dir tuned under the old
  name is refused, not silently started again beside it; a bad template is one line."""
  config = cc_run["config"].copy_and_resolve_references()
  config.tune.study_name = "nisb_base_banis_{decoder}_tuning"
  with pytest.raises(OutputError, match="study_name"):
    tune_lib.tune(config, cc_run["workdir"], checkpoint=cc_run["ckpt"], decoder="cc",
                  show_progress=False)  # fmt: skip
  config.tune.study_name = "{model}_tuning"
  with pytest.raises(ConfigError, match=r"config\.tune\.study_name '\{model\}_tuning'"):
    tune_lib.tune(config, cc_run["workdir"], checkpoint=cc_run["ckpt"], decoder="cc",
                  show_progress=False)  # fmt: skip
