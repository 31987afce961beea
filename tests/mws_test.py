"""The mutex watershed decoder (``decode.method = "mws"``): labels back from affinities, storage
conventions, refusals, and decoding, scoring and tuning it like the other decoders.

Labels are a small Voronoi tessellation with membranes (and, for tuning, the demo's generated
cubes); affinities are made from them with ``compute_affinities`` over every channel of a preset
(banis6: nearest-neighbour and 10-voxel edges; aff12: up to 27 voxels), plus noise.
"""

import os
import subprocess
import sys

import numpy as np
import optuna
import pytest
from conftest import REPO_ROOT

from jaxseg.common import outputs
from jaxseg.common.config_util import load_config
from jaxseg.common.errors import ConfigError
from jaxseg.common.files import write_json
from jaxseg.data.affinity import AFF12, BANIS6, compute_affinities, convert_convention
from jaxseg.decoding import decode_lib, mws, scoring
from jaxseg.decoding.settings import decode_settings
from jaxseg.inference import cache, layout
from jaxseg.io import create_zarr, open_volume
from jaxseg.io.datasets import dataset_volumes
from jaxseg.metrics.rand import adapted_rand
from jaxseg.synthesis import generate_cube, resolve_config, write_cube
from jaxseg.tuning import search, tune_lib
from jaxseg.workflow import chain, report

DEMO = str(REPO_ROOT / "configs" / "demo.py")
SHAPE = (20, 40, 40)


def voronoi_labels(shape, n, seed):
  """Cells of a random anisotropic Voronoi tessellation, with 1-voxel membranes of 0."""
  rng = np.random.default_rng(seed)
  centres = rng.uniform(0, 1, (n, 3)) * np.array(shape)
  grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
  cells = np.argmin((((grid[..., None, :] - centres) * [3.0, 1.0, 1.0]) ** 2).sum(-1), -1) + 1
  membrane = np.zeros(shape, bool)
  for axis in range(3):
    membrane |= np.diff(cells, axis=axis, prepend=np.take(cells, [0], axis=axis)) != 0
  return np.where(membrane, 0, cells).astype(np.uint32)


@pytest.fixture(scope="module")
def labels():
  """24 cells, each one connected piece (stray voxels cut off by the membranes become 0)."""
  from scipy import ndimage

  cells = voronoi_labels(SHAPE, 24, seed=0)
  for i in range(1, int(cells.max()) + 1):
    pieces, n = ndimage.label(cells == i)
    if n > 1:
      largest = 1 + int(np.argmax(ndimage.sum_labels(pieces > 0, pieces, range(1, n + 1))))
      cells[(pieces > 0) & (pieces != largest)] = 0
  return cells


def noisy_affinities(labels, spec, noise, seed=1, convention=None):
  """Every channel of ``spec``: 0.15 (cut) or 0.85 (same object) plus Gaussian noise, float16."""
  aff, _ = compute_affinities(labels, spec.offsets, convention or spec.convention)
  if noise:
    rng = np.random.default_rng(seed)
    aff = np.clip(0.15 + 0.7 * aff + rng.normal(0, noise, aff.shape), 0, 1)
  return aff.astype(np.float16)


def settings(**mws_keys):
  top = {k: mws_keys.pop(k) for k in ("min_size", "convention") if k in mws_keys}
  return decode_settings({"method": "mws", **top, "mws": mws_keys})


def write_prediction(path, aff, spec, channels, convention=None):
  """An affinity zarr with the attributes jaxseg.predict writes."""
  attrs = {
    "offsets": [list(spec.offsets[c]) for c in channels],
    "convention": convention or spec.convention,
    "channels": list(channels),
  }
  volume = create_zarr(path, aff.shape, aff.dtype, resolution=(20, 9, 9), attributes=attrs)
  volume.write((0, 0, 0, 0), aff).result()
  return path


