"""Procedural neurites: branching, self-avoiding random walks rasterised as tubes into a label cube.

Owns the geometry stage of the generator. Neurites are grown one after another in physical space
(nm, canonical ``(z, y, x)``); voxel ``i`` has its centre at ``i * resolution`` nm. Each neurite
starts at a free point inside the cube and grows both ways with momentum (a worm-like chain whose
``persistence_nm`` sets how straight it runs) until it leaves the cube through a face, is blocked,
or the node budget is used. Its radius drifts along the path (an Ornstein-Uhlenbeck walk in
log-radius) and shrinks locally to squeeze past neighbours; it branches at random into thinner
children. Every step is rasterised as a capsule (cone frustum with round caps) into the label
volume, writing **only free voxels**: an earlier neurite is never overwritten, so the voxels under
its skeleton stay its own. Steering probes the label volume, so neurites avoid each other instead
of interpenetrating, which packs them like neuropil.

Growth stops when the tubes cover ``fill_fraction`` of the cube (or seeding keeps failing, or
``max_neurites`` is reached). Randomness comes from numba's generator, seeded from the caller's
``numpy.random.Generator``, so a cube is a pure function of its seed.

Outputs (see :class:`Neurites`): ``labels`` [z, y, x] int32 (0 = free, k = neurite k) and the
skeleton nodes: ``position_nm`` [N, 3] float64 (z, y, x), ``parent`` [N] int64 (-1 at a root),
``neurite`` [N] int32 (label of the node's neurite), ``radius_nm`` [N] float64.
"""

# numba compiles only the legacy np.random API (its own per-thread Mersenne Twister, seeded from
# the cube's numpy Generator), so the Generator-only rule does not apply to the jitted walk.
# ruff: noqa: NPY002

from __future__ import annotations

import dataclasses
import math

import numba
import numpy as np

