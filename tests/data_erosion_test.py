"""Tests for jaxseg.data.erosion: contact erosion against hand-built cases and a loop reference."""

import numpy as np
from absl.testing import absltest, parameterized

from jaxseg.data import erosion

# Axes of the window plane and the slicing axis, spelled out independently of the module.
PLANE_AXES = {"yx": (1, 2), "zy": (0, 1), "zx": (0, 2)}


def loop_reference(labels, e, plane):
  """Slice-by-slice, voxel-by-voxel erosion with np.pad(mode='reflect') windows."""
  a, b = PLANE_AXES[plane]
  normal = ({0, 1, 2} - {a, b}).pop()
  moved = np.moveaxis(labels, (normal, a, b), (0, 1, 2))
  out = moved.copy()
  for s in range(moved.shape[0]):
    padded = np.pad(moved[s], e, mode="reflect")
    for i in range(moved.shape[1]):
      for j in range(moved.shape[2]):
        window = padded[i : i + 2 * e + 1, j : j + 2 * e + 1]
        if moved[s, i, j] > 0 and len(set(window[window > 0].tolist())) >= 2:
          out[s, i, j] = 0
  return np.moveaxis(out, (0, 1, 2), (normal, a, b))


def blob_labels(rng, shape, num_ids=4):
  """Blocky labels (ids, background, unlabeled) so that windows see both contacts and interiors."""
  coarse = rng.choice(np.arange(-1, num_ids + 1), size=[(n + 1) // 2 for n in shape])
  fine = coarse.repeat(2, 0).repeat(2, 1).repeat(2, 2)[: shape[0], : shape[1], : shape[2]]
  noise = rng.random(shape) < 0.1
  return np.where(noise, rng.integers(-1, num_ids + 1, shape), fine).astype(np.int32)


class ErosionTest(parameterized.TestCase):
  def test_touching_ids_erode_at_contact(self):
    labels = np.zeros((1, 4, 6), np.int32)
    labels[0, :, :3], labels[0, :, 3:] = 1, 2
    want = labels.copy()
    want[0, :, 2:4] = 0
    np.testing.assert_array_equal(erosion.erode_labels(labels, 1), want)

  def test_background_and_unlabeled_do_not_erode(self):
    labels = np.zeros((1, 5, 5), np.int32)
    labels[0, 1:4, 1:4] = 7
    labels[0, 0, :] = -1
    np.testing.assert_array_equal(erosion.erode_labels(labels, 1), labels)
    np.testing.assert_array_equal(erosion.erode_labels(labels, 2), labels)

  def test_unlabeled_voxels_are_kept(self):
    # With e=1 the -1 voxel sees both ids but stays -1, and 1 and 2 are out of each other's reach.
    labels = np.array([[[1, -1, 2], [1, -1, 2]]], np.int32)
    np.testing.assert_array_equal(erosion.erode_labels(labels, 1), labels)
    np.testing.assert_array_equal(erosion.erode_labels(labels, 2), [[[0, -1, 0], [0, -1, 0]]])

  def test_borders_and_short_axes(self):
    # Mirrored values are already inside the window, so at a face only real neighbours count; axes
    # shorter than the window (numpy and jax both reflect repeatedly) must work too.
    labels = np.array([[[1, 1, 2, 2]]], np.int32)
    np.testing.assert_array_equal(erosion.erode_labels(labels, 1), [[[1, 0, 0, 2]]])
    np.testing.assert_array_equal(erosion.erode_labels(labels, 2), [[[0, 0, 0, 0]]])
    short = np.array([[[1, 2]], [[3, 3]]], np.int32)
    for plane in ("yx", "zy", "zx"):
      np.testing.assert_array_equal(
        erosion.erode_labels(short, 2, plane), loop_reference(short, 2, plane)
      )

  def test_zero_is_identity(self):
    labels = np.array([[[1, 2]]], np.int32)
    self.assertIs(erosion.erode_labels(labels, 0), labels)

  def test_plane_only_sees_its_plane(self):
    # Two ids stacked along z: a contact across slices, invisible to 'yx' windows.
    labels = np.ones((2, 3, 3), np.int32)
    labels[1] = 2
    np.testing.assert_array_equal(erosion.erode_labels(labels, 1, "yx"), labels)
    np.testing.assert_array_equal(erosion.erode_labels(labels, 1, "zy"), 0)
    np.testing.assert_array_equal(erosion.erode_labels(labels, 1, "zx"), 0)

  def test_bad_arguments(self):
    labels = np.ones((2, 3, 3), np.int32)
    with self.assertRaises(ValueError):
      erosion.erode_labels(labels, 1, "xy")
    with self.assertRaises(ValueError):
      erosion.erode_labels(labels, -1)
    with self.assertRaises(TypeError):
      erosion.erode_labels(labels.astype(np.float32), 1)

  @parameterized.product(e=[1, 2], plane=["yx", "zy", "zx"])
  def test_matches_loop_reference(self, e, plane):
    labels = blob_labels(np.random.default_rng(e), (7, 8, 9))
    np.testing.assert_array_equal(
      erosion.erode_labels(labels, e, plane), loop_reference(labels, e, plane)
    )

  def test_plane_is_a_transpose(self):
    labels = blob_labels(np.random.default_rng(7), (6, 7, 8))
    # 'zy' on [z, y, x] is 'yx' on the volume with x moved to the front.
    as_yx = np.transpose(labels, (2, 0, 1))
    np.testing.assert_array_equal(
      erosion.erode_labels(labels, 2, "zy"),
      np.transpose(erosion.erode_labels(as_yx, 2, "yx"), (1, 2, 0)),
    )

  def test_unsigned_and_extreme_ids(self):
    labels = blob_labels(np.random.default_rng(8), (4, 6, 6)).clip(0).astype(np.uint32)
    labels[labels == 3] = np.iinfo(np.uint32).max
    np.testing.assert_array_equal(erosion.erode_labels(labels, 1), loop_reference(labels, 1, "yx"))
    self.assertEqual(erosion.erode_labels(labels, 1).dtype, np.uint32)

  def test_jit_matches_numpy(self):
    import jax
    import jax.numpy as jnp

    labels = blob_labels(np.random.default_rng(9), (5, 8, 9))
    erode = jax.jit(erosion.erode_labels, static_argnums=(1, 2))
    got = erode(jnp.asarray(labels), 2, "zy")
    self.assertIsInstance(got, jax.Array)
    self.assertEqual(got.dtype, jnp.int32)
    np.testing.assert_array_equal(np.asarray(got), erosion.erode_labels(labels, 2, "zy"))


if __name__ == "__main__":
  absltest.main()
