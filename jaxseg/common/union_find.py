"""Union-find over integer parent arrays, for numba code (the one copy every labeller uses).

A set is represented by its least index: :func:`union` links the larger root under the smaller,
so a root is the first-opened label (connected components), the least node (merging tables) or
the first voxel in scan order (generated labels), and the result does not depend on the order
in which pairs are joined. ``parent`` is a 1-D integer array with ``parent[i] == i`` at roots.
"""

from __future__ import annotations

import numba


@numba.njit(cache=True, nogil=True, inline="always")
def find_root(parent, i):
  """The root of ``i``, halving the path on the way (every node skips to its grandparent)."""
  while parent[i] != i:
    parent[i] = parent[parent[i]]
    i = parent[i]
  return i


@numba.njit(cache=True, nogil=True, inline="always")
def union(parent, a, b):
  """Joins the sets of ``a`` and ``b``; returns the joint root (the lesser of the two roots)."""
  a = find_root(parent, a)
  b = find_root(parent, b)
  if a < b:
    parent[b] = a
    return a
  if b < a:
    parent[a] = b
  return b
