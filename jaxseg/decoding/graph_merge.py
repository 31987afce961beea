"""waterz's iterative region merging on a region graph: the merge kernels.

Owns :class:`RegionGraph` (the live graph of ``N`` nodes and ``E`` edges, numba arrays),
:func:`region_graph` to build one from edge ends ``eu, ev [E]`` (node indices), and the kernels
that :func:`~jaxseg.decoding.graph_agglomeration.agglomerate_graph` runs per threshold:

  * :func:`merge_until`: pops the :class:`~jaxseg.decoding.graph_queue.EdgeQueue` while the top's
    cached score is below the threshold (deleted entries dropped, stale ones rescored and pushed
    again) and merges the two regions of every other edge it pops;
  * :func:`extract`: the surviving region graph, like waterz's ``getRegionGraph``;
  * :func:`representatives`: ``[N]`` region id of every node.

Statistics and scores come from :mod:`~jaxseg.decoding.graph_scoring`. Nodes merge small-to-large
internally (by adjacency length) with a hash table of live node pairs, so a merge costs
O(smaller adjacency); region ids still follow waterz (smaller id wins). The tie rules are in the
module docstring of :mod:`~jaxseg.decoding.graph_agglomeration`.

This module never imports JAX.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from jaxseg.decoding import graph_edges, graph_queue, graph_scoring


class RegionGraph(NamedTuple):
  """The live region graph (numba arrays, updated in place by the kernels).

  Attributes:
    num_nodes: N.
    eu, ev: ``[E]`` int64 current (internal) node at each end of an edge. Slot 2e is e's entry in
      eu[e]'s adjacency list, slot 2e + 1 in ev[e]'s.
    deleted: ``[E]`` bool, absorbed by a parallel edge; merged ``[E]``: its two regions merged;
      stale ``[E]``: statistics changed since ``score`` was cached.
    score: ``[E]`` float32 cached score (waterz's _edgeScores).
    parent: ``[N]`` int64 union-find over internal nodes; rep ``[N]``: smallest node index of a
      set, at its internal root (waterz's region id).
    head: ``[N]`` int64 one slot of each node's circular adjacency list (-1 = empty); llen ``[N]``
      its length (dead slots included, dropped lazily).
    slot_next: ``[2E]`` int64 next slot in the same list.
    table: ``[cap, 2]`` int64 open-addressing hash table (key, value): ``lo * N + hi`` of two
      live internal roots -> their live edge.
  """

  num_nodes: int
  eu: np.ndarray
  ev: np.ndarray
  deleted: np.ndarray
  merged: np.ndarray
  stale: np.ndarray
  score: np.ndarray
  parent: np.ndarray
  rep: np.ndarray
  head: np.ndarray
  llen: np.ndarray
  slot_next: np.ndarray
  table: np.ndarray


def region_graph(num_nodes: int, eu: np.ndarray, ev: np.ndarray) -> RegionGraph:
  """The graph of ``num_nodes`` nodes and edges ``(eu[e], ev[e])`` (int64, taken over)."""
  num_edges = int(eu.size)
  hcap = 1 << max(4, int(2 * num_edges).bit_length())
  graph = RegionGraph(
    num_nodes=num_nodes,
    eu=eu,
    ev=ev,
    deleted=np.zeros(num_edges, np.bool_),
    merged=np.zeros(num_edges, np.bool_),
    stale=np.zeros(num_edges, np.bool_),
    score=np.zeros(num_edges, np.float32),
    parent=np.arange(num_nodes, dtype=np.int64),
    rep=np.arange(num_nodes, dtype=np.int64),
    head=np.full(num_nodes, -1, np.int64),
    llen=np.zeros(num_nodes, np.int64),
    slot_next=np.empty(2 * num_edges, np.int64),
    table=np.full((hcap, 2), -1, np.int64),
  )
  _init_graph(num_nodes, eu, ev, graph.slot_next, graph.head, graph.llen, graph.table)
  return graph


# -- the live-pair hash table and adjacency lists -------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _ht_get(table, key):
  # table [cap, 2]: key and value side by side, so a probe touches one cache line.
  mask = table.shape[0] - 1
  i = graph_edges.int_hash(key, mask)
  while table[i, 0] != -1:
    if table[i, 0] == key:
      return table[i, 1]
    i = (i + 1) & mask
  return -1


@numba.njit(cache=True, nogil=True)
def _ht_put(table, key, value):
  mask = table.shape[0] - 1
  i = graph_edges.int_hash(key, mask)
  while table[i, 0] != -1 and table[i, 0] != key:
    i = (i + 1) & mask
  table[i, 0] = key
  table[i, 1] = value


@numba.njit(cache=True, nogil=True)
def _ht_del(table, key):
  mask = table.shape[0] - 1
  i = graph_edges.int_hash(key, mask)
  while table[i, 0] != key:
    if table[i, 0] == -1:
      return
    i = (i + 1) & mask
  # Backward-shift deletion keeps linear probing free of tombstones.
  j = i
  while True:
    j = (j + 1) & mask
    if table[j, 0] == -1:
      break
    home = graph_edges.int_hash(table[j, 0], mask)
    if i <= j:
      stays = i < home <= j
    else:
      stays = home > i or home <= j
    if not stays:
      table[i, 0] = table[j, 0]
      table[i, 1] = table[j, 1]
      i = j
  table[i, 0] = -1


@numba.njit(cache=True, nogil=True)
def _pair_key(p, q, n):
  if p < q:
    return p * n + q
  return q * n + p


@numba.njit(cache=True, nogil=True)
def _list_insert(head, llen, slot_next, node, s):
  h = head[node]
  if h == -1:
    head[node] = s
    slot_next[s] = s
  else:
    slot_next[s] = slot_next[h]
    slot_next[h] = s
  llen[node] += 1


@numba.njit(cache=True, nogil=True)
def _init_graph(num_nodes, eu, ev, slot_next, head, llen, table):
  for e in range(eu.shape[0]):
    _list_insert(head, llen, slot_next, eu[e], 2 * e)
    _list_insert(head, llen, slot_next, ev[e], 2 * e + 1)
    _ht_put(table, _pair_key(eu[e], ev[e], num_nodes), e)


# -- merging --------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _merge_regions(e, graph, scores):
  # Merges the two regions of edge e (waterz's mergeRegions).
  num_nodes, eu, ev = graph.num_nodes, graph.eu, graph.ev
  deleted, merged, stale, score = graph.deleted, graph.merged, graph.stale, graph.score
  head, llen, slot_next, table = graph.head, graph.llen, graph.slot_next, graph.table
  rep = graph.rep
  ru = eu[e]
  rv = ev[e]
  merged[e] = True
  _ht_del(table, _pair_key(ru, rv, num_nodes))
  # Internally the shorter adjacency list joins the longer one (cost O(shorter)); which region
  # is waterz's "b" (the one with the larger id) only matters for the tie rule below.
  if llen[ru] <= llen[rv]:
    x, y = ru, rv
  else:
    x, y = rv, ru
  x_is_b = rep[x] > rep[y]
  h = head[x]
  if h != -1:
    s = h
    while True:
      nxt = slot_next[s]
      e2 = s >> 1
      if not deleted[e2] and not merged[e2]:
        side = s & 1
        n = ev[e2] if side == 0 else eu[e2]
        _ht_del(table, _pair_key(x, n, num_nodes))
        f = _ht_get(table, _pair_key(y, n, num_nodes))
        survivor = e2
        if f >= 0:
          # A neighbour of both regions: the edge with the higher cached score joins the other
          # one, which becomes stale; on a tie the edge of region b survives (waterz).
          if x_is_b:
            b_edge, a_edge = e2, f
          else:
            b_edge, a_edge = f, e2
          if score[b_edge] > score[a_edge]:
            survivor, victim = a_edge, b_edge
          else:
            survivor, victim = b_edge, a_edge
          graph_scoring.merge_stats(victim, survivor, scores)
          deleted[victim] = True
          stale[survivor] = True
        if survivor == e2:
          if side == 0:
            eu[e2] = y
          else:
            ev[e2] = y
          _ht_put(table, _pair_key(y, n, num_nodes), e2)
          _list_insert(head, llen, slot_next, y, s)
      s = nxt
      if s == h:
        break
  head[x] = -1
  llen[x] = 0
  graph.parent[x] = y
  rep[y] = min(rep[x], rep[y])


@numba.njit(cache=True, nogil=True)
def merge_until(threshold, first, graph, scores, queue):
  # Merges while the top's cached score < threshold (float32); first: score and queue every edge
  # before. Returns the number of merges.
  deleted, merged, stale, score = graph.deleted, graph.merged, graph.stale, graph.score
  num_edges = graph.eu.shape[0]
  qstate = queue.qstate  # once: numba counts a reference on every read of a tuple's field
  if first:
    for e in range(num_edges):
      s = graph_scoring.score_edge(e, scores)
      score[e] = s
      graph_queue.push(queue, e, s)
  merges = 0
  while qstate[0] > 0:
    top = graph_queue.top(queue)
    # The cached score decides, also for a deleted or stale entry (waterz).
    if score[top] >= threshold:
      break
    graph_queue.pop(queue)
    if deleted[top] or merged[top]:
      # A merged edge only comes back as a duplicate entry; waterz's re-merge is a no-op.
      continue
    if stale[top]:
      s = graph_scoring.score_edge(top, scores)
      score[top] = s
      graph_queue.push(queue, top, s)
      stale[top] = False
      continue
    _merge_regions(top, graph, scores)
    merges += 1
  return merges


@numba.njit(cache=True, nogil=True)
def extract(merged_until, requeue, graph, scores, queue):
  # The live edges with score >= merged_until, as (rep u, rep v, score) [R] arrays; requeue: push
  # the rescores of stale edges like waterz's getRegionGraph (the queue must have room).
  eu, ev, rep = graph.eu, graph.ev, graph.rep
  deleted, merged, stale, score = graph.deleted, graph.merged, graph.stale, graph.score
  num_edges = eu.shape[0]
  out_u = np.empty(num_edges, np.int64)
  out_v = np.empty(num_edges, np.int64)
  out_s = np.empty(num_edges, np.float32)
  k = 0
  for e in range(num_edges):
    if deleted[e] or merged[e]:
      continue
    if stale[e]:
      s = graph_scoring.score_edge(e, scores)
      if requeue:
        # waterz's getRegionGraph rescores through scoreEdge, which caches and queues the score
        # (the edge stays stale).
        score[e] = s
        graph_queue.push(queue, e, s)
    else:
      s = score[e]
    if s < merged_until:
      continue
    a = rep[eu[e]]
    b = rep[ev[e]]
    out_u[k] = min(a, b)
    out_v[k] = max(a, b)
    out_s[k] = s
    k += 1
  # Copies: a view would keep the [E] buffers of every threshold alive.
  return out_u[:k].copy(), out_v[:k].copy(), out_s[:k].copy()


@numba.njit(cache=True, nogil=True)
def representatives(parent, rep):
  # [N] region id of every node (path compression on parent).
  n = parent.shape[0]
  out = np.empty(n, np.int64)
  for i in range(n):
    r = i
    while parent[r] != r:
      r = parent[r]
    j = i
    while parent[j] != r:  # path compression
      nxt = parent[j]
      parent[j] = r
      j = nxt
    out[i] = rep[r]
  return out
