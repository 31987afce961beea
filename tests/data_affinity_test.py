"""Tests for jaxseg.data.affinity: presets, targets, masks, context crops, conventions."""

import itertools
import subprocess
import sys

import numpy as np
from absl.testing import absltest, parameterized

from jaxseg.data import affinity

X1, MX1 = (0, 0, 1), (0, 0, -1)


def line(values):
  """A [1, 1, n] label volume."""
  return np.asarray(values, np.int64).reshape(1, 1, -1)


def loop_reference(labels, offsets, convention):
  """Voxel-by-voxel affinities written straight from the definition."""
  c, shape = len(offsets), labels.shape
  aff = np.zeros((c, *shape), np.float32)
  mask = np.zeros((c, *shape), np.float32)
  for ch, o in enumerate(offsets):
    for v in itertools.product(*(range(n) for n in shape)):
      sign = 1 if convention == "source" else -1
      partner = tuple(p + sign * d for p, d in zip(v, o, strict=True))
      if not all(0 <= p < n for p, n in zip(partner, shape, strict=True)):
        continue
      a, b = labels[v], labels[partner]
      aff[(ch, *v)] = float(a == b and a > 0)
      mask[(ch, *v)] = float(a != -1 and b != -1)
  return aff, mask


def random_labels(rng, shape, num_ids=3):
  """Random labels in {-1, 0, 1..num_ids}, mostly positive so equal-id edges are common."""
  p = np.array([0.1, 0.2] + [0.7 / num_ids] * num_ids)
  return rng.choice(np.arange(-1, num_ids + 1), size=shape, p=p).astype(np.int32)


class PresetTest(absltest.TestCase):
  def test_presets(self):
    self.assertEqual(affinity.get_preset("aff12").num_channels, 12)
    self.assertEqual(affinity.AFF12.convention, "target")
    self.assertEqual(affinity.AFF12.offsets[:3], ((0, 0, 1), (0, 1, 0), (1, 0, 0)))
    self.assertEqual(affinity.AFF12.channel_index((0, 3, 0)), 9)
    banis = affinity.get_preset("banis6")
    self.assertEqual(banis.convention, "source")
    self.assertEqual(
      banis.offsets, ((0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 0, 10), (0, 10, 0), (10, 0, 0))
    )
    self.assertEqual(banis.context, ((0, 10), (0, 10), (0, 10)))
    self.assertEqual(affinity.AFF12.context, ((4, 0), (27, 0), (27, 0)))
    with self.assertRaisesRegex(ValueError, "banis6"):
      affinity.get_preset("aff3")
    with self.assertRaises(ValueError):
      affinity.AFF12.channel_index((0, 0, 2))

  def test_bad_arguments(self):
    labels = line([1, 1])
    with self.assertRaises(ValueError):
      affinity.compute_affinities(labels, [X1], "deepem")
    with self.assertRaises(ValueError):
      affinity.compute_affinities(labels, [(0, 1)], "source")
    with self.assertRaises(ValueError):
      affinity.compute_affinities(labels, [], "source")
    with self.assertRaises(TypeError):
      affinity.compute_affinities(labels.astype(float), [X1], "source")

  def test_context_negative_offsets(self):
    offsets = [(0, 0, 2), (0, -3, 0), (1, 0, -1)]
    self.assertEqual(affinity.affinity_context(offsets, "source"), ((0, 1), (3, 0), (1, 2)))
    self.assertEqual(affinity.affinity_context(offsets, "target"), ((1, 0), (0, 3), (2, 1)))