# Probe directions for the free-space test around a candidate centre: the 6 axes and the 8 cube
# diagonals (unit vectors, physical space).
_AXES = np.array(
  [[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=np.float64
)
_DIAG = np.array(
  [[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)], dtype=np.float64
) / math.sqrt(3.0)
PROBE_DIRECTIONS = np.concatenate([_AXES, _DIAG])

_SEED_ATTEMPTS = 300  # random seed points tried per neurite before giving up
_MAX_FAILURES = 12  # consecutive neurites that failed to seed/grow before growth stops
_N_CANDIDATES = 8  # directions tried per step when the natural one is blocked
_MAX_BRANCH_STACK = 4096
# A neurite narrows to at most this share of its radius to pass neighbours: thinner necks get
# cut by the extracellular gaps and would split neurons into pieces.
_MIN_SQUEEZE = 0.5
_RADIUS_CORRELATION_NM = 500.0  # length over which the radius drifts back to its base value


@dataclasses.dataclass(frozen=True)
class Neurites:
  """Result of :func:`grow_neurites` (shapes in the module docstring)."""

  labels: np.ndarray
  position_nm: np.ndarray
  parent: np.ndarray
  neurite: np.ndarray
  radius_nm: np.ndarray
  num_neurites: int


@numba.njit(cache=True)
def _seed_numba(seed):
  np.random.seed(seed)


@numba.njit(cache=True, inline="always")
def _label_at(labels, z, y, x, rz, ry, rx):
  """Label of the voxel containing the point (z, y, x) nm; -1 outside the cube."""
  iz = math.floor(z / rz + 0.5)
  iy = math.floor(y / ry + 0.5)
  ix = math.floor(x / rx + 0.5)
  if iz < 0 or iy < 0 or ix < 0:
    return -1
  if iz >= labels.shape[0] or iy >= labels.shape[1] or ix >= labels.shape[2]:
    return -1
  return labels[iz, iy, ix]


@numba.njit(cache=True)
def _foreign_at(labels, z, y, x, res, own):
  """True if the nm point (z, y, x) lies in a neurite other than ``own``."""
  lab = _label_at(labels, z, y, x, res[0], res[1], res[2])
  return lab > 0 and lab != own


@numba.njit(cache=True)
def _segment_free(labels, p, q, res, own, spacing):
  """True if every voxel along the centre line p -> q is free, own, or outside the cube."""
  d = math.sqrt((q[0] - p[0]) ** 2 + (q[1] - p[1]) ** 2 + (q[2] - p[2]) ** 2)
  n = max(1, math.ceil(d / spacing))
  for i in range(n + 1):
    t = i / n
    z = p[0] + t * (q[0] - p[0])
    y = p[1] + t * (q[1] - p[1])
    x = p[2] + t * (q[2] - p[2])
    if _foreign_at(labels, z, y, x, res, own):
      return False
  return True


@numba.njit(cache=True)
def _ball_free(labels, c, r, res, own, dirs):
  """True if the centre and probe points on (and halfway into) the sphere are free or own."""
  if _foreign_at(labels, c[0], c[1], c[2], res, own):
    return False
  for k in range(dirs.shape[0]):
    # The 6 axis directions are also probed at half radius, to catch thin obstacles.
    for i in range(2 if k < 6 else 1):
      h = r if i == 0 else 0.5 * r
      if _foreign_at(
        labels, c[0] + h * dirs[k, 0], c[1] + h * dirs[k, 1], c[2] + h * dirs[k, 2], res, own
      ):
        return False
  return True


@numba.njit(cache=True)
def _raster_capsule(labels, p, q, rp, rq, res, own, bbox):
  """Writes ``own`` into free voxels within the tapered capsule p(rp) -> q(rq); returns the count.

  ``bbox`` (zmin, ymin, xmin, zmax, ymax, xmax) is grown to cover the touched box (used to undo a
  discarded neurite cheaply).
  """
  rmax = max(rp, rq)
  lo = np.empty(3, np.int64)
  hi = np.empty(3, np.int64)
  for a in range(3):
    lo[a] = max(0, math.floor((min(p[a], q[a]) - rmax) / res[a]))
    hi[a] = min(labels.shape[a] - 1, math.ceil((max(p[a], q[a]) + rmax) / res[a]))
    if lo[a] > hi[a]:
      return 0
  for a in range(3):
    bbox[a] = min(bbox[a], lo[a])
    bbox[3 + a] = max(bbox[3 + a], hi[a])
  vz = q[0] - p[0]
  vy = q[1] - p[1]
  vx = q[2] - p[2]
  vv = vz * vz + vy * vy + vx * vx
  count = 0
  for iz in range(lo[0], hi[0] + 1):
    dz = iz * res[0] - p[0]
    for iy in range(lo[1], hi[1] + 1):
      dy = iy * res[1] - p[1]
      for ix in range(lo[2], hi[2] + 1):
        if labels[iz, iy, ix] != 0:
          continue
        dx = ix * res[2] - p[2]
        t = 0.0
        if vv > 0.0:
          t = (dz * vz + dy * vy + dx * vx) / vv
          t = min(1.0, max(0.0, t))
        ez = dz - t * vz
        ey = dy - t * vy
        ex = dx - t * vx
        rr = rp + t * (rq - rp)
        if ez * ez + ey * ey + ex * ex <= rr * rr:
          labels[iz, iy, ix] = own
          count += 1
  return count


@numba.njit(cache=True, inline="always")
def _normalize(v):
  n = math.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2])
  if n == 0.0:
    v[0] = 1.0
    return
  v[0] /= n
  v[1] /= n
  v[2] /= n


@numba.njit(cache=True)
def _random_unit(out):
  for a in range(3):
    out[a] = np.random.normal()
  _normalize(out)


@numba.njit(cache=True)
def _seed_neurite(labels, res, extent, floor_r, radii, thin_fraction, own, dirs, c):
  """Draws a base radius and a free seed point (written into ``c``); returns ``(found, radius)``.

  ``radii`` is ``(thick_lo, thick_hi, thin_lo, thin_hi)`` nm; the radius is log-uniform in the
  thin range with probability ``thin_fraction``, else in the thick one.
  """
  thick_lo, thick_hi, thin_lo, thin_hi = radii
  if np.random.random() < thin_fraction:
    lo, hi = thin_lo, thin_hi
  else:
    lo, hi = thick_lo, thick_hi
  r0 = math.exp(math.log(lo) + np.random.random() * (math.log(hi) - math.log(lo)))
  r = r0
  for attempt in range(_SEED_ATTEMPTS):
    # Later attempts try thinner neurites: what still fits between the existing ones.
    r = max(floor_r, r0 * 0.985**attempt)
    for a in range(3):
      c[a] = np.random.random() * extent[a]
    if _label_at(labels, c[0], c[1], c[2], res[0], res[1], res[2]) != 0:
      continue
    if _ball_free(labels, c, r, res, own, dirs):
      return True, r
  return False, r


