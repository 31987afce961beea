"""Tests for jaxseg.metrics.skeletonize and ``python -m jaxseg.skeletonize``: skeletons made from
dense labels score their labels perfectly, reproduce known centrelines' ERL, stitch blockwise runs
into one tree per object, are cached, and the command line writes, reuses and refuses like the
other commands."""

import json
import os
import subprocess
import sys

import h5py
import networkx as nx
import numpy as np
import pytest
from scipy.spatial import cKDTree

from jaxseg.common.errors import ConfigError
from jaxseg.io import VolumeError, open_volume
from jaxseg.io.skeleton import Skeletons, load_skeleton_graph, skeletons_from_graph
from jaxseg.metrics import expected_run_length
from jaxseg.metrics import skeletonize as skeletonize_module
from jaxseg.metrics.evaluation import evaluate
from jaxseg.metrics.skeletonize import (
  cached_skeleton,
  skeleton_summary,
  skeletonize_labels,
  write_skeleton,
)
from jaxseg.synthesis import default_config, generate_cube

RES = (20.0, 9.0, 9.0)  # (z, y, x) nm, the generator's default


def _cube(shape, seed):
  config = default_config()
  config.shape = shape
  _, seg, graph = generate_cube(config, seed)
  return seg, graph


def _perturb(seg: np.ndarray) -> np.ndarray:
  """``seg`` with its three largest objects split in half along x and two others merged."""
  ids, counts = np.unique(seg[seg > 0], return_counts=True)
  order = ids[np.argsort(-counts, kind="stable")]
  out = seg.astype(np.int64)
  new = int(seg.max()) + 1
  for k, label in enumerate(order[:3]):
    x = np.nonzero(seg == label)[2]
    half = (seg == label) & (np.arange(seg.shape[2]) >= int(np.median(x)))
    out[half] = new + k
  out[seg == order[4]] = order[5]
  return out


def _components_per_id(graph: nx.Graph) -> dict[int, int]:
  count: dict[int, int] = {}
  for nodes in nx.connected_components(graph):
    label = graph.nodes[next(iter(nodes))]["id"]
    count[label] = count.get(label, 0) + 1
  return count


def _skeleton_length(skeletons: Skeletons, label: int) -> float:
  return float(
    skeletons.edge_length_nm[skeletons.skeleton_ids[skeletons.edges[:, 0]] == label].sum()
  )


def _subset(skeletons: Skeletons, keep) -> Skeletons:
  """The skeletons of the ids in ``keep`` only."""
  node = np.isin(skeletons.skeleton_ids, keep)
  row = np.cumsum(node) - 1
  edge = node[skeletons.edges[:, 0]] & node[skeletons.edges[:, 1]]
  return Skeletons(
    skeletons.skeleton_ids[node],
    skeletons.voxel_zyx[node],
    skeletons.nm_zyx[node],
    row[skeletons.edges[edge]],
    skeletons.edge_length_nm[edge],
  )


# -- the library -----------------------------------------------------------------------------------


def test_generated_cube_scores_its_own_skeleton_perfectly(tmp_path):
  seg, generating = _cube((32, 64, 64), seed=0)
  graph = skeletonize_labels(seg, RES)
  # One component per object: the synthetic ids are 6-connected.
  assert set(_components_per_id(graph).values()) == {1}
  # Every object big enough gets a skeleton, and every node sits on its own label (x, y, z order).
  ids, counts = np.unique(seg[seg > 0], return_counts=True)
  assert {n for _, n in graph.nodes(data="id")} == set(ids[counts >= 100].tolist())
  for _, data in graph.nodes(data=True):
    x, y, z = data["index_position"]
    assert seg[z, y, x] == data["id"]
    # nm_position is the voxel centre, smoothed along the path by about a voxel at most.
    assert np.allclose(data["nm_position"], np.array([x, y, z]) * RES[::-1], atol=2 * max(RES))
  for u, v, length in graph.edges(data="edge_length"):
    a, b = (np.asarray(graph.nodes[n]["nm_position"]) for n in (u, v))
    assert length == pytest.approx(np.linalg.norm(a - b))

  path = tmp_path / "skeleton.pkl"
  write_skeleton(graph, path)
  loaded = load_skeleton_graph(path)
  assert loaded.number_of_nodes() == graph.number_of_nodes()
  metrics = evaluate(seg, None, str(path), resolution=RES)
  assert metrics["nerl"] == 1.0
  assert metrics["n_skeletons"] == len({n for _, n in graph.nodes(data="id")})
  # The same cube against its generating skeletons, for scale (their ERL is 1.0 too).
  assert evaluate(seg, None, skeletons_from_graph(generating, RES))["nerl"] == 1.0
  summary = skeleton_summary(graph)
  assert summary["nodes"] == graph.number_of_nodes()
  assert summary["length_um"] == pytest.approx(
    sum(w for *_, w in graph.edges(data="edge_length")) / 1000
  )