class ComputeTest(parameterized.TestCase):
  def check(self, labels, offsets, convention, want_aff, want_mask):
    aff, mask = affinity.compute_affinities(labels, offsets, convention)
    self.assertEqual(aff.dtype, np.float32)
    self.assertEqual(mask.dtype, np.float32)
    np.testing.assert_array_equal(aff, np.asarray(want_aff, np.float32).reshape(aff.shape))
    np.testing.assert_array_equal(mask, np.asarray(want_mask, np.float32).reshape(mask.shape))

  def test_source_1d(self):
    # Edges 1-1, 1-2, 2-2, 2-0, 0-0 stored at their lower end; the last voxel has no partner.
    self.check(line([1, 1, 2, 2, 0, 0]), [X1], "source", [1, 0, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0])

  def test_target_1d(self):
    self.check(line([1, 1, 2, 2, 0, 0]), [X1], "target", [0, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 1])

  def test_negative_offsets(self):
    labels = line([1, 1, 2, 2, 0, 0])
    # Source with -1: the edge v <-> v-1 stored at v, which is target with +1.
    self.check(labels, [MX1], "source", [0, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 1])
    self.check(labels, [MX1], "target", [1, 0, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0])
    self.check(line([3, 0, 3, 3]), [(0, 0, -2)], "source", [[0, 0, 1, 0]], [[0, 0, 1, 1]])

  def test_unlabeled_and_background(self):
    labels = line([1, -1, 1, 1, 0, -1, -1, 0])
    # Edge ends:  1|-1  -1|1  1|1  1|0  0|-1  -1|-1  -1|0
    self.check(labels, [X1], "source", [0, 0, 1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0])
    self.check(labels, [X1], "target", [0, 0, 0, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0])

  def test_background_edges_are_valid_negatives(self):
    aff, mask = affinity.compute_affinities(np.zeros((2, 2, 2), np.int32), [X1], "source")
    np.testing.assert_array_equal(aff, 0)
    np.testing.assert_array_equal(mask[0, :, :, 0], 1)
    np.testing.assert_array_equal(mask[0, :, :, 1], 0)

  def test_offset_longer_than_array(self):
    aff, mask = affinity.compute_affinities(np.ones((2, 3, 4), np.int32), [(0, 0, 4)], "target")
    np.testing.assert_array_equal(aff, 0)
    np.testing.assert_array_equal(mask, 0)

  def test_3d_hand_built(self):
    labels = np.array([[[1, 1], [2, 0]], [[1, 2], [2, 0]]], np.int32)  # [z, y, x]
    offsets = [(1, 0, 0), (0, 1, 0), (0, 0, 1)]
    aff, mask = affinity.compute_affinities(labels, offsets, "target")
    # z edges (stored at z = 1): 1-1, 1-2, 2-2, 0-0.
    np.testing.assert_array_equal(aff[0], [[[0, 0], [0, 0]], [[1, 0], [1, 0]]])
    np.testing.assert_array_equal(mask[0], [[[0, 0], [0, 0]], [[1, 1], [1, 1]]])
    # y edges (stored at y = 1): z0: 1-2, 1-0; z1: 1-2, 2-0.
    np.testing.assert_array_equal(aff[1], 0)
    np.testing.assert_array_equal(mask[1], [[[0, 0], [1, 1]], [[0, 0], [1, 1]]])
    # x edges (stored at x = 1): z0: 1-1, 2-0; z1: 1-2, 2-0.
    np.testing.assert_array_equal(aff[2], [[[0, 1], [0, 0]], [[0, 0], [0, 0]]])
    np.testing.assert_array_equal(mask[2], [[[0, 1], [0, 1]], [[0, 1], [0, 1]]])

  def test_unsigned_labels(self):
    labels = line([1, 1, 0, 2]).astype(np.uint64)
    self.check(labels, [X1], "source", [1, 0, 0, 0], [1, 1, 1, 0])

  @parameterized.product(preset=["aff12", "banis6"], convention=["source", "target"])
  def test_matches_loop_reference(self, preset, convention):
    offsets = affinity.get_preset(preset).offsets
    labels = random_labels(np.random.default_rng(0), (6, 13, 30))
    aff, mask = affinity.compute_affinities(labels, offsets, convention)
    want_aff, want_mask = loop_reference(labels, offsets, convention)
    np.testing.assert_array_equal(aff, want_aff)
    np.testing.assert_array_equal(mask, want_mask)

  @parameterized.parameters("source", "target")
  def test_negative_offsets_match_loop_reference(self, convention):
    offsets = ((0, 0, -1), (-2, 1, 0), (1, -3, 2), (0, 0, 0))
    labels = random_labels(np.random.default_rng(1), (5, 6, 7))
    aff, mask = affinity.compute_affinities(labels, offsets, convention)
    want_aff, want_mask = loop_reference(labels, offsets, convention)
    np.testing.assert_array_equal(aff, want_aff)
    np.testing.assert_array_equal(mask, want_mask)


class ContextTest(parameterized.TestCase):
  def test_banis_context_mask(self):
    rng = np.random.default_rng(2)
    labels = random_labels(rng, (12, 13, 14))
    spec = affinity.BANIS6
    aff, mask = affinity.compute_affinities_with_context(labels, spec.offsets, spec.convention)
    self.assertEqual(aff.shape, (6, 2, 3, 4))
    self.assertEqual(mask.shape, (6, 2, 3, 4))
    # Every partner exists, so the mask only drops edges with a -1 end.
    for c, (dz, dy, dx) in enumerate(spec.offsets):
      here = labels[:2, :3, :4]
      partner = labels[dz : dz + 2, dy : dy + 3, dx : dx + 4]
      np.testing.assert_array_equal(mask[c], (here != -1) & (partner != -1))
    full_aff, _ = affinity.compute_affinities(labels, spec.offsets, spec.convention)
    np.testing.assert_array_equal(aff, full_aff[:, :2, :3, :4])

  def test_all_true_without_unlabeled(self):
    labels = np.random.default_rng(3).integers(0, 3, (8, 30, 31)).astype(np.int32)
    spec = affinity.AFF12
    _, mask = affinity.compute_affinities_with_context(labels, spec.offsets, spec.convention)
    self.assertEqual(mask.shape, (12, 4, 3, 4))
    np.testing.assert_array_equal(mask, 1)

  def test_explicit_larger_context_and_crop(self):
    labels = np.ones((4, 5, 6), np.int32)
    context = ((1, 1), (0, 2), (0, 2))
    self.assertEqual(affinity.crop_context(labels, context).shape, (2, 3, 4))
    _, mask = affinity.compute_affinities_with_context(labels, [X1], "source", context)
    np.testing.assert_array_equal(mask, 1)
    # Context on the wrong side leaves the face without partners masked.
    context = ((1, 1), (0, 2), (2, 0))
    _, mask = affinity.compute_affinities_with_context(labels, [X1], "source", context)
    np.testing.assert_array_equal(mask[..., :3], 1)
    np.testing.assert_array_equal(mask[..., 3], 0)
    with self.assertRaises(ValueError):
      affinity.crop_context(labels, ((3, 2), (0, 0), (0, 0)))