@numba.njit(cache=True)
def _squeezed_radius(labels, q, r_t, res, own, dirs, floor_r):
  """The widest radius down to ``_MIN_SQUEEZE * r_t`` whose ball at ``q`` is free; -1 if none."""
  r_eff = r_t
  r_min = max(floor_r, _MIN_SQUEEZE * r_t)
  while r_eff > r_min and not _ball_free(labels, q, r_eff, res, own, dirs):
    r_eff = max(r_min, 0.8 * r_eff)
  if not _ball_free(labels, q, r_eff, res, own, dirs):
    return -1.0
  return r_eff


@numba.njit(cache=True)
def _choose_step(labels, res, own, dirs, p, d, r_t, walk, cand, q, best_dir):
  """Tries up to ``_N_CANDIDATES`` headings from ``p`` (current heading ``d``, radius ``r_t``).

  Writes the widest-passing heading into ``best_dir``; returns ``(radius, leaves_cube)``, radius
  -1 when every candidate is blocked. ``cand`` and ``q`` are scratch.
  """
  step_nm, sig_dir, spacing, floor_r = walk[0], walk[1], walk[2], walk[3]
  best_r = -1.0
  best_exit = False
  for k in range(_N_CANDIDATES):
    if k < _N_CANDIDATES // 2:
      s = sig_dir * (1.0 + 2.0 * k)  # widening cone around the current heading
      for a in range(3):
        cand[a] = d[a] + s * np.random.normal()
      _normalize(cand)
    else:
      _random_unit(cand)  # any forward direction
      dot = cand[0] * d[0] + cand[1] * d[1] + cand[2] * d[2]
      if dot < 0.0:
        for a in range(3):
          cand[a] = -cand[a]
    for a in range(3):
      q[a] = p[a] + step_nm * cand[a]
    lab_q = _label_at(labels, q[0], q[1], q[2], res[0], res[1], res[2])
    if lab_q > 0 and lab_q != own:
      continue
    if not _segment_free(labels, p, q, res, own, spacing):
      continue
    leaving = lab_q == -1
    if leaving:
      r_eff = r_t
    else:
      r_eff = _squeezed_radius(labels, q, r_t, res, own, dirs, floor_r)
      if r_eff < 0.0:
        continue
    if r_eff > best_r + 1e-9:
      best_r = r_eff
      best_exit = leaving
      for a in range(3):
        best_dir[a] = cand[a]
    if k == 0 and r_eff >= r_t * 0.999:
      break  # the natural step is unobstructed: keep the walk unbiased
  return best_r, best_exit


@numba.njit(cache=True)
def _record_node(nodes, n, point, parent_node, own, r):
  """Stores node ``n``: position, parent, neurite label and radius."""
  pos, parent, neurite, radius = nodes
  pos[n] = point
  parent[n] = parent_node
  neurite[n] = own
  radius[n] = r


@numba.njit(cache=True)
def _claim_voxel(labels, res, q, own):
  """Gives the voxel under ``q`` to ``own`` if it is free; returns the voxels newly filled."""
  iz = math.floor(q[0] / res[0] + 0.5)
  iy = math.floor(q[1] / res[1] + 0.5)
  ix = math.floor(q[2] / res[2] + 0.5)
  if labels[iz, iy, ix] == 0:  # a node's own voxel is always its own
    labels[iz, iy, ix] = own
    return 1
  return 0


@numba.njit(cache=True)
def _push_branch(stack, top, cur, d, lr0, u):
  """Pushes a child of node ``cur`` heading 30-80 degrees off ``d``, in a random plane."""
  stack_node, stack_dir, stack_lr = stack
  _random_unit(u)
  dot = u[0] * d[0] + u[1] * d[1] + u[2] * d[2]
  for a in range(3):
    u[a] -= dot * d[a]
  _normalize(u)
  angle = math.radians(30.0 + 50.0 * np.random.random())
  stack_node[top] = cur
  for a in range(3):
    stack_dir[top, a] = math.cos(angle) * d[a] + math.sin(angle) * u[a]
  stack_lr[top] = lr0 + math.log(0.55 + 0.3 * np.random.random())