# Straight tubes through a (32, 96, 96) volume at 20 x 9 x 9 nm: (start, end) of the axis in nm
# (z, y, x) and the radius. Their skeletons are known exactly: the axes.
_TUBES = (
  ((320, 100, 0), (320, 100, 855), 50),  # along x
  ((0, 300, 300), (620, 300, 300), 45),  # along z
  ((200, 0, 450), (400, 855, 650), 45),  # oblique
  ((500, 450, 0), (300, 855, 500), 55),  # oblique, crosses an edge of the volume
  ((100, 560, 0), (160, 640, 855), 40),
  ((100, 855, 800), (560, 450, 855), 40),  # clips a corner
)


def _tubes():
  """Labels of the tubes and their axes as exact skeletons (nodes every 10 nm)."""
  shape = (32, 96, 96)
  grid = np.stack(
    np.meshgrid(*[np.arange(n) * r for n, r in zip(shape, RES, strict=True)], indexing="ij"), -1
  )
  labels = np.zeros(shape, np.uint32)
  ids, nm, edges = [], [], []
  for label, (a, b, radius) in enumerate(_TUBES, start=1):
    a, b = np.asarray(a, float), np.asarray(b, float)
    axis = b - a
    t = np.clip((grid - a) @ axis / (axis @ axis), 0, 1)
    inside = np.linalg.norm(grid - (a + t[..., None] * axis), axis=-1) <= radius
    assert not (inside & (labels > 0)).any(), f"tube {label} touches another"
    labels[inside] = label
    points = a + np.linspace(0, 1, int(np.linalg.norm(axis) / 10) + 1)[:, None] * axis
    first = sum(len(i) for i in ids)
    ids.append(np.full(len(points), label))
    nm.append(points)
    edges.append(first + np.stack([np.arange(len(points) - 1), np.arange(1, len(points))], 1))
  ids, nm, edges = (np.concatenate(x) for x in (ids, nm, edges))
  voxels = np.rint(nm / RES).astype(np.int64)
  assert (labels[tuple(voxels.T)] == ids).all()
  lengths = np.linalg.norm(nm[edges[:, 0]] - nm[edges[:, 1]], axis=1)
  truth = Skeletons(ids.astype(np.int64), voxels, nm, edges.astype(np.int64), lengths)
  return labels, truth, grid


def test_erl_matches_known_centrelines():
  """Tubes whose true skeletons are their axes: lengths and the ERL of a perturbed segmentation
  (two tubes split, two merged) through the made skeleton match the axes' within 5 %."""
  labels, truth, grid = _tubes()
  made = skeletons_from_graph(skeletonize_labels(labels, RES), RES)
  for label in range(1, len(_TUBES) + 1):
    assert _skeleton_length(made, label) == pytest.approx(_skeleton_length(truth, label), rel=0.06)
  seg = labels.astype(np.int64)
  seg[(labels == 1) & (grid[..., 2] > 400)] = 11
  seg[(labels == 3) & (grid[..., 1] > 500)] = 13
  seg[labels == 5] = 4
  want = expected_run_length(truth, seg)
  got = expected_run_length(made, seg)
  assert got.erl_nm == pytest.approx(want.erl_nm, rel=0.05)  # measured: +2.0 %
  assert got.nerl == pytest.approx(want.nerl, rel=0.05)
  assert got.n_mergers == want.n_mergers == 2


