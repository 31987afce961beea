"""Tests for jaxseg.synthesis and ``python -m jaxseg.synth``: determinism, ground-truth consistency
(seg ids vs skeletons, NERL of GT == 1), membranes and image statistics, NISB layout on disk,
resume, and the command line. Cubes are small (32 x 64 x 64) to keep the file well under 40 s.
"""

import json
import math
import os
import subprocess
import sys

import networkx as nx
import numpy as np
import pytest
import scipy.ndimage

from jaxseg.common.errors import OutputError
from jaxseg.synthesis import (
  cube_stats,
  default_config,
  format_summary,
  generate_cube,
  generate_dataset,
  is_complete,
  resolve_config,
  write_cube,
)
from jaxseg.synthesis.render import membrane_mask

SHAPE = (32, 64, 64)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(difficulty="base", **overrides):
  config = default_config(difficulty)
  config.shape = SHAPE
  for key, value in overrides.items():
    config[key] = value
  return config


_CACHE = {}


def _cube(difficulty="base", seed=0):
  """Cubes are pure functions of (config, seed): generate each once per test session."""
  key = (difficulty, seed)
  if key not in _CACHE:
    _CACHE[key] = generate_cube(_config(difficulty), seed)
  return _CACHE[key]


def _graph_signature(graph):
  nodes = sorted(graph.nodes(data=True))
  edges = sorted((min(u, v), max(u, v), d["edge_length"]) for u, v, d in graph.edges(data=True))
  return nodes, edges


def _adjacent_pairs(seg):
  """Unordered pairs of different nonzero ids that share a face (6-adjacency)."""
  pairs = set()
  for axis in range(3):
    a = np.moveaxis(seg, axis, 0)
    lo, hi = a[:-1].ravel(), a[1:].ravel()
    sel = (lo != hi) & (lo > 0) & (hi > 0)
    pairs |= set(
      zip(np.minimum(lo[sel], hi[sel]).tolist(), np.maximum(lo[sel], hi[sel]).tolist(), strict=True)
    )
  return pairs


def test_deterministic_for_a_seed():
  img, seg, graph = generate_cube(_config(), 7)
  img2, seg2, graph2 = generate_cube(_config(), 7)
  assert img.dtype == np.uint8 and seg.dtype == np.uint32
  assert img.shape == seg.shape == SHAPE
  assert img.tobytes() == img2.tobytes()
  assert seg.tobytes() == seg2.tobytes()
  assert _graph_signature(graph) == _graph_signature(graph2)
  img3, seg3, _ = generate_cube(_config(), 8)
  assert not np.array_equal(seg, seg3)
  assert not np.array_equal(img, img3)


@pytest.mark.parametrize("difficulty", ["easy", "base", "touching_thin"])
def test_ground_truth_is_consistent(difficulty):
  _img, seg, graph = _cube(difficulty)
  resolution = np.asarray(resolve_config(_config(difficulty)).resolution)  # z, y, x
  ids = set(np.unique(seg).tolist()) - {0}
  assert len(ids) >= 5, f"too few neurons: {len(ids)}"
  assert ids == set(range(1, len(ids) + 1)), "ids are 1..K"
  # Every node sits inside its own segment; nm_position = index * resolution (x, y, z order).
  for _, d in graph.nodes(data=True):
    x, y, z = d["index_position"]
    assert seg[z, y, x] == d["id"]
    np.testing.assert_allclose(d["nm_position"], np.array([x, y, z]) * resolution[::-1])
  # Every segment has exactly one skeleton, one connected component.
  components = list(nx.connected_components(graph))
  component_ids = [{graph.nodes[n]["id"] for n in c} for c in components]
  assert all(len(c) == 1 for c in component_ids)
  assert sorted(next(iter(c)) for c in component_ids) == sorted(ids)
  # edge_length is the Euclidean nm distance.
  for u, v, d in graph.edges(data=True):
    dist = math.dist(graph.nodes[u]["nm_position"], graph.nodes[v]["nm_position"])
    assert d["edge_length"] == pytest.approx(dist)
  # Each id is one 6-connected component (checked with scipy, not the generator's own code).
  for i in ids:
    _, n = scipy.ndimage.label(seg == i)
    assert n == 1, f"id {i} has {n} components"


@pytest.mark.parametrize("difficulty", ["base", "touching_thin"])
def test_nerl_of_ground_truth_is_one(difficulty):
  from jaxseg.io.skeleton import skeletons_from_graph
  from jaxseg.metrics.erl import expected_run_length

  _, seg, graph = _cube(difficulty)
  resolution = resolve_config(_config(difficulty)).resolution
  result = expected_run_length(skeletons_from_graph(graph, resolution=resolution), seg)
  assert result.nerl == pytest.approx(1.0)
  assert result.n_mergers == 0 and result.n_split_edges == 0 and result.n_omitted_edges == 0


def test_touching_is_controlled_by_config():
  _, seg_easy, _ = _cube("easy")  # touch_probability 0: an extracellular gap between all ids
  assert _adjacent_pairs(seg_easy) == set()
  _, seg_thin, _ = _cube("touching_thin")  # mostly touching neighbours
  assert len(_adjacent_pairs(seg_thin)) > 50


def test_membranes_are_dark():
  img, seg, _ = _cube("base")
  membrane = membrane_mask(seg)
  interior = (seg > 0) & (membrane == 0)
  in_plane = membrane == 2
  assert img[in_plane].mean() < img[interior].mean() - 60
  assert img[seg == 0].mean() < img[interior].mean()
  # At contacts between touching neurites (a shared face in-plane) the image is dark too.
  a, b = seg[:, :, :-1], seg[:, :, 1:]
  contact = (a != b) & (a > 0) & (b > 0)
  assert contact.sum() > 100
  assert img[:, :, :-1][contact].mean() < img[interior].mean() - 60
  # Reasonable dynamic range, not saturated.
  assert 60 < img.mean() < 200 and img.std() > 20
  assert (img == 0).mean() < 0.01 and (img == 255).mean() < 0.01


