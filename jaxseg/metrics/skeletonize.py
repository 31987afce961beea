"""Skeletons from dense labels: the NISB ``skeleton.pkl`` that NERL needs, made with kimimaro.

Owns :func:`skeletonize_labels` (a label volume -> a ``networkx.Graph``), :func:`write_skeleton`,
:func:`skeleton_summary` and :func:`cached_skeleton` (the same, made once per labels and settings
in jaxseg's cache folder), behind ``python -m jaxseg.skeletonize`` and
``python -m jaxseg.evaluate --skeletonize``. The method, its parameters, the blockwise stitching
and the cache are described in ``docs/metrics.md``, "Skeletons from labels".

Inputs: ``labels`` is a [z, y, x] integer volume (a lazy ``jaxseg.io.Volume``, a numpy array, or
a spec ``jaxseg.io.open_volume`` opens); labels <= 0 are background. ``mask`` is an optional
[z, y, x] volume of the same shape, non-zero (1) where the labels are valid. ``resolution`` is
(z, y, x) nm.

kimimaro (TEASAR) reads its array as (x, y, z) with ``anisotropy`` in that order, and returns
vertices in physical units in that order: jaxseg hands it the transposed block (``block.T``, which
for a C-ordered [z, y, x] block is the Fortran-ordered (x, y, z) array kimimaro wants, no copy)
and ``resolution[::-1]``, and maps each vertex back to its voxel by dividing by the anisotropy.

Output: the graph :func:`jaxseg.io.skeleton.load_skeleton_graph` reads. Nodes are ``0..N-1``,
sorted by (label, z, y, x); node attributes ``id`` (the label), ``index_position`` (the voxel
x, y, z, ints: always a voxel of the node's own label, so the labels scored against their own
skeleton have NERL 1) and ``nm_position`` (nm, x, y, z: the voxel centre moved along its path by
:func:`_smooth`, which removes the voxel staircase: under half a voxel on average, up to about
two voxels on tight bends); edge attribute
``edge_length`` (nm, the Euclidean distance of the endpoints' ``nm_position``).

Blockwise (``block_shape``): the cores tile the volume without overlap; kimimaro skeletonizes each
core together with a halo of context around it (:data:`HALO_NM`), and only the nodes inside the
core are kept, with the edges between them. The halo makes a block trace, near its core's faces,
the paths the whole volume would. Where a kept path leaves its core (an edge to a voxel ``v``
beyond the face), its node is joined to the nearest node of the same object near ``v``, normally
the neighbouring block's node at ``v`` or next to it (:func:`_joins`); joins are taken shortest
first and only between pieces not yet connected, so each connected object is one tree again, as
in a whole-volume run. Whole objects below ``dust`` are dropped before any block is
traced (voxels counted over the whole volume), so no block drops a small piece of a large object.

Never imports JAX; kimimaro is imported only when a skeleton is made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import itertools
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import fastremap
import networkx as nx
import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import scipy.spatial

from jaxseg.common.errors import ConfigError, OutputError, from_os_error
from jaxseg.common.outputs import input_identity
from jaxseg.common.progress import progress
from jaxseg.common.union_find import find_root, union
from jaxseg.io import Volume, VolumeError, open_volume
from jaxseg.io.skeleton import default_cache_dir, save_skeleton_graph

# Objects with fewer voxels get no skeleton: specks at the volume's faces and annotation noise.
# Low on purpose: a thin axon clipping a corner of the volume still has a few hundred voxels.
DEFAULT_DUST = 100
# TEASAR parameters (kimimaro's names; lengths in nm), pinned so that a kimimaro release cannot
# change the skeletons (or the cache key) silently. A branch is traced to a voxel only when it lies
# farther than scale * (its path's distance to the boundary) + const from the paths so far.
# kimimaro's defaults (1.5, 300) suit large neurons: the 300 nm floor, ten radii of a thin axon,
# drops short branches and parallel stretches of thin processes. With (2, 50) the skeletons of
# generated objects are 95 % of the length of their generating paths (where those are centrelines),
# against 89 % (docs/metrics.md, "Skeletons from labels"). The rest are kimimaro's defaults.
TEASAR_PARAMS: Mapping[str, float] = {
  "scale": 2.0,
  "const": 50.0,
  "pdrf_scale": 100000.0,
  "pdrf_exponent": 4,
  "soma_acceptance_threshold": 3500.0,
  "soma_detection_threshold": 750.0,
  "soma_invalidation_const": 300.0,
  "soma_invalidation_scale": 2.0,
}
# block_shape=None skeletonizes the whole volume at once up to this many voxels (kimimaro needs
# about 25 bytes a voxel: a copy of the labels, their components, the distance transform), else
# in blocks of _DEFAULT_BLOCK.
WHOLE_VOLUME_VOXELS = 1 << 27
_DEFAULT_BLOCK = (128, 512, 512)
# Context read around each block, in nm per axis: beyond the invalidation radius of a thick
# process (2 * 150 + 50 nm), so that near its core's faces a block traces the paths the whole
# volume would. Blockwise and whole-volume skeletons then differ about as much as the skeletons of
# a volume and its mirror image do (TEASAR's paths depend on where it starts).
HALO_NM = 400.0
# Pieces of an object in neighbouring blocks are joined where one block's path leaves its core,
# to the other block's nearest node of the label within this distance (nm). Usually that node is
# the very voxel the path went to, or one beside it; a stub that only one block traced (a short
# branch poking across the face) is joined to the other block's path a few voxels away.
JOIN_RADIUS_NM = 300.0
# Rounds of (1, 2, 1) / 4 smoothing along the paths (_smooth): about a Gaussian of sigma 2 nodes.
SMOOTHING_ROUNDS = 10
# Bump when the skeletons made from the same inputs change, so cached ones are remade.
_CACHE_VERSION = 1
CACHE_SUFFIX = ".skeleton.pkl"


# -- inputs ----------------------------------------------------------------------------------------


def _resolution(resolution: Sequence[float]) -> tuple[float, float, float]:
  try:
    values = tuple(float(r) for r in resolution)
  except (TypeError, ValueError):
    values = ()
  if len(values) != 3 or not all(np.isfinite(values)) or min(values) <= 0:
    raise ConfigError(
      f"resolution must be three positive numbers (z, y, x nm), got {tuple(resolution)!r}"
    )
  return values  # type: ignore[return-value]


def _dust(dust) -> int:
  try:
    ok = int(dust) == dust >= 0
  except (TypeError, ValueError, OverflowError):
    ok = False
  if not ok:
    raise ConfigError(f"dust must be a whole number of voxels >= 0, got {dust!r}")
  return int(dust)


def _volume(spec, what: str):
  """A numpy array or Volume for ``spec`` and its name for messages."""
  if isinstance(spec, np.ndarray):
    return spec, f"<{what} array>"
  if isinstance(spec, Volume):
    return spec, spec.path
  vol = open_volume(spec)
  return vol, vol.path


def _check_3d(vol, name: str, *, labels: bool) -> None:
  if len(vol.shape) != 3:
    raise VolumeError(f"{name}: expected a 3-D (z, y, x) volume, found shape {tuple(vol.shape)}")
  dtype = np.dtype(vol.dtype)
  if not (np.issubdtype(dtype, np.integer) or dtype == np.bool_):
    what = "integer labels" if labels else "an integer or boolean mask"
    raise VolumeError(f"{name}: expected {what}, found dtype {dtype}")


def _read(vol, box: tuple[slice, ...]) -> np.ndarray:
  # The block is zeroed in place: a copy of the caller's array (a Volume reads a fresh one).
  return np.array(vol[box]) if isinstance(vol, np.ndarray) else vol[box]


def _clean(block: np.ndarray, mask_block: np.ndarray | None) -> np.ndarray:
  """Background (labels <= 0, voxels outside the mask) as 0, in place; bool as uint8."""
  if block.dtype == np.bool_:
    block = block.view(np.uint8)
  if np.issubdtype(block.dtype, np.signedinteger):
    block[block < 0] = 0  # NISB's -1 "unlabeled" is background too
  if mask_block is not None:
    block[mask_block == 0] = 0
  return block


# -- blocks ----------------------------------------------------------------------------------------


def default_halo(resolution: Sequence[float]) -> tuple[int, int, int]:
  """The context around each block of a blockwise run: :data:`HALO_NM` in voxels per axis."""
  return tuple(math.ceil(HALO_NM / float(r)) for r in resolution)  # type: ignore[return-value]


def block_grid(
  shape: Sequence[int], block_shape: Sequence[int], halo: Sequence[int]
) -> list[tuple[tuple[slice, ...], tuple[slice, ...]]]:
  """The blocks of a blockwise run: ``(core, region)`` pairs of (z, y, x) slices, z slowest.

  The cores tile the volume without overlap (``block_shape`` apart, the last ones shorter); each
  region is its core grown by ``halo`` voxels per axis, clipped to the volume.
  """
  starts = [range(0, int(n), int(b)) for n, b in zip(shape, block_shape, strict=True)]
  blocks = []
  for corner in itertools.product(*starts):
    core = tuple(
      slice(s, min(s + int(b), int(n))) for s, b, n in zip(corner, block_shape, shape, strict=True)
    )
    region = tuple(
      slice(max(c.start - int(h), 0), min(c.stop + int(h), int(n)))
      for c, h, n in zip(core, halo, shape, strict=True)
    )
    blocks.append((core, region))
  return blocks


def _triple(value, name: str, minimum: int) -> tuple[int, int, int]:
  try:
    values = tuple(int(v) for v in value)
    ok = len(values) == 3 and all(int(v) == v for v in value) and min(values) >= minimum
  except (TypeError, ValueError, OverflowError):
    ok = False
  if not ok:
    raise ConfigError(
      f"{name} must be three whole numbers >= {minimum} (z, y, x voxels), got {value!r}"
    )
  return values  # type: ignore[return-value]


def _choose_blocks(shape, block_shape, halo, res_zyx):
  whole = tuple(slice(0, int(n)) for n in shape)
  if block_shape is None:
    if int(np.prod(shape, dtype=np.int64)) <= WHOLE_VOLUME_VOXELS:
      return [(whole, whole)]
    block_shape = _DEFAULT_BLOCK
  block = _triple(block_shape, "block_shape", 1)
  halo = default_halo(res_zyx) if halo is None else _triple(halo, "halo", 0)
  return block_grid(shape, block, halo)


def _small_labels(blocks, dust: int) -> np.ndarray:
  """The label ids with fewer than ``dust`` voxels in ``blocks`` (cleaned label arrays that tile
  the volume, so every voxel is counted once)."""
  ids, counts = [], []
  for block in blocks:
    u, c = fastremap.unique(block, return_counts=True)
    ids.append(np.asarray(u, np.int64))
    counts.append(np.asarray(c, np.float64))
  unique, inverse = np.unique(np.concatenate(ids), return_inverse=True)
  totals = np.bincount(inverse.reshape(-1), weights=np.concatenate(counts))
  return unique[(totals < dust) & (unique != 0)]


# -- skeletons -------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Pieces:
  """What the blocks found: nodes (label, voxel z, y, x), edges between them (rows), and the
  crossings: an edge from a node in its block's core to a voxel outside it."""

  ids: list = dataclasses.field(default_factory=list)
  voxels: list = dataclasses.field(default_factory=list)
  edges: list = dataclasses.field(default_factory=list)
  cross_rows: list = dataclasses.field(default_factory=list)
  cross_voxels: list = dataclasses.field(default_factory=list)
  n_rows: int = 0

  def add(self, label: int, vox_zyx: np.ndarray, edges: np.ndarray, core) -> None:
    lo = np.asarray([c.start for c in core], np.int64)
    hi = np.asarray([c.stop for c in core], np.int64)
    inside = np.all((vox_zyx >= lo) & (vox_zyx < hi), axis=1)
    row = np.full(len(vox_zyx), -1, np.int64)
    row[inside] = self.n_rows + np.arange(int(inside.sum()))
    self.ids.append(np.full(int(inside.sum()), label, np.int64))
    self.voxels.append(vox_zyx[inside])
    a, b = inside[edges[:, 0]], inside[edges[:, 1]]
    self.edges.append(row[edges[a & b]])
    # A crossing edge keeps its inner end; its outer end is a voxel of the next block's skeleton
    # (or near it), where the two pieces are joined.
    out = edges[a ^ b]
    inner = np.where(inside[out[:, 0]], out[:, 0], out[:, 1])
    outer = np.where(inside[out[:, 0]], out[:, 1], out[:, 0])
    self.cross_rows.append(row[inner])
    self.cross_voxels.append(vox_zyx[outer])
    self.n_rows += int(inside.sum())


