"""Tests for jaxseg.inference.tta: views, input transforms, affinity-aware inverse, ensembles.

The key test runs a model that is equivariant by construction (it computes the affinities of the
label volume it is given) through all 16 views: the ensemble must equal the plain prediction
exactly, for both presets and every ensemble. The scalar-field inverse PyTC used until Aug 2026
fails the same test.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.data.affinity import AFF12, BANIS6, compute_affinities
from jaxseg.inference import tta

FLIPS_ROT = {"enabled": True, "flip_axes": ("z", "y", "x"), "rot90_yx": True}
FLIPS = {"enabled": True, "flip_axes": ("z", "y", "x"), "rot90_yx": False}
WINDOW = (8, 12, 12)
NO_FLIP = (False, False, False)


def matrices(views):
  return {v.matrix.tobytes() for v in views}


def numpy_views(x):
  """Every ``np.rot90(np.flip(x, flips), k)`` in yx of a ``[b, z, y, x, c]`` array."""
  out = []
  for n in range(4):
    for flips in itertools.combinations((1, 2, 3), n):
      flipped = np.flip(x, flips) if flips else x
      out.extend(np.rot90(flipped, k, axes=(2, 3)) for k in range(4))
  return out


def blocky_labels(rng, shape, num_ids=4):
  """Labels made of 2x2x2 blocks of ids 0..num_ids, plus noise voxels, not symmetric."""
  coarse = rng.integers(0, num_ids + 1, size=tuple(-(-n // 2) for n in shape))
  labels = np.repeat(np.repeat(np.repeat(coarse, 2, 0), 2, 1), 2, 2)[: shape[0], : shape[1]]
  labels = labels[..., : shape[2]].copy()
  noise = rng.random(shape) < 0.1
  labels[noise] = rng.integers(0, num_ids + 1, size=int(noise.sum()))
  return labels.astype(np.int32)


def label_input(rng, batch, shape):
  """``[b, z, y, x, 2]``: channel 0 holds integer label ids as float, channel 1 noise."""
  labels = np.stack([blocky_labels(rng, shape) for _ in range(batch)])
  noise = rng.standard_normal(labels.shape)
  return np.stack([labels.astype(np.float32), noise.astype(np.float32)], axis=-1)


def affinity_model(offsets, convention):
  """An equivariant model: logits ``2 aff - 1`` of the labels carried by input channel 0."""

  def apply(x):
    out = []
    for b in range(x.shape[0]):
      labels = jnp.asarray(x[b, ..., 0]).astype(jnp.int32)
      aff, _ = compute_affinities(labels, offsets, convention)
      out.append(jnp.moveaxis(aff, 0, -1))
    return 2.0 * jnp.stack(out) - 1.0

  return apply


# -- views -----------------------------------------------------------------------------------------


def test_view_counts_and_order():
  views = tta.tta_views(FLIPS_ROT, WINDOW, (30.0, 6.0, 6.0))
  assert len(views) == 16
  assert len(matrices(views)) == 16
  assert views[0] == tta.IDENTITY
  assert views == tta.tta_views(FLIPS_ROT, WINDOW, None)  # deterministic; no resolution needed
  assert len({v.name for v in views}) == 16
  assert views[0].name == "identity"

  flips = tta.tta_views(FLIPS, (8, 12, 10), None)
  assert len(flips) == 8
  assert {v.flip for v in flips} == set(itertools.product((False, True), repeat=3))
  assert all(v.perm == (0, 1, 2) for v in flips)

  assert tta.tta_views({"enabled": False, "flip_axes": ("w",)}, WINDOW, None) == (tta.IDENTITY,)
  assert tta.tta_views(None, WINDOW, None) == (tta.IDENTITY,)
  assert len(tta.tta_views({"enabled": True, "rot90_yx": True}, WINDOW, None)) == 4
  assert tta.tta_views({"enabled": True}, WINDOW, None) == (tta.IDENTITY,)
  assert len(tta.tta_views({"enabled": True, "flip_axes": "x"}, WINDOW, None)) == 2


def test_permute_axes():
  cube = (8, 8, 8)
  perms = {"enabled": True, "permute_axes": True}
  assert len(tta.tta_views(perms, cube, (4.0, 4.0, 4.0))) == 6
  anisotropic = tta.tta_views(perms, (4, 8, 8), (20.0, 9.0, 9.0))
  assert [v.perm for v in anisotropic] == [(0, 1, 2), (0, 2, 1)]
  assert anisotropic[1].name == "transpose z,x,y"
  everything = dict(FLIPS_ROT, permute_axes=True)
  assert len(tta.tta_views(everything, cube, (4.0, 4.0, 4.0))) == 48  # all signed permutations
  # Without permute_axes the same config leaves z alone.
  assert len(tta.tta_views(dict(everything, permute_axes=False), cube, (4.0, 4.0, 4.0))) == 16


def test_view_errors():
  with pytest.raises(ValueError, match="y == x"):
    tta.tta_views(FLIPS_ROT, (8, 12, 10), None)
  with pytest.raises(ValueError, match="unknown axis"):
    tta.tta_views({"enabled": True, "flip_axes": ("z", "w")}, WINDOW, None)
  with pytest.raises(ValueError, match="window"):
    tta.tta_views({"enabled": True, "permute_axes": True}, (8, 12, 10), (4.0, 6.0, 6.0))
  with pytest.raises(ValueError, match="resolution"):
    tta.tta_views({"enabled": True, "permute_axes": True}, WINDOW, None)
  with pytest.raises(ValueError):
    tta.View((0, 0, 1))
  with pytest.raises(ValueError):
    tta.View.from_matrix(np.eye(3) * 2)


def test_view_matrix_and_names():
  rot1 = tta.View((0, 2, 1), (False, True, False))
  np.testing.assert_array_equal(rot1.matrix, [[1, 0, 0], [0, 0, -1], [0, 1, 0]])
  assert rot1.name == "rot90 k=1"
  assert tta.View(flip=(True, False, True)).name == "flip z,x"
  assert tta.View((0, 2, 1), (False, False, True)).name == "rot90 k=3"
  for view in tta.tta_views(dict(FLIPS_ROT, permute_axes=True), (8, 8, 8), (1.0, 1.0, 1.0)):
    assert tta.View.from_matrix(view.matrix) == view


# -- input transform -------------------------------------------------------------------------------


def test_transform_input_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 4, 4, 2)).astype(np.float32)
  got = [tta.transform_input(x, v) for v in tta.tta_views(FLIPS_ROT, (3, 4, 4), None)]
  expected = numpy_views(x)
  assert {a.tobytes() for a in got} == {a.tobytes() for a in expected}
  assert len({a.tobytes() for a in got}) == 16
  # Explicit: np.rot90 k=1 in yx, and flips.
  np.testing.assert_array_equal(
    tta.transform_input(x, tta.View((0, 2, 1), (False, True, False))), np.rot90(x, 1, axes=(2, 3))
  )
  np.testing.assert_array_equal(
    tta.transform_input(x, tta.View(flip=(True, False, True))), np.flip(x, (1, 3))
  )
  # jax arrays give the same values.
  for view in tta.tta_views(FLIPS_ROT, (3, 4, 4), None):
    np.testing.assert_array_equal(
      np.asarray(tta.transform_input(jnp.asarray(x), view)), tta.transform_input(x, view)
    )


def test_transform_input_follows_matrix():
  """Voxel by voxel: the value at centred p lands at centred M p."""
  rng = np.random.default_rng(1)
  shape = (3, 4, 4)
  x = rng.standard_normal((1, *shape, 1))
  centre = (np.asarray(shape) - 1) / 2
  for view in tta.tta_views(FLIPS_ROT, shape, None):
    xv = tta.transform_input(x, view)
    for p in itertools.product(*(range(n) for n in shape)):
      q = view.matrix @ (np.asarray(p) - centre) + centre
      assert xv[(0, *np.rint(q).astype(int), 0)] == x[(0, *p, 0)]


# -- channel moves ---------------------------------------------------------------------------------


def test_channel_moves_rot90_aff12():
  rot1 = tta.View((0, 2, 1), (False, True, False))  # view y = -x, view x = +y
  moves = tta.channel_moves(rot1, AFF12.offsets, AFF12.convention)
  # Original y channels come from view x channels as they are; original x channels from view y
  # channels, which see -x edges: target convention re-anchors them by +t.
  assert moves == (
    (1, (0, 0, 1)),
    (0, None),
    (2, None),
    (3, None),
    (4, None),
    (5, None),
    (9, (0, 0, 3)),
    (10, (0, 0, 9)),
    (11, (0, 0, 27)),
    (6, None),
    (7, None),
    (8, None),
  )
  banis = tta.channel_moves(rot1, BANIS6.offsets, BANIS6.convention)
  assert banis == ((1, (0, 0, -1)), (0, None), (2, None), (4, (0, 0, -10)), (3, None), (5, None))


def test_channel_moves_flip():
  flip_x = tta.View(flip=(False, False, True))
  assert tta.channel_moves(flip_x, BANIS6.offsets, "source") == (
    (0, (0, 0, -1)),
    (1, None),
    (2, None),
    (3, (0, 0, -10)),
    (4, None),
    (5, None),
  )
  moves = tta.channel_moves(flip_x, AFF12.offsets, "target")
  assert [m[1] for m in moves] == [
    (0, 0, 1),
    None,
    None,
    None,
    None,
    None,
    (0, 0, 3),
    (0, 0, 9),
    (0, 0, 27),
    None,
    None,
    None,
  ]
  assert [m[0] for m in moves] == list(range(12))
  # A negative offset configured next to its positive partner is matched as is, no shift.
  pair = ((0, 0, 1), (0, 0, -1))
  assert tta.channel_moves(flip_x, pair, "source") == ((1, None), (0, None))
  with pytest.raises(ValueError, match="rot90 k=1"):
    tta.channel_moves(tta.View((0, 2, 1), (False, True, False)), ((0, 0, 1),), "source")
  with pytest.raises(ValueError):
    tta.channel_moves(flip_x, BANIS6.offsets, "center")


# -- restore ---------------------------------------------------------------------------------------


def test_restore_inverts_transform_on_scalar_fields():
  rng = np.random.default_rng(2)
  y = rng.standard_normal((2, 4, 4, 4, 3)).astype(np.float32)
  zero = ((0, 0, 0),) * 3  # every offset maps to itself: a plain per-channel field
  views = tta.tta_views(dict(FLIPS_ROT, permute_axes=True), (4, 4, 4), (1.0, 1.0, 1.0))
  for view in views:
    moves = tta.channel_moves(view, zero, "source")
    assert moves == ((0, None), (1, None), (2, None))
    out, valid = tta.restore_output(tta.transform_input(y, view), view, moves)
    np.testing.assert_array_equal(out, y)
    assert valid.shape == (4, 4, 4, 3) and valid.all()
    out_j, valid_j = tta.restore_output(tta.transform_input(jnp.asarray(y), view), view, moves)
    np.testing.assert_array_equal(np.asarray(out_j), y)
    assert np.asarray(valid_j).all()


def test_restore_shift_by_hand():
  rng = np.random.default_rng(3)
  yv = rng.standard_normal((1, 3, 4, 5, 2)).astype(np.float32)
  flip_x = tta.View(flip=(False, False, True))
  offsets = ((0, 0, 1), (0, 1, 0))
  for convention, src, dst in (("source", slice(1, 5), slice(0, 4)), ("target", 0, 0)):
    moves = tta.channel_moves(flip_x, offsets, convention)
    out, valid = tta.restore_output(yv, flip_x, moves)
    back = yv[:, :, :, ::-1]
    np.testing.assert_array_equal(out[..., 1], back[..., 1])
    assert valid[..., 1].all()
    expected = np.zeros_like(back[..., 0])
    if convention == "source":  # out[u] = B[u + 1]: the last x face is vacated
      expected[..., dst] = back[..., src, 0]
      invalid_x = 4
    else:  # out[u] = B[u - 1]: the first x face is vacated
      expected[..., 1:] = back[..., :4, 0]
      invalid_x = 0
    np.testing.assert_array_equal(out[..., 0], expected)
    assert not valid[:, :, invalid_x, 0].any()
    assert valid[..., 0].sum() == 3 * 4 * 4


# -- prediction ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [AFF12, BANIS6], ids=lambda s: s.name)
def test_equivariant_model_is_reproduced_exactly(spec):
  rng = np.random.default_rng(4)
  x = label_input(rng, 1, WINDOW)
  apply = affinity_model(spec.offsets, spec.convention)
  plain = np.asarray(apply(jnp.asarray(x)))
  # The test has teeth: short-range channels mix positive and negative edges.
  assert (plain[..., :3] == 1).any() and (plain[..., :3] == -1).any()
  views = tta.tta_views(FLIPS_ROT, WINDOW, None)

  @jax.jit  # one program for the three ensembles: compiles faster than three
  def predict_all(x):
    return [
      tta.predict_with_tta(apply, x, views, spec.offsets, spec.convention, ensemble)
      for ensemble in tta.ENSEMBLES
    ]

  for ensemble, got in zip(tta.ENSEMBLES, predict_all(x), strict=True):
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), plain, err_msg=f"{spec.name} {ensemble}")
  if spec is AFF12:  # offsets of 27 exceed the 12-voxel window: never an edge, still exact
    assert (plain[..., [8, 11]] == -1).all()


def test_scan_matches_loop():
  """A model whose views disagree: the scan and the Python loop still give the same numbers."""
  rng = np.random.default_rng(9)
  x = rng.standard_normal((1, 4, 6, 6, 1)).astype(np.float32)
  weights = jnp.asarray(rng.standard_normal(6), jnp.float32)

  def apply(xv):
    z = jnp.arange(xv.shape[1], dtype=jnp.float32)[None, :, None, None, None]
    y = jnp.arange(xv.shape[2], dtype=jnp.float32)[None, None, :, None, None]
    return xv * weights + 0.3 * z - 0.2 * y

  views = tta.tta_views(FLIPS_ROT, (4, 6, 6), None)
  results = []
  for unroll in (False, True):
    predict = functools.partial(
      tta.predict_with_tta,
      apply,
      views=views,
      offsets=BANIS6.offsets,
      convention=BANIS6.convention,
      ensemble="mean",
      activation=jnp.tanh,
      unroll=unroll,
    )
    results.append(np.asarray(jax.jit(predict)(x)))
  # Same values; XLA may fuse the two programs differently (last-bit differences).
  np.testing.assert_allclose(results[0], results[1], rtol=1e-6, atol=1e-7)
  assert np.abs(results[0] - np.tanh(np.asarray(apply(x)))).max() > 0.1  # the views disagree


def test_shape_changing_views_use_the_loop():
  """A yx transpose of a y != x window changes the shape: the Python loop runs it, still exact."""
  rng = np.random.default_rng(5)
  x = label_input(rng, 1, (6, 12, 10))
  offsets = ((0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 3, 0), (0, 0, 3))
  apply = affinity_model(offsets, "target")
  views = (tta.IDENTITY, tta.View((0, 2, 1)), tta.View((0, 2, 1), (True, False, True)))
  predict = functools.partial(
    tta.predict_with_tta, apply, views=views, offsets=offsets, convention="target", ensemble="min"
  )
  got = jax.jit(predict)(x)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(apply(jnp.asarray(x))))


def test_scalar_field_inverse_fails():
  """PyTC's pre-Aug-2026 inverse (spatial only) does not reproduce the equivariant model."""
  rng = np.random.default_rng(4)
  x = label_input(rng, 1, WINDOW)
  for spec in (AFF12, BANIS6):
    apply = affinity_model(spec.offsets, spec.convention)
    plain = np.asarray(apply(jnp.asarray(x)))
    naive = tuple((c, None) for c in range(spec.num_channels))
    total = np.zeros_like(plain)
    views = tta.tta_views(FLIPS_ROT, WINDOW, None)
    for view in views:
      out, _ = tta.restore_output(np.asarray(apply(tta.transform_input(x, view))), view, naive)
      total += out
    mean = total / len(views)
    assert not np.array_equal(mean, plain)
    assert np.abs(mean[..., 0] - plain[..., 0]).max() > 0.5  # x edges swapped with y, misplaced


