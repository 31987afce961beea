"""Tests for jaxseg.data.augment (with augment_ops and augment_sections) against numpy / scipy
references and hand-built cases.

Tiny crops; each random transform is jitted once (vmapped over many keys) and the same outputs
serve the probability, label, range and determinism checks.
"""

import functools
import itertools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import scipy.special

from jaxseg.common import config_util
from jaxseg.data import augment as A
from jaxseg.data import augment_ops, augment_sections
from jaxseg.data.affinity import AFF12, BANIS6, compute_affinities, shift_volume

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EM = config_util.load_config(str(CONFIGS / "snemi.py")).data.aug  # aug_em_neuron
BANIS = config_util.load_config(str(CONFIGS / "nisb_base.py")).data.aug  # aug_banis
NUM_KEYS = 400  # probability checks allow about 4 standard deviations of a binomial(400, p)
SHAPE = (6, 10, 10)  # crop of the per-op probability runs (yx square: every rot90 allowed)


def blob_labels(rng, shape, num_ids=5, block=2):
  """Blocky labels with background, unlabeled (-1) and ids, so interiors and boundaries exist."""
  coarse = rng.integers(-1, num_ids + 1, size=[-(-n // block) for n in shape])
  fine = coarse
  for axis in range(3):
    fine = fine.repeat(block, axis)
  return fine[: shape[0], : shape[1], : shape[2]].astype(np.int32)


def coordinate_image(shape):
  """[z, y, x, 3] image whose channel a holds the voxel's coordinate along axis a."""
  return np.moveaxis(np.indices(shape), 0, -1).astype(np.float32)


@functools.cache
def batch(shape=SHAPE, channels=1, seed=0):
  """NUM_KEYS keys, random images in [0, 1] and blob labels (the same sample for every key)."""
  rng = np.random.default_rng(seed)
  image = rng.random((*shape, channels), dtype=np.float32)
  labels = blob_labels(rng, shape)
  keys = jax.random.split(jax.random.key(seed), NUM_KEYS)
  return keys, image, labels


def run_many(fn, image, labels, keys):
  """fn over every key on the same sample: vmapped and jitted once."""
  many = jax.jit(jax.vmap(fn, in_axes=(0, None, None)))
  out_image, out_labels = many(keys, jnp.asarray(image), jnp.asarray(labels))
  return np.asarray(out_image), np.asarray(out_labels)


# -- index ops: flip, rot90, permutations ---------------------------------------------------------


def test_allowed_choices_keep_the_shape():
  assert A.allowed_permutations((42, 74, 74)) == ((0, 1, 2), (0, 2, 1))
  assert len(A.allowed_permutations((138, 138, 138))) == 6
  assert A.allowed_permutations((4, 5, 6)) == ((0, 1, 2),)
  assert A.allowed_rot90((16, 224, 224), (1, 2), (1, 2, 3)) == (1, 2, 3)
  assert A.allowed_rot90((16, 224, 200), (1, 2), (1, 2, 3)) == (2,)
  assert A.allowed_rot90((42, 74, 74), (0, 1), range(4)) == (0, 2)


def test_index_ops_match_numpy_exactly():
  rng = np.random.default_rng(1)
  shape = (4, 6, 6)
  image = rng.random((*shape, 2), dtype=np.float32)
  labels = blob_labels(rng, shape)
  key = jax.random.key(0)
  for axes in itertools.combinations(range(3), 2):
    for k in A.allowed_rot90(shape, axes, range(4)):
      out_image, out_labels = A.rot90(key, image, labels, axes=axes, p=1.0, ks=(k,))
      np.testing.assert_array_equal(out_labels, np.rot90(labels, k, axes))
      np.testing.assert_array_equal(out_image, np.rot90(image, k, axes))
  for flags in itertools.product((0.0, 1.0), repeat=3):
    out_image, out_labels = A.flip(key, image, labels, p=flags)
    flipped = [a for a in range(3) if flags[a]]
    np.testing.assert_array_equal(out_labels, np.flip(labels, flipped))
    np.testing.assert_array_equal(out_image, np.flip(image, flipped))
  # Only y <-> x keeps (4, 6, 6): the permutation is the identity or that swap.
  seen = set()
  for seed in range(12):
    out_image, out_labels = A.permute_axes(jax.random.key(seed), image, labels)
    same = np.array_equal(out_labels, labels) and np.array_equal(out_image, image)
    swapped = np.array_equal(out_labels, labels.transpose(0, 2, 1)) and np.array_equal(
      out_image, image.transpose(0, 2, 1, 3)
    )
    assert same or swapped
    seen.add(swapped)
  assert seen == {True, False}


def test_composed_axis_maps_equal_sequential_gathers():
  rng = np.random.default_rng(2)
  shape = (5, 5, 5)
  image = jnp.asarray(rng.random((*shape, 1), dtype=np.float32))
  labels = jnp.asarray(blob_labels(rng, shape))
  for seed in range(6):
    u = augment_ops._Uniforms(jax.random.uniform(jax.random.key(seed), (7,)))
    maps = [
      augment_ops._permute_map(u, shape, 1.0),
      augment_ops._rot90_map(u, shape, (0, 2), 1.0, range(4)),
      augment_ops._flip_map(u, 0.5),
    ]
    sequential = (image, labels)
    composed = augment_ops._identity_map()
    for m in maps:
      sequential = A.apply_axis_map(*sequential, m)
      composed = augment_ops._compose(composed, m)
    once = A.apply_axis_map(image, labels, composed)
    np.testing.assert_array_equal(once[0], sequential[0])
    np.testing.assert_array_equal(once[1], sequential[1])


# -- resampling -----------------------------------------------------------------------------------

WARP_SHAPE = (6, 6, 6)
warp = jax.jit(A.warp)  # one compile for every warp check (same shapes)
gaussian_filter = jax.jit(A.gaussian_filter_zero_padded)  # sigma traced: one compile


def test_warp_matches_scipy_reflect():
  rng = np.random.default_rng(3)
  image = rng.random((*WARP_SHAPE, 2), dtype=np.float32)
  labels = blob_labels(rng, WARP_SHAPE, block=1)
  # Positions inside and up to two crops outside, where reflection folds them back.
  coords = rng.uniform(-2.0, 2.0, (3, *WARP_SHAPE)) * np.asarray(WARP_SHAPE)[:, None, None, None]
  coords = coords.astype(np.float32)
  out_image, out_labels = warp(image, labels, coords)
  for c in range(2):
    want = scipy.ndimage.map_coordinates(image[..., c], coords, order=1, mode="reflect")
    np.testing.assert_allclose(out_image[..., c], want, atol=1e-5)
  want = scipy.ndimage.map_coordinates(labels, coords, order=0, mode="reflect")
  np.testing.assert_array_equal(out_labels, want)
  # Integer positions read voxels exactly.
  identity = warp(image, labels, np.indices(WARP_SHAPE).astype(np.float32))
  np.testing.assert_array_equal(identity[0], image)
  np.testing.assert_array_equal(identity[1], labels)


def test_gaussian_filter_matches_erf_kernel_reference():
  rng = np.random.default_rng(4)
  volume = rng.uniform(-1, 1, (3, 16, 48, 48)).astype(np.float32)
  for sigma in (0.8, 2.3, 4.0):
    tail = int(max(sigma * 3.0, 0.5) + 0.5)
    taps = np.arange(-tail, tail + 1)
    t = 1 / (math.sqrt(2) * sigma)
    kernel = 0.5 * (scipy.special.erf(t * (taps + 0.5)) - scipy.special.erf(t * (taps - 0.5)))
    want = volume.astype(np.float64)
    for axis in (1, 2, 3):
      want = scipy.ndimage.correlate1d(want, kernel, axis=axis, mode="constant", cval=0.0)
    got = gaussian_filter(volume, np.float32(sigma))
    np.testing.assert_allclose(got, want, atol=1e-5)
  # The recipe's field, U(-1, 1) smoothed with sigma 4 and scaled by the largest magnitude 16,
  # moves voxels by a small fraction of a voxel (the claim in elastic's docstring).
  displacement = 16.0 * np.asarray(gaussian_filter(volume, np.float32(4.0)))
  assert 0.05 < displacement.std() < 0.25 and np.abs(displacement).max() < 1.0


def test_affine_matrix_follows_monai_axes():
  zero3, zero6, one3 = np.zeros(3), np.zeros(6), np.ones(3)
  np.testing.assert_allclose(A.affine_matrix(zero3, one3, zero6), np.eye(3), atol=1e-7)
  # Shear s0 (MONAI row x, column y) reads x from x + s0 * y; in (z, y, x): row 2, column 1.
  shear = np.array([0.3, 0, 0, 0, 0, 0])
  want = np.eye(3)
  want[2, 1] = 0.3
  np.testing.assert_allclose(A.affine_matrix(zero3, one3, shear), want, atol=1e-7)
  # Scale 2 on MONAI dim 0 (x) samples x twice as far from the centre.
  np.testing.assert_allclose(A.affine_matrix(zero3, [2.0, 1, 1], zero6), np.diag([1, 1, 2.0]))
  # A quarter turn about MONAI dim 2 (z) is np.rot90(k=1) in the (y, x) plane, about dim 0 (x)
  # np.rot90(k=1) in (z, y); about dim 1 (y) it is k=3 in (z, x) (MONAI's dim-1 matrix carries
  # +sin above the diagonal, the others below).
  rng = np.random.default_rng(5)
  image = rng.random((*WARP_SHAPE, 2), dtype=np.float32)
  labels = blob_labels(rng, WARP_SHAPE, block=1)
  quarter = math.pi / 2
  for angles, k, axes in (
    ((0, 0, quarter), 1, (1, 2)),
    ((quarter, 0, 0), 1, (0, 1)),
    ((0, quarter, 0), 3, (0, 2)),
  ):
    coords = A.affine_coords(A.affine_matrix(np.asarray(angles), one3, zero6), WARP_SHAPE)
    out_image, out_labels = warp(image, labels, coords)
    np.testing.assert_array_equal(out_labels, np.rot90(labels, k, axes))
    np.testing.assert_allclose(out_image, np.rot90(image, k, axes), atol=1e-5)


def check_resampled(fn, shape, num_keys, p, seed=6):
  """A one-hot image of blob labels through ``fn`` over ``num_keys`` keys.

  Checks that labels match the image wherever interpolation is pure, that the nearest label
  always has trilinear weight, that no new ids appear and -1 survives, and that ``fn`` changed
  the sample with probability ``p``. Returns the outputs.
  """
  rng = np.random.default_rng(seed)
  num_ids = 4
  labels = blob_labels(rng, shape, num_ids=num_ids, block=3)
  ids = np.arange(-1, num_ids + 1)
  image = (labels[..., None] == ids).astype(np.float32)  # channel c <-> id ids[c]
  keys = jax.random.split(jax.random.key(seed), num_keys)
  out_image, out_labels = run_many(fn, image, labels, keys)
  assert out_image.shape == (num_keys, *image.shape) and out_image.dtype == np.float32
  assert out_labels.dtype == np.int32
  assert set(np.unique(out_labels)) <= set(ids) and np.all((out_labels == -1).any((1, 2, 3)))
  pure = out_image.max(-1) > 1 - 1e-5  # all 8 trilinear corners carry one id
  assert pure.mean() > 0.3
  np.testing.assert_array_equal(ids[out_image.argmax(-1)][pure], out_labels[pure])
  # Everywhere, the nearest corner's id carries at least its own trilinear weight (>= 1/8).
  weight = np.take_along_axis(out_image, np.searchsorted(ids, out_labels)[..., None], -1)
  assert weight.min() >= 0.125 - 1e-5
  np.testing.assert_allclose(out_image.sum(-1), 1.0, atol=1e-5)  # channels move together
  assert out_image.min() >= 0 and out_image.max() <= 1 + 1e-6
  assert abs(fraction(changed(out_image, image)) - p) < 0.1
  return out_image, out_labels


def test_affine_keeps_image_label_alignment():
  fn = functools.partial(
    A.affine,
    p=BANIS.affine_p,
    rotation=BANIS.affine_rotation,
    scale=BANIS.affine_scale,
    shear=BANIS.affine_shear,
  )
  check_resampled(fn, (10, 10, 10), NUM_KEYS, p=0.5)


def test_elastic_keeps_image_label_alignment():
  recipe = functools.partial(
    A.elastic, p=EM.elastic_p, sigma=EM.elastic_sigma, magnitude=EM.elastic_magnitude
  )
  check_resampled(recipe, (6, 12, 12), NUM_KEYS, p=0.7)
  # PyTC's magnitudes move voxels by a fraction of a voxel; 100x that deforms for real.
  strong = functools.partial(A.elastic, p=1.0, sigma=(2.0, 3.0), magnitude=(800.0, 1600.0))
  out_image, _ = check_resampled(strong, (8, 16, 16), 8, p=1.0)
  assert (out_image.max(-1) < 1 - 1e-3).mean() > 0.05  # it really mixed ids


# -- affinity targets after geometric ops ---------------------------------------------------------


def expected_after(affinity, transform, offsets, convention, source_channel, moved):
  """Affinities of transformed labels predicted from the original affinities.

  Channel c takes transform(affinity[source_channel[c]]); if the transform reversed the edge
  direction (``moved[c]``), the edge is stored one offset further (source: -o, target: +o).
  """
  sign = -1 if convention == "source" else 1
  result, valid = [], []
  for c, offset in enumerate(offsets):
    turned = transform(affinity[source_channel[c]])
    if moved[c]:
      turned, ok = shift_volume(turned, tuple(sign * d for d in offset))
    else:
      ok = np.ones(turned.shape, bool)
    result.append(turned)
    valid.append(ok)
  return np.stack(result), np.stack(valid)


@pytest.mark.parametrize("spec", [AFF12, BANIS6], ids=lambda s: s.name)
def test_flip_then_target_is_flipped_target(spec):
  rng = np.random.default_rng(7)
  labels = blob_labels(rng, (6, 12, 12), block=2)
  image = labels[..., None].astype(np.float32)
  affinity, mask = compute_affinities(labels, spec.offsets, spec.convention)
  for axis in range(3):
    p = tuple(float(a == axis) for a in range(3))
    _, flipped = A.flip(jax.random.key(0), image, labels, p=p)
    got_affinity, got_mask = compute_affinities(np.asarray(flipped), spec.offsets, spec.convention)
    moved = [o[axis] != 0 for o in spec.offsets]
    channels = range(len(spec.offsets))
    for got, original in ((got_affinity, affinity), (got_mask, mask)):
      want, valid = expected_after(
        original, lambda v, a=axis: np.flip(v, a), spec.offsets, spec.convention, channels, moved
      )
      np.testing.assert_array_equal(got, np.where(valid, want, 0))
    # The edges the shift vacated are exactly the ones with no partner: masked out.
    assert np.all(got_mask[~valid] == 0)


@pytest.mark.parametrize("spec", [AFF12, BANIS6], ids=lambda s: s.name)
def test_rot90_then_target_swaps_x_and_y_channels(spec):
  rng = np.random.default_rng(8)
  labels = blob_labels(rng, (5, 12, 12), block=2)
  image = labels[..., None].astype(np.float32)
  affinity, mask = compute_affinities(labels, spec.offsets, spec.convention)
  _, turned = A.rot90(jax.random.key(0), image, labels, p=1.0, ks=(1,))
  got_affinity, got_mask = compute_affinities(np.asarray(turned), spec.offsets, spec.convention)
  # np.rot90(k=1, axes=(y, x)): an x edge becomes a y edge (same direction) and a y edge becomes
  # an x edge pointing the other way, so it is re-stored one offset further.
  source, moved = [], []
  for dz, dy, dx in spec.offsets:
    source.append(spec.channel_index((dz, dx, dy)))
    moved.append(dy != 0)
  for got, original in ((got_affinity, affinity), (got_mask, mask)):
    want, valid = expected_after(
      original, lambda v: np.rot90(v, 1, (1, 2)), spec.offsets, spec.convention, source, moved
    )
    np.testing.assert_array_equal(got, np.where(valid, want, 0))


# -- every random op: probability, labels, range, determinism ------------------------------------


def fraction(flags):
  return float(np.mean(flags))


def changed(out_image, image):
  return np.abs(out_image - image[None]).reshape(len(out_image), -1).max(1) > 0


# (name, function with recipe settings, probability it changes the image, stays in [0, 1])
IMAGE_OPS = [
  ("noise", functools.partial(A.gaussian_noise, p=EM.noise_p, std=EM.noise_std), 0.3, False),
  ("shift", functools.partial(A.intensity_shift, p=EM.intensity_shift_p, shift=0.2), 0.7, False),
  ("gamma", functools.partial(A.gamma_contrast, p=EM.gamma_p, gamma=EM.gamma), 0.7, True),
  (
    "scale_shift",
    functools.partial(
      A.intensity_scale_shift, p=BANIS.intensity_p, mul=BANIS.intensity_mul, add=BANIS.intensity_add
    ),
    0.5,
    False,
  ),
  ("defect", functools.partial(A.random_defect, defects=EM.defects), None, True),
]


@pytest.mark.parametrize(
  ("name", "fn", "p", "in_unit_range"), IMAGE_OPS, ids=[o[0] for o in IMAGE_OPS]
)
def test_image_only_op(name, fn, p, in_unit_range):
  keys, image, labels = batch()
  out_image, out_labels = run_many(fn, image, labels, keys)
  assert out_image.shape == (NUM_KEYS, *image.shape) and out_image.dtype == np.float32
  np.testing.assert_array_equal(out_labels, np.broadcast_to(labels, out_labels.shape))
  assert np.all(np.isfinite(out_image))
  if in_unit_range:
    assert out_image.min() >= 0.0 and out_image.max() <= 1.0
  if p is not None:
    assert abs(fraction(changed(out_image, image)) - p) < 0.1, name
  # Same key, same result; in a smaller batch too (XLA may sum in another order there).
  again, _ = run_many(fn, image, labels, keys[:3])
  np.testing.assert_allclose(again, out_image[:3], atol=1e-6)


def test_geometric_op_probabilities():
  keys, _, labels = batch()
  image = coordinate_image(SHAPE)
  # Flip: channel a at voxel 0 reads n_a - 1 exactly when axis a flipped.
  out_image, out_labels = run_many(functools.partial(A.flip, p=EM.flip_p), image, labels, keys)
  flipped = out_image[:, 0, 0, 0, :] == np.asarray(SHAPE) - 1
  assert np.all(np.abs(flipped.mean(0) - 0.5) < 0.1)
  assert set(np.unique(out_labels)) == set(np.unique(labels))
  # rot90 in yx: fires half the time, k uniform in {1, 2, 3} when it does.
  out_image, _ = run_many(functools.partial(A.rot90, p=EM.rot90_yx_p), image, labels, keys)
  corner = out_image[:, 0, 0, 0, 1:]  # (y, x) read at output (y, x) = (0, 0)
  n = SHAPE[1] - 1
  k_of = {(0, 0): 0, (0, n): 1, (n, n): 2, (n, 0): 3}
  ks = np.array([k_of[tuple(c)] for c in corner.astype(int).tolist()])
  assert abs(fraction(ks > 0) - 0.5) < 0.1
  assert np.all(np.abs(np.bincount(ks[ks > 0], minlength=4)[1:] / np.sum(ks > 0) - 1 / 3) < 0.12)
  # Permutations of a cube: all 6, uniform, identity included.
  cube = (5, 5, 5)
  out_image, _ = run_many(
    A.permute_axes, coordinate_image(cube), blob_labels(np.random.default_rng(0), cube), keys
  )
  # Moving along output axis k changes exactly the input coordinate of axis perm[k].
  perms = [
    tuple(
      int(np.argmax(out_image[i][tuple(np.eye(3, dtype=int)[k])] - out_image[i, 0, 0, 0]))
      for k in range(3)
    )
    for i in range(NUM_KEYS)
  ]
  counts = {p: perms.count(p) / NUM_KEYS for p in itertools.permutations(range(3))}
  assert all(abs(v - 1 / 6) < 0.07 for v in counts.values()), counts


def check_image_only(out_image, out_labels, image, labels):
  assert out_image.shape == (len(out_image), *image.shape) and out_image.dtype == np.float32
  np.testing.assert_array_equal(out_labels, np.broadcast_to(labels, out_labels.shape))
  assert np.all(np.isfinite(out_image))


def test_slice_drop():
  keys, image, labels = batch()
  fn = functools.partial(A.slice_drop, p=BANIS.slice_drop_p, rate=BANIS.slice_drop_rate)
  out_image, out_labels = run_many(fn, image, labels, keys)
  check_image_only(out_image, out_labels, image, labels)
  assert out_image.min() >= 0 and out_image.max() <= 1
  # p = 0.5 times "some slice of the drawn axis dropped": 1 - 0.95^n averaged over the axes.
  p_change = 0.5 * (1 - np.mean(0.95 ** np.asarray(SHAPE)))
  assert abs(fraction(changed(out_image, image)) - p_change) < 0.075
  # A slice normal to axis a is dropped when all of it is zero: p * rate of the drawn axis' slices.
  zero = out_image[..., 0] == 0
  dropped = sum(zero.all(axis=tuple(b for b in (1, 2, 3) if b != a)).sum() for a in (1, 2, 3))
  assert 0.012 < dropped / (NUM_KEYS * np.mean(SHAPE)) < 0.04


def test_slice_shift():
  keys, image, labels = batch()
  fn = functools.partial(
    A.slice_shift,
    p=BANIS.slice_shift_p,
    rate=BANIS.slice_shift_rate,
    max_shift=BANIS.slice_shift_max,
  )
  out_image, out_labels = run_many(fn, image, labels, keys)
  check_image_only(out_image, out_labels, image, labels)
  # Rolling with wrap-around only permutes each slice's voxels.
  np.testing.assert_array_equal(
    np.sort(out_image.reshape(NUM_KEYS, -1), 1),
    np.sort(image.reshape(-1))[None].repeat(NUM_KEYS, 0),
  )
  p_change = 0.5 * (1 - np.mean(0.95 ** np.asarray(SHAPE)))
  assert abs(fraction(changed(out_image, image)) - p_change) < 0.075
  # Along the drawn axis ~5% of the slices changed; along the others nearly every slice crosses a
  # shifted one, so the smallest fraction over the axes estimates p * rate.
  moved = np.abs(out_image - image[None])[..., 0] > 0
  per_axis = [moved.any(axis=tuple(b for b in (1, 2, 3) if b != a)).mean(1) for a in (1, 2, 3)]
  assert 0.01 < np.min(per_axis, 0).mean() < 0.042
  # Where the drawn axis is z, each changed section is its original rolled in y and x.
  z_drawn = [i for i in range(NUM_KEYS) if 0 < per_axis[0][i] < min(per_axis[1][i], per_axis[2][i])]
  assert len(z_drawn) > 5
  for i in z_drawn:
    for z in np.flatnonzero(moved[i].any((1, 2))):
      assert any(
        np.array_equal(out_image[i, z], np.roll(image[z], (dy, dx), (0, 1)))
        for dy, dx in itertools.product(range(-10, 11), repeat=2)
      )


def test_misalignment_translates_one_section_or_a_block():
  rng = np.random.default_rng(10)
  shape = (6, 40, 40)
  image = rng.random((*shape, 1), dtype=np.float32) + 1.0  # no zeros inside the data
  labels = np.zeros(shape, np.int32)
  keys = jax.random.split(jax.random.key(1), 24)
  out_image, out_labels = run_many(A.misalignment, image, labels, keys)
  np.testing.assert_array_equal(out_labels, 0)
  kinds = set()
  for out in out_image:
    moved = [z for z in range(shape[0]) if not np.array_equal(out[z], image[z])]
    if not moved:
      continue  # a zero shift
    split = moved[0]
    assert 1 <= split <= shape[0] - 2
    assert moved in ([split], list(range(split, shape[0])))
    kinds.add(len(moved) == 1 and split != shape[0] - 1)
    # Recover the shift from the first moved section and check it, zero fill included.
    found = False
    for dy, dx in itertools.product(range(-17, 18), repeat=2):
      want = np.zeros_like(image[split])
      src = image[split][max(0, -dy) : 40 - max(0, dy), max(0, -dx) : 40 - max(0, dx)]
      want[max(0, dy) : 40 + min(0, dy), max(0, dx) : 40 + min(0, dx)] = src
      if np.array_equal(out[split], want):
        found = True
        break
    assert found
  assert kinds == {True, False}


def test_missing_sections_fill_rectangles_or_whole_sections():
  rng = np.random.default_rng(11)
  shape = (8, 20, 20)
  image = rng.random((*shape, 1), dtype=np.float32) + 2.0  # fills are < 1, data > 2
  keys = jax.random.split(jax.random.key(2), 40)
  out_image, _ = run_many(A.missing_sections, image, np.zeros(shape, np.int32), keys)
  counts = []
  for out in out_image[..., 0]:
    filled = out < 1.5
    sections = np.flatnonzero(filled.any((1, 2)))
    counts.append(len(sections))
    for z in sections:
      values = np.unique(out[z][filled[z]])
      assert len(values) == 1 and 0 <= values[0] < 1
      ys, xs = np.nonzero(filled[z])
      h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
      assert filled[z].sum() == h * w  # one rectangle
      assert (h, w) == (20, 20) or (4 <= h <= 16 and 4 <= w <= 16)
  assert max(counts) <= 5 and min(counts) == 0 and len(set(counts)) >= 4


def test_lost_section_copies_a_neighbour():
  rng = np.random.default_rng(12)
  shape = (5, 6, 6)
  image = rng.random((*shape, 1), dtype=np.float32)
  keys = jax.random.split(jax.random.key(3), 30)
  out_image, _ = run_many(A.lost_section, image, np.zeros(shape, np.int32), keys)
  for out in out_image:
    changed_sections = [z for z in range(shape[0]) if not np.array_equal(out[z], image[z])]
    assert len(changed_sections) == 1
    z = changed_sections[0]
    assert any(np.array_equal(out[z], image[n]) for n in (z - 1, z + 1) if 0 <= n < shape[0])


def test_blur_matrix_matches_mirror_gaussian():
  rng = np.random.default_rng(13)
  row = rng.random(17)
  for sigma in (1.0, 2.2, 3.0):
    taps = np.arange(-5, 6)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    want = scipy.ndimage.correlate1d(row, kernel / kernel.sum(), mode="mirror")
    got = np.asarray(augment_sections._blur_matrix(17, sigma, 5)) @ row
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_blur_sections_smooth_at_most_five_sections():
  rng = np.random.default_rng(14)
  shape = (8, 16, 16)
  image = rng.random((*shape, 1), dtype=np.float32)
  keys = jax.random.split(jax.random.key(4), 40)
  out_image, _ = run_many(A.blur_sections, image, np.zeros(shape, np.int32), keys)
  counts = []
  for out in out_image:
    blurred = [z for z in range(shape[0]) if not np.allclose(out[z], image[z])]
    counts.append(len(blurred))
    for z in blurred:
      diff = ~np.isclose(out[z], image[z])[..., 0]
      assert np.var(out[z][diff]) < np.var(image[z][diff])  # smoother where it changed
  assert max(counts) <= 5 and min(counts) == 0


def test_missing_parts_zeroes_one_small_rectangle():
  rng = np.random.default_rng(15)
  shape = (4, 40, 40)
  image = rng.random((*shape, 1), dtype=np.float32) + 1.0  # no zeros in the data
  labels = blob_labels(rng, shape)
  keys = jax.random.split(jax.random.key(5), NUM_KEYS)
  fn = functools.partial(A.missing_parts, p=EM.defects.missing_parts_p)
  out_image, out_labels = run_many(fn, image, labels, keys)
  check_image_only(out_image, out_labels, image, labels)
  fired = (out_image == 0).any((1, 2, 3, 4))
  assert abs(fraction(fired) - 0.2) < 0.08
  for out in out_image[fired][..., 0]:
    zero = out == 0
    assert len(np.flatnonzero(zero.any((1, 2)))) == 1
    ys, xs = np.nonzero(zero.any(0))
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert zero.sum() == h * w and 4 <= h <= 10 and 4 <= w <= 10


# -- make_augment ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("config", "shape"),
  [(EM, (8, 32, 32)), (BANIS, (12, 12, 12))],
  ids=["aug_em_neuron", "aug_banis"],
)
def test_make_augment_runs_vmapped_and_jitted(config, shape):
  rng = np.random.default_rng(16)
  image = jnp.asarray(rng.random((2, *shape, 1), dtype=np.float32))
  labels = jnp.asarray(np.stack([blob_labels(rng, shape) for _ in range(2)]))
  augment = jax.jit(jax.vmap(A.make_augment(config, shape)))
  keys = jax.random.split(jax.random.key(0), 2)
  out_image, out_labels = augment(keys, image, labels)
  assert out_image.shape == image.shape and out_image.dtype == jnp.float32
  assert out_labels.shape == labels.shape and out_labels.dtype == jnp.int32
  assert np.all(np.isfinite(out_image))
  for b in range(2):
    assert set(np.unique(out_labels[b])) <= set(np.unique(labels[b]))
  again = augment(keys, image, labels)
  np.testing.assert_array_equal(again[0], out_image)
  np.testing.assert_array_equal(again[1], out_labels)


def test_make_augment_none_is_identity_and_names_are_checked():
  rng = np.random.default_rng(17)
  shape = (4, 6, 6)
  image = rng.random((*shape, 1), dtype=np.float32)
  labels = blob_labels(rng, shape)
  none = A.make_augment(type("Aug", (), {"name": "none"})(), shape)
  out_image, out_labels = none(jax.random.key(0), image, labels)
  np.testing.assert_array_equal(out_image, image)
  np.testing.assert_array_equal(out_labels, labels)
  with pytest.raises(ValueError, match="unknown augmentation"):
    A.make_augment(type("Aug", (), {"name": "aug_foo"})(), shape)
  with pytest.raises(ValueError, match="built for shape"):
    none(jax.random.key(0), image[:3], labels[:3])


def test_make_augment_traces_on_recipe_shapes():
  # Shape-keeping choices on the real crop sizes, traced without compiling.
  for config, shape in (
    (EM, (16, 224, 224)),
    (EM, (16, 224, 192)),
    (BANIS, (138, 138, 138)),
    (BANIS, (42, 74, 74)),
  ):
    augment = A.make_augment(config, shape)
    out = jax.eval_shape(
      augment,
      jax.random.key(0),
      jax.ShapeDtypeStruct((*shape, 1), jnp.float32),
      jax.ShapeDtypeStruct(shape, jnp.int32),
    )
    assert out[0].shape == (*shape, 1) and out[1].shape == shape


# -- another microscope: contrast and gamma (off in the recipes) ----------------------------------


def test_contrast_gamma_stays_in_range_and_is_deterministic():
  keys, image, labels = batch()
  image = 3.0 * image - 1.0  # any normalisation: zscore images are not in [0, 1]
  fn = functools.partial(A.contrast_gamma, p=0.5, contrast=(0.5, 1.5), gamma=(0.7, 1.5))
  out_image, out_labels = run_many(fn, image, labels, keys)
  check_image_only(out_image, out_labels, image, labels)
  fired = changed(out_image, image)
  assert abs(fraction(fired) - 0.5) < 0.1
  # Within the input's range scaled by at most 1.5 about its mean, and never outside the range
  # its own contrast draw allows: its spread is 0.5x to 1.5x the input's.
  mean, low, high = image.mean(), image.min(), image.max()
  eps = 1e-5
  assert out_image.min() >= mean + 1.5 * (low - mean) - eps
  assert out_image.max() <= mean + 1.5 * (high - mean) + eps
  spread = out_image.reshape(NUM_KEYS, -1).max(1) - out_image.reshape(NUM_KEYS, -1).min(1)
  assert np.all(spread[fired] >= 0.5 * (high - low) - eps)
  assert np.all(spread[fired] <= 1.5 * (high - low) + eps)
  assert len({out_image[i].tobytes() for i in np.flatnonzero(fired)}) == int(fired.sum())
  # Same key, same result.
  again, _ = run_many(fn, image, labels, keys[:3])
  np.testing.assert_allclose(again, out_image[:3], atol=1e-6)
  # Contrast alone (gamma 1): the exact linear map about the mean.
  key = keys[0]
  linear, _ = A.contrast_gamma(key, image, labels, p=1.0, contrast=(0.6, 0.6), gamma=(1.0, 1.0))
  np.testing.assert_allclose(linear, mean + 0.6 * (image - mean), atol=1e-5)
  # Gamma alone keeps the input's min and max.
  curved, _ = A.contrast_gamma(key, image, labels, p=1.0, contrast=(1.0, 1.0), gamma=(1.4, 1.4))
  assert curved.min() == pytest.approx(low, abs=1e-5) and curved.max() <= high + eps


def _aug_with(recipe, **values):
  """A copy of a recipe's ``data.aug`` with ``values`` set (``None``: the key removed)."""
  aug = recipe.copy_and_resolve_references()
  aug.unlock()
  for key, value in values.items():
    if value is None:
      del aug[key]
    else:
      aug[key] = value
  return aug


@pytest.mark.parametrize(("recipe", "shape"), [(EM, (6, 12, 12)), (BANIS, (8, 8, 8))])
def test_recipes_with_their_optional_steps_off_are_unchanged(recipe, shape):
  """Contrast / gamma and the grid warp declared and off (the shipped recipes), or not declared:
  the same random numbers and bytes. On, each is one more step (the whole recipe then draws other
  numbers); the warp moves labels with the image."""
  assert recipe.contrast_gamma_p == 0.0 and recipe.warp_p == 0.0
  assert (recipe.contrast_range, recipe.gamma_range) == ((0.5, 1.5), (0.7, 1.5))
  assert (tuple(recipe.warp_spacing), tuple(recipe.warp_sigma)) == ((16, 16, 16), (2.0, 2.0, 2.0))
  rng = np.random.default_rng(11)
  image = jnp.asarray(rng.random((3, *shape, 1), dtype=np.float32))
  labels = jnp.asarray(np.stack([blob_labels(rng, shape) for _ in range(3)]))
  keys = jax.random.split(jax.random.key(4), 3)

  def run(aug):
    out = jax.jit(jax.vmap(A.make_augment(aug, shape)))(keys, image, labels)
    return [np.asarray(o) for o in out]

  shipped = run(recipe)
  optional = ("contrast_gamma_p", "contrast_range", "gamma_range")
  absent = _aug_with(recipe, **dict.fromkeys((*optional, "warp_p", "warp_spacing", "warp_sigma")))
  for got, want in zip(run(absent), shipped, strict=True):
    assert got.tobytes() == want.tobytes()
  on_image, _ = run(_aug_with(recipe, contrast_gamma_p=1.0))
  assert not np.array_equal(on_image, shipped[0])
  assert on_image.shape == shipped[0].shape and np.all(np.isfinite(on_image))
  on_image, on_labels = run(_aug_with(recipe, warp_p=1.0, warp_spacing=(4, 4, 4)))
  assert not np.array_equal(on_labels, shipped[1]) and np.all(np.isfinite(on_image))
  for b in range(3):
    assert set(np.unique(on_labels[b])) <= set(np.unique(labels[b]))
  # On the real crop sizes too (traced, not compiled).
  for big in ((16, 224, 224), (42, 74, 74)):
    out = jax.eval_shape(
      A.make_augment(_aug_with(recipe, warp_p=0.5), big),
      jax.random.key(0),
      jax.ShapeDtypeStruct((*big, 1), jnp.float32),
      jax.ShapeDtypeStruct(big, jnp.int32),
    )
    assert out[0].shape == (*big, 1) and out[1].shape == big


def test_contrast_gamma_settings_are_checked_in_one_line():
  from jaxseg.common.errors import ConfigError

  cases = [
    ({"contrast_gamma_p": 1.5}, "contrast_gamma_p"),
    ({"contrast_gamma_p": 0.5, "contrast_range": (1.5, 0.5)}, "contrast_range"),
    ({"contrast_gamma_p": 0.5, "gamma_range": (0.0, 1.0)}, "gamma_range"),
    ({"gamma_range": (1.0,)}, "gamma_range"),  # checked while off too
    ({"contrast_gamma_p": 0.5, "contrast_range": None}, "contrast_range"),  # needed when on
  ]
  for values, key in cases:
    with pytest.raises(ConfigError, match=rf"^data\.aug\.{key} must be") as e:
      A.make_augment(_aug_with(EM, **values), (6, 12, 12))
    assert "\n" not in str(e.value)


# -- elastic deformation on a control grid (off in the recipes) ------------------------------------


def test_grid_warp_weights_cover_the_crop_with_unit_rows():
  for n, spacing in ((42, 16), (74, 16), (1, 16), (16, 4), (20, 8.5)):
    weights = A.grid_warp_weights(n, spacing)
    # One control interval per spacing over the n - 1 voxel steps, one more point at each end.
    assert weights.shape == (n, max(1, math.ceil((n - 1) / spacing)) + 3)
    np.testing.assert_allclose((weights**2).sum(1), 1.0, atol=1e-6)
    assert weights.min() >= 0 and np.all(weights[:, 0] + weights[:, -1] < weights.max(1))


def test_grid_warp_moves_voxels_by_sigma_smoothly_over_the_spacing():
  """A coordinate image through the warp reads back every voxel's displacement (trilinear is exact
  on a linear image wherever no position was mirrored: away from the faces)."""
  shape, spacing, sigma = (28, 48, 48), (6, 8, 8), (1.0, 2.0, 1.5)
  image = coordinate_image(shape)
  keys = jax.random.split(jax.random.key(20), 32)
  fn = functools.partial(A.grid_warp, p=1.0, spacing=spacing, sigma=sigma)
  out_image, _ = run_many(fn, image, np.zeros(shape, np.int32), keys)
  m = [math.ceil(5 * s) + 1 for s in sigma]  # 5 std from the faces: never mirrored
  inner = (slice(None), slice(m[0], -m[0]), slice(m[1], -m[1]), slice(m[2], -m[2]))
  displacement = (out_image - image[None])[inner]
  flat = displacement.reshape(-1, 3)
  np.testing.assert_allclose(flat.std(0), sigma, rtol=0.15)
  assert np.all(np.abs(flat.mean(0)) < 0.2 * np.asarray(sigma))
  assert np.abs(displacement[..., 1]).max() > 3.0  # whole voxels, unlike PyTC's elastic

  def correlation(axis, lag):
    n = displacement.shape[axis + 1]
    a = np.take(displacement, np.arange(n - lag), axis=axis + 1)
    b = np.take(displacement, np.arange(lag, n), axis=axis + 1)
    a, b = a - a.mean((0, 1, 2, 3)), b - b.mean((0, 1, 2, 3))
    return float(np.mean(np.sum(a * b, (0, 1, 2, 3)) / np.sqrt(np.sum(a * a) * np.sum(b * b) / 9)))

  for axis in range(3):
    # Neighbours move almost alike; about 0.5 one spacing apart, nearly 0 two spacings apart.
    assert correlation(axis, 1) > 0.95
    assert 0.3 < correlation(axis, spacing[axis]) < 0.7
    assert abs(correlation(axis, 2 * spacing[axis])) < 0.2


def test_grid_warp_keeps_image_label_alignment():
  fn = functools.partial(A.grid_warp, p=0.5, spacing=(4, 4, 4), sigma=(1.0, 1.0, 1.0))
  check_resampled(fn, (6, 12, 12), NUM_KEYS, p=0.5)
  strong = functools.partial(A.grid_warp, p=1.0, spacing=(4, 6, 6), sigma=(1.5, 3.0, 3.0))
  out_image, _ = check_resampled(strong, (8, 16, 16), 8, p=1.0)
  assert (out_image.max(-1) < 1 - 1e-3).mean() > 0.05  # it really mixed ids


def test_grid_warp_settings_are_checked_in_one_line():
  from jaxseg.common.errors import ConfigError

  cases = [
    ({"warp_p": -0.1}, "warp_p"),
    ({"warp_p": 2.0}, "warp_p"),
    ({"warp_p": 0.5, "warp_sigma": (1.0, 2.0)}, "warp_sigma"),
    ({"warp_p": 0.5, "warp_sigma": (1.0, -2.0, 1.0)}, "warp_sigma"),
    ({"warp_p": 0.5, "warp_spacing": (0, 16, 16)}, "warp_spacing"),
    ({"warp_spacing": (16, 16, float("nan"))}, "warp_spacing"),  # checked while off too
    ({"warp_p": 0.5, "warp_sigma": None}, "warp_sigma"),  # needed when on
  ]
  for values, key in cases:
    with pytest.raises(ConfigError, match=rf"^data\.aug\.{key} must be") as e:
      A.make_augment(_aug_with(BANIS, **values), (8, 8, 8))
    assert "\n" not in str(e.value)
