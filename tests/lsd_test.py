"""Local shape descriptors: the JAX computation against direct sums, config checks, the MTLSD step.

The reference evaluates the definition of ``docs/targets_and_losses.md`` ("Local shape
descriptors") voxel by voxel with plain numpy sums over the window, so every trick of
``jaxseg.data.lsd`` (relabelling, separable matrix products, chunks, interpolation) is checked
against it.
"""

import itertools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.common.config_util import load_config
from jaxseg.common.errors import ConfigError
from jaxseg.data import lsd as lsd_lib
from jaxseg.data import targets
from jaxseg.data.targets import LsdSettings
from jaxseg.training import paths

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO_ROOT, "configs", "demo.py")
RECIPES = ("demo", "fibsem", "liconn", "nisb_base", "own_data_example", "snemi")


def reference(labels, sigma_nm, resolution):
  """Direct sums over each labelled voxel's window (3 sigma per axis, cut at the crop)."""
  labels = np.asarray(labels)
  sigma, res = np.asarray(sigma_nm, float), np.asarray(resolution, float)
  reach = np.floor(3.0 * sigma / res + 1e-9).astype(int)
  whole = 1.0  # the weights of a window no border cuts
  for a in range(3):
    j = np.arange(-reach[a], reach[a] + 1)
    whole *= np.sum(np.exp(-0.5 * (j * res[a] / sigma[a]) ** 2))
  lsd = np.zeros((*labels.shape, 10))
  mask = np.zeros((*labels.shape, 1))
  for v in itertools.product(*map(range, labels.shape)):
    if labels[v] <= 0:
      continue
    lo = [max(0, v[a] - reach[a]) for a in range(3)]
    hi = [min(labels.shape[a], v[a] + reach[a] + 1) for a in range(3)]
    own = labels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] == labels[v]
    axes = [(np.arange(lo[a], hi[a]) - v[a]) * res[a] / sigma[a] for a in range(3)]
    t = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # offsets u - v, in sigmas
    g = np.exp(-0.5 * np.sum(t * t, axis=-1)) * own
    s = g.sum()
    mean = np.einsum("ijk,ijka->a", g, t) / s
    cov = np.einsum("ijk,ijka,ijkb->ab", g, t, t) / s - np.outer(mean, mean)
    values = [*(0.5 + 0.5 * mean), cov[0, 0], cov[1, 1], cov[2, 2]]
    values += [0.5 + 0.5 * cov[0, 1], 0.5 + 0.5 * cov[0, 2], 0.5 + 0.5 * cov[1, 2], s / whole]
    lsd[v] = np.clip(values, 0.0, 1.0)
    mask[v] = 1.0
  return lsd, mask


def _settings(
  downsample=(1, 1, 1), max_objects=128, sigma=(40.0, 30.0, 30.0), res=(20.0, 10.0, 10.0)
):
  return LsdSettings(tuple(sigma), tuple(res), tuple(downsample), max_objects, 1.0)


def _compute(labels, settings):
  out = jax.jit(lsd_lib.local_shape_descriptors, static_argnums=1)(labels, settings)
  return tuple(np.asarray(a) for a in out)


def _small_labels():
  """6 x 10 x 12: four objects touching the crop border, a background plane, unlabeled voxels."""
  labels = np.zeros((6, 10, 12), np.int32)
  labels[:, :5, :] = 3
  labels[:, 5:, :7] = 7
  labels[:3, 5:, 7:] = 2
  labels[2] = 0  # a background (membrane) section
  labels[:, 0, :3] = -1  # unlabeled
  labels[4, 6, 9] = 11  # a one-voxel object
  return labels


def _voronoi_labels(shape=(10, 24, 24), n=8, seed=0):
  rng = np.random.default_rng(seed)
  points = rng.uniform(0, 1, (n, 3)) * np.array(shape)
  grid = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), axis=-1)
  d = np.sum(((grid[..., None, :] - points) * np.array([2.0, 1.0, 1.0])) ** 2, axis=-1)
  labels = (np.argmin(d, axis=-1) + 1).astype(np.int32)
  labels[:, :, 11] = 0
  labels[3] = 0
  labels[:, :3, :3] = -1
  return labels


def test_full_resolution_matches_direct_sums():
  labels = _small_labels()
  settings = _settings()
  got, mask = _compute(labels, settings)
  want, want_mask = reference(labels, settings.sigma_nm, settings.resolution)
  np.testing.assert_array_equal(mask, want_mask)
  np.testing.assert_array_equal(mask[..., 0], labels > 0)
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert np.all(got[labels <= 0] == 0)