class ConventionTest(parameterized.TestCase):
  offsets = ((0, 0, 1), (0, -2, 0), (1, 1, -1), (2, 0, 0))

  @parameterized.parameters(("source", "target"), ("target", "source"))
  def test_matches_direct_computation(self, src, dst):
    labels = random_labels(np.random.default_rng(4), (5, 6, 7))
    aff, mask = affinity.compute_affinities(labels, self.offsets, src)
    want_aff, want_mask = affinity.compute_affinities(labels, self.offsets, dst)
    got_aff, valid = affinity.convert_convention(aff, self.offsets, src, dst)
    got_mask, _ = affinity.convert_convention(mask, self.offsets, src, dst)
    self.assertEqual(valid.dtype, bool)
    np.testing.assert_array_equal(got_aff, want_aff)
    np.testing.assert_array_equal(got_mask, want_mask)
    # Vacated faces are exactly the voxels whose edge has no partner inside.
    _, inside = affinity.compute_affinities(np.zeros_like(labels), self.offsets, dst)
    np.testing.assert_array_equal(valid, inside.astype(bool))

  def test_round_trip(self):
    rng = np.random.default_rng(5)
    pred = rng.random((4, 5, 6, 7)).astype(np.float16)
    there, _ = affinity.convert_convention(pred, self.offsets, "source", "target")
    back, valid_back = affinity.convert_convention(there, self.offsets, "target", "source")
    self.assertEqual(back.dtype, np.float16)
    _, inside = affinity.compute_affinities(np.zeros((5, 6, 7), np.int32), self.offsets, "source")
    np.testing.assert_array_equal(valid_back, inside.astype(bool))
    np.testing.assert_array_equal(back, np.where(valid_back, pred, 0))
    same, valid = affinity.convert_convention(pred, self.offsets, "source", "source")
    self.assertIs(same, pred)
    self.assertTrue(valid.all())

  def test_shift_volume(self):
    x = np.arange(1, 5).reshape(1, 1, 4)
    shifted, valid = affinity.shift_volume(x, (0, 0, 1))
    np.testing.assert_array_equal(shifted, [[[0, 1, 2, 3]]])
    np.testing.assert_array_equal(valid, [[[False, True, True, True]]])
    shifted, valid = affinity.shift_volume(x[None], (0, 0, -2))
    np.testing.assert_array_equal(shifted, [[[[3, 4, 0, 0]]]])
    np.testing.assert_array_equal(valid, [[[True, True, False, False]]])


class JaxTest(absltest.TestCase):
  def test_jit_matches_numpy(self):
    import jax
    import jax.numpy as jnp

    labels = random_labels(np.random.default_rng(6), (6, 9, 30))
    compute = jax.jit(affinity.compute_affinities, static_argnums=(1, 2))
    for spec in (affinity.AFF12, affinity.BANIS6):
      want = affinity.compute_affinities(labels, spec.offsets, spec.convention)
      got = compute(jnp.asarray(labels), spec.offsets, spec.convention)
      for g, w in zip(got, want, strict=True):
        self.assertIsInstance(g, jax.Array)
        np.testing.assert_array_equal(np.asarray(g), w)

    convert = jax.jit(affinity.convert_convention, static_argnums=(1, 2, 3))
    offsets = affinity.BANIS6.offsets
    aff, _ = want
    got = convert(jnp.asarray(aff), offsets, "source", "target")
    for g, w in zip(
      got, affinity.convert_convention(aff, offsets, "source", "target"), strict=True
    ):
      np.testing.assert_array_equal(np.asarray(g), w)


class ImportTest(absltest.TestCase):
  def test_no_jax_import(self):
    code = (
      "import sys; import jaxseg.data.affinity, jaxseg.data.erosion; "
      "sys.exit(int(any(m == 'jax' or m.startswith('jax.') for m in sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    self.assertEqual(result.returncode, 0, "importing jaxseg.data imported jax" + result.stderr)


if __name__ == "__main__":
  absltest.main()
