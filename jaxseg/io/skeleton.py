"""Skeleton ground truth for NERL / ERL: the NISB networkx pickle, em_erl ``.npz`` and a flat form.

Owns reading and writing skeleton graphs and their conversion to :class:`Skeletons`, the flat array
form the metrics use (no networkx in hot paths). Shapes of the flat form, with N nodes and E edges:

- ``skeleton_ids`` [N] int64: the GT skeleton (neuron) id of every node.
- ``voxel_zyx`` [N, 3] int64: voxel index of every node, canonical (z, y, x) order.
- ``nm_zyx`` [N, 3] float64: physical position in nm, (z, y, x).
- ``edges`` [E, 2] int64: node indices (rows of the arrays above).
- ``edge_length_nm`` [E] float64.

Two on-disk layouts are read:

- NISB ``skeleton.pkl``: a pickled undirected ``networkx.Graph``, one connected component per
  neuron. Node attributes ``id`` (GT id), ``index_position`` (voxel **x, y, z**), optionally
  ``nm_position`` (nm, **x, y, z**); optional edge attribute ``edge_length`` (nm).
- em_erl ``gt_graph.npz``: ``skeleton_id`` [S], ``nodes`` [N, 4] = (skeleton_index, z, y, x) in nm
  and ``edges_<k>`` [E_k, 3] = (u, v, length_nm) with u, v global node rows.

Parsing a large pickle takes minutes, so the flat form of a ``.pkl`` is cached in jaxseg's own
cache folder (:func:`default_cache_dir`: ``$JAXSEG_CACHE_DIR/erl``, else ``~/.cache/jaxseg/erl``;
the run chain and the tuner pass ``<workdir>/cache/erl``), never beside the skeleton: the user's
data folder may be read-only or shared. A cache file is named by the skeleton's identity (absolute
path, size, mtime) and the resolution, so an edited skeleton never reuses a stale one.

This module never imports JAX.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pickle
import re
from collections.abc import Sequence

import numpy as np

from jaxseg.common.files import atomic_output
from jaxseg.io.errors import VolumeError

# Bump when the cache layout or the conversion rules change, so stale caches are ignored.
_CACHE_VERSION = 1
CACHE_SUFFIX = ".erl_cache.npz"
# The jaxseg cache root (ERL caches in its ``erl`` folder); default ``~/.cache/jaxseg``.
CACHE_ENV = "JAXSEG_CACHE_DIR"
# Under a run's or a tuning's work dir (``workdir_cache_dir``).
_WORKDIR_CACHE = os.path.join("cache", "erl")


class SkeletonError(VolumeError):
  """A skeleton file is missing or malformed; the message names the file and the culprit."""


@dataclasses.dataclass(frozen=True)
class Skeletons:
  """Skeleton ground truth as flat arrays (see the module docstring for shapes).

  Attributes:
    skeleton_ids: [N] int64 GT skeleton id per node.
    voxel_zyx: [N, 3] int64 voxel index per node, (z, y, x).
    nm_zyx: [N, 3] float64 position in nm per node, (z, y, x).
    edges: [E, 2] int64 node rows; an edge belongs to the skeleton of its first node.
    edge_length_nm: [E] float64 edge lengths in nm.
    path: the file it was read from, used in error messages (``None`` if built in memory).
    edge_length_source: how lengths were obtained: ``"edge_length"`` (stored attribute),
      ``"nm_position"`` (Euclidean nm distance), ``"voxel*resolution"`` or ``"voxel"`` (Euclidean
      voxel distance, no resolution known), or ``"mixed"``.
  """

  skeleton_ids: np.ndarray
  voxel_zyx: np.ndarray
  nm_zyx: np.ndarray
  edges: np.ndarray
  edge_length_nm: np.ndarray
  path: str | None = None
  edge_length_source: str = "edge_length"

  def __post_init__(self):
    n = self.skeleton_ids.shape[0]
    name = self.path or "<in-memory skeletons>"
    if self.skeleton_ids.shape != (n,):
      raise SkeletonError(f"{name}: skeleton_ids must be [N], got {self.skeleton_ids.shape}")
    for field in ("voxel_zyx", "nm_zyx"):
      if getattr(self, field).shape != (n, 3):
        raise SkeletonError(f"{name}: {field} must be [{n}, 3], got {getattr(self, field).shape}")
    e = self.edges.shape[0]
    if self.edges.shape != (e, 2) or self.edge_length_nm.shape != (e,):
      raise SkeletonError(
        f"{name}: edges must be [E, 2] and edge_length_nm [E], got {self.edges.shape} and "
        f"{self.edge_length_nm.shape}"
      )
    if e and (self.edges.min() < 0 or self.edges.max() >= n):
      raise SkeletonError(
        f"{name}: edge endpoints must be node rows in [0, {n}), found "
        f"[{self.edges.min()}, {self.edges.max()}]"
      )

  @property
  def num_nodes(self) -> int:
    return int(self.skeleton_ids.shape[0])

  @property
  def num_edges(self) -> int:
    return int(self.edges.shape[0])

  @property
  def num_skeletons(self) -> int:
    return int(np.unique(self.skeleton_ids).size)

  def check_bounds(self, shape: Sequence[int], volume_name: str = "segmentation") -> None:
    """Raises :class:`SkeletonError` if any node voxel lies outside a volume of ``shape``.

    Args:
      shape: canonical (z, y, x) shape of the volume the nodes index into.
      volume_name: the volume's name or path, for the message.
    """
    shape_arr = np.asarray(tuple(shape)[-3:], dtype=np.int64)
    bad = np.any((self.voxel_zyx < 0) | (self.voxel_zyx >= shape_arr), axis=1)
    if bad.any():
      first = int(np.argmax(bad))
      raise SkeletonError(
        f"{self.path or '<in-memory skeletons>'}: {int(bad.sum())} of {self.num_nodes} skeleton "
        f"nodes lie outside {volume_name} of shape (z, y, x) {tuple(int(s) for s in shape)}; "
        f"first is node row {first} of skeleton {int(self.skeleton_ids[first])} at voxel (z, y, x) "
        f"{tuple(int(v) for v in self.voxel_zyx[first])}. Check the axis order and resolution."
      )

  def to_npz_dict(self) -> dict[str, np.ndarray]:
    """The arrays as a dict (the cache and tests store this)."""
    return {
      "skeleton_ids": self.skeleton_ids,
      "voxel_zyx": self.voxel_zyx,
      "nm_zyx": self.nm_zyx,
      "edges": self.edges,
      "edge_length_nm": self.edge_length_nm,
    }


def save_skeleton_graph(graph, path: str | os.PathLike) -> None:
  """Pickles a NISB skeleton graph atomically (temporary file, then ``os.replace``).

  Args:
    graph: an undirected ``networkx.Graph`` with node attributes ``id``, ``index_position``
      (voxel x, y, z) and optionally ``nm_position`` (nm, x, y, z), edges optionally
      ``edge_length`` (nm).
    path: destination ``.pkl`` file; its directory must exist.
  """
  path = os.fspath(path)
  with atomic_output(path) as tmp, open(tmp, "wb") as f:
    pickle.dump(graph, f, protocol=pickle.HIGHEST_PROTOCOL)


def load_skeleton_graph(path: str | os.PathLike):
  """Loads and validates a NISB ``skeleton.pkl``.

  Args:
    path: the pickle file.

  Returns:
    The ``networkx.Graph``.

  Raises:
    SkeletonError: the file is missing, is not a networkx graph, or a node lacks ``id`` /
      ``index_position`` (the message names the file, the node and the attribute).
  """
  path = os.fspath(path)
  graph = _read_pickle(path)
  _validate_graph(graph, path)
  return graph


def _read_pickle(path: str):
  if not os.path.isfile(path):
    raise SkeletonError(f"{path}: skeleton file not found")
  try:
    with open(path, "rb") as f:
      graph = pickle.load(f)
  except Exception as e:  # A corrupt pickle can raise almost anything.
    raise SkeletonError(f"{path}: cannot unpickle skeleton graph: {e!r}") from e
  if not (hasattr(graph, "nodes") and hasattr(graph, "edges")):
    raise SkeletonError(f"{path}: expected a networkx Graph, found {type(graph).__name__}")
  return graph


def _validate_graph(graph, path: str) -> None:
  """Checks required node attributes; optional ones must be all-or-nothing."""
  for attr in ("id", "index_position"):
    missing = [n for n, value in graph.nodes(data=attr) if value is None]
    if missing:
      raise SkeletonError(
        f"{path}: {len(missing)} of {graph.number_of_nodes()} nodes lack the required node "
        f"attribute {attr!r} (first: node {missing[0]!r})"
      )


def skeletons_from_graph(
  graph, resolution: Sequence[float] | None = None, path: str | None = None
) -> Skeletons:
  """Converts a NISB skeleton graph to :class:`Skeletons`.

  Positions on the graph are (x, y, z) and become (z, y, x). The edge length of each edge is, in
  order of preference: its ``edge_length`` attribute; else the Euclidean distance of the endpoints'
  ``nm_position``; else the Euclidean voxel distance scaled by ``resolution`` (plain voxel distance,
  as in PyTC, when no resolution is given). ``nm_zyx`` is ``nm_position`` when present, else
  ``voxel * resolution`` (else the voxel index).

  Args:
    graph: the ``networkx.Graph`` (see :func:`load_skeleton_graph`).
    resolution: (z, y, x) voxel size in nm, used only where nm information is missing.
    path: source file name, for error messages.

  Returns:
    The flat skeletons.
  """
  name = path or "<skeleton graph>"
  _validate_graph(graph, name)
  nodes = list(graph.nodes)
  n = len(nodes)
  ids = np.fromiter((v for _, v in graph.nodes(data="id")), dtype=np.int64, count=n)
  voxel_xyz = _stack_positions(
    [v for _, v in graph.nodes(data="index_position")], name, "index_position"
  )
  voxel_zyx = np.rint(voxel_xyz[:, ::-1]).astype(np.int64)
  nm_values = [v for _, v in graph.nodes(data="nm_position")]
  n_nm = sum(v is not None for v in nm_values)
  if 0 < n_nm < n:
    first = next(node for node, v in zip(nodes, nm_values, strict=True) if v is None)
    raise SkeletonError(
      f"{name}: {n - n_nm} of {n} nodes lack 'nm_position' while others have "
      f"it (first: node {first!r})"
    )
  res = None if resolution is None else np.asarray(resolution, dtype=np.float64).reshape(3)
  if n_nm:
    nm_zyx = _stack_positions(nm_values, name, "nm_position")[:, ::-1].copy()
  else:
    nm_zyx = voxel_zyx.astype(np.float64) * (1.0 if res is None else res)

  # Node keys are arbitrary hashables; map them to rows, with a fast path for 0..N-1 in order.
  edge_list = list(graph.edges(data="edge_length"))
  n_edges = len(edge_list)
  if nodes == list(range(n)):
    flat = (k for u, v, _ in edge_list for k in (u, v))
  else:
    row = {k: i for i, k in enumerate(nodes)}
    flat = (row[k] for u, v, _ in edge_list for k in (u, v))
  edges = np.fromiter(flat, dtype=np.int64, count=2 * n_edges).reshape(n_edges, 2)
  stored = np.fromiter(
    (np.nan if w is None else w for _, _, w in edge_list), dtype=np.float64, count=n_edges
  )
  missing = np.isnan(stored)
  if n_nm:
    computed_source = "nm_position"
    computed = np.linalg.norm(nm_zyx[edges[:, 0]] - nm_zyx[edges[:, 1]], axis=1)
  else:
    computed_source = "voxel" if res is None else "voxel*resolution"
    delta = (voxel_zyx[edges[:, 0]] - voxel_zyx[edges[:, 1]]).astype(np.float64)
    computed = np.linalg.norm(delta * (1.0 if res is None else res), axis=1)
  lengths = np.where(missing, computed, stored)
  if not missing.any():
    source = "edge_length"
  elif missing.all():
    source = computed_source
  else:
    source = "mixed"
  return Skeletons(ids, voxel_zyx, nm_zyx, edges, lengths, path=path, edge_length_source=source)


def _stack_positions(values: list, name: str, attr: str) -> np.ndarray:
  try:
    arr = np.asarray(values, dtype=np.float64)
  except (ValueError, TypeError) as e:
    raise SkeletonError(f"{name}: node attribute {attr!r} must be 3 numbers per node: {e}") from e
  if arr.ndim != 2 or arr.shape[1] != 3:
    raise SkeletonError(
      f"{name}: node attribute {attr!r} must be 3 numbers (x, y, z) per node, "
      f"found array of shape {arr.shape}"
    )
  return arr


def load_skeletons(
  path: str | os.PathLike,
  resolution: Sequence[float] | None = None,
  cache: bool = True,
  cache_dir: str | os.PathLike | None = None,
) -> Skeletons:
  """Reads skeleton GT into the flat :class:`Skeletons` form.

  For a NISB ``.pkl`` (networkx) see :func:`skeletons_from_graph` for how edge lengths are chosen.
  The parsed arrays are cached in ``cache_dir`` (:func:`cache_path`), keyed by the pickle's
  absolute path, mtime, size and ``resolution``, so a graph of a million nodes loads in well under
  a second the second time. Nothing is written beside the pickle; a cache folder that cannot be
  written only costs the cache.

  For an em_erl ``.npz`` (``nodes`` = (skeleton_index, z, y, x) in nm, ``edges_<k>`` = (u, v,
  length_nm)), ``resolution`` is required and voxel = round(nm / resolution); the stored lengths are
  used as is.

  Args:
    path: ``skeleton.pkl`` (NISB) or ``gt_graph.npz`` (em_erl).
    resolution: (z, y, x) voxel size in nm.
    cache: read / write the cache for pickles.
    cache_dir: the cache folder (default :func:`default_cache_dir`).

  Returns:
    The flat skeletons.

  Raises:
    SkeletonError: missing file, unknown layout, missing attributes or keys.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise SkeletonError(f"{path}: skeleton file not found")
  if path.endswith(CACHE_SUFFIX):
    raise SkeletonError(f"{path}: this is a cache file; pass the skeleton .pkl it belongs to")
  if path.endswith(".npz"):
    return _load_em_erl_npz(path, resolution)
  key = _cache_key(path, resolution)
  if cache:
    where = cache_path(path, resolution, cache_dir)
    cached = _read_cache(where, key, path)
    if cached is not None:
      return cached
  skeletons = skeletons_from_graph(_read_pickle(path), resolution=resolution, path=path)
  if cache:
    _write_cache(where, key, skeletons)
  return skeletons