def test_slice_defects_change_only_the_image():
  img, seg, _ = _cube("base")
  config = _config(missing_slice_prob=0.3, shifted_slice_prob=0.3)
  img_d, seg_d, _ = generate_cube(config, 0)
  assert np.array_equal(seg, seg_d)
  black = np.all(img_d == 0, axis=(1, 2))
  assert 1 <= black.sum() < SHAPE[0]
  changed = np.any(img_d != img, axis=(1, 2)) & ~black
  assert changed.any()


def test_presets_and_overrides():
  base = resolve_config(_config())
  thin = resolve_config(_config("touching_thin"))
  assert thin.radius_thin_nm[1] < base.radius_thin_nm[1]
  assert thin.touch_probability > base.touch_probability
  config = _config("touching_thin", noise_std=0.5)
  assert resolve_config(config).noise_std == 0.5  # an explicit knob beats the preset
  config.difficulty = "easy"
  assert resolve_config(config).touch_probability == 0.0
  config.difficulty = "nope"
  with pytest.raises(ValueError, match="difficulty"):
    resolve_config(config)
  with pytest.raises(ValueError, match="fill_fraction"):
    resolve_config(_config(fill_fraction=1.5))


def test_write_cube_nisb_layout(tmp_path):
  from jaxseg.io import open_volume
  from jaxseg.io.skeleton import load_skeleton_graph

  img, seg, graph = _cube("base")
  resolution = (20.0, 9.0, 9.0)
  info = write_cube(
    str(tmp_path / "seed0"),
    img,
    seg,
    graph,
    resolution,
    chunks=(16, 32, 32),
    attributes={"seed": 0},
  )
  assert info["neurons"] == cube_stats(seg, graph)["neurons"]
  assert is_complete(str(tmp_path / "seed0"))
  # On disk x-first: seg (X, Y, Z), img (X, Y, Z, 1).
  zarray = json.loads((tmp_path / "seed0/data.zarr/seg/.zarray").read_text())
  assert zarray["shape"] == [SHAPE[2], SHAPE[1], SHAPE[0]] and zarray["dtype"] == "<u4"
  zarray = json.loads((tmp_path / "seed0/data.zarr/img/.zarray").read_text())
  assert zarray["shape"] == [SHAPE[2], SHAPE[1], SHAPE[0], 1] and zarray["dtype"] == "|u1"
  vol = open_volume(str(tmp_path / "seed0/data.zarr/seg"), axis_order="xyz")
  assert vol.shape == SHAPE and tuple(vol.resolution) == resolution
  np.testing.assert_array_equal(vol[...], seg)
  vol = open_volume(str(tmp_path / "seed0/data.zarr/img"), axis_order="xyzc")
  assert vol.shape == (1, *SHAPE)
  np.testing.assert_array_equal(vol[...][0], img)
  loaded = load_skeleton_graph(str(tmp_path / "seed0/skeleton.pkl"))
  assert _graph_signature(loaded) == _graph_signature(graph)
  assert (tmp_path / "seed0/preview.png").stat().st_size > 1000


def test_generate_dataset_resumes(tmp_path):
  config = _config(train_seeds=(0,), val_seeds=(100,), test_seeds=())
  config.shape = (16, 32, 32)
  root = str(tmp_path)
  summary = generate_dataset(config, root, show_progress=False)
  assert set(summary) == {"train", "val"}
  assert summary["train"]["generated"] == 1 and summary["train"]["neurons"] > 0
  assert "neurons" in format_summary(summary)
  seg_file = tmp_path / "train/seed0/data.zarr/seg/.zarray"
  mtime = seg_file.stat().st_mtime_ns
  again = generate_dataset(config, root, show_progress=False)
  assert again["train"]["generated"] == 0 and again["train"]["skipped"] == 1
  assert again["train"]["neurons"] == summary["train"]["neurons"]
  assert seg_file.stat().st_mtime_ns == mtime
  # An incomplete cube (no marker) is regenerated; the complete one is left alone.
  os.remove(tmp_path / "val/seed100/synth_complete.json")
  again = generate_dataset(config, root, show_progress=False)
  assert again["val"]["generated"] == 1 and again["train"]["generated"] == 0
  # Different knobs never mix silently into an existing dataset.
  config.noise_std = 0.2
  with pytest.raises(OutputError, match="generated dataset there was made differently"):
    generate_dataset(config, root, show_progress=False)
  assert generate_dataset(config, root, overwrite=True, show_progress=False)["train"]["generated"]


def test_main_end_to_end(tmp_path):
  out = tmp_path / "synth"
  command = [
    sys.executable,
    "-m",
    "jaxseg.synth",
    f"--output={out}",
    "--config.data.synth.shape=(16,32,32)",
    "--config.data.synth.train_seeds=(3,)",
    "--config.data.synth.val_seeds=()",
    "--config.data.synth.test_seeds=(5,)",
    "--config.data.synth.difficulty=touching_thin",
  ]
  result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "neurons" in result.stdout and "train" in result.stdout
  assert is_complete(str(out / "train/seed3")) and is_complete(str(out / "test/seed5"))
  assert not (out / "val").exists()
  params = json.loads((out / "synth_params.json").read_text())
  assert params["difficulty"] == "touching_thin" and params["shape"] == [16, 32, 32]
  assert json.loads((out / "config.json").read_text())["data"]["synth"]["shape"] == [16, 32, 32]