def skeletonize_labels(
  labels,
  resolution: Sequence[float],
  *,
  dust: int = DEFAULT_DUST,
  mask=None,
  block_shape: Sequence[int] | None = None,
  halo: Sequence[int] | None = None,
  show_progress: bool = False,
) -> nx.Graph:
  """Skeletonizes every object of a label volume with kimimaro (TEASAR) into a NISB graph.

  Args:
    labels: [z, y, x] integer labels: ``jaxseg.io.Volume``, numpy array or ``open_volume`` spec;
      labels <= 0 are background. Never modified.
    resolution: (z, y, x) voxel size in nm.
    dust: objects (label ids) with fewer voxels than this, counted over the whole volume after
      masking, get no skeleton.
    mask: optional [z, y, x] volume of ``labels``' shape (same forms); labels where it is 0 are
      treated as background.
    block_shape: (z, y, x) voxels per block for a blockwise run (see the module docstring). None:
      the whole volume at once when it has at most :data:`WHOLE_VOLUME_VOXELS` voxels, else
      blocks of (128, 512, 512).
    halo: (z, y, x) voxels of context read around each block (default :func:`default_halo`,
      :data:`HALO_NM` per axis). Unused for a whole-volume run.
    show_progress: a progress bar over the blocks (over the objects of a whole-volume run on a
      terminal).

  Returns:
    The skeleton graph (module docstring: nodes, attributes; one component per connected object).

  Raises:
    ConfigError: a bad resolution, dust, block shape or halo.
    VolumeError: labels or mask not 3-D integer volumes, or of different shapes (names both).
  """
  res_zyx = _resolution(resolution)
  dust = _dust(dust)
  labels, labels_name = _volume(labels, "labels")
  _check_3d(labels, labels_name, labels=True)
  shape = tuple(int(n) for n in labels.shape)
  if mask is not None:
    mask, mask_name = _volume(mask, "mask")
    _check_3d(mask, mask_name, labels=False)
    if tuple(mask.shape) != shape:
      raise VolumeError(
        f"mask {mask_name} has shape (z, y, x) {tuple(mask.shape)} but labels {labels_name} have "
        f"{shape}; the mask must cover the labels voxel for voxel"
      )
  blocks = _choose_blocks(shape, block_shape, halo, res_zyx)
  blockwise = len(blocks) > 1

  def read(box):
    return _clean(_read(labels, box), None if mask is None else np.asarray(mask[box]))

  # Dust is a property of whole objects: counted over all cores before any block is traced (a
  # whole-volume run counts the one block it reads).
  small = np.zeros(0, np.int64)
  if dust > 1 and blockwise:
    small = _small_labels((read(core) for core, _ in blocks), dust)

  import kimimaro  # ~1 s to import: only when a skeleton is made, not by every evaluate run

  res_xyz = np.asarray(res_zyx[::-1], dtype=np.float64)
  pieces = _Pieces()
  for core, region in progress(
    blocks, desc="skeletonize", unit="block", disable=not (show_progress and blockwise)
  ):
    block = read(region)
    if dust > 1 and not blockwise:
      small = _small_labels([block], dust)
    if small.size:
      block = fastremap.mask(block, small.astype(block.dtype), in_place=True)
    if not block.any():
      continue
    skeletons = kimimaro.skeletonize(
      block.T,  # (x, y, z), Fortran-ordered: kimimaro's layout, no copy
      teasar_params=dict(TEASAR_PARAMS),
      anisotropy=tuple(res_xyz),
      dust_threshold=0,  # dust was applied to whole objects above
      progress=show_progress and not blockwise and sys.stderr.isatty(),
      fix_branching=True,
      # An object cut by a face of the region ends at the centre of its cross-section there,
      # not in a corner of it: no spurs along the volume's faces.
      fix_borders=True,
      in_place=True,
      parallel=1,
    )
    origin = np.asarray([r.start for r in region], np.int64)
    for label, skeleton in skeletons.items():
      if len(skeleton.vertices) == 0:
        continue
      vox_xyz = np.rint(np.asarray(skeleton.vertices, np.float64) / res_xyz).astype(np.int64)
      edges = np.asarray(skeleton.edges, np.int64).reshape(-1, 2)
      pieces.add(int(label), vox_xyz[:, ::-1] + origin, edges, core)
  return _graph(pieces, np.asarray(res_zyx, np.float64))