def _folds(skeletons: Skeletons, label: int, near_nm=120.0, hops=6) -> bool:
  """True when the skeleton of ``label`` comes within ``near_nm`` of itself more than ``hops``
  edges further along: a path that doubled back inside its own tube."""
  rows = np.nonzero(skeletons.skeleton_ids == label)[0]
  graph = nx.Graph()
  graph.add_nodes_from(rows.tolist())
  graph.add_edges_from(skeletons.edges[np.isin(skeletons.edges[:, 0], rows)].tolist())
  near = dict(nx.all_pairs_shortest_path_length(graph, cutoff=hops + 2))
  pairs = cKDTree(skeletons.nm_zyx[rows]).query_pairs(near_nm)
  return any(near[rows[a]].get(rows[b], hops + 1) > hops for a, b in pairs)


def test_erl_matches_generating_skeletons_where_they_are_centrelines():
  """ERL of a perturbed segmentation through the made skeletons against the generating ones.

  The generator's random walks often double back inside their own tube, so a generating skeleton
  can be much longer than the object it runs in (seed 0 here: 116 of 209 objects; the largest
  generating skeleton is 10.9 µm, the made one 4.7 µm, in a 1.3 x 1.2 x 1.2 µm cube); no skeleton
  of the labels can follow that. Over all objects the made skeletons give 0.69 (seed 0) and 0.71
  (seed 1) of the generating ERL at this size, and 0.81 to 1.12 on (32, 64, 64) cubes, where two
  or three objects dominate. Over the objects whose generating path is a centreline they agree:
  measured -4.5 % (seed 0) and +0.6 % (seed 1).
  """
  seg, generating = _cube((64, 128, 128), seed=0)
  want_all = skeletons_from_graph(generating, RES)
  made_all = skeletons_from_graph(skeletonize_labels(seg, RES), RES)
  clean = [i for i in np.unique(want_all.skeleton_ids) if not _folds(want_all, i)]
  assert len(clean) > 60
  want, made = _subset(want_all, clean), _subset(made_all, clean)
  pert = _perturb(seg)
  assert expected_run_length(made, pert).erl_nm == pytest.approx(
    expected_run_length(want, pert).erl_nm, rel=0.05
  )
  assert expected_run_length(made_all, seg).nerl == 1.0


@pytest.mark.slow
def test_blockwise_equals_whole_volume():
  """Blocks of (32, 96, 96) with the default halo: the same skeletons as one whole-volume run,
  one tree per object. Lengths agree within 1 % (measured 0.83 %); the ERL of a perturbed
  segmentation within 3 % (measured 2.5 %): TEASAR's paths depend on where it starts, and the
  same cube mirrored along z moves ERL by 1.8 % and length by 0.9 % in a whole-volume run."""
  seg, _ = _cube((32, 192, 192), seed=0)
  whole = skeletonize_labels(seg, RES)
  blocks = skeletonize_labels(seg, RES, block_shape=(32, 96, 96))
  for graph in (whole, blocks):
    assert set(_components_per_id(graph).values()) == {1}
    assert nx.is_forest(graph)
  assert {n for _, n in blocks.nodes(data="id")} == {n for _, n in whole.nodes(data="id")}
  assert skeleton_summary(blocks)["length_um"] == pytest.approx(
    skeleton_summary(whole)["length_um"], rel=0.01
  )
  pert = _perturb(seg)
  erl = [expected_run_length(skeletons_from_graph(g, RES), pert).erl_nm for g in (whole, blocks)]
  assert erl[1] == pytest.approx(erl[0], rel=0.03)
  assert evaluate(seg, None, skeletons_from_graph(blocks, RES))["nerl"] == 1.0


def test_blocks_smaller_than_objects_still_make_one_tree_per_object():
  seg, _ = _cube((32, 64, 64), seed=1)
  graph = skeletonize_labels(seg, RES, block_shape=(12, 20, 24), halo=(4, 8, 8))
  assert set(_components_per_id(graph).values()) == {1}
  assert evaluate(seg, None, skeletons_from_graph(graph, RES))["nerl"] == 1.0