@numba.njit(cache=True)
def _walk_branch(labels, res, own, dirs, walk, nodes, stack, top, scratch, bbox, state):
  """Walks the branch at ``stack[top]`` until it is blocked, leaves the cube or the node budget
  ends, pushing the branches it sprouts.

  ``walk`` holds the step constants (see :func:`_grow`); ``state`` is ``(n, filled, length,
  max_nodes)``. Returns the updated ``(n, filled, length, top)``.
  """
  step_nm, floor_r, theta, lr_noise = walk[0], walk[3], walk[4], walk[5]
  lr_min, lr_max, p_branch = walk[6], walk[7], walk[8]
  n, filled, length, max_nodes = state
  pos, radius = nodes[0], nodes[3]
  stack_node, stack_dir, stack_lr = stack
  d, cand, best_dir, q, u = scratch
  cur = stack_node[top]
  for a in range(3):
    d[a] = stack_dir[top, a]
  lr0 = stack_lr[top]
  lr = lr0
  r_prev = radius[cur]
  p = pos[cur].copy()
  while n < max_nodes - 16:
    r_t = max(floor_r, math.exp(lr))
    best_r, best_exit = _choose_step(labels, res, own, dirs, p, d, r_t, walk, cand, q, best_dir)
    if best_r < 0.0:
      break  # blocked on every side: the neurite ends here
    for a in range(3):
      q[a] = p[a] + step_nm * best_dir[a]
    filled += _raster_capsule(labels, p, q, r_prev, best_r, res, own, bbox)
    length += step_nm
    if best_exit:
      break  # left the cube through a face
    _record_node(nodes, n, q, cur, own, best_r)
    filled += _claim_voxel(labels, res, q, own)
    cur = n
    n += 1
    for a in range(3):
      p[a] = q[a]
      d[a] = best_dir[a]
    r_prev = best_r
    lr += theta * (lr0 - lr) + lr_noise * np.random.normal()
    lr = min(lr_max, max(lr_min, lr))
    if np.random.random() < p_branch and top < _MAX_BRANCH_STACK:
      _push_branch(stack, top, cur, d, lr0, u)
      top += 1
  return n, filled, length, top


@numba.njit(cache=True)
def _erase_neurite(labels, bbox, own):
  """Frees every voxel of ``own`` inside ``bbox`` (zmin, ymin, xmin, zmax, ymax, xmax)."""
  for iz in range(bbox[0], bbox[3] + 1):
    for iy in range(bbox[1], bbox[4] + 1):
      for ix in range(bbox[2], bbox[5] + 1):
        if labels[iz, iy, ix] == own:
          labels[iz, iy, ix] = 0


