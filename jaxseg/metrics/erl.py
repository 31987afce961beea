"""Expected run length (ERL / NERL) and skeleton-node VOI on flat skeleton arrays.

Owns :func:`expected_run_length` (skeletons + a [z, y, x] segmentation, numpy or lazy
``jaxseg.io`` Volume), :func:`erl_from_node_labels` ([N] predicted label per node),
:func:`lookup_node_labels` and :func:`segments_in_mask`. Skeletons are
:class:`jaxseg.io.skeleton.Skeletons` ([N] ids, [N, 3] voxels, [E, 2] edges, [E] lengths in nm).
Everything is vectorised numpy over nodes and edges; there is no networkx here.

Definition (funlib ``expected_run_length`` as used by BANIS / NISB, with PyTC's merge threshold):

1. A node's label is the segmentation value at its voxel (exact lookup).
2. A (skeleton, segment) pair is *kept* if at least ``merge_threshold`` nodes of the skeleton carry
   the segment (1 = funlib / BANIS, every contact counts). A segment is *merging* if kept pairs of
   >= 2 different skeletons use it, or if it is listed in ``no_merge_segments`` (em_erl's
   "no-merge" regions, e.g. from :func:`segments_in_mask`).
3. An edge belongs to the skeleton of its first node and is **omitted** if an endpoint has label 0,
   **split** if the endpoint labels differ, **merged** if they share a merging segment and the
   (skeleton, segment) pair is kept, **correct** otherwise. (A skeleton whose contact with a
   merging segment is below the threshold keeps its edges there: the contact is tolerated.)
4. c_{s,k} = total length of correct edges of skeleton s in segment k (summed per segment id, not
   per contiguous run); L_s = total edge length of s; L = Σ L_s.
   ``ERL = Σ_s Σ_k c_{s,k}² / L``, ``max ERL = Σ_s L_s² / L`` (ERL of GT as prediction),
   ``NERL = ERL / max ERL``.

Merge counts: ``n_mergers`` = Σ over merging segments of the number of skeletons with a kept pair
on it, counting segment 0 like any other id when >= 2 skeletons have background nodes (the
funlib / BANIS count); ``n_non0_mergers`` leaves segment 0 out; ``n_merging_segments`` is the
number of merging non-zero segments. Node VOI (``voi_split``, ``voi_merge``, log2) compares the
GT skeleton id with the predicted label per node; skeleton ids <= 0 are ignored, predicted 0 is
an ordinary label (funlib ``rand_voi`` on nodes).

This module never imports JAX.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxseg.metrics.contingency import contingency_table
from jaxseg.metrics.voi import voi_from_table

if TYPE_CHECKING:
  # Only a type here: importing jaxseg.io would pull in tensorstore for every metrics user.
  from jaxseg.io.skeleton import Skeletons

# Box edge used to group node look-ups in lazy volumes when the volume does not say its chunks.
_DEFAULT_LOOKUP_BLOCK = (64, 256, 256)


@dataclasses.dataclass(frozen=True)
class ErlResult:
  """ERL metrics of one segmentation against skeleton GT (lengths in nm).

  Attributes:
    erl_nm: expected run length.
    max_erl_nm: ERL of a perfect segmentation (GT as prediction).
    nerl: erl_nm / max_erl_nm (NaN when the skeletons have no length).
    n_mergers: Σ over merging segments (segment 0 included) of the skeletons each touches.
    n_non0_mergers: the same without segment 0.
    n_merging_segments: number of merging non-zero segments.
    n_skeletons, n_nodes, n_edges: sizes of the skeleton GT.
    n_correct_edges, n_omitted_edges, n_split_edges, n_merged_edges: edge classes.
    voi_split, voi_merge: node-level VOI in bits.
    merge_threshold: the threshold used.
    skeleton_ids: [S] skeleton ids (sorted).
    skeleton_length_nm: [S] L_s.
    skeleton_erl_nm: [S] Σ_k c_{s,k}² / L_s (per-skeleton run length).
  """

  erl_nm: float
  max_erl_nm: float
  nerl: float
  n_mergers: int
  n_non0_mergers: int
  n_merging_segments: int
  n_skeletons: int
  n_nodes: int
  n_edges: int
  n_correct_edges: int
  n_omitted_edges: int
  n_split_edges: int
  n_merged_edges: int
  voi_split: float
  voi_merge: float
  merge_threshold: int
  skeleton_ids: np.ndarray = dataclasses.field(repr=False)
  skeleton_length_nm: np.ndarray = dataclasses.field(repr=False)
  skeleton_erl_nm: np.ndarray = dataclasses.field(repr=False)

  def to_dict(self) -> dict[str, Any]:
    """The scalar fields as a JSON-ready dict (per-skeleton arrays left out)."""
    return {
      f.name: getattr(self, f.name)
      for f in dataclasses.fields(self)
      if not isinstance(getattr(self, f.name), np.ndarray)
    }


def _labels_1d(labels: np.ndarray) -> np.ndarray:
  labels = np.asarray(labels).reshape(-1)
  if labels.dtype == np.bool_:
    return labels.astype(np.int64)
  if not np.issubdtype(labels.dtype, np.integer):
    raise TypeError(f"segment labels must be integers, got dtype {labels.dtype}")
  return labels.astype(np.uint64 if np.issubdtype(labels.dtype, np.unsignedinteger) else np.int64)


def erl_from_node_labels(
  skeletons: Skeletons,
  node_labels: np.ndarray,
  merge_threshold: int = 1,
  no_merge_segments: Sequence[int] | np.ndarray | None = None,
) -> ErlResult:
  """ERL / NERL and node VOI from the predicted label of every node.

  Args:
    skeletons: the GT skeletons (N nodes, E edges).
    node_labels: [N] predicted segment per node (any integer dtype; 0 = background).
    merge_threshold: minimum nodes of a skeleton in a segment for the contact to count as a merge.
    no_merge_segments: segment ids that are merging regardless of skeletons (em_erl no-merge
      mask); their edges are never correct.

  Returns:
    The metrics (module docstring has the definitions).
  """
  if merge_threshold < 1:
    raise ValueError(f"merge_threshold must be >= 1, got {merge_threshold}")
  labels = _labels_1d(node_labels)
  if labels.shape[0] != skeletons.num_nodes:
    raise ValueError(f"{labels.shape[0]} node labels for {skeletons.num_nodes} skeleton nodes")

  skel_unique, skel_index = np.unique(skeletons.skeleton_ids, return_inverse=True)
  seg_unique, seg_index = np.unique(labels, return_inverse=True)
  n_skel, n_seg = skel_unique.size, max(seg_unique.size, 1)
  zero_pos = int(np.searchsorted(seg_unique, 0))
  has_zero = zero_pos < seg_unique.size and seg_unique[zero_pos] == 0

  # (skeleton, segment) node counts; keys are sorted, so later look-ups use searchsorted.
  pair_keys, pair_counts = np.unique(skel_index * n_seg + seg_index, return_counts=True)
  pair_seg = pair_keys % n_seg
  kept = pair_counts >= merge_threshold
  skeletons_per_seg = np.bincount(pair_seg[kept], minlength=n_seg)
  merging = skeletons_per_seg >= 2
  n_mergers = int(skeletons_per_seg[merging].sum())
  non0 = np.ones(n_seg, bool)
  if has_zero:
    non0[zero_pos] = False
  n_non0_mergers = int(skeletons_per_seg[merging & non0].sum())
  n_merging_segments = int(np.count_nonzero(merging & non0))
  pair_merged = kept & merging[pair_seg]
  if no_merge_segments is not None and len(no_merge_segments):
    forbidden = np.isin(seg_unique, np.asarray(no_merge_segments, dtype=seg_unique.dtype))
    if has_zero:
      forbidden[zero_pos] = False
    pair_merged |= forbidden[pair_seg]

  u, v = skeletons.edges[:, 0], skeletons.edges[:, 1]
  lengths = skeletons.edge_length_nm
  edge_skel = skel_index[u]
  lu, lv = seg_index[u], seg_index[v]
  omitted = (labels[u] == 0) | (labels[v] == 0)
  split = ~omitted & (lu != lv)
  same = ~omitted & (lu == lv)
  edge_pair = edge_skel * n_seg + lu
  # Every same-label edge's pair exists (its first node has it), so searchsorted finds it.
  merged = same & pair_merged[np.searchsorted(pair_keys, edge_pair)]
  correct = same & ~merged

  skel_len = np.bincount(edge_skel, weights=lengths, minlength=n_skel)
  total = float(skel_len.sum())
  run_keys, run_index = np.unique(edge_pair[correct], return_inverse=True)
  run_len = np.bincount(run_index, weights=lengths[correct], minlength=run_keys.size)
  per_skel_sq = np.bincount(run_keys // n_seg, weights=run_len**2, minlength=n_skel)
  erl = float(per_skel_sq.sum() / total) if total > 0 else math.nan
  max_erl = float(np.sum(skel_len**2) / total) if total > 0 else math.nan
  nerl = erl / max_erl if total > 0 and max_erl > 0 else math.nan
  with np.errstate(invalid="ignore", divide="ignore"):
    skel_erl = np.where(skel_len > 0, per_skel_sq / np.where(skel_len > 0, skel_len, 1), 0.0)

  node_voi = voi_from_table(contingency_table(skeletons.skeleton_ids, labels))
  return ErlResult(
    erl_nm=erl,
    max_erl_nm=max_erl,
    nerl=nerl,
    n_mergers=n_mergers,
    n_non0_mergers=n_non0_mergers,
    n_merging_segments=n_merging_segments,
    n_skeletons=int(n_skel),
    n_nodes=skeletons.num_nodes,
    n_edges=skeletons.num_edges,
    n_correct_edges=int(correct.sum()),
    n_omitted_edges=int(omitted.sum()),
    n_split_edges=int(split.sum()),
    n_merged_edges=int(merged.sum()),
    voi_split=node_voi.split,
    voi_merge=node_voi.merge,
    merge_threshold=int(merge_threshold),
    skeleton_ids=skel_unique,
    skeleton_length_nm=skel_len,
    skeleton_erl_nm=skel_erl,
  )


def lookup_node_labels(
  seg, voxel_zyx: np.ndarray, block_shape: Sequence[int] | None = None, num_threads: int = 4
) -> np.ndarray:
  """Reads the segmentation value under every node, touching only voxels near nodes.

  A numpy array is indexed directly. A lazy volume (anything with ``shape`` and numpy-returning
  ``__getitem__`` over [z, y, x] slices, e.g. ``jaxseg.io.Volume``) is read box by box: nodes are
  grouped into blocks of ``block_shape`` (default: the volume's ``chunks`` attribute when it has a
  3-D one, else 64x256x256), and for every block that holds nodes only the bounding box of those
  nodes is read, with ``num_threads`` reads in flight. The number of reads is at most the number
  of occupied blocks, independent of the node count.

  Args:
    seg: [z, y, x] numpy array or lazy volume.
    voxel_zyx: [N, 3] int voxel indices, already checked to be in bounds.
    block_shape: grouping box for lazy volumes.
    num_threads: concurrent box reads for lazy volumes.

  Returns:
    [N] labels in the volume's dtype.
  """
  voxel_zyx = np.asarray(voxel_zyx, dtype=np.int64)
  if isinstance(seg, np.ndarray):
    return seg[voxel_zyx[:, 0], voxel_zyx[:, 1], voxel_zyx[:, 2]]
  if block_shape is None:
    chunks = getattr(seg, "chunks", None)
    block_shape = tuple(chunks)[-3:] if chunks is not None and len(chunks) >= 3 else None
    block_shape = block_shape or _DEFAULT_LOOKUP_BLOCK
  block = np.asarray(block_shape, dtype=np.int64)
  n = voxel_zyx.shape[0]
  if n == 0:
    return np.zeros(0, dtype=np.dtype(seg.dtype))
  grid = -(-np.asarray(seg.shape[-3:], dtype=np.int64) // block)
  block_id = np.ravel_multi_index(tuple((voxel_zyx // block).T), tuple(grid))
  order = np.argsort(block_id, kind="stable")
  sorted_ids = block_id[order]
  starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
  pts = voxel_zyx[order]
  lo = np.minimum.reduceat(pts, starts, axis=0)
  hi = np.maximum.reduceat(pts, starts, axis=0) + 1
  ends = np.r_[starts[1:], n]
  out = np.empty(n, dtype=np.dtype(seg.dtype))

  def read_block(b: int) -> None:
    box = np.asarray(seg[lo[b, 0] : hi[b, 0], lo[b, 1] : hi[b, 1], lo[b, 2] : hi[b, 2]])
    local = pts[starts[b] : ends[b]] - lo[b]
    out[order[starts[b] : ends[b]]] = box[local[:, 0], local[:, 1], local[:, 2]]

  # One read per occupied block, not per node. tensorstore releases the GIL, so reads overlap.
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    list(pool.map(read_block, range(starts.size)))
  return out


def expected_run_length(
  skeletons: Skeletons,
  seg,
  merge_threshold: int = 1,
  no_merge_segments: Sequence[int] | np.ndarray | None = None,
  volume_name: str | None = None,
) -> ErlResult:
  """ERL / NERL of a segmentation against skeleton GT.

  Args:
    skeletons: GT skeletons whose ``voxel_zyx`` index into ``seg``.
    seg: [z, y, x] segmentation, numpy array or lazy volume (only voxels at nodes are read).
    merge_threshold: see :func:`erl_from_node_labels` (1 = funlib / BANIS).
    no_merge_segments: segment ids treated as merging (em_erl no-merge mask).
    volume_name: name for error messages (default: the volume's ``path`` or "segmentation").

  Returns:
    The metrics.

  Raises:
    jaxseg.io.skeleton.SkeletonError: a node lies outside the volume (names both).
  """
  name = volume_name or getattr(seg, "path", None) or "segmentation"
  skeletons.check_bounds(seg.shape, volume_name=str(name))
  labels = lookup_node_labels(seg, skeletons.voxel_zyx)
  return erl_from_node_labels(
    skeletons, labels, merge_threshold=merge_threshold, no_merge_segments=no_merge_segments
  )


def segments_in_mask(seg: np.ndarray, mask: np.ndarray, min_voxels: int = 1) -> np.ndarray:
  """Non-zero segment ids with at least ``min_voxels`` voxels inside ``mask`` (em_erl no-merge).

  Args:
    seg: [z, y, x] segmentation.
    mask: [z, y, x] boolean / 0-1 mask of regions no axon may merge into.
    min_voxels: overlap needed to count.

  Returns:
    Sorted segment ids, for ``no_merge_segments``.
  """
  seg = np.asarray(seg)
  mask = np.asarray(mask)
  if seg.shape != mask.shape:
    raise ValueError(f"seg and mask shapes differ: {seg.shape} vs {mask.shape}")
  ids, counts = np.unique(seg[mask.astype(bool)], return_counts=True)
  keep = (ids != 0) & (counts >= min_voxels)
  return ids[keep]