def test_axis_order_mask_background_and_dust():
  # A rod along x, one along z and a speck: kimimaro reads (x, y, z), jaxseg (z, y, x).
  labels = np.zeros((40, 30, 60), np.int32)
  labels[10:14, 5:9, 2:58] = 7  # along x
  labels[2:38, 20:25, 30:35] = 8  # along z
  labels[30:32, 2:4, 2:4] = 9  # 8 voxels: dust
  labels[0, :, :] = -1  # NISB's "unlabeled" is background
  graph = skeletonize_labels(labels, (10.0, 4.0, 4.0), dust=20)
  assert {n for _, n in graph.nodes(data="id")} == {7, 8}
  span = {}
  for label in (7, 8):
    xyz = np.array([d["index_position"] for _, d in graph.nodes(data=True) if d["id"] == label])
    span[label] = np.ptp(xyz, axis=0)  # extent in x, y, z
  assert span[7][0] > 40 and span[7][2] <= 4
  assert span[8][2] > 25 and span[8][0] <= 4
  # The rod along x is 56 voxels of 4 nm: its skeleton spans most of that in nm.
  lengths = skeletons_from_graph(graph)
  assert 180 < _skeleton_length(lengths, 7) < 240

  mask = np.ones(labels.shape, np.uint8)
  mask[:, :, 30:] = 0  # the x rod keeps its first half, the z rod is gone
  masked = skeletonize_labels(labels, (10.0, 4.0, 4.0), dust=20, mask=mask)
  assert {n for _, n in masked.nodes(data="id")} == {7}
  assert max(p[0] for _, p in masked.nodes(data="index_position")) < 30

  with pytest.raises(VolumeError, match=r"mask .* \(40, 30, 59\)"):
    skeletonize_labels(labels, (10.0, 4.0, 4.0), mask=mask[:, :, :59])
  with pytest.raises(ConfigError, match="resolution"):
    skeletonize_labels(labels, (10.0, 4.0))
  with pytest.raises(ConfigError, match="block_shape"):
    skeletonize_labels(labels, (10.0, 4.0, 4.0), block_shape=(8, 0, 8))
  with pytest.raises(VolumeError, match="integer labels"):
    skeletonize_labels(labels.astype(np.float32), (10.0, 4.0, 4.0))
  assert skeletonize_labels(np.zeros((4, 4, 4), np.uint8), (1, 1, 1)).number_of_nodes() == 0


def _write_h5(path, array):
  with h5py.File(path, "w") as f:
    f.create_dataset("stack", data=array)
  return f"{path}:stack"


def test_cached_skeleton_is_reused_and_remade_when_the_labels_change(tmp_path, monkeypatch):
  seg, _ = _cube((32, 64, 64), seed=2)
  data = tmp_path / "data"
  data.mkdir()
  spec = _write_h5(data / "gt.h5", seg)
  cache = tmp_path / "cache"
  path = cached_skeleton(spec, RES, cache)
  assert os.path.dirname(path) == str(cache) and os.listdir(data) == ["gt.h5"]
  assert evaluate(spec, None, path, resolution=RES)["nerl"] == 1.0
  # The same labels again: the file is reused, nothing is skeletonized.
  made = skeletonize_module.skeletonize_labels
  monkeypatch.setattr(skeletonize_module, "skeletonize_labels", None)
  assert cached_skeleton(open_volume(spec), RES, cache) == path
  # Another resolution or dust is another entry, and the labels changed in place another state.
  monkeypatch.setattr(skeletonize_module, "skeletonize_labels", made)
  other_dust = cached_skeleton(spec, RES, cache, dust=1000)
  assert other_dust != path and os.path.isfile(path)
  changed = seg.copy()
  changed[seg == 1] = 0
  _write_h5(data / "gt.h5", changed)
  remade = cached_skeleton(spec, RES, cache)
  assert remade != path and not os.path.exists(path)  # the stale state is pruned
  assert 1 not in {n for _, n in load_skeleton_graph(remade).nodes(data="id")}
  # A mask is part of the key.
  mask = np.ones(seg.shape, np.uint8)
  mask[:, :, :32] = 0
  with_mask = cached_skeleton(spec, RES, cache, mask=_write_h5(data / "mask.h5", mask))
  assert with_mask not in (path, remade, other_dust)
  # The default folder is beside the ERL cache, under $JAXSEG_CACHE_DIR (set by conftest).
  default = cached_skeleton(spec, RES)
  assert default.startswith(os.path.join(os.environ["JAXSEG_CACHE_DIR"], "skeletons") + os.sep)