@numba.njit(cache=True)
def _grow(
  labels,
  res,
  rng_seed,
  target_voxels,
  max_neurites,
  thick_lo,
  thick_hi,
  thin_lo,
  thin_hi,
  thin_fraction,
  radius_sigma,
  branch_rate_per_um,
  step_nm,
  persistence_nm,
  min_length_nm,
  max_nodes,
  dirs,
):
  """Grows neurites into ``labels`` in place; returns node arrays, their count and #neurites."""
  _seed_numba(rng_seed)
  floor_r = 0.5 * math.sqrt(res[0] ** 2 + res[1] ** 2 + res[2] ** 2)
  spacing = 0.5 * min(res[0], min(res[1], res[2]))
  extent = np.empty(3)
  for a in range(3):
    extent[a] = (labels.shape[a] - 1) * res[a]
  pos = np.empty((max_nodes, 3))
  parent = np.empty(max_nodes, np.int64)
  neurite = np.empty(max_nodes, np.int32)
  radius = np.empty(max_nodes)
  nodes = (pos, parent, neurite, radius)
  stack_node = np.empty(_MAX_BRANCH_STACK, np.int64)
  stack_dir = np.empty((_MAX_BRANCH_STACK, 3))
  stack_lr = np.empty(_MAX_BRANCH_STACK)
  stack = (stack_node, stack_dir, stack_lr)
  bbox = np.empty(6, np.int64)
  c = np.empty(3)
  d = np.empty(3)
  scratch = (d, np.empty(3), np.empty(3), np.empty(3), np.empty(3))  # d, cand, best_dir, q, u
  radii = (thick_lo, thick_hi, thin_lo, thin_hi)
  sig_dir = math.sqrt(step_nm / persistence_nm)
  p_branch = branch_rate_per_um * step_nm / 1000.0
  theta = min(1.0, step_nm / _RADIUS_CORRELATION_NM)
  lr_noise = radius_sigma * math.sqrt(2.0 * theta)
  lr_min = math.log(floor_r)
  lr_max = math.log(2.0 * thick_hi)
  walk = (step_nm, sig_dir, spacing, floor_r, theta, lr_noise, lr_min, lr_max, p_branch)
  n = 0
  filled = 0
  n_neurites = 0
  failures = 0
  while filled < target_voxels and failures < _MAX_FAILURES and n < max_nodes - 16:
    if max_neurites > 0 and n_neurites >= max_neurites:
      break
    own = n_neurites + 1
    found, r = _seed_neurite(labels, res, extent, floor_r, radii, thin_fraction, own, dirs, c)
    if not found:
      failures += 1
      continue
    start_n = n
    start_filled = filled
    for a in range(3):
      bbox[a] = labels.shape[a]
      bbox[3 + a] = -1
    _record_node(nodes, n, c, -1, own, r)
    n += 1
    filled += _raster_capsule(labels, c, c, r, r, res, own, bbox)
    lr_base = math.log(r)
    _random_unit(d)
    top = 0
    for sign in (1.0, -1.0):  # grow both ways from the seed
      stack_node[top] = start_n
      for a in range(3):
        stack_dir[top, a] = sign * d[a]
      stack_lr[top] = lr_base
      top += 1
    length = 0.0
    while top > 0 and n < max_nodes - 16:
      top -= 1
      state = (n, filled, length, max_nodes)
      n, filled, length, top = _walk_branch(
        labels, res, own, dirs, walk, nodes, stack, top, scratch, bbox, state
      )
    if length < min_length_nm:
      # Discard stubs that were blocked right away: undo their voxels and nodes.
      _erase_neurite(labels, bbox, own)
      n = start_n
      filled = start_filled
      failures += 1
      continue
    n_neurites += 1
    failures = 0
  return pos[:n].copy(), parent[:n].copy(), neurite[:n].copy(), radius[:n].copy(), n_neurites


def grow_neurites(params, rng: np.random.Generator) -> Neurites:
  """Grows neurites for one cube.

  Args:
    params: resolved :class:`jaxseg.synthesis.config.SynthParams`.
    rng: the cube's generator; one integer is drawn from it to seed the numba walk.

  Returns:
    The label volume (int32 [z, y, x]) and skeleton nodes (see :class:`Neurites`).
  """
  shape = tuple(params.shape)
  labels = np.zeros(shape, np.int32)
  res = np.asarray(params.resolution, np.float64)
  n_voxels = int(np.prod(shape))
  max_nodes = max(100_000, n_voxels // 8)
  # In a tiny cube nothing is 300 nm long: scale the stub limit to the smallest extent.
  extent_nm = min(n * r for n, r in zip(shape, params.resolution, strict=True))
  min_length = min(float(params.min_length_nm), 0.5 * extent_nm)
  pos, parent, neurite, radius, n_neurites = _grow(
    labels,
    res,
    int(rng.integers(0, 2**31 - 1)),
    int(params.fill_fraction * n_voxels),
    int(params.max_neurites),
    float(params.radius_thick_nm[0]),
    float(params.radius_thick_nm[1]),
    float(params.radius_thin_nm[0]),
    float(params.radius_thin_nm[1]),
    float(params.thin_fraction),
    float(params.radius_variation),
    float(params.branch_rate_per_um),
    float(params.node_spacing_nm),
    float(params.persistence_nm),
    min_length,
    max_nodes,
    PROBE_DIRECTIONS,
  )
  return Neurites(labels, pos, parent, neurite, radius, int(n_neurites))