def _graph(pieces: _Pieces, res_zyx: np.ndarray) -> nx.Graph:
  """The NISB graph of the blocks' pieces: joined across block faces, smoothed, lengths in nm."""
  graph = nx.Graph()
  if not pieces.n_rows:
    return graph
  ids = np.concatenate(pieces.ids)
  voxels = np.concatenate(pieces.voxels)
  # Sorted by (label, z, y, x). Cores do not overlap, so no voxel comes from two blocks.
  order = np.lexsort((voxels[:, 2], voxels[:, 1], voxels[:, 0], ids))
  rank = np.empty_like(order)
  rank[order] = np.arange(order.size)
  ids, voxels = ids[order], voxels[order]
  edges = rank[np.concatenate(pieces.edges).reshape(-1, 2)]
  joins = _joins(
    ids,
    voxels,
    edges,
    rank[np.concatenate(pieces.cross_rows)],
    np.concatenate(pieces.cross_voxels).reshape(-1, 3),
    res_zyx,
  )
  edges = np.sort(np.concatenate([edges, joins]), axis=1)
  edges = np.unique(edges[edges[:, 0] != edges[:, 1]], axis=0)
  nm_zyx = _smooth(voxels * res_zyx, edges, SMOOTHING_ROUNDS)
  lengths = np.linalg.norm(nm_zyx[edges[:, 0]] - nm_zyx[edges[:, 1]], axis=1)
  graph.add_nodes_from(
    (
      i,
      {
        "id": int(label),
        "index_position": (int(x), int(y), int(z)),
        "nm_position": (float(c), float(b), float(a)),
      },
    )
    for i, (label, (z, y, x), (a, b, c)) in enumerate(zip(ids, voxels, nm_zyx, strict=True))
  )
  graph.add_edges_from(
    (int(u), int(v), {"edge_length": float(w)}) for (u, v), w in zip(edges, lengths, strict=True)
  )
  return graph