def test_runs_under_jit():
  rng = np.random.default_rng(6)
  x = label_input(rng, 2, WINDOW)
  views = tta.tta_views(FLIPS, WINDOW, None)
  apply = affinity_model(BANIS6.offsets, BANIS6.convention)
  predict = jax.jit(
    functools.partial(
      tta.predict_with_tta,
      apply,
      views=views,
      offsets=BANIS6.offsets,
      convention=BANIS6.convention,
      ensemble="max",
      activation=jax.nn.sigmoid,
    )
  )
  got = np.asarray(predict(jnp.asarray(x)))
  np.testing.assert_array_equal(got, np.asarray(jax.nn.sigmoid(apply(jnp.asarray(x)))))


def ramp_model(x):
  """Not equivariant: adds the view-space z index, so the views disagree."""
  z = jnp.arange(x.shape[1], dtype=jnp.float32)[None, :, None, None, None]
  return x[..., :1] + z


def test_activation_before_ensembling():
  rng = np.random.default_rng(7)
  x = rng.standard_normal((1, 5, 3, 3, 1)).astype(np.float32)
  views = tta.tta_views({"enabled": True, "flip_axes": ("z",)}, (5, 3, 3), None)
  assert len(views) == 2
  offsets = ((0, 0, 0),)
  got = tta.predict_with_tta(ramp_model, x, views, offsets, "source", "mean", jax.nn.sigmoid)

  def sigmoid(v):
    return 1 / (1 + np.exp(-v))

  z = np.arange(5, dtype=np.float64)[None, :, None, None, None]
  # Identity view sees ramp z; the flipped view, restored, sees 4 - z.
  expected = (sigmoid(x + z) + sigmoid(x + 4 - z)) / 2
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)
  after = sigmoid(x + 2.0)  # the sigmoid of the mean logit: different
  assert np.abs(np.asarray(got) - after).max() > 1e-3
  for ensemble, reduce in (("min", np.minimum), ("max", np.maximum)):
    got = tta.predict_with_tta(ramp_model, x, views, offsets, "source", ensemble, jax.nn.sigmoid)
    np.testing.assert_allclose(np.asarray(got), reduce(sigmoid(x + z), sigmoid(x + 4 - z)), 1e-6)