# -- the command line ------------------------------------------------------------------------------


def _cli(program: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", program, *args], capture_output=True, text=True, timeout=300
  )


@pytest.mark.slow
def test_cli_writes_reuses_and_refuses(tmp_path):
  seg, _ = _cube((32, 64, 64), seed=0)
  spec = _write_h5(tmp_path / "gt.h5", seg)
  out = tmp_path / "results" / "skeleton.pkl"
  args = [f"--labels={spec}", "--resolution=20,9,9", f"--output={out}"]
  done = _cli("jaxseg.skeletonize", *args)
  assert done.returncode == 0, done.stderr
  line = done.stdout.strip().splitlines()[-1]
  assert line.startswith(f"wrote {out}: ") and "objects" in line and "µm" in line
  assert evaluate(spec, None, str(out), resolution=RES)["nerl"] == 1.0
  stamp = out.stat().st_mtime_ns

  again = _cli("jaxseg.skeletonize", *args)
  assert again.returncode == 0, again.stderr
  assert "reused" in again.stdout and out.stat().st_mtime_ns == stamp

  changed = _cli("jaxseg.skeletonize", *args, "--dust=10")
  assert changed.returncode == 1 and "--overwrite" in changed.stderr
  assert out.stat().st_mtime_ns == stamp

  foreign = tmp_path / "results" / "theirs.pkl"
  foreign.write_bytes(b"not jaxseg's")
  refused = _cli("jaxseg.skeletonize", f"--labels={spec}", "--resolution=20,9,9",
                 f"--output={foreign}", "--overwrite")  # fmt: skip
  assert refused.returncode == 1
  assert len(refused.stderr.strip().splitlines()) == 1
  assert str(foreign) in refused.stderr and "did not make" in refused.stderr
  assert foreign.read_bytes() == b"not jaxseg's"

  bad = _cli("jaxseg.skeletonize", f"--labels={tmp_path / 'nope.h5'}:stack", f"--output={out}")
  assert bad.returncode == 1
  assert len(bad.stderr.strip().splitlines()) == 1 and "nope.h5" in bad.stderr


@pytest.mark.slow
def test_evaluate_skeletonize_reports_nerl(tmp_path):
  seg, _ = _cube((32, 64, 64), seed=0)
  gt = _write_h5(tmp_path / "gt.h5", seg)
  pred = _write_h5(tmp_path / "pred.h5", _perturb(seg).astype(np.uint32))
  out = tmp_path / "metrics.json"
  done = _cli(
    "jaxseg.evaluate",
    f"--seg={pred}",
    f"--gt={gt}",
    "--skeletonize",
    "--resolution=20,9,9",
    f"--output={out}",
  )
  assert done.returncode == 0, done.stderr
  assert "NERL" in done.stdout and "adapted Rand" in done.stdout
  metrics = json.loads(out.read_text())
  assert 0 < metrics["nerl"] < 1 and metrics["n_mergers"] == 2
  assert metrics["inputs"]["skeletonize"] is True
  # Nothing was written beside the data but what was asked for.
  assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
    "gt.h5",
    "metrics.json",
    "pred.h5",
  ]
  refused = _cli("jaxseg.evaluate", f"--seg={pred}", "--skeletonize", "--skeleton=x.pkl")
  assert refused.returncode != 0 and "--skeletonize" in refused.stderr


# -- real data -------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_gala_ground_truth_scores_nerl_one_against_its_skeleton(shared_data, tmp_path):
  # The gala README states no voxel size ("very probably isotropic ~10 nm"): 10 nm is assumed.
  spec = f"{shared_data / 'gala_fibsem_example' / 'test-gt.lzf.h5'}:stack"
  resolution = (10.0, 10.0, 10.0)
  path = cached_skeleton(spec, resolution, tmp_path / "cache")
  graph = load_skeleton_graph(path)
  assert len({n for _, n in graph.nodes(data="id")}) > 40
  metrics = evaluate(spec, None, path, resolution=resolution)
  assert metrics["nerl"] == 1.0 and metrics["n_mergers"] == 0
