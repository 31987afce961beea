"""From grown tubes to a NISB-style ground truth: packing, extracellular gaps, ids and skeletons.

Owns the label post-processing of the generator and the skeleton graph. Arrays are canonical
``[z, y, x]``: ``seg`` uint32 (0 = extracellular space / background), node positions (z, y, x).

Steps after :func:`jaxseg.synthesis.neurites.grow_neurites`:

1. **Expand**: tubes grow into free space by up to ``expand_nm`` (a grassfire that advances one
   in-plane voxel per round and one z voxel whenever the covered distance passes another z
   spacing), so neighbours press against each other like neuropil. Wider free space stays
   extracellular (label 0).
2. **Touching vs. separated**: every pair of neighbouring neurites is *touching* with probability
   ``touch_probability`` (a stable hash of the pair). Touching neighbours share faces in ``seg``;
   the image draws a dark membrane at the contact. Between separated neighbours an extracellular
   gap (``gap_nm`` wide, at least one voxel, so never 6-adjacent) is carved out of the thicker
   of the two (carving the thinner would cut thin processes into pieces).
   Voxels under skeleton nodes are never carved; in the rare case that two nodes of separated
   neurites are 6-adjacent the later neurite's node is dropped from its skeleton.
3. **One id = one 6-connected component**: squeezing and carving can cut a neurite. Each
   6-connected component of a label that holds skeleton nodes becomes its own neuron (its
   skeleton is the part of the generating path inside it; edges crossing between pieces are
   removed); pieces without nodes become extracellular space (0). If a piece holds two separate
   stretches of the path, the longer is kept and the other's nodes are dropped, so no segment
   ever holds nodes of two skeletons.
4. **Relabel**: ids ``1..K`` in the order the neurons were generated.

The resulting ``skeleton.pkl`` graph has one connected component per neuron; node attributes
``id`` (= the seg id at the node), ``index_position`` (voxel x, y, z), ``nm_position`` (x, y, z nm
= index * resolution); edge attribute ``edge_length`` (nm, Euclidean between ``nm_position``).
Hence NERL of the ground truth against itself is exactly 1.
"""

from __future__ import annotations

import dataclasses
import math

import networkx as nx
import numba
import numpy as np
import scipy.sparse
import scipy.sparse.csgraph

from jaxseg.common.union_find import find_root, union
from jaxseg.synthesis.neurites import Neurites, grow_neurites


@numba.njit(cache=True)
def _expand(labels, z_rounds):
  """Grassfire growth of labels into 0 voxels; round r also grows along z if ``z_rounds[r]``."""
  nz, ny, nx_ = labels.shape
  for r in range(z_rounds.shape[0]):
    src = labels.copy()
    grow_z = z_rounds[r]
    for z in range(nz):
      for y in range(ny):
        for x in range(nx_):
          if src[z, y, x] != 0:
            continue
          lab = 0
          if y > 0 and src[z, y - 1, x] != 0:
            lab = src[z, y - 1, x]
          elif y + 1 < ny and src[z, y + 1, x] != 0:
            lab = src[z, y + 1, x]
          elif x > 0 and src[z, y, x - 1] != 0:
            lab = src[z, y, x - 1]
          elif x + 1 < nx_ and src[z, y, x + 1] != 0:
            lab = src[z, y, x + 1]
          elif grow_z and z > 0 and src[z - 1, y, x] != 0:
            lab = src[z - 1, y, x]
          elif grow_z and z + 1 < nz and src[z + 1, y, x] != 0:
            lab = src[z + 1, y, x]
          labels[z, y, x] = lab


@numba.njit(cache=True, inline="always")
def _pair_uniform(a, b, salt):
  """A stable uniform [0, 1) for the unordered label pair (a, b) (splitmix64 finaliser)."""
  lo = min(a, b)
  hi = max(a, b)
  h = np.uint64(lo) * np.uint64(0x9E3779B97F4A7C15) ^ np.uint64(hi) ^ np.uint64(salt)
  h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  h = h ^ (h >> np.uint64(31))
  return float(h >> np.uint64(11)) / 9007199254740992.0