def _joins(ids, voxels, edges, cross_rows, cross_voxels, res_zyx) -> np.ndarray:
  """Edges that join the pieces of an object across block faces: [J, 2] node rows.

  Each crossing edge (a node ``u`` in its block's core, a voxel ``v`` beyond it) proposes joins
  from ``u`` to the other pieces of its label within :data:`JOIN_RADIUS_NM` of ``v``, to the
  nearest node of each. Proposals are taken shortest first, and only while they connect two
  separate pieces (Kruskal), so a crossing seen from both blocks is joined once and no cycle is
  made. The usual partner is the neighbour block's node at ``v`` or beside it; when the neighbour
  traced no path there (it skirted a bump of the object in its halo, or a stub was traced by one
  block only) the piece is joined to the nearest other piece of the object, in either block.
  """
  if not len(cross_rows):
    return np.zeros((0, 2), np.int64)
  n = len(ids)
  adjacency = scipy.sparse.coo_matrix(
    (np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n)
  )
  _, piece = scipy.sparse.csgraph.connected_components(adjacency, directed=False)
  nm = voxels * res_zyx
  tree = scipy.spatial.cKDTree(nm)
  radius = max(JOIN_RADIUS_NM, 2.0 * float(res_zyx.max()))
  target = cross_voxels * res_zyx
  proposals = []
  for u, near in zip(cross_rows, tree.query_ball_point(target, radius), strict=True):
    near = np.asarray(near, np.int64)
    near = near[(ids[near] == ids[u]) & (piece[near] != piece[u])]
    if not near.size:
      continue
    dist = np.linalg.norm(nm[near] - nm[u], axis=1)
    order = np.lexsort((dist, piece[near]))
    first = np.ones(order.size, bool)
    first[1:] = piece[near[order[1:]]] != piece[near[order[:-1]]]
    for k in order[first]:  # the nearest node of each other piece
      proposals.append((float(dist[k]), int(u), int(near[k])))
  parent = np.arange(int(piece.max()) + 1, dtype=np.int64)
  joins = []
  for _, u, w in sorted(proposals):
    a, b = find_root(parent, piece[u]), find_root(parent, piece[w])
    if a != b:
      union(parent, a, b)
      joins.append((u, w))
  return np.asarray(joins, np.int64).reshape(-1, 2)