@pytest.mark.parametrize("spec", [BANIS6, AFF12], ids=lambda s: s.name)
def test_recovers_the_labels_from_clean_and_noisy_affinities(labels, spec):
  exact = mws.mutex_watershed(
    noisy_affinities(labels, spec, 0.0), spec.offsets, spec.convention, settings().mws
  )
  # Ground-truth affinities give the labels exactly: same partition, membranes 0, ids in scan order.
  assert exact.dtype == np.uint8 and exact.max() == labels.max()
  assert adapted_rand(labels, exact).error == 0.0
  assert np.array_equal(exact == 0, labels == 0)
  first = np.unique(exact[exact > 0], return_index=True)[1]
  assert np.all(np.diff(first) > 0)
  # Noise leaves small specks on the membranes, which min_size removes; the cells stay whole.
  s = settings(min_size=20)
  noisy = noisy_affinities(labels, spec, 0.15)
  seg = decode_lib.decode_array(noisy, s, offsets=spec.offsets, convention=spec.convention)
  ((threshold, seg),) = seg
  assert threshold == 0.5 and seg.max() == labels.max()
  assert adapted_rand(labels, seg).error < 0.002


def test_source_and_target_storage_give_the_same_segmentation(labels, tmp_path):
  offsets = BANIS6.offsets
  source = noisy_affinities(labels, BANIS6, 0.2, convention="source")
  target, _ = convert_convention(source, offsets, "source", "target")
  a = mws.mutex_watershed(source, offsets, "source", settings().mws)
  b = mws.mutex_watershed(target, offsets, "target", settings().mws)
  assert a.max() > 10 and np.array_equal(a, b)
  # Through the files: the convention comes from the attributes (config.decode.convention
  # must agree), the channels from their offsets in any stored order.
  order = [3, 0, 4, 1, 5, 2]
  src = write_prediction(str(tmp_path / "s.zarr" / "affinities"), source, BANIS6, range(6))
  tgt = write_prediction(
    str(tmp_path / "t.zarr" / "affinities"), target[order], BANIS6, order, convention="target"
  )
  decode_lib.decode(settings(), src, str(tmp_path / "out_s"))
  decode_lib.decode(settings(convention="target"), tgt, str(tmp_path / "out_t"))
  seg_s = open_volume(str(tmp_path / "out_s" / "segmentation"))[:]
  seg_t = open_volume(str(tmp_path / "out_t" / "segmentation"))[:]
  assert np.array_equal(seg_s, seg_t)


def test_biases_and_strides_change_the_decode_as_documented(labels):
  aff = noisy_affinities(labels, BANIS6, 0.15)
  # Every edge repulsive (p - 1 <= 0): nothing merges, and no voxel has an attractive edge.
  none = mws.mutex_watershed(aff, BANIS6.offsets, "source", settings(bias_short=1, bias_long=1).mws)
  assert not none.any()
  weights = mws.edge_weights(aff, BANIS6.offsets, settings(bias_short=0.4, bias_long=0.7).mws)
  assert weights.dtype == np.float64
  assert np.allclose(weights[:3], aff[:3].astype(np.float64) - 0.4)
  assert np.allclose(weights[3:], aff[3:].astype(np.float64) - 0.7)
  # Fewer repulsive long-range edges: still a segmentation of the same cells here.
  strided = mws.mutex_watershed(
    aff, BANIS6.offsets, "source", settings(strides=(2, 4, 4)).mws, min_size=20
  )
  assert adapted_rand(labels, strided).error < 0.01