def test_single_view_and_uncovered_voxels():
  rng = np.random.default_rng(8)
  x = rng.standard_normal((2, 3, 4, 4, 1)).astype(np.float32)
  one = tta.predict_with_tta(ramp_model, x, (tta.IDENTITY,), ((0, 0, 0),), "target", "min")
  np.testing.assert_array_equal(np.asarray(one), np.asarray(ramp_model(jnp.asarray(x))))
  # A lone flipped view leaves the vacated face uncovered: it comes out 0, not inf.
  flip_x = tta.View(flip=(False, False, True))
  for ensemble in tta.ENSEMBLES:
    got = np.asarray(
      tta.predict_with_tta(ramp_model, x, (flip_x,), ((0, 0, 1),), "source", ensemble)
    )
    assert np.isfinite(got).all()
    assert (got[:, :, :, 3] == 0).all()
    np.testing.assert_allclose(got[:, :, :, :3], np.asarray(ramp_model(x))[:, :, :, 1:])


def test_predict_errors():
  x = np.zeros((1, 2, 2, 2, 1), np.float32)
  with pytest.raises(ValueError, match="ensemble"):
    tta.predict_with_tta(ramp_model, x, (tta.IDENTITY,), ((0, 0, 0),), "source", "median")
  with pytest.raises(ValueError, match="2 offsets"):
    tta.predict_with_tta(ramp_model, x, (tta.IDENTITY,), ((0, 0, 1), (0, 1, 0)), "source", "mean")
  with pytest.raises(ValueError, match="at least one view"):
    tta.predict_with_tta(ramp_model, x, (), ((0, 0, 0),), "source", "mean")