def test_downsampled_grid_is_close():
  # sigma is 3 z voxels and 6 y / x voxels: d = 2 puts the coarse points 0.67 sigma apart in z,
  # 0.33 sigma in y / x (interpolation errors grow as the square of that spacing).
  labels = _voronoi_labels((8, 20, 20))
  settings = _settings(sigma=(60.0, 60.0, 60.0))
  want, want_mask = reference(labels, settings.sigma_nm, settings.resolution)
  for downsample, tol in (((1, 2, 2), 0.015), ((2, 2, 2), 0.05)):
    got, mask = _compute(labels, _settings(downsample, sigma=(60.0, 60.0, 60.0)))
    np.testing.assert_array_equal(mask, want_mask)
    err = np.abs(got - want)[mask[..., 0] > 0]
    assert err.mean(axis=0).max() < tol, (downsample, err.mean(axis=0))
    assert err.max() < 4 * tol, (downsample, err.max(axis=0))


def test_crop_border_truncates_the_window():
  # One object filling the crop: at a corner the window holds only the voxels inside the crop,
  # so the mean points into the crop and the size shrinks by the cut weights of each axis.
  labels = np.ones((9, 9, 9), np.int32)
  settings = _settings(sigma=(15.0, 15.0, 15.0), res=(10.0, 10.0, 10.0))  # 1.5 voxels, reach 4
  got, _ = _compute(labels, settings)
  corner, centre = got[0, 0, 0], got[4, 4, 4]
  np.testing.assert_allclose(centre, [0.5, 0.5, 0.5, 1, 1, 1, 0.5, 0.5, 0.5, 1], atol=0.05)
  np.testing.assert_allclose(centre[[0, 1, 2, 6, 7, 8, 9]], [0.5] * 6 + [1.0], atol=1e-5)
  g = np.exp(-0.5 * (np.arange(5) / 1.5) ** 2)  # offsets 0..4 voxels
  half = np.sum(g) / (2 * np.sum(g) - 1)  # the in-crop share of a window cut at its centre
  np.testing.assert_allclose(corner[9], half**3, rtol=1e-4)
  inward = 0.5 + 0.5 * np.sum(g * np.arange(5) / 1.5) / np.sum(g)
  np.testing.assert_allclose(corner[:3], inward, rtol=1e-4)
  # A sub-crop is computed on its own: the part of the window outside it does not count.
  sub = _voronoi_labels((6, 12, 12), n=5, seed=1)
  big, _ = _compute(np.pad(sub, 3, mode="edge"), settings)
  small, _ = _compute(sub, settings)
  want = reference(sub, settings.sigma_nm, settings.resolution)[0]
  np.testing.assert_allclose(small, want, atol=1e-4)
  assert np.abs(big[3:-3, 3:-3, 3:-3] - small).max() > 0.05


def test_objects_beyond_max_objects_are_masked():
  labels = _small_labels()  # ids 2, 3, 7, 11
  got, mask = _compute(labels, _settings(max_objects=2))
  want, _ = reference(labels, (40.0, 30.0, 30.0), (20.0, 10.0, 10.0))
  kept = np.isin(labels, (2, 3))
  np.testing.assert_array_equal(mask[..., 0], kept)
  np.testing.assert_allclose(got[kept], want[kept], atol=1e-4)
  assert np.all(got[~kept] == 0)


def test_batches_are_per_crop():
  batch = np.stack([_small_labels(), _small_labels()[::-1, ::-1].copy()])
  settings = _settings()
  lsd, mask = jax.jit(lsd_lib.lsd_targets, static_argnums=1)(batch, settings)
  assert lsd.shape == (2, 6, 10, 12, 10) and mask.shape == (2, 6, 10, 12, 1)
  for i in range(2):
    one, one_mask = _compute(batch[i], settings)
    np.testing.assert_allclose(np.asarray(lsd[i]), one, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(mask[i]), one_mask)


# -- configuration ---------------------------------------------------------------------------------


def _demo(**overrides):
  return load_config(DEMO, overrides)