def test_refuses_predictions_without_the_long_range_channels_in_one_line(labels, tmp_path):
  aff = noisy_affinities(labels, BANIS6, 0.1)
  nearest = write_prediction(str(tmp_path / "nn.zarr" / "affinities"), aff[:3], BANIS6, (0, 1, 2))
  with pytest.raises(ConfigError, match=r"decode.method='mws' needs long-range") as info:
    decode_lib.decode(settings(), nearest, str(tmp_path / "out"))
  assert "infer.output_channels" in str(info.value) and "\n" not in str(info.value)
  assert not os.path.exists(tmp_path / "out" / "segmentation")  # refused before any output

  full = write_prediction(str(tmp_path / "all.zarr" / "affinities"), aff, BANIS6, range(6))
  with pytest.raises(ConfigError, match=r"decode.mws.channels \[0, 1, 2, 7\] asks for .*\[7\]"):
    decode_lib.decode(settings(channels=(0, 1, 2, 7)), full, str(tmp_path / "out"))
  with pytest.raises(ConfigError, match="along each of z, y and x"):
    decode_lib.decode(settings(channels=(0, 1, 3, 4, 5)), full, str(tmp_path / "out"))
  with pytest.raises(
    ConfigError, match=r"more than decode.mws.max_voxels=1000 .*decode.method='cc' or 'waterz'"
  ):
    decode_lib.decode(settings(max_voxels=1000), full, str(tmp_path / "out"))
  with pytest.raises(ConfigError, match=r"blockwise='always' cannot run decode\.method='mws'"):
    decode_settings({"method": "mws", "blockwise": "always"})

  # The CLI says it in one line.
  out = subprocess.run(
    [sys.executable, "-m", "jaxseg.decode", f"--config={DEMO}", "--config.decode.method=mws",
     f"--affinities={nearest}", f"--output={tmp_path / 'cli'}"],
    capture_output=True, text=True, cwd=REPO_ROOT,
  )  # fmt: skip
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 1 and len(lines) == 1, out.stderr
  assert "decode.method='mws'" in lines[0] and "infer.output_channels" in lines[0]

  # From the config alone, before anything is predicted (the tuner and the chain).
  demo = load_config(DEMO)
  with pytest.raises(ConfigError, match=r"infer.output_channels=\(0, 1, 2\) predicts only"):
    mws.check_predicted_channels(demo)
  mws.check_predicted_channels(load_config(DEMO, {"infer.output_channels": ()}))
  run = load_config(DEMO, {"run.decoders": ("cc", "mws"), "data.root": str(tmp_path / "data")})
  with pytest.raises(ConfigError, match=r"config.run.decoders=\('cc', 'mws'\) needs long-range"):
    chain.Chain(run, str(tmp_path / "run"), echo=lambda line: None).run("all")
  assert not os.path.exists(tmp_path / "data") and not os.path.exists(tmp_path / "run")


# -- scored and tuned like the other decoders --------------------------------------------------------


TUNE_SHAPE = (16, 32, 32)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
  """A val and a test cube, their six-channel predictions in the cache, an mws TPE study."""
  root = tmp_path_factory.mktemp("data")
  params = resolve_config(load_config(DEMO, {"data.synth.shape": TUNE_SHAPE}).data.synth)
  for split, seed in (("val", 100), ("test", 101)):
    img, seg, graph = generate_cube(params, seed)
    write_cube(
      str(root / split / f"seed{seed}"), img, seg, graph, params.resolution, chunks=TUNE_SHAPE,
      preview=False,
    )  # fmt: skip
  config = load_config(
    DEMO,
    {
      "data.root": str(root),
      "qc.enabled": False,
      "infer.output_channels": (),  # all six banis6 channels
      "decode.mws.bias_long": 0.9,  # a poor default the tuning should leave
      "tune.trial_timeout_s": 60.0,
      "tune.mws.n_trials": 4,
      "tune.mws.n_startup_trials": 2,
      "tune.mws.bias_short": (0.4, 0.6, 0.1),
      "tune.mws.bias_long": (0.3, 0.9, 0.3),
      "run.decoders": ("cc", "mws"),
    },
  )
  workdir = str(tmp_path_factory.mktemp("run"))
  entry = outputs.StageOutput(
    workdir, name="train", stage="training run", fingerprint={}, paths=("checkpoints",)
  )
  entry.open()
  os.makedirs(os.path.join(workdir, "checkpoints", "100"))
  for split in ("val", "test"):
    _write_cached_predictions(config, workdir, split)
  result = tune_lib.tune(config, workdir, checkpoint=workdir, decoder="mws", show_progress=False)
  return {"config": config, "workdir": workdir, "result": result}