@numba.njit(cache=True)
def _carve(labels, protected, offsets, touch_probability, salt, thickness):
  """Zeroes unprotected voxels that have a separated, thinner foreign label within ``offsets``.

  Only the thicker side of a contact (``thickness[label]``, ties: the larger label) gives up
  voxels: thin processes would otherwise be cut through.
  """
  nz, ny, nx_ = labels.shape
  mark = np.zeros(labels.shape, np.bool_)
  for z in range(nz):
    for y in range(ny):
      for x in range(nx_):
        lab = labels[z, y, x]
        if lab == 0 or protected[z, y, x]:
          continue
        for k in range(offsets.shape[0]):
          zz = z + offsets[k, 0]
          yy = y + offsets[k, 1]
          xx = x + offsets[k, 2]
          if zz < 0 or yy < 0 or xx < 0 or zz >= nz or yy >= ny or xx >= nx_:
            continue
          other = labels[zz, yy, xx]
          if other != 0 and other != lab:
            thicker = thickness[lab] > thickness[other] or (
              thickness[lab] == thickness[other] and lab > other
            )
            if thicker and _pair_uniform(lab, other, salt) >= touch_probability:
              mark[z, y, x] = True
              break
  count = 0
  for z in range(nz):
    for y in range(ny):
      for x in range(nx_):
        if mark[z, y, x]:
          labels[z, y, x] = 0
          count += 1
  return count


@numba.njit(cache=True)
def _separated_contacts(labels, touch_probability, salt):
  """Flat index pairs of 6-adjacent voxels whose (different) labels should be separated."""
  nz, ny, nx_ = labels.shape
  out = []
  for z in range(nz):
    for y in range(ny):
      for x in range(nx_):
        lab = labels[z, y, x]
        if lab == 0:
          continue
        for axis in range(3):
          zz, yy, xx = z, y, x
          if axis == 0:
            zz += 1
          elif axis == 1:
            yy += 1
          else:
            xx += 1
          if zz >= nz or yy >= ny or xx >= nx_:
            continue
          other = labels[zz, yy, xx]
          if other != 0 and other != lab and _pair_uniform(lab, other, salt) >= touch_probability:
            out.append(((z * ny + y) * nx_ + x, (zz * ny + yy) * nx_ + xx))
  return out


@numba.njit(cache=True)
def label_components(labels):
  """6-connected components of equal nonzero labels.

  Args:
    labels: [z, y, x] integer labels (0 = background).

  Returns:
    ``(components, n)``: int32 [z, y, x] component ids ``1..n`` numbered in scan order, 0 where
    ``labels`` is 0.
  """
  nz, ny, nx_ = labels.shape
  flat = labels.ravel()
  parent = np.arange(flat.shape[0], dtype=np.int64)
  for z in range(nz):
    for y in range(ny):
      for x in range(nx_):
        i = (z * ny + y) * nx_ + x
        lab = flat[i]
        if lab == 0:
          continue
        for j in (i - 1 if x > 0 else -1, i - nx_ if y > 0 else -1, i - nx_ * ny if z > 0 else -1):
          if j >= 0 and flat[j] == lab:
            union(parent, i, j)
  out = np.zeros(flat.shape[0], np.int32)
  n = 0
  for i in range(flat.shape[0]):
    if flat[i] == 0:
      continue
    root = find_root(parent, i)
    if root == i:
      n += 1
      out[i] = n
    else:
      out[i] = out[root]  # roots are the smallest index of their component: already numbered
  return out.reshape(labels.shape), n


@dataclasses.dataclass(frozen=True)
class GroundTruth:
  """Result of :func:`build_segmentation`.

  Attributes:
    seg: [z, y, x] uint32 neuron ids, 0 = extracellular space.
    graph: networkx skeleton graph (see the module docstring).
    num_grown: neurites grown before splitting / relabelling.
    carved_voxels: voxels turned into extracellular gaps.
    dropped_voxels: voxels of node-less pieces turned into extracellular space.
  """

  seg: np.ndarray
  graph: nx.Graph
  num_grown: int
  carved_voxels: int
  dropped_voxels: int


