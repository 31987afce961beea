"""Tests for jaxseg.io.skeleton: pickle round trip, validation errors, flat form, cache, em_erl npz."""

import os
import pickle
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
from conftest import SHARED_DATA, require_shared

from jaxseg.io import skeleton as skeleton_lib
from jaxseg.io.skeleton import (
  CACHE_SUFFIX,
  SkeletonError,
  Skeletons,
  load_skeleton_graph,
  load_skeletons,
  save_skeleton_graph,
  skeletons_from_graph,
)

DATA = SHARED_DATA
EM_ERL = DATA / "em_erl_testcase"


def _graph(with_nm=True, with_length=True):
  """Two skeletons: a 3-node chain (id 7) and a 2-node chain (id 9); positions are x, y, z."""
  g = nx.Graph()
  voxels = {0: (1, 2, 3), 1: (2, 2, 3), 2: (2, 4, 3), 10: (5, 5, 5), 11: (5, 5, 6)}
  for node, xyz in voxels.items():
    attrs = {"id": 7 if node < 10 else 9, "index_position": np.array(xyz)}
    if with_nm:
      attrs["nm_position"] = np.array(xyz, dtype=float) * np.array([9.0, 9.0, 20.0])
    g.add_node(node, **attrs)
  for u, v in [(0, 1), (1, 2), (10, 11)]:
    g.add_edge(u, v)
    if with_length:
      g.edges[u, v]["edge_length"] = 100.0 + u
  return g


def test_pickle_round_trip(tmp_path):
  g = _graph()
  path = tmp_path / "skeleton.pkl"
  save_skeleton_graph(g, path)
  assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
  h = load_skeleton_graph(path)
  assert sorted(h.nodes) == sorted(g.nodes) and sorted(h.edges) == sorted(g.edges)
  assert h.nodes[2]["id"] == 7 and tuple(h.nodes[2]["index_position"]) == (2, 4, 3)
  assert h.edges[1, 2]["edge_length"] == 101.0


def test_flat_form_axis_order_and_lengths(tmp_path):
  sk = skeletons_from_graph(_graph())
  assert sk.voxel_zyx.dtype == np.int64 and sk.voxel_zyx.shape == (5, 3)
  # index_position is (x, y, z); the flat form is (z, y, x).
  np.testing.assert_array_equal(sk.voxel_zyx[0], [3, 2, 1])
  np.testing.assert_allclose(sk.nm_zyx[0], [60.0, 18.0, 9.0])
  np.testing.assert_array_equal(sk.skeleton_ids, [7, 7, 7, 9, 9])
  assert sk.edge_length_source == "edge_length"
  np.testing.assert_allclose(np.sort(sk.edge_length_nm), [100.0, 101.0, 110.0])

  no_length = skeletons_from_graph(_graph(with_length=False))
  assert no_length.edge_length_source == "nm_position"
  # Edge (1, 2) moves 2 voxels in y at 9 nm.
  row = {tuple(e) for e in no_length.edges.tolist()}
  assert (1, 2) in row
  lengths = dict(zip(map(tuple, no_length.edges.tolist()), no_length.edge_length_nm, strict=True))
  assert lengths[(1, 2)] == pytest.approx(18.0)
  assert lengths[(3, 4)] == pytest.approx(20.0)

  voxel = skeletons_from_graph(_graph(with_nm=False, with_length=False))
  assert voxel.edge_length_source == "voxel"
  assert np.sort(voxel.edge_length_nm).tolist() == pytest.approx([1.0, 1.0, 2.0])
  scaled = skeletons_from_graph(_graph(with_nm=False, with_length=False), resolution=(20, 9, 9))
  assert scaled.edge_length_source == "voxel*resolution"
  assert np.sort(scaled.edge_length_nm).tolist() == pytest.approx([9.0, 18.0, 20.0])


def test_string_node_keys():
  g = nx.relabel_nodes(_graph(), {n: f"n{n}" for n in _graph().nodes})
  sk = skeletons_from_graph(g)
  assert sk.num_nodes == 5 and sk.num_edges == 3
  assert sk.skeleton_ids[sk.edges[:, 0]].tolist() == sk.skeleton_ids[sk.edges[:, 1]].tolist()


@pytest.mark.parametrize("attr", ["id", "index_position"])
def test_missing_required_attribute(tmp_path, attr):
  g = _graph()
  del g.nodes[11][attr]
  path = tmp_path / "bad.pkl"
  save_skeleton_graph(g, path)
  with pytest.raises(SkeletonError, match=rf"bad\.pkl.*'{attr}'.*node 11"):
    load_skeleton_graph(path)
  with pytest.raises(SkeletonError, match=attr):
    load_skeletons(path)


def test_partial_nm_position_and_bad_shapes(tmp_path):
  g = _graph()
  del g.nodes[10]["nm_position"]
  with pytest.raises(SkeletonError, match=r"nm_position.*node 10"):
    skeletons_from_graph(g)
  g = _graph()
  g.nodes[10]["index_position"] = (1, 2)
  with pytest.raises(SkeletonError, match="index_position"):
    skeletons_from_graph(g)