def _smooth(points: np.ndarray, edges: np.ndarray, rounds: int) -> np.ndarray:
  """``points`` [N, 3] moved along the skeleton's paths to remove the voxel staircase.

  Every node with exactly two neighbours moves to ``(prev + 2 * self + next) / 4``, ``rounds``
  times; ends and branch points stay put. A path through voxel centres at an angle to the axes
  zig-zags (worst with anisotropic voxels: a 20 nm z step beside 9 nm y steps), which makes it up
  to ~20 % longer than the line it follows; the smoothed path has the line's length.
  """
  n = len(points)
  degree = np.bincount(edges.reshape(-1), minlength=n)
  inner = np.nonzero(degree == 2)[0]
  out = points.astype(np.float64, copy=True)
  if rounds <= 0 or inner.size == 0:
    return out
  ends = np.concatenate([edges[:, 0], edges[:, 1]])
  others = np.concatenate([edges[:, 1], edges[:, 0]])[np.argsort(ends, kind="stable")]
  first = np.concatenate([[0], np.cumsum(degree)])[inner]
  prev, nxt = others[first], others[first + 1]
  for _ in range(rounds):
    out[inner] = 0.5 * out[inner] + 0.25 * (out[prev] + out[nxt])
  return out


def skeleton_summary(graph: nx.Graph) -> dict[str, Any]:
  """``objects`` (distinct ids), ``nodes``, ``edges`` and ``length_um`` of a skeleton graph."""
  return {
    "objects": len({i for _, i in graph.nodes(data="id")}),
    "nodes": graph.number_of_nodes(),
    "edges": graph.number_of_edges(),
    "length_um": float(sum(w or 0.0 for *_, w in graph.edges(data="edge_length")) / 1000.0),
  }