def _expand_rounds(resolution, expand_nm: float) -> np.ndarray:
  """Per round of in-plane growth, whether z grows too (keeps the front roughly round in nm)."""
  res_xy = min(resolution[1], resolution[2])
  rounds = round(expand_nm / res_xy)
  z_steps = [math.floor(r * res_xy / resolution[0] + 1e-9) for r in range(rounds + 1)]
  return np.array([z_steps[r + 1] > z_steps[r] for r in range(rounds)], dtype=np.bool_)


def _carve_offsets(resolution, gap_nm: float) -> np.ndarray:
  """Neighbourhood whose foreign labels trigger carving: 6-neighbours plus a gap_nm ellipsoid."""
  reach = [max(1, math.floor(gap_nm / r)) for r in resolution]
  offsets = []
  for dz in range(-reach[0], reach[0] + 1):
    for dy in range(-reach[1], reach[1] + 1):
      for dx in range(-reach[2], reach[2] + 1):
        if (dz, dy, dx) == (0, 0, 0):
          continue
        six = abs(dz) + abs(dy) + abs(dx) == 1
        dist = math.sqrt(
          (dz * resolution[0]) ** 2 + (dy * resolution[1]) ** 2 + (dx * resolution[2]) ** 2
        )
        if six or dist <= gap_nm + 1e-9:
          offsets.append((dz, dy, dx))
  return np.array(offsets, dtype=np.int64)


def _node_voxels(position_nm: np.ndarray, resolution) -> np.ndarray:
  # Same rounding as the numba walk (voxel i has its centre at i * resolution).
  return np.floor(position_nm / np.asarray(resolution) + 0.5).astype(np.int64)


def build_segmentation(params, rng: np.random.Generator) -> GroundTruth:
  """Grows, packs, separates and relabels neurites; builds the skeleton graph.

  Args:
    params: resolved :class:`jaxseg.synthesis.config.SynthParams`.
    rng: the cube's generator (consumed deterministically).

  Returns:
    The ground truth (see :class:`GroundTruth`).
  """
  grown: Neurites = grow_neurites(params, rng)
  labels = grown.labels
  resolution = tuple(params.resolution)
  _expand(labels, _expand_rounds(resolution, params.expand_nm))

  vox = _node_voxels(grown.position_nm, resolution)
  n_nodes = len(vox)
  flat_shape = labels.shape
  node_flat = np.ravel_multi_index(tuple(vox.T), flat_shape) if n_nodes else np.zeros(0, np.int64)
  dropped = np.zeros(n_nodes, bool)
  salt = int(rng.integers(0, 2**63 - 1))
  carved = 0
  if params.touch_probability < 1.0:
    protected = np.zeros(flat_shape, bool)
    protected.ravel()[node_flat] = True
    # Thickness rank of each neurite: its radius at the seed (the first node).
    thickness = np.zeros(grown.num_neurites + 1)
    roots = grown.parent < 0
    thickness[grown.neurite[roots]] = grown.radius_nm[roots]
    carved = _carve(
      labels,
      protected,
      _carve_offsets(resolution, params.gap_nm),
      params.touch_probability,
      salt,
      thickness,
    )
    # Two protected node voxels of separated neurites may still touch: drop the later node(s).
    contacts = _separated_contacts(labels, params.touch_probability, salt)
    if len(contacts):
      flat_labels = labels.ravel()
      for a, b in contacts:
        loser = a if flat_labels[a] > flat_labels[b] else b
        dropped |= node_flat == loser
        flat_labels[loser] = 0
        carved += 1

  graph, seg, dropped_voxels = _finalize(labels, grown, vox, node_flat, dropped, resolution)
  return GroundTruth(seg, graph, grown.num_neurites, int(carved), int(dropped_voxels))