def test_missing_and_non_graph_files(tmp_path):
  with pytest.raises(SkeletonError, match="not found"):
    load_skeleton_graph(tmp_path / "nope.pkl")
  with pytest.raises(SkeletonError, match="not found"):
    load_skeletons(tmp_path / "nope.pkl")
  path = tmp_path / "list.pkl"
  path.write_bytes(pickle.dumps([1, 2, 3]))
  with pytest.raises(SkeletonError, match="expected a networkx Graph"):
    load_skeleton_graph(path)
  (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
  with pytest.raises(SkeletonError, match="cannot unpickle"):
    load_skeleton_graph(tmp_path / "junk.pkl")


def _cache_files(folder):
  return sorted(p.name for p in Path(folder).glob("*")) if Path(folder).exists() else []


def test_cache_is_used_and_invalidated(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXSEG_CACHE_DIR", str(tmp_path / "cache"))
  path = tmp_path / "skeleton.pkl"
  save_skeleton_graph(_graph(), path)
  first = load_skeletons(path)
  (cache,) = _cache_files(tmp_path / "cache" / "erl")
  assert cache.endswith(CACHE_SUFFIX) and not Path(str(path) + CACHE_SUFFIX).exists()

  def no_parsing(path):
    raise AssertionError("parsed the pickle again instead of reading the cache")

  with monkeypatch.context() as m:
    m.setattr(skeleton_lib, "_read_pickle", no_parsing)
    second = load_skeletons(path)  # a cache hit
  for key, value in first.to_npz_dict().items():
    np.testing.assert_array_equal(value, second.to_npz_dict()[key])
  assert second.edge_length_source == first.edge_length_source

  # A changed pickle (new size / mtime) must not be served from the stale cache, which goes.
  g = _graph()
  g.add_node(20, id=11, index_position=(0, 0, 0), nm_position=(0.0, 0.0, 0.0))
  save_skeleton_graph(g, path)
  os.utime(path, ns=(1, 1))
  assert load_skeletons(path).num_nodes == 6
  assert len(_cache_files(tmp_path / "cache" / "erl")) == 1
  assert _cache_files(tmp_path / "cache" / "erl") != [cache]
  # Only touched (same bytes, new mtime): parsed again too.
  os.utime(path, ns=(2, 2))
  parsed = []
  with monkeypatch.context() as m:
    m.setattr(skeleton_lib, "_read_pickle", lambda p: parsed.append(p) or g)
    assert load_skeletons(path).num_nodes == 6
  assert parsed == [str(path)]
  # A different resolution is a different cache entry, kept beside the other.
  assert load_skeletons(path, resolution=(20, 9, 9)).num_nodes == 6
  assert len(_cache_files(tmp_path / "cache" / "erl")) == 2
  assert load_skeletons(path, cache=False).num_nodes == 6


def test_cache_never_writes_beside_the_skeleton(tmp_path, monkeypatch):
  """The user's data folder may be read-only (or shared): the cache goes to jaxseg's own."""
  monkeypatch.setenv("JAXSEG_CACHE_DIR", str(tmp_path / "env"))
  data = tmp_path / "data"
  data.mkdir()
  path = data / "skeleton.pkl"
  save_skeleton_graph(_graph(), path)
  before = _cache_files(data)
  data.chmod(0o555)
  try:
    load_skeletons(path)
    load_skeletons(path, cache_dir=tmp_path / "explicit")  # an explicit folder wins
    assert _cache_files(data) == before  # tests run as root: the chmod alone proves nothing
  finally:
    data.chmod(0o755)
  assert len(_cache_files(tmp_path / "env" / "erl")) == 1
  assert len(_cache_files(tmp_path / "explicit")) == 1
  assert skeleton_lib.cache_path(path, None).startswith(str(tmp_path / "env" / "erl") + os.sep)
  # Without the variable: ~/.cache/jaxseg/erl.
  monkeypatch.delenv("JAXSEG_CACHE_DIR")
  monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  load_skeletons(path)
  assert len(_cache_files(tmp_path / "home" / ".cache" / "jaxseg" / "erl")) == 1
  # An unwritable cache folder costs the cache, never the load.
  blocked = tmp_path / "blocked"
  blocked.write_text("a file where the folder should be")
  assert load_skeletons(path, cache_dir=blocked / "erl").num_nodes == 5


def test_check_bounds_message():
  sk = skeletons_from_graph(_graph())
  sk.check_bounds((7, 6, 6))
  named = Skeletons(*sk.to_npz_dict().values(), path="skel.pkl")
  with pytest.raises(SkeletonError, match=r"skel\.pkl.*outside seg\.zarr of shape.*\(4, 6, 6\)"):
    named.check_bounds((4, 6, 6), volume_name="seg.zarr")


@pytest.mark.realdata
def test_em_erl_npz():
  path = require_shared(EM_ERL / "gt_graph.npz")
  with pytest.raises(SkeletonError, match="resolution"):
    load_skeletons(path)
  sk = load_skeletons(path, resolution=(30, 30, 30))
  assert sk.num_nodes == 204 and sk.num_edges == 202
  assert sorted(np.unique(sk.skeleton_ids).tolist()) == [1, 2]
  np.testing.assert_array_equal(sk.voxel_zyx[0], [0, 98, 135])
  lengths = np.bincount(sk.skeleton_ids[sk.edges[:, 0]], weights=sk.edge_length_nm)[1:]
  np.testing.assert_allclose(lengths, np.load(path)["skeleton_len"])
