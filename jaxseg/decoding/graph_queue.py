"""The edge priority queue of waterz's agglomeration, cheapest score first.

Owns :class:`EdgeQueue` (numba arrays) and its kernels :func:`push`, :func:`top`, :func:`pop`,
plus :func:`edge_queue` to make one for ``E`` edges and :func:`ensure_room` to grow it between
kernel calls. Two kinds, as waterz's ``discretize_queue`` picks them:

  * ``discretize_queue=0``: a binary heap on the float32 score that reproduces libstdc++'s
    ``std::priority_queue`` (``push_heap`` / ``pop_heap`` with ``greater``), tie order included.
  * ``discretize_queue=K``: waterz's ``BinQueue``, K FIFO bins by ``floor(K * score)``; the top is
    the oldest entry of the lowest non-empty bin.

Entries are edge indices; the queue never reads scores back (the caller compares the top edge's
cached score, as waterz does).

This module never imports JAX.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from jaxseg.decoding import graph_scoring

MAX_QUEUE_BINS = 65536


class EdgeQueue(NamedTuple):
  """A heap or a bin queue of edge indices (arrays the other kind does not use are ``[1]``).

  Attributes:
    use_bins: whether this is a bin queue.
    nbins: K, the number of bins (1 for a heap).
    hs, he: ``[C]`` float32 score and int64 edge of each heap entry.
    qhead, qtail: ``[K]`` int64 first and last entry of each bin (-1 = empty).
    ent_edge, ent_next: ``[C]`` int64 edge and next entry (in its bin, or in the free list).
    qstate: ``[3]`` int64 ``[size, lowest non-empty bin (-1 = none), first free entry]``.
  """

  use_bins: bool
  nbins: int
  hs: np.ndarray
  he: np.ndarray
  qhead: np.ndarray
  qtail: np.ndarray
  ent_edge: np.ndarray
  ent_next: np.ndarray
  qstate: np.ndarray


def edge_queue(num_edges: int, queue_bins: int) -> EdgeQueue:
  """An empty queue with room for ``num_edges`` entries; ``queue_bins`` 0 makes a heap."""
  use_bins = queue_bins > 0
  capacity = max(num_edges, 1)
  return EdgeQueue(
    use_bins=use_bins,
    nbins=max(queue_bins, 1),
    hs=np.empty(capacity if not use_bins else 1, np.float32),
    he=np.empty(capacity if not use_bins else 1, np.int64),
    qhead=np.full(max(queue_bins, 1), -1, np.int64),
    qtail=np.full(max(queue_bins, 1), -1, np.int64),
    ent_edge=np.empty(capacity if use_bins else 1, np.int64),
    ent_next=np.append(np.arange(1, capacity if use_bins else 1), -1).astype(np.int64),
    qstate=np.array([0, -1, 0], np.int64),
  )


def ensure_room(queue: EdgeQueue, extra: int) -> EdgeQueue:
  """The queue, its arrays grown so that ``extra`` more entries fit (between kernel calls)."""
  if not queue.use_bins:
    hs, he = queue.hs, queue.he
    need = int(queue.qstate[0]) + extra
    if need > hs.size:
      size = max(need, 2 * hs.size)
      queue = queue._replace(hs=np.resize(hs, size), he=np.resize(he, size))
    return queue
  ent_edge, ent_next, qstate = queue.ent_edge, queue.ent_next, queue.qstate
  free = ent_edge.size - int(qstate[0])
  if extra > free:
    old = ent_edge.size
    size = max(old + extra - free, 2 * old)
    ent_next = np.resize(ent_next, size)
    # Chain the new entries in front of the free list.
    ent_next[old : size - 1] = np.arange(old + 1, size)
    ent_next[size - 1] = qstate[2]
    qstate[2] = old
    queue = queue._replace(ent_edge=np.resize(ent_edge, size), ent_next=ent_next)
  return queue


@numba.njit(cache=True, nogil=True)
def push(queue, e, s):
  # Edge e with score s.
  qstate = queue.qstate
  if not queue.use_bins:
    hs, he = queue.hs, queue.he
    # libstdc++ push_heap on a min-heap (comp = greater): sift the hole up.
    hole = qstate[0]
    while hole > 0:
      parent = (hole - 1) // 2
      if not (hs[parent] > s):
        break
      hs[hole] = hs[parent]
      he[hole] = he[parent]
      hole = parent
    hs[hole] = s
    he[hole] = e
    qstate[0] += 1
    return
  qhead, qtail, ent_edge, ent_next = queue.qhead, queue.qtail, queue.ent_edge, queue.ent_next
  b = graph_scoring.discretize(s, queue.nbins)
  ent = qstate[2]
  qstate[2] = ent_next[ent]
  ent_edge[ent] = e
  ent_next[ent] = -1
  if qtail[b] == -1:
    qhead[b] = ent
  else:
    ent_next[qtail[b]] = ent
  qtail[b] = ent
  if qstate[1] == -1 or b < qstate[1]:
    qstate[1] = b
  qstate[0] += 1


@numba.njit(cache=True, nogil=True)
def top(queue):
  # The edge of the top entry (the queue must not be empty).
  if not queue.use_bins:
    return queue.he[0]
  return queue.ent_edge[queue.qhead[queue.qstate[1]]]


@numba.njit(cache=True, nogil=True)
def pop(queue):
  # Removes the top entry (the queue must not be empty).
  qstate = queue.qstate
  if not queue.use_bins:
    hs, he = queue.hs, queue.he
    # libstdc++ pop_heap: the last element fills a hole moved from the root down to a leaf
    # (always to the smaller child, the left one on ties), then sifts up.
    length = qstate[0] - 1
    qstate[0] = length
    if length == 0:
      return
    value_s = hs[length]
    value_e = he[length]
    hole = 0
    child = 0
    while child < (length - 1) // 2:
      child = 2 * (child + 1)
      if hs[child] > hs[child - 1]:
        child -= 1
      hs[hole] = hs[child]
      he[hole] = he[child]
      hole = child
    if (length & 1) == 0 and child == (length - 2) // 2:
      child = 2 * (child + 1)
      hs[hole] = hs[child - 1]
      he[hole] = he[child - 1]
      hole = child - 1
    while hole > 0:
      parent = (hole - 1) // 2
      if not (hs[parent] > value_s):
        break
      hs[hole] = hs[parent]
      he[hole] = he[parent]
      hole = parent
    hs[hole] = value_s
    he[hole] = value_e
    return
  qhead, qtail, ent_next, nbins = queue.qhead, queue.qtail, queue.ent_next, queue.nbins
  b = qstate[1]
  ent = qhead[b]
  qhead[b] = ent_next[ent]
  if qhead[b] == -1:
    qtail[b] = -1
  ent_next[ent] = qstate[2]
  qstate[2] = ent
  qstate[0] -= 1
  if qhead[b] == -1:
    while b < nbins and qhead[b] == -1:
      b += 1
    qstate[1] = b if b < nbins else -1