def test_named_view_sets():
  """``infer.tta.views``: "xy8" is PyTC's SNEMI3D "8x" (the yx square's symmetries, no z flip),
  the SNEMI default; "zyx16" adds the z flips; "custom" keeps the three keys."""
  import os

  from jaxseg.common.config_util import load_config
  from jaxseg.common.errors import ConfigError
  from jaxseg.inference.settings import inference_settings

  snemi = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                       "snemi.py")  # fmt: skip
  res = (30.0, 6.0, 6.0)

  def views(**overrides):
    config = load_config(snemi, {"infer.tta.enabled": True, **overrides})
    settings = inference_settings(config)
    return tta.tta_views(settings.tta, settings.window, res)

  eight = views()
  assert len(eight) == 8 and all(not v.flip[0] and v.perm[0] == 0 for v in eight)  # z untouched
  sixteen = views(**{"infer.tta.views": "zyx16"})
  assert len(sixteen) == 16 and set(eight) < set(sixteen)
  assert views(**{"infer.tta.views": "custom"}) == sixteen  # snemi's own keys: z, y, x + rot90
  flips = views(**{"infer.tta.views": "custom", "infer.tta.rot90_yx": False})
  assert len(flips) == 8 and set(flips) != set(eight)
  with pytest.raises(ConfigError, match=r"infer\.tta\.views must be one of"):
    views(**{"infer.tta.views": "x8"})