def test_out_channels_mismatch_is_one_config_error_line():
  from jaxseg.inference.settings import inference_settings
  from jaxseg.training import losses

  config = _demo(**{"target.lsd.enabled": True})
  for check in (targets.check_out_channels, losses.make_objective, inference_settings):
    with pytest.raises(ConfigError) as info:
      check(config)
    message = str(info.value)
    assert "\n" not in message
    assert "model.out_channels=6" in message and "target.lsd.enabled" in message
    assert "model.out_channels=16" in message
  assert targets.check_out_channels(
    _demo(**{"target.lsd.enabled": True, "model.out_channels": 16})
  ) == (6, 10)
  with pytest.raises(ConfigError, match=re.escape("target.lsd.enabled=False")):
    targets.check_out_channels(_demo(**{"model.out_channels": 16}))
  on = {"target.lsd.enabled": True}
  with pytest.raises(ConfigError, match=re.escape("target.lsd.downsample")):
    targets.lsd_settings(_demo(**on, **{"target.lsd.downsample": (0, 2, 2)}))
  with pytest.raises(ConfigError, match=re.escape("data.resolution")):
    targets.lsd_settings(_demo(**on, **{"data.resolution": None}))


@pytest.mark.parametrize("name", RECIPES)
def test_lsd_is_off_and_out_of_the_fingerprint(name):
  config = load_config(os.path.join(REPO_ROOT, "configs", f"{name}.py"))
  assert config.target.lsd.enabled is False and targets.lsd_settings(config) is None
  fingerprint = paths.training_fingerprint(config)
  assert "lsd" not in fingerprint["target"]
  on = load_config(os.path.join(REPO_ROOT, "configs", f"{name}.py"), {"target.lsd.enabled": True})
  assert paths.training_fingerprint(on)["target"]["lsd"]["sigma_nm"] == [80.0, 80.0, 80.0]


def test_prediction_writes_only_affinity_channels():
  from jaxseg.inference import engine as engine_lib
  from jaxseg.inference.settings import inference_settings

  config = _demo(
    **{"target.lsd.enabled": True, "model.out_channels": 16, "infer.output_channels": ()}
  )
  settings = inference_settings(config)
  assert settings.output_channels == tuple(range(6))
  with pytest.raises(ConfigError, match="affinity channels"):
    inference_settings(
      _demo(
        **{"target.lsd.enabled": True, "model.out_channels": 16, "infer.output_channels": (0, 6)}
      )
    )

  def apply(variables, x):  # affinity logits 0, descriptor logits 50
    return jnp.concatenate([jnp.zeros((*x.shape[:4], 6)), jnp.full((*x.shape[:4], 10), 50.0)], -1)

  engine = engine_lib.WindowEngine(apply, {}, settings)
  out = np.asarray(engine._predict_windows({}, jnp.zeros((1, *settings.window, 1))))
  assert out.shape == (1, *settings.window, 6)
  np.testing.assert_allclose(out, 0.5)  # sigmoid(0 / T): no descriptor channel leaked in


# -- training --------------------------------------------------------------------------------------


def test_train_step_with_lsd_learns():
  from jaxseg.training import optim, train_lib
  from jaxseg.training import sharding as sharding_lib

  config = _demo(
    **{
      "target.lsd.enabled": True,
      "model.out_channels": 16,
      "model.widths": (4, 8),
      "model.norm_groups": 2,
      "data.patch_size": (4, 16, 16),
      "target.target_context": (0, 0, 0),
      "data.aug.name": "none",
      "optim.lr": 1e-2,
      "train.num_steps": 100,
      "train.ema.enabled": False,
    }
  )
  read_shape = targets.read_shape_for(config)
  sharding = sharding_lib.create_sharding(1)
  tx = optim.create_optimizer(config.optim, int(config.train.num_steps))
  graphdef, state = train_lib.create_train_state(config, tx, sharding)
  step = train_lib.make_train_step(config, graphdef, tx, sharding, read_shape)
  labels = _voronoi_labels(read_shape, n=12)[None]
  image = (labels[..., None] % 5).astype(np.float32) / 4.0
  losses = []
  for _ in range(4):
    state, metrics = step(state, image, labels)
    losses.append(float(metrics["loss"]))
    assert bool(metrics["finite"])
  assert {"loss_affinity", "loss_lsd", "loss_per_channel"} <= set(metrics)
  assert metrics["loss_per_channel"].shape == (6,)
  np.testing.assert_allclose(
    float(metrics["loss"]), float(metrics["loss_affinity"]) + float(metrics["loss_lsd"]), rtol=1e-5
  )
  assert losses[-1] < losses[0], losses