def format_summary(summary: Mapping[str, Any]) -> str:
  """The summary as one line: ``12 objects, 3,456 nodes, 78.9 µm of skeleton``."""
  return (
    f"{summary['objects']:,} objects, {summary['nodes']:,} nodes, "
    f"{summary['length_um']:,.1f} µm of skeleton"
  )


def write_skeleton(graph: nx.Graph, path: str | os.PathLike) -> None:
  """Pickles ``graph`` to ``path`` atomically (a reader never sees half a file).

  The one NISB writer, :func:`jaxseg.io.skeleton.save_skeleton_graph`; the folder must exist.
  """
  save_skeleton_graph(graph, path)


# -- the cache -------------------------------------------------------------------------------------


def default_skeleton_cache_dir() -> str:
  """Where :func:`cached_skeleton` keeps skeletons by default: the ``skeletons`` folder beside the
  ERL cache (``$JAXSEG_CACHE_DIR/skeletons``, else ``~/.cache/jaxseg/skeletons``)."""
  return os.path.join(os.path.dirname(default_cache_dir()), "skeletons")


def _digest(value: Any) -> str:
  text = json.dumps(value, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _identity(vol, name: str) -> dict[str, Any]:
  """What names a volume's contents: its file's identity (no data read), or an array's hash."""
  if isinstance(vol, np.ndarray):
    digest = hashlib.sha256(np.ascontiguousarray(vol).tobytes()).hexdigest()[:20]
    return {"path": name, "content": digest, "shape": list(vol.shape), "dtype": str(vol.dtype)}
  ident = input_identity(vol.path)
  # The same file read in another axis order is other labels.
  ident.update(axis_order=vol.axis_order, shape=list(vol.shape), dtype=str(vol.dtype))
  return ident


def _method() -> dict[str, Any]:
  """Everything besides the inputs that shapes a skeleton: a change remakes cached ones."""
  return {
    "cache_version": _CACHE_VERSION,
    "kimimaro": importlib.metadata.version("kimimaro"),
    "teasar": dict(TEASAR_PARAMS),
    "halo_nm": HALO_NM,
    "join_radius_nm": JOIN_RADIUS_NM,
    "smoothing_rounds": SMOOTHING_ROUNDS,
    "whole_volume_voxels": WHOLE_VOLUME_VOXELS,
    "default_block": list(_DEFAULT_BLOCK),
  }


def cached_skeleton(
  labels,
  resolution: Sequence[float],
  cache_dir: str | os.PathLike | None = None,
  *,
  dust: int = DEFAULT_DUST,
  mask=None,
) -> str:
  """The path of a ``skeleton.pkl`` made from ``labels``, made once and kept in a cache folder.

  The file is named ``<entry>-<state>.skeleton.pkl``: ``entry`` hashes the labels' path, axis
  order and shape, the mask's path, the resolution and ``dust``; ``state`` the contents'
  identities (:func:`jaxseg.common.outputs.input_identity`: size and mtime of a file, every
  file of a zarr folder; no data is read) and the method (:func:`_method`). An
  identical request reuses the file; labels or a mask changed in place make a new one, and the
  older states of the same entry are deleted. Inputs whose contents cannot be told (remote
  volumes) are remade every time. Nothing is written beside the user's data.

  Args:
    labels: [z, y, x] labels: an ``open_volume`` spec, a ``jaxseg.io.Volume`` (its axis order
      counts) or a numpy array (hashed).
    resolution: (z, y, x) nm.
    cache_dir: the cache folder (default :func:`default_skeleton_cache_dir`; the run chain passes
      its work dir's).
    dust: as :func:`skeletonize_labels`.
    mask: optional mask, as :func:`skeletonize_labels`.

  Returns:
    The absolute path of the cached skeleton pickle.

  Raises:
    OutputError: the cache folder cannot be written (names it).
    ConfigError, VolumeError: as :func:`skeletonize_labels`.
  """
  res = _resolution(resolution)
  dust = _dust(dust)
  vol, name = _volume(labels, "labels")
  mask_vol, mask_name = (None, None) if mask is None else _volume(mask, "mask")
  ident = _identity(vol, name)
  mask_ident = None if mask_vol is None else _identity(mask_vol, mask_name)
  where = {
    "labels": {k: v for k, v in ident.items() if k != "content"},
    "mask": None if mask_ident is None else mask_ident["path"],
    "resolution": list(res),
    "dust": dust,
  }
  state = {
    "method": _method(),
    "labels": ident["content"],
    "mask": None if mask_ident is None else mask_ident["content"],
  }
  folder = os.path.abspath(
    os.fspath(cache_dir) if cache_dir is not None else default_skeleton_cache_dir()
  )
  entry = _digest(where)
  path = os.path.join(folder, f"{entry}-{_digest(state)}{CACHE_SUFFIX}")
  known = ident["content"] is not None and (mask_ident is None or mask_ident["content"] is not None)
  if known and os.path.isfile(path):
    return path
  graph = skeletonize_labels(vol, res, dust=dust, mask=mask_vol)
  try:
    os.makedirs(folder, exist_ok=True)
    write_skeleton(graph, path)
  except OSError as e:
    error = from_os_error(e, folder)
    raise OutputError(
      f"{error or f'{folder}: cannot write the skeleton cache ({e.strerror or e})'}; set "
      "$JAXSEG_CACHE_DIR to a writable folder"
    ) from e
  for other in os.listdir(folder):  # the same request in older states: stale for good
    if (
      other.startswith(f"{entry}-")
      and other.endswith(CACHE_SUFFIX)
      and other != os.path.basename(path)
    ):
      with contextlib.suppress(OSError):  # another process pruned it first
        os.remove(os.path.join(folder, other))
  return path
