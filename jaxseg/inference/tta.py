"""Test-time augmentation (TTA) for affinity models: views, their exact inverse, ensembling.

This module owns what a test-time *view* is (an axis permutation followed by axis flips of the
model's input window), which views a config asks for, and how to bring a view's affinity output
back to the original frame so that the views can be ensembled.

Shapes: model inputs and outputs are channels-last ``[b, z, y, x, c]`` (numpy or jax); affinity
channels follow ``jaxseg.data.affinity``: one ``(dz, dy, dx)`` offset per channel plus a storage
convention, ``'source'`` (the edge ``v -> v + o`` is stored at ``v``) or ``'target'`` (at
``v + o``).

Why affinities need more than the inverse spatial transform
-----------------------------------------------------------
A view maps the window ``A`` to ``A'`` with centred coordinates ``p' = M p``, ``M`` a signed
permutation matrix (:attr:`View.matrix`). The model's channel ``c`` in view space describes edges
with offset ``t_c`` *in view coordinates*; after the inverse spatial transform the same numbers
describe edges with offset ``s = M^T t_c`` in the original frame, stored with the same
convention. Three cases:

- ``s == t_d``: the channel is original channel ``d`` (a rotation can move x into y).
- ``s == -t_d``: the value stored at ``p`` is the edge ``p -> p - t_d`` (``'source'``), i.e. the
  ``t_d`` edge stored at ``p - t_d``; so ``out_d[u] = B[u + t_d]``, ``shift_volume`` by ``-t_d``.
  Under ``'target'`` the value at ``p`` relates ``p`` to ``p + t_d``, the ``t_d`` edge stored at
  ``p + t_d``: shift by ``+t_d``. The faces the shift vacates have no value from this view and
  are left out of the ensemble.
- neither: the offsets are not closed under the view; :func:`channel_moves` raises.

Treating affinities as scalar fields (only the spatial inverse) swaps x and y channels under rot90
and misplaces every flipped edge by its offset: PyTC did this until Aug 2026.

Ensembling runs over the views one at a time (running sum + count, or running min / max), never
holding all views' outputs at once (PyTC issue #175: stacking 16 views ran out of memory).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxseg.common.errors import ConfigError
from jaxseg.data.affinity import (
  Offset,
  array_namespace,
  check_convention,
  normalize_offsets,
  shift_volume,
)

AXES = ("z", "y", "x")
ENSEMBLES = ("mean", "min", "max")

# np.rot90(a, 1, axes=(y, x)) as a matrix on centred (z, y, x) coords: out[i, j] = a[j, n-1-i],
# so view y = -original x and view x = original y.
_ROT90_YX = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], np.int64)


@dataclasses.dataclass(frozen=True)
class View:
  """One test-time view: permute the spatial axes, then flip some of them.

  Attributes:
    perm: view spatial axis ``a`` shows original spatial axis ``perm[a]`` (``(0, 1, 2)`` = none).
    flip: then view axis ``a`` is reversed where ``flip[a]``.
  """

  perm: tuple[int, int, int] = (0, 1, 2)
  flip: tuple[bool, bool, bool] = (False, False, False)

  def __post_init__(self):
    perm = tuple(int(a) for a in self.perm)
    flip = tuple(bool(f) for f in self.flip)
    if sorted(perm) != [0, 1, 2] or len(flip) != 3:
      raise ValueError(f"View needs perm a permutation of (0, 1, 2) and 3 flips, got {self}")
    object.__setattr__(self, "perm", perm)
    object.__setattr__(self, "flip", flip)

  @classmethod
  def from_matrix(cls, matrix) -> View:
    """The view whose :attr:`matrix` is ``matrix`` (a 3x3 signed permutation matrix)."""
    m = np.asarray(matrix)
    mag = np.abs(m) if m.shape == (3, 3) else None
    if (
      mag is None
      or not np.isin(m, (-1, 0, 1)).all()
      or not (mag.sum(0) == 1).all()
      or not (mag.sum(1) == 1).all()
    ):
      raise ValueError(f"not a signed permutation matrix: {m.tolist()}")
    perm = tuple(int(np.flatnonzero(row)[0]) for row in m)
    flip = tuple(bool(m[a, perm[a]] < 0) for a in range(3))
    return cls(perm, flip)  # type: ignore[arg-type]

  @property
  def matrix(self) -> np.ndarray:
    """``[3, 3]`` int signed permutation ``M``: centred view coords = ``M @`` centred original."""
    m = np.zeros((3, 3), np.int64)
    for a in range(3):
      m[a, self.perm[a]] = -1 if self.flip[a] else 1
    return m

  @property
  def name(self) -> str:
    """Readable and unique, e.g. ``identity``, ``flip z,x``, ``flip y; rot90 k=1``.

    Read left to right as the order the operations apply: ``transpose`` (the original axes the
    view axes show), then ``flip`` (view axes reversed), then ``rot90`` in yx (``np.rot90``).
    """
    # M = R^k F P for every k (R = rot90 in yx); name the shortest decomposition, preferring
    # one without a transpose, then the smallest k.
    candidates = []
    for k in range(4):
      base = View.from_matrix(np.linalg.matrix_power(_ROT90_YX.T, k) @ self.matrix)  # R^-k M
      parts = []
      if base.perm != (0, 1, 2):
        parts.append("transpose " + ",".join(AXES[a] for a in base.perm))
      if any(base.flip):
        parts.append("flip " + ",".join(AXES[a] for a in range(3) if base.flip[a]))
      if k:
        parts.append(f"rot90 k={k}")
      candidates.append((len(parts), base.perm != (0, 1, 2), k, "; ".join(parts) or "identity"))
    return min(candidates)[-1]

  def spatial_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
    """Shape of the view of a ``(z, y, x)`` window."""
    return tuple(int(shape[a]) for a in self.perm)  # type: ignore[return-value]


IDENTITY = View()


def tta_views(
  tta_config: Mapping[str, Any] | None,
  window: Sequence[int],
  resolution: Sequence[float] | None,
) -> tuple[View, ...]:
  """The views a TTA config asks for, deduplicated, :data:`IDENTITY` first.

  Every combination of an axis permutation (only with ``permute_axes``: permutations that move
  axes only among axes of equal resolution), a subset of ``flip_axes`` and ``rot90`` in yx with
  ``k = 0..3`` (with ``rot90_yx``), composed in that order, deduplicated by matrix in a fixed
  order. Flips of z, y, x with rot90 give 16 views (z flip x the 8 symmetries of the yx square);
  flips alone give 8.

  Args:
    tta_config: mapping (dict or ConfigDict) with ``enabled``, ``flip_axes`` (subset of
      ``"z", "y", "x"``), ``rot90_yx`` and ``permute_axes``; missing keys are off / empty. Other
      keys (``ensemble``) are ignored. ``None`` or disabled gives ``(IDENTITY,)``.
    window: model input window ``(z, y, x)``.
    resolution: voxel size ``(z, y, x)``; needed only for ``permute_axes``.

  Returns:
    The views, a tuple of :class:`View`.

  Raises:
    ValueError: unknown axis names; ``rot90_yx`` with a window whose y and x differ;
      ``permute_axes`` without a resolution or with equal-resolution axes of different window
      size.
  """
  if tta_config is None or not tta_config.get("enabled", False):
    return (IDENTITY,)
  window = tuple(int(w) for w in window)
  if len(window) != 3:
    raise ValueError(f"TTA window must be (z, y, x), got {window}")
  flip_axes = tuple(tta_config.get("flip_axes", ()) or ())
  unknown = [a for a in flip_axes if a not in AXES]
  if unknown:
    raise ConfigError(f"infer.tta.flip_axes: unknown axis names {unknown}; use {AXES}")
  flip_idx = sorted({AXES.index(a) for a in flip_axes})
  rot90 = bool(tta_config.get("rot90_yx", False))
  if rot90 and window[1] != window[2]:
    raise ConfigError(
      f"infer.tta.rot90_yx needs a window with y == x, got infer.window (z, y, x) = {window}"
    )
  if rot90 and resolution is not None and not np.isclose(resolution[1], resolution[2]):
    raise ConfigError(
      f"infer.tta.rot90_yx turns y into x, but the volume's y and x resolutions differ "
      f"({tuple(resolution)} nm, z, y, x); switch it off for this volume"
    )

  perms = [(0, 1, 2)]
  if tta_config.get("permute_axes", False):
    if resolution is None:
      raise ConfigError("infer.tta.permute_axes needs the volume resolution (z, y, x)")
    res = tuple(float(r) for r in resolution)
    if len(res) != 3:
      raise ValueError(f"resolution must be (z, y, x), got {resolution}")
    for i, j in itertools.combinations(range(3), 2):
      if np.isclose(res[i], res[j]) and window[i] != window[j]:
        raise ConfigError(
          f"infer.tta.permute_axes: axes {AXES[i]} and {AXES[j]} share resolution {res[i]} but the "
          f"window {window} differs along them"
        )
    perms = [
      p
      for p in itertools.permutations(range(3))
      if all(np.isclose(res[p[a]], res[a]) for a in range(3))
    ]

  views: dict[bytes, View] = {}
  for perm in perms:
    p = View(perm).matrix  # type: ignore[arg-type]
    for n in range(len(flip_idx) + 1):
      for flipped in itertools.combinations(flip_idx, n):
        f = np.diag([-1 if a in flipped else 1 for a in range(3)])
        for k in range(4 if rot90 else 1):
          m = np.linalg.matrix_power(_ROT90_YX, k) @ f @ p
          views.setdefault(m.tobytes(), View.from_matrix(m))
  return tuple(views.values())


def transform_input(x, view: View):
  """Moves a batch of windows into view space.

  Args:
    x: ``[b, z, y, x, c]``, numpy or jax.
    view: the view.

  Returns:
    ``[b, z', y', x', c]`` with ``(z', y', x') = view.spatial_shape((z, y, x))``; numpy in, numpy
    out (a view of ``x`` where possible).
  """
  if x.ndim != 5:
    raise ValueError(f"expected [b, z, y, x, c], got shape {x.shape}")
  xp = array_namespace(x)
  if view.perm != (0, 1, 2):
    x = xp.transpose(x, (0, *(1 + a for a in view.perm), 4))
  flipped = tuple(1 + a for a in range(3) if view.flip[a])
  return xp.flip(x, flipped) if flipped else x


def _inverse_spatial(y, view: View):
  """Undoes :func:`transform_input` on ``[b, z', y', x', c]``: unflip, then unpermute."""
  xp = array_namespace(y)
  flipped = tuple(1 + a for a in range(3) if view.flip[a])
  if flipped:
    y = xp.flip(y, flipped)
  if view.perm != (0, 1, 2):
    inverse = np.argsort(view.perm)
    y = xp.transpose(y, (0, *(1 + int(a) for a in inverse), 4))
  return y


Move = tuple[int, Offset | None]


def channel_moves(
  view: View, offsets: Sequence[Sequence[int]], convention: str
) -> tuple[Move, ...]:
  """How to rebuild each original affinity channel from a view's output.

  For destination channel ``d`` (offset ``t_d``) find a view channel ``c`` with
  ``M^T t_c == t_d`` (taken as is) or, failing that, ``M^T t_c == -t_d`` (re-anchored by
  ``shift_volume`` with shift ``-t_d`` under ``'source'``, ``+t_d`` under ``'target'``). Where
  several channels match (repeated offsets), ``c == d`` is preferred, then the lowest ``c``.

  Args:
    view: the view.
    offsets: ``(dz, dy, dx)`` per channel (the model's output channels).
    convention: ``'source'`` or ``'target'``.

  Returns:
    One ``(c, shift)`` per destination channel; ``shift`` is ``None`` or a ``(dz, dy, dx)`` tuple
    with ``shift_volume`` semantics (``out[v] = in[v - shift]``).

  Raises:
    ValueError: naming the view and the offset, if some offset is reached by neither rule (the
      offsets are not closed under the view, e.g. x offsets without matching y ones under rot90).
  """
  offsets = normalize_offsets(offsets)
  sign = -1 if check_convention(convention) == "source" else 1
  m = view.matrix
  mapped = [tuple(int(v) for v in m.T @ np.asarray(t)) for t in offsets]

  def pick(candidates: list[int], d: int) -> int:
    return d if d in candidates else candidates[0]

  moves = []
  for d, t in enumerate(offsets):
    same = [c for c, s in enumerate(mapped) if s == t]
    if same:
      moves.append((pick(same, d), None))
      continue
    negated = tuple(-v for v in t)
    opposite = [c for c, s in enumerate(mapped) if s == negated]
    if not opposite:
      raise ValueError(
        f"TTA view '{view.name}': no channel maps to offset {t} (channel {d}) or its negation; "
        f"the offsets {offsets} are not closed under this view"
      )
    moves.append((pick(opposite, d), tuple(sign * v for v in t)))
  return tuple(moves)


def restore_output(y, view: View, moves: Sequence[Move]):
  """Brings a view's affinity output back to the original frame.

  Args:
    y: model output in view space, ``[b, z', y', x', C]``, numpy or jax.
    view: the view ``y`` was predicted in.
    moves: ``channel_moves(view, offsets, convention)`` (one per output channel).

  Returns:
    ``(out, valid)``: ``out`` ``[b, z, y, x, C']`` (``C' = len(moves)``, ``y``'s dtype), and
    ``valid`` bool ``[z, y, x, C']``, False on the faces a re-anchoring shift vacated (their value
    is 0 and must not enter the ensemble).
  """
  xp = array_namespace(y)
  if y.ndim != 5:
    raise ValueError(f"expected [b, z, y, x, C], got shape {y.shape}")
  restored = _inverse_spatial(y, view)
  spatial = restored.shape[1:4]
  channels, valid = [], []
  for c, shift in moves:
    channel = restored[..., c]
    if shift is None:
      channels.append(channel)
      valid.append(xp.ones(spatial, bool))
    else:
      moved, ok = shift_volume(channel, shift)
      channels.append(moved)
      valid.append(ok)
  return xp.stack(channels, axis=-1), xp.stack(valid, axis=-1)


def predict_with_tta(
  apply: Callable[[Any], Any],
  x,
  views: Sequence[View],
  offsets: Sequence[Sequence[int]],
  convention: str,
  ensemble: str,
  activation: Callable[[Any], Any] | None = None,
  *,
  unroll: bool = False,
):
  """Predicts ``x`` through every view and ensembles the restored outputs.

  Each view's output is cast to float32, passed through ``activation`` (before ensembling: the
  mean of probabilities is not the sigmoid of the mean logit), restored as
  :func:`restore_output` does and folded into a running mean / min / max over the views whose voxel is
  valid. A voxel no view covers validly (only possible without :data:`IDENTITY`) comes out 0.

  When every view keeps the window's shape (always true for :func:`tta_views`) the views run in a
  ``lax.scan`` with ``lax.switch`` picking the view, so ``apply`` is traced and compiled once,
  not once per view; ``unroll=True`` (or shape-changing views) runs a Python loop instead. Both
  compute the same thing (XLA may fuse them differently: last-bit differences).

  Args:
    apply: ``x' [b, z', y', x', cin] -> logits [b, z', y', x', C]`` (jittable).
    x: ``[b, z, y, x, cin]``, numpy or jax.
    views: the views (static), e.g. :func:`tta_views`.
    offsets: ``(dz, dy, dx)`` of each of the ``C`` model output channels (static).
    convention: ``'source'`` or ``'target'`` (static).
    ensemble: ``'mean'``, ``'min'`` or ``'max'`` (static).
    activation: applied to each view's output before ensembling; ``None`` = identity.
    unroll: run the views in a Python loop even when a scan is possible.

  Returns:
    ``[b, z, y, x, C]`` float32 jax array. With only :data:`IDENTITY` this is exactly
    ``activation(apply(x))`` in float32.
  """
  import jax.numpy as jnp  # Lazy: the module's view helpers stay usable without jax.

  views = tuple(views)
  if not views:
    raise ValueError("predict_with_tta needs at least one view")
  if ensemble not in ENSEMBLES:
    raise ValueError(f"TTA ensemble must be one of {ENSEMBLES}, got {ensemble!r}")
  offsets = normalize_offsets(offsets)
  all_moves = tuple(channel_moves(v, offsets, convention) for v in views)
  run = _model_runner(apply, activation, len(offsets))
  x = jnp.asarray(x)
  if x.ndim != 5:
    raise ValueError(f"expected x [b, z, y, x, cin], got shape {x.shape}")
  if views == (IDENTITY,):
    return run(x)

  spatial = tuple(x.shape[1:4])
  carry = _ensemble_start(x.shape[0], spatial, len(offsets), ensemble)
  same_shape = all(v.spatial_shape(spatial) == spatial for v in views)
  if unroll or not same_shape:
    for view, moves in zip(views, all_moves, strict=True):
      out, valid = restore_output(run(transform_input(x, view)), view, moves)
      carry = _fold(ensemble, carry, out, valid)
  else:
    carry = _scan_views(run, x, views, all_moves, ensemble, carry)

  acc, count = carry
  covered = count > 0
  if ensemble == "mean":
    acc = acc / jnp.maximum(count, 1.0)
  return jnp.where(covered, acc, 0.0)


def _model_runner(apply: Callable[[Any], Any], activation, channels: int):
  """``run(x') = activation(apply(x'))`` in float32, checking the model's output shape."""
  import jax.numpy as jnp

  act = activation if activation is not None else (lambda v: v)

  def run(xv):
    y = jnp.asarray(apply(xv))
    if y.ndim != 5 or y.shape[-1] != channels:
      raise ValueError(
        f"model output must be [b, z, y, x, {channels}] for {channels} offsets, got shape {y.shape}"
      )
    return act(y.astype(jnp.float32)).astype(jnp.float32)

  return run


def _ensemble_start(batch: int, spatial: tuple, channels: int, ensemble: str):
  """The empty ensemble ``(acc [b, z, y, x, C], count [z, y, x, C])``."""
  import jax.numpy as jnp

  out_shape = (batch, *spatial, channels)
  count0 = jnp.zeros((*spatial, channels), jnp.float32)
  if ensemble == "mean":
    acc0 = jnp.zeros(out_shape, jnp.float32)
  else:
    acc0 = jnp.full(out_shape, jnp.inf if ensemble == "min" else -jnp.inf, jnp.float32)
  return acc0, count0


def _fold(ensemble: str, carry, out, valid):
  """Folds one view's restored ``out`` into the ensemble where ``valid``."""
  import jax.numpy as jnp

  acc, count = carry
  if ensemble == "mean":
    acc = acc + jnp.where(valid, out, 0.0)
  elif ensemble == "min":
    acc = jnp.where(valid, jnp.minimum(acc, out), acc)
  else:
    acc = jnp.where(valid, jnp.maximum(acc, out), acc)
  return acc, count + valid


def _scan_views(run, x, views: tuple[View, ...], all_moves, ensemble: str, carry):
  """Folds every view into ``carry`` in one ``lax.scan``: ``apply`` is compiled once."""
  import jax
  import jax.numpy as jnp

  spatial = tuple(x.shape[1:4])
  channels = len(all_moves[0])
  # Only the flips / transposes differ per view (cheap branches of a switch). A re-anchored
  # channel d is always shifted by the same -t_d ('source') or +t_d ('target'), whichever view
  # asks for it, so the per-channel shifts are written once, outside the switch, and a per-view
  # flag picks shifted or not: the compiled code does not grow with views x channels.
  to_view = [functools.partial(transform_input, view=v) for v in views]
  from_view = [functools.partial(_inverse_spatial, view=v) for v in views]
  sources = jnp.asarray([[c for c, _ in m] for m in all_moves], jnp.int32)  # [V, C]
  flags = np.asarray([[s is not None for _, s in m] for m in all_moves])  # [V, C]
  # channel_moves gives channel d the same shift (sign * t_d) in every view that shifts it.
  shifts = [
    next((m[d][1] for m in all_moves if m[d][1] is not None), None) for d in range(channels)
  ]
  shift_valid = np.stack(
    [
      np.ones(spatial, bool) if s is None else shift_volume(np.ones(spatial, bool), s)[1]
      for s in shifts
    ],
    axis=-1,
  )  # [z, y, x, C]
  flags = jnp.asarray(flags)

  def body(carry, i):
    y = jax.lax.switch(i, from_view, run(jax.lax.switch(i, to_view, x)))
    y = jnp.take(y, sources[i], axis=-1, mode="clip")
    shifted = jnp.stack(
      [y[..., d] if s is None else shift_volume(y[..., d], s)[0] for d, s in enumerate(shifts)],
      axis=-1,
    )
    out = jnp.where(flags[i], shifted, y)
    valid = jnp.where(flags[i], shift_valid, True)
    return _fold(ensemble, carry, out, valid), None

  carry, _ = jax.lax.scan(body, carry, jnp.arange(len(views)))
  return carry