def default_cache_dir() -> str:
  """The ERL cache folder: ``$JAXSEG_CACHE_DIR/erl``, else ``~/.cache/jaxseg/erl`` (``~/.cache``
  being ``$XDG_CACHE_HOME`` when set)."""
  root = os.environ.get(CACHE_ENV)
  if not root:
    home_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = os.path.join(home_cache, "jaxseg")
  return os.path.join(os.path.abspath(os.path.expanduser(root)), "erl")


def workdir_cache_dir(workdir: str | os.PathLike) -> str:
  """The ERL cache folder of a run's or a tuning's work dir: ``<workdir>/cache/erl``."""
  return os.path.join(os.path.abspath(os.fspath(workdir)), _WORKDIR_CACHE)


def workdir_skeleton_dir(workdir: str | os.PathLike) -> str:
  """Where a run or a tuning keeps skeletons it made from labels: ``<workdir>/cache/skeletons``."""
  return os.path.join(os.path.abspath(os.fspath(workdir)), "cache", "skeletons")


def cache_path(
  path: str | os.PathLike,
  resolution: Sequence[float] | None,
  cache_dir: str | os.PathLike | None = None,
) -> str:
  """The cache file of skeleton ``path`` read at ``resolution``, in ``cache_dir`` (default
  :func:`default_cache_dir`).

  Named ``<entry>-<state><CACHE_SUFFIX>``: ``entry`` hashes the real absolute path and the
  resolution, ``state`` the file's size and mtime (and the cache layout), so an edited or touched
  skeleton gets a new file and the old one is pruned by name.
  """
  real = os.path.realpath(os.fspath(path))
  st = os.stat(real)
  res = "none" if resolution is None else ",".join(repr(float(r)) for r in resolution)
  entry = _digest(f"{real}\0{res}")
  state = _digest(f"{_CACHE_VERSION}\0{st.st_size}\0{st.st_mtime_ns}")
  folder = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
  return os.path.join(os.path.abspath(folder), f"{entry}-{state}{CACHE_SUFFIX}")