def _write_cached_predictions(config, workdir, split):
  """Six-channel predictions where the cache looks for them, as jaxseg.predict leaves them."""
  key, _ = cache.cache_key(config, workdir, split)
  out = os.path.join(tune_lib.predictions_root(workdir), key)
  for v in dataset_volumes(config.data, split):
    entry = outputs.StageOutput(
      out,
      name=layout.entry_name(v.name),
      stage="predict",
      fingerprint={},
      paths=(layout.group_name(v.name), layout.summary_name(v.name)),
    )
    entry.open(overwrite=True)
    aff = noisy_affinities(v.labels.read(), BANIS6, 0.1, seed=len(split))
    write_prediction(os.path.join(out, f"{v.name}.zarr", "affinities"), aff, BANIS6, range(6))
    write_json(os.path.join(out, f"{v.name}_predict.json"), {"name": v.name, "complete": True})
    entry.finish()


def test_tuning_searches_the_biases_and_tune_test_applies_them(tuned):
  config, workdir, result = tuned["config"], tuned["workdir"], tuned["result"]
  assert result["decoder"] == "mws" and result["n_complete"] == 4
  assert result["objective"] == "adapted_rand" and set(result["best_params"]) == {
    "bias_short",
    "bias_long",
  }
  space = search.search_space(config, "mws")
  assert space.defaults == {"bias_short": 0.5, "bias_long": 0.9}  # trial 0: the config's own
  study = optuna.load_study(
    study_name="jaxseg-mws", storage=f"sqlite:///{workdir}/tune/mws/study.db"
  )
  first = study.trials[0]
  assert first.user_attrs["defaults"] and first.params == space.defaults
  assert result["best_value"] < min(first.value, 0.01)  # better than the split-happy default
  assert os.path.getsize(result["plot"]) > 1000

  (tested,) = tune_lib.tune_test(config, workdir, checkpoint=workdir, decoder="mws",
                                 show_progress=False)  # fmt: skip
  row = tested["results"][tested["best"]]
  assert tested["decoder"] == "mws" and row["params"] == result["best_params"]
  assert row["adapted_rand"] < 0.05 and row["threshold"] == result["best_params"]["bias_short"]
  tuned_config = scoring.decoder_config(config, "mws", result["best_params"])
  assert tuned_config.decode.mws.bias_long == result["best_params"]["bias_long"]

  # The report shows the decoder's own parameters on its rows.
  best = tune_lib.load_best_params(workdir, "mws")
  rows = report.metric_rows({"tuned": {"mws": {"best": best, "volumes": {"seed101": tested}}}})
  (shown,) = rows
  short, long = (result["best_params"][k] for k in ("bias_short", "bias_long"))
  assert shown["row"] == "mws (tuned)" and "threshold" not in shown["params"]
  assert sorted(shown["params"].split(", ")) == [f"bias_long={long:g}", f"bias_short={short:g}"]


def test_tuning_refuses_a_config_that_predicts_no_long_range_channels(tuned, tmp_path):
  config = tuned["config"].copy_and_resolve_references()
  config.infer.output_channels = (0, 1, 2)

  def no_predictions(*args, **kwargs):
    raise AssertionError("predicted before refusing")

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(cache, "cached_predictions", no_predictions)
    with pytest.raises(ConfigError, match=r"decode.method='mws' needs long-range"):
      tune_lib.tune(config, str(tmp_path), checkpoint=tuned["workdir"], decoder="mws",
                    show_progress=False)  # fmt: skip