def _finalize(labels, grown: Neurites, vox, node_flat, dropped, resolution):
  """Splits labels into 6-connected neurons, attaches skeleton pieces, relabels, builds graph."""
  n_nodes = len(vox)
  if n_nodes == 0:  # nothing fitted (a tiny cube): all extracellular space
    return nx.Graph(), np.zeros(labels.shape, np.uint32), int(np.count_nonzero(labels))
  parent = grown.parent
  # Skip dropped nodes and nodes on their parent's voxel: children attach to the nearest kept
  # ancestor. Parents always precede children, so one forward pass resolves chains.
  eff_parent = np.full(n_nodes, -1, np.int64)
  for i in range(n_nodes):
    p = parent[i]
    if p >= 0 and dropped[p]:
      p = eff_parent[p]
    eff_parent[i] = p
    if not dropped[i] and p >= 0 and node_flat[i] == node_flat[p]:
      dropped[i] = True
  keep = ~dropped

  components, n_comp = label_components(labels)
  comp_flat = components.ravel()
  node_comp = comp_flat[node_flat]
  # Nodes sit on their own neurite's voxels (never overwritten); a dropped node's voxel may be 0.
  assert np.all(labels.ravel()[node_flat[keep]] == grown.neurite[keep])

  child = np.nonzero(keep & (eff_parent >= 0))[0]
  par = eff_parent[child]
  same = node_comp[child] == node_comp[par]
  child, par = child[same], par[same]
  nm = vox.astype(np.float64) * np.asarray(resolution)
  length = np.sqrt(((nm[child] - nm[par]) ** 2).sum(axis=1))

  # Connected pieces of the skeleton forest (over kept nodes).
  adjacency = scipy.sparse.coo_matrix((np.ones(len(child)), (child, par)), shape=(n_nodes, n_nodes))
  _, piece = scipy.sparse.csgraph.connected_components(adjacency, directed=False)
  piece_len = np.bincount(piece[child], weights=length, minlength=piece.max() + 1)
  piece_nodes = np.bincount(piece[keep], minlength=piece.max() + 1)
  # Per seg component keep the piece with the longest path (then most nodes, then oldest).
  kept_nodes = np.nonzero(keep)[0]
  order = np.lexsort(
    (
      kept_nodes,
      -piece_nodes[piece[kept_nodes]],
      -piece_len[piece[kept_nodes]],
      node_comp[kept_nodes],
    )
  )
  ordered = kept_nodes[order]
  first = np.ones(len(ordered), bool)
  first[1:] = node_comp[ordered[1:]] != node_comp[ordered[:-1]]
  winner_piece = np.full(n_comp + 1, -1, np.int64)
  winner_piece[node_comp[ordered[first]]] = piece[ordered[first]]
  in_skeleton = keep & (winner_piece[node_comp] == piece)

  # New ids 1..K in generation order (the oldest node of each neuron).
  comps_with_nodes = np.nonzero(winner_piece >= 0)[0]
  oldest = np.full(n_comp + 1, np.iinfo(np.int64).max, np.int64)
  np.minimum.at(oldest, node_comp[in_skeleton], np.nonzero(in_skeleton)[0])
  comps_sorted = comps_with_nodes[np.argsort(oldest[comps_with_nodes], kind="stable")]
  lut = np.zeros(n_comp + 1, np.uint32)
  lut[comps_sorted] = np.arange(1, len(comps_sorted) + 1, dtype=np.uint32)
  seg = lut[components]
  dropped_voxels = int(np.count_nonzero((components > 0) & (seg == 0)))

  graph = nx.Graph()
  node_ids = np.nonzero(in_skeleton)[0]
  new_index = np.full(n_nodes, -1, np.int64)
  new_index[node_ids] = np.arange(len(node_ids))
  for old in node_ids:
    z, y, x = (int(v) for v in vox[old])
    graph.add_node(
      int(new_index[old]),
      id=int(lut[node_comp[old]]),
      index_position=(x, y, z),
      nm_position=(float(nm[old, 2]), float(nm[old, 1]), float(nm[old, 0])),
    )
  edge_ok = in_skeleton[child] & in_skeleton[par]
  for c, p, ell in zip(child[edge_ok], par[edge_ok], length[edge_ok], strict=True):
    graph.add_edge(int(new_index[c]), int(new_index[p]), edge_length=float(ell))
  return graph, seg, dropped_voxels