def _digest(text: str) -> str:
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cache_key(path: str, resolution) -> np.ndarray:
  st = os.stat(path)
  res = [np.nan] * 3 if resolution is None else [float(r) for r in resolution]
  return np.asarray([_CACHE_VERSION, st.st_mtime_ns, st.st_size, *res], dtype=np.float64)


def _read_cache(cache_path: str, key: np.ndarray, path: str) -> Skeletons | None:
  if not os.path.isfile(cache_path):
    return None
  try:
    with np.load(cache_path, allow_pickle=False) as z:
      if not np.array_equal(z["key"], key, equal_nan=True):
        return None
      return Skeletons(
        z["skeleton_ids"],
        z["voxel_zyx"],
        z["nm_zyx"],
        z["edges"],
        z["edge_length_nm"],
        path=path,
        edge_length_source=str(z["edge_length_source"]),
      )
  except Exception:  # A stale or truncated cache is rebuilt, never fatal.
    return None


def _write_cache(cache_path: str, key: np.ndarray, skeletons: Skeletons) -> None:
  folder, name = os.path.split(cache_path)
  try:
    os.makedirs(folder, exist_ok=True)
    with atomic_output(cache_path) as tmp:
      np.savez(
        tmp,
        key=key,
        edge_length_source=np.asarray(skeletons.edge_length_source),
        **skeletons.to_npz_dict(),
      )
  except OSError:
    return  # An unwritable cache folder only costs the cache, never the load.
  # The same skeleton (and resolution) in an older state: stale for good.
  entry = name.split("-", 1)[0] + "-"
  for other in os.listdir(folder):
    if other.startswith(entry) and other.endswith(CACHE_SUFFIX) and other != name:
      with contextlib.suppress(OSError):  # another process pruned it first
        os.remove(os.path.join(folder, other))


def _load_em_erl_npz(path: str, resolution) -> Skeletons:
  if resolution is None:
    raise SkeletonError(
      f"{path}: an em_erl skeleton .npz stores nm positions; pass the "
      "segmentation resolution (z, y, x nm) to map them to voxels"
    )
  res = np.asarray(resolution, dtype=np.float64).reshape(3)
  try:
    z = np.load(path, allow_pickle=False)
  except Exception as e:
    raise SkeletonError(f"{path}: cannot read .npz: {e!r}") from e
  with z:
    for key in ("skeleton_id", "nodes"):
      if key not in z.files:
        raise SkeletonError(f"{path}: em_erl skeleton .npz lacks key {key!r} (found {z.files})")
    skeleton_id = z["skeleton_id"].astype(np.int64).reshape(-1)
    nodes = z["nodes"]
    if nodes.ndim != 2 or nodes.shape[1] != 4:
      raise SkeletonError(
        f"{path}: 'nodes' must be [N, 4] = (skeleton_index, z, y, x nm), found {nodes.shape}"
      )
    edge_keys = sorted(
      (k for k in z.files if re.fullmatch(r"edges_\d+", k)), key=lambda k: int(k.split("_")[1])
    )
    edge_arrays = [z[k].reshape(-1, 3) for k in edge_keys]
  index = nodes[:, 0].astype(np.int64)
  if index.size and (index.min() < 0 or index.max() >= skeleton_id.size):
    raise SkeletonError(
      f"{path}: nodes[:, 0] must index skeleton_id (size {skeleton_id.size}), "
      f"found range [{index.min()}, {index.max()}]"
    )
  nm_zyx = nodes[:, 1:].astype(np.float64)
  edges_all = np.concatenate(edge_arrays) if edge_arrays else np.zeros((0, 3))
  return Skeletons(
    skeleton_ids=skeleton_id[index],
    voxel_zyx=np.rint(nm_zyx / res).astype(np.int64),
    nm_zyx=nm_zyx,
    edges=edges_all[:, :2].astype(np.int64),
    edge_length_nm=edges_all[:, 2].astype(np.float64),
    path=path,
    edge_length_source="edge_length",
  )
