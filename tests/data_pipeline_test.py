"""Training data pipeline: host crops (sampling, padding, normalisation, labels, determinism,
prefetch) against direct numpy reads of the volumes, and the device transform against the numpy
affinity / erosion code. Data: tiny generated demo cubes (NISB layout) and small SNEMI-layout
TIFFs written here.
"""

import threading
from pathlib import Path

import jax
import numpy as np
import pytest
import tifffile

from jaxseg.common.config_util import load_config
from jaxseg.data import crop_io, normalize, pipeline, targets
from jaxseg.data.affinity import compute_affinities_with_context, get_preset
from jaxseg.data.erosion import erode_labels
from jaxseg.io import write_volume
from jaxseg.io.datasets import LabeledVolume
from jaxseg.synthesis import generate_dataset

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------
# Data.


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  """The demo config on a small generated dataset (two train cubes, one val cube)."""
  root = tmp_path_factory.mktemp("demo")
  config = load_config(str(CONFIGS / "demo.py"))
  config.data.root = str(root)
  synth = config.data.synth
  synth.shape = (48, 80, 80)
  synth.chunks = (16, 32, 32)
  synth.train_seeds = (0, 1)
  synth.val_seeds = (100,)
  synth.test_seeds = ()
  synth.preview = False
  generate_dataset(synth, str(root), show_progress=False)
  return config


def _snemi(tmp_path, *, pytc=False, shape=(10, 20, 24), **data):
  """SNEMI-layout TIFFs (image 10..209, labels 0..5) and the SNEMI config reading them."""
  image = RNG.integers(10, 210, shape).astype(np.uint8)
  labels = RNG.integers(0, 6, shape).astype(np.uint16)
  tifffile.imwrite(tmp_path / "train-input.tif", image)
  tifffile.imwrite(tmp_path / "train-labels.tif", labels)
  config = load_config(str(CONFIGS / "snemi.py") + (":pytc" if pytc else ""))
  config.data.root = str(tmp_path)
  config.data.patch_size = (4, 16, 16)
  config.data.pad_size = (2, 5, 5)
  config.data.val_sections = 3
  for key, value in data.items():
    config.data[key] = value
  return config, image, labels


def _volumes(tmp_path, image, labels, name="cube", **kwargs):
  img = write_volume(str(tmp_path / f"{name}-img.zarr"), image, chunks=(1, 4, 8, 8))
  lab = write_volume(str(tmp_path / f"{name}-seg.zarr"), labels, chunks=(4, 8, 8))
  return [LabeledVolume(name, img, lab, **kwargs)]


def _equal_batches(a, b):
  return all(np.array_equal(a[k], b[k]) for k in ("image", "labels"))


def _data_threads():
  return [t for t in threading.enumerate() if t.name.startswith("jaxseg-data")]


# ---------------------------------------------------------------------------------------------
# Host side.


def test_demo_shapes_and_crop_positions(demo):
  data = pipeline.TrainData(demo, "train")
  assert data.read_shape == (42, 74, 74) and data.patch_size == (32, 64, 64)
  assert data.context == ((0, 10), (0, 10), (0, 10)) and data.channels == 1
  full = [(v.image.read()[0], v.labels.read()) for v in data.volumes]
  seen = set()
  for step in range(4):
    batch = data.batch(step, 2)
    assert batch["image"].shape == (2, 42, 74, 74, 1) and batch["image"].dtype == np.float32
    assert batch["labels"].shape == (2, 42, 74, 74) and batch["labels"].dtype == np.int32
    for i, crop in enumerate(data.crops(step, 2)):
      seen.add(crop.volume)
      image, labels = full[crop.volume]
      box = tuple(slice(s, s + r) for s, r in zip(crop.start, data.read_shape, strict=True))
      np.testing.assert_array_equal(batch["image"][i, ..., 0], image[box] / np.float32(255))
      np.testing.assert_array_equal(batch["labels"][i], labels[box].astype(np.int32))
  assert seen == {0, 1}


def test_determinism_by_step_and_process(demo):
  a = pipeline.TrainData(demo, "train")
  b = pipeline.TrainData(demo, "train")  # a restarted run
  assert _equal_batches(a.batch(7, 2), b.batch(7, 2))
  assert not _equal_batches(a.batch(7, 2), a.batch(8, 2))
  other = pipeline.TrainData(demo, "train", process_index=1, process_count=2)
  assert a.crops(7, 2) != other.crops(7, 2)
  demo.seed = 1
  try:
    assert a.crops(7, 2) != pipeline.TrainData(demo, "train").crops(7, 2)
  finally:
    demo.seed = 0
  with pytest.raises(ValueError, match="process_index 2"):
    pipeline.TrainData(demo, "train", process_index=2, process_count=2)


def test_iterate_resumes_and_stops_threads(demo):
  data = pipeline.TrainData(demo, "train")
  with data.iterate(5, 2) as it:
    got = [next(it) for _ in range(3)]
    assert _data_threads()
  assert [s for s, _ in got] == [5, 6, 7]
  for step, batch in got:
    assert _equal_batches(batch, data.batch(step, 2))
  assert not _data_threads()
  with pytest.raises(StopIteration):
    next(it)
  assert [s for s, _ in data.iterate(3, 1, stop_step=5)] == [3, 4]
  assert not _data_threads()


def test_iterate_raises_reader_errors(demo):
  data = pipeline.TrainData(demo, "train")
  good = data.batch

  def flaky(step, batch_size):
    if step == 3:
      raise OSError("disk went away")
    return good(step, batch_size)

  data.batch = flaky
  it = data.iterate(0, 1)
  assert [next(it)[0] for _ in range(3)] == [0, 1, 2]
  with pytest.raises(OSError, match="disk went away"):
    next(it)
  assert not _data_threads()
  data.prefetch = 0  # the synchronous path raises the same way
  it = data.iterate(2, 1)
  assert next(it)[0] == 2
  with pytest.raises(OSError, match="disk went away"):
    next(it)
  with pytest.raises(StopIteration):
    next(it)


def test_eval_batches_are_fixed(demo):
  val = pipeline.TrainData(demo, "val")
  first = list(val.eval_batches(2, 3))
  again = list(val.eval_batches(2, 3))
  assert len(first) == 3
  assert all(_equal_batches(x, y) for x, y in zip(first, again, strict=True))
  assert _equal_batches(first[1], val.eval_batch(1, 2))
  assert not _equal_batches(first[0], first[1])
  assert val.eval_crops(0, 2) != val.crops(0, 2)
  assert not _data_threads()


@pytest.mark.parametrize("pytc", [False, True])
def test_snemi_padding_matches_np_pad(tmp_path, pytc):
  config, image, labels = _snemi(tmp_path, pytc=pytc)
  if pytc:  # PyTC trains on all sections: no holdout, mirrored labels, per-crop min-max
    assert (config.data.pad_labels, config.data.normalize_scope) == ("reflect", "crop")
    config.data.val_sections = 3
  data = pipeline.TrainData(config, "train")
  assert data.read_shape == (4, 16, 16) and data.context == ((0, 0),) * 3
  pad = [(2, 2), (5, 5), (5, 5)]
  region = image[:7]
  want_image = np.pad(region, pad, mode="reflect").astype(np.float32)
  region_labels = labels[:7].astype(np.int32)
  if pytc:
    want_labels = np.pad(region_labels, pad, mode="reflect")
  else:
    want_labels = np.pad(region_labels, pad, constant_values=-1)
  lo, hi = float(image.min()), float(image.max())  # the whole file, held-out sections included
  unlabeled = 0
  for step in range(12):
    batch = data.batch(step, 3)
    for i, crop in enumerate(data.crops(step, 3)):
      box = tuple(slice(s, s + r) for s, r in zip(crop.start, data.read_shape, strict=True))
      raw = want_image[box]
      if pytc:
        want = (raw - raw.min()) / (raw.max() - raw.min())
      else:
        want = (raw - lo) / (hi - lo)
      np.testing.assert_allclose(batch["image"][i, ..., 0], want, rtol=1e-6, atol=1e-6)
      np.testing.assert_array_equal(batch["labels"][i], want_labels[box])
      unlabeled += int((batch["labels"][i] == -1).sum())
  assert (unlabeled > 0) != pytc  # padding reached, and -1 only where we pad labels as unlabeled


def test_z_range_is_respected(tmp_path):
  """Sections 7..9 are validation: training crops (padding included) never show them."""
  config, _, _ = _snemi(tmp_path)
  image = np.broadcast_to(np.arange(10, dtype=np.uint8)[:, None, None] * 20, (10, 20, 24))
  tifffile.imwrite(tmp_path / "train-input.tif", np.ascontiguousarray(image))
  config.data.normalize = "divide_255"
  train = pipeline.TrainData(config, "train")
  val = pipeline.TrainData(config, "val")
  train_sections = {
    round(v * 255 / 20) for s in range(10) for v in np.unique(train.batch(s, 2)["image"])
  }
  val_sections = {
    round(v * 255 / 20) for s in range(10) for v in np.unique(val.batch(s, 2)["image"])
  }
  assert train_sections == set(range(7))
  assert val_sections == {7, 8, 9}


def test_in_memory_equals_lazy(tmp_path):
  config, _, _ = _snemi(tmp_path)
  assert config.data.in_memory
  cached = pipeline.TrainData(config, "train")
  config.data.in_memory = False
  lazy = pipeline.TrainData(config, "train")
  assert _equal_batches(cached.batch(3, 4), lazy.batch(3, 4))


@pytest.mark.parametrize("mode", ["reflect", "symmetric", "edge", "constant"])
@pytest.mark.parametrize("size", [1, 2, 5])
def test_padded_indices_match_np_pad(mode, size):
  pad = 2 * size + 1  # longer than the axis: repeated reflections
  kwargs = {"constant_values": -1} if mode == "constant" else {}
  want = np.pad(np.arange(size), pad, mode=mode, **kwargs)
  source, inside = crop_io.padded_indices(np.arange(-pad, size + pad), size, mode)
  got = np.where(inside, source, -1) if mode == "constant" else source
  np.testing.assert_array_equal(got, want)


def test_normalisation_numbers(tmp_path):
  data_config = load_config(str(CONFIGS / "snemi.py")).data
  image = np.array([[[10, 60], [110, 210]]], np.uint8)
  stats = normalize.VolumeStats(10.0, 210.0)
  np.testing.assert_allclose(
    normalize.normalize_image(image, data_config, stats), [[[0, 0.25], [0.5, 1.0]]]
  )
  narrow = normalize.VolumeStats(0.0, 110.0)
  np.testing.assert_allclose(
    normalize.normalize_image(image[:, :1], data_config, narrow), [[[10 / 110, 60 / 110]]]
  )
  with pytest.raises(ValueError, match="statistics"):
    normalize.normalize_image(image, data_config, None)
  data_config.normalize_scope = "crop"
  np.testing.assert_allclose(normalize.normalize_image(image[:, :1], data_config), [[[0, 1]]])
  np.testing.assert_array_equal(normalize.normalize_image(np.full((1, 2, 2), 7), data_config), 0)
  data_config.normalize = "divide_255"
  out = normalize.normalize_image(image, data_config)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, image / 255.0, rtol=1e-6)
  data_config.normalize = "l2"
  with pytest.raises(ValueError, match=r"data\.normalize must be one of"):
    normalize.normalize_image(image, data_config)
  data_config.normalize, data_config.normalize_scope = "minmax", "dataset"
  with pytest.raises(ValueError, match="normalize_scope must be one of"):
    normalize.normalize_image(image, data_config)
  # Streaming statistics over many small chunks, a channel axis and a float volume.
  big = RNG.normal(size=(2, 9, 6, 5)).astype(np.float32)
  vol = write_volume(str(tmp_path / "f.zarr"), big, chunks=(2, 2, 3, 5))
  stats = normalize.volume_stats(vol)
  assert (stats.min, stats.max) == (float(big.min()), float(big.max()))
  assert stats.voxels == big.size and not stats.sampled


def _data_config(mode, scope="volume", percentiles=None):
  data = load_config(str(CONFIGS / "snemi.py")).data
  data.unlock()
  data.normalize, data.normalize_scope = mode, scope
  if percentiles is not None:
    data.normalize_percentiles = percentiles
  return data


def test_zscore_and_percentile_statistics_equal_numpy(tmp_path):
  """Streamed over small chunks with a channel axis: exact for 8- and 16-bit images (histogram),
  within (max - min) / 2**16 for float percentiles."""
  u8 = RNG.integers(0, 256, (2, 9, 14, 11)).astype(np.uint8)
  u16 = (RNG.normal(20000, 3000, (9, 14, 11))).astype(np.uint16)
  f32 = RNG.normal(3.0, 2.0, (2, 9, 14, 11)).astype(np.float32)
  for name, array in (("u8", u8), ("u16", u16), ("f32", f32)):
    vol = write_volume(
      str(tmp_path / f"{name}.zarr"), array, chunks=(1,) * (array.ndim - 3) + (2, 7, 11)
    )
    for levels in ((1.0, 99.0), (0.0, 37.5), (12.25, 100.0)):
      stats = normalize.volume_stats(vol, "percentile", levels)
      assert stats.voxels == array.size and not stats.sampled
      assert (stats.min, stats.max) == (float(array.min()), float(array.max()))
      assert stats.mean == pytest.approx(np.mean(array, dtype=np.float64), rel=1e-12)
      assert stats.std == pytest.approx(np.std(array, dtype=np.float64), rel=1e-12)
      want = np.percentile(array, levels)
      if name == "f32":
        width = (float(array.max()) - float(array.min())) / normalize.FLOAT_HISTOGRAM_BINS
        np.testing.assert_allclose([stats.p_low, stats.p_high], want, rtol=0, atol=width)
      else:
        assert [stats.p_low, stats.p_high] == want.tolist()  # exact, numpy's "linear" percentile
    zscore = normalize.volume_stats(vol, "zscore")
    assert zscore.mean == stats.mean and zscore.p_low is None
  # The config's percentiles reach the statistics.
  got = normalize.normalization_stats(vol, _data_config("percentile", percentiles=(5.0, 95.0)))
  assert got.percentiles == (5.0, 95.0)


class _CountingVolume:
  """A lazy volume that counts the voxels read from it."""

  def __init__(self, array, chunks):
    self.array, self.chunks, self.read = array, chunks, 0
    self.shape, self.dtype = array.shape, array.dtype

  def __getitem__(self, key):
    out = self.array[key]
    self.read += out.size
    return out


def test_large_volumes_are_summarised_from_a_sample(tmp_path, monkeypatch):
  """Over LARGE_VOLUME_VOXELS, zscore / percentile read about SAMPLE_VOXELS voxels in whole
  chunks, the same ones every time, and still come close to the whole volume's numbers."""
  shape = (40, 64, 64)
  trend = np.linspace(60, 120, shape[0])[:, None, None]  # brighter with depth, plus noise
  noise = np.random.default_rng(7).normal(0, 25, shape)
  array = np.clip(trend + noise, 0, 255).astype(np.uint8)
  monkeypatch.setattr(normalize, "LARGE_VOLUME_VOXELS", array.size // 10)
  monkeypatch.setattr(normalize, "SAMPLE_VOXELS", array.size // 4)
  vol = _CountingVolume(array, (4, 16, 16))
  stats = normalize.volume_stats(vol, "percentile")
  assert stats.sampled and stats.voxels == vol.read == array.size // 4  # 40 whole chunks
  assert stats.mean == pytest.approx(array.mean(), abs=0.05 * array.std())
  assert stats.std == pytest.approx(array.std(), rel=0.05)
  np.testing.assert_allclose([stats.p_low, stats.p_high], np.percentile(array, (1, 99)), atol=3)
  assert normalize.volume_stats(vol, "percentile") == stats  # deterministic
  assert normalize.volume_stats(vol, "zscore").mean == stats.mean
  # Float volumes take the same boxes; min-max always reads every voxel.
  floats = normalize.volume_stats(_CountingVolume(array.astype(np.float32), (4, 16, 16)), "zscore")
  assert floats.voxels == stats.voxels and floats.mean == pytest.approx(stats.mean, rel=1e-12)
  vol.read = 0
  assert normalize.volume_stats(vol).voxels == vol.read == array.size
  # A lazy zarr without the counting: chunks bigger than the sample's box are cut.
  lazy = write_volume(str(tmp_path / "big.zarr"), array, chunks=(40, 64, 64))
  sampled = normalize.volume_stats(lazy, "zscore")
  assert sampled.sampled and sampled.voxels <= array.size // 4
  assert sampled.mean == pytest.approx(array.mean(), abs=0.1 * array.std())


@pytest.mark.parametrize("mode", ["zscore", "percentile"])
def test_another_microscopes_contrast_normalises_to_the_same_image(mode):
  """The volume at 0.6x contrast about its mean (and brighter), normalised by its own
  statistics, is the original normalised volume; dividing by 255 is not."""
  rng = np.random.default_rng(8)
  smooth = rng.normal(0, 1, (12, 40, 40)).cumsum(1).cumsum(2)
  image = 120 + 30 * (smooth - smooth.mean()) / smooth.std() + rng.normal(0, 8, smooth.shape)
  data = _data_config(mode)
  for dtype in (np.float32, np.uint16):
    scale = 100 if dtype == np.uint16 else 1  # 16-bit: keeps rounding below the tolerance
    original = np.round(image * scale).astype(dtype) if scale > 1 else image.astype(dtype)
    mean = original.mean(dtype=np.float64)
    other = mean + 0.6 * (original.astype(np.float64) - mean) + 15 * scale
    other = np.round(other).astype(dtype) if scale > 1 else other.astype(dtype)
    want = normalize.normalize_image(original, data, normalize.volume_stats(original, mode))
    got = normalize.normalize_image(other, data, normalize.volume_stats(other, mode))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)
    plain = _data_config("divide_255")
    assert (
      np.abs(
        normalize.normalize_image(other, plain) - normalize.normalize_image(original, plain)
      ).max()
      > 0.05
    )


def test_zscore_and_percentile_mappings_and_crop_scope():
  image = RNG.normal(100, 20, (3, 7, 8)).astype(np.float32)
  stats = normalize.volume_stats(image, "percentile", (5.0, 95.0))
  zscore = _data_config("zscore")
  np.testing.assert_allclose(
    normalize.normalize_image(image, zscore, stats),
    (image - stats.mean) / stats.std,
    rtol=1e-5,
    atol=1e-5,
  )
  percentile = _data_config("percentile", percentiles=(5.0, 95.0))
  got = normalize.normalize_image(image, percentile, stats)
  want = np.clip((image - stats.p_low) / (stats.p_high - stats.p_low), 0, 1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert got.min() == 0.0 and got.max() == 1.0 and got.dtype == np.float32
  with pytest.raises(ValueError, match=r"statistics \(p_low, p_high"):
    normalize.normalize_image(image, percentile, normalize.volume_stats(image))
  # "crop": the array's own statistics, no volume statistics needed.
  crop_z = _data_config("zscore", "crop")
  np.testing.assert_allclose(
    normalize.normalize_image(image, crop_z), (image - image.mean()) / image.std(), atol=1e-5
  )
  crop_p = _data_config("percentile", "crop", (5.0, 95.0))
  lo, hi = np.percentile(image, (5.0, 95.0))
  np.testing.assert_allclose(
    normalize.normalize_image(image, crop_p), np.clip((image - lo) / (hi - lo), 0, 1), atol=1e-5
  )
  np.testing.assert_array_equal(normalize.normalize_image(np.full((2, 2, 2), 7), crop_z), 0)
  assert not normalize.needs_volume_stats(crop_p) and normalize.needs_volume_stats(percentile)
  # jax arrays go through the same mapping.
  for data, volume_stats in ((zscore, stats), (percentile, stats), (crop_z, None), (crop_p, None)):
    np.testing.assert_allclose(
      np.asarray(normalize.normalize_image(jax.numpy.asarray(image), data, volume_stats)),
      normalize.normalize_image(image, data, volume_stats),
      atol=1e-5,
    )


def test_normalisation_settings_are_checked_in_one_line():
  from jaxseg.common.errors import ConfigError

  for bad in ((99.0, 1.0), (1.0,), (-1.0, 50.0), (1.0, 101.0), ("a", "b"), 5, (1.0, float("nan"))):
    with pytest.raises(ConfigError, match=r"^data\.normalize_percentiles must be two numbers") as e:
      normalize.normalize_settings(_data_config("percentile", percentiles=bad))
    assert "\n" not in str(e.value)
  for mode, scope, key in (("l1", "volume", "normalize"), ("zscore", "slab", "normalize_scope")):
    with pytest.raises(ConfigError, match=rf"^data\.{key} must be one of") as e:
      normalize.normalize_settings(_data_config(mode, scope))
    assert "\n" not in str(e.value)
  settings = normalize.normalize_settings(_data_config("percentile", percentiles=(2, 98)))
  assert settings.record() == {
    "normalize": "percentile",
    "normalize_scope": "volume",
    "normalize_percentiles": [2.0, 98.0],
  }
  assert normalize.normalize_settings(_data_config("divide_255")).record() == {
    "normalize": "divide_255"
  }


def test_statistics_are_computed_once_per_volume(tmp_path, monkeypatch):
  """The train and val splits of one SNEMI file share one pass; a rewritten file gets a new
  one; training crops are normalised with the file's statistics."""
  config, image, _ = _snemi(tmp_path, in_memory=False)
  config.data.normalize = "zscore"
  normalize._memo.clear()
  calls = []
  real = normalize.volume_stats
  monkeypatch.setattr(
    normalize, "volume_stats", lambda *a, **k: calls.append(a[0].path) or real(*a, **k)
  )
  train = pipeline.TrainData(config, "train")
  pipeline.TrainData(config, "val")
  assert len(calls) == 1
  mean, std = image.mean(dtype=np.float64), image.std(dtype=np.float64)
  batch = train.batch(0, 2)
  for i, crop in enumerate(train.crops(0, 2)):
    raw = np.pad(image[:7], [(p, p) for p in train.pad], mode="reflect")
    box = tuple(slice(s, s + r) for s, r in zip(crop.start, train.read_shape, strict=True))
    np.testing.assert_allclose(batch["image"][i, ..., 0], (raw[box] - mean) / std, atol=1e-5)
  tifffile.imwrite(tmp_path / "train-input.tif", image[::-1] // 2)  # same path, new contents
  pipeline.TrainData(config, "train")
  assert len(calls) == 2


def test_uint64_and_int64_labels(tmp_path):
  config = load_config(str(CONFIGS / "nisb_base.py"))
  config.data.patch_size = (6, 8, 8)
  shape = (20, 24, 24)
  small = RNG.integers(0, 5, shape)
  big = np.where(small > 0, np.uint64(2**40) + small.astype(np.uint64) * np.uint64(2**33), 0)
  image = RNG.integers(0, 256, (1, *shape)).astype(np.uint8)
  data = pipeline.TrainData(config, volumes=_volumes(tmp_path, image, big.astype(np.uint64)))
  batch = data.batch(0, 4)
  for i, crop in enumerate(data.crops(0, 4)):
    box = tuple(slice(s, s + r) for s, r in zip(crop.start, data.read_shape, strict=True))
    want, got = small[box], batch["labels"][i]
    assert ((got == 0) == (want == 0)).all()
    pairs = set(zip(want.ravel().tolist(), got.ravel().tolist(), strict=True))
    assert len(pairs) == len({w for w, _ in pairs}) == len({g for _, g in pairs})  # a bijection
  signed = np.where(small == 4, -1, big.astype(np.int64))
  data = pipeline.TrainData(config, volumes=_volumes(tmp_path, image, signed, name="signed"))
  crop, got = data.crops(1, 1)[0], data.batch(1, 1)["labels"][0]
  box = tuple(slice(s, s + r) for s, r in zip(crop.start, data.read_shape, strict=True))
  np.testing.assert_array_equal(got == -1, small[box] == 4)
  assert got.max() <= len(np.unique(small[box]))
  with pytest.raises(ValueError, match="negative label -2"):
    crop_io.labels_to_int32(np.array([0, -2, 2**40]), "cube")


def test_bad_inputs(tmp_path, demo):
  config = load_config(str(CONFIGS / "nisb_base.py"))
  config.data.patch_size = (6, 8, 8)
  image = RNG.integers(0, 256, (1, 16, 20, 20)).astype(np.uint8)
  labels = RNG.integers(0, 5, (16, 20, 20)).astype(np.uint32)
  volumes = _volumes(tmp_path, image, labels)
  config.data.patch_size = (8, 8, 8)
  with pytest.raises(ValueError, match=r"'cube'.*read_shape \(18, 18, 18\).*\(16, 20, 20\)"):
    pipeline.TrainData(config, volumes=volumes)
  config.data.patch_size = (6, 8, 8)
  with pytest.raises(ValueError, match=r"'cube'.*has no labels"):
    pipeline.TrainData(config, volumes=[LabeledVolume("cube", volumes[0].image, None)])
  empty = LabeledVolume("cube", volumes[0].image, volumes[0].labels, z_range=(3, 3))
  with pytest.raises(ValueError, match=r"'cube'.*\(0, 20, 20\).*empty axis"):
    pipeline.TrainData(config, volumes=[empty])
  config.model.in_channels = 2
  with pytest.raises(ValueError, match=r"'cube'.*1 channel.*in_channels is 2"):
    pipeline.TrainData(config, volumes=volumes)
  config.model.in_channels = 1
  snemi, _, _ = _snemi(tmp_path)
  snemi.data.val_sections = 0
  with pytest.raises(ValueError, match="split 'val' has no volumes"):
    pipeline.TrainData(snemi, "val")
  config.target.relabel_connected_components = True
  with pytest.raises(ValueError, match="relabel_connected_components=True is not supported"):
    pipeline.TrainData(config, volumes=volumes)
  config.target.relabel_connected_components = False
  config.target.target_context = (5, 5, 5)
  with pytest.raises(ValueError, match=r"target_context \(5, 5, 5\) disagrees"):
    pipeline.TrainData(config, volumes=volumes)
  config.target.target_context = (0, 0, 0, 10, 10, 10)  # PyTC's 6-number form
  assert pipeline.TrainData(config, volumes=volumes).read_shape == (16, 18, 18)
  config.data.normalize = "l2"
  with pytest.raises(ValueError, match=r"data\.normalize must be one of"):
    pipeline.TrainData(config, volumes=volumes)


# ---------------------------------------------------------------------------------------------
# Device side.


def _numpy_targets(config, labels):
  target = config.target
  spec = get_preset(target.preset)
  settings = targets.target_settings(config)
  eroded = erode_labels(labels, target.erosion, target.erosion_plane)
  aff, mask = compute_affinities_with_context(
    eroded, spec.offsets, target.convention, settings.context
  )
  return np.moveaxis(aff, 0, -1), np.moveaxis(mask, 0, -1)


def test_device_transform_matches_numpy_nisb(demo):
  data = pipeline.TrainData(demo, "train")
  batch = data.batch(0, 2)
  transform = jax.jit(pipeline.make_device_transform(demo, data.read_shape, train=False))
  out = transform(None, batch["image"], batch["labels"])
  assert out["image"].shape == (2, 32, 64, 64, 1)
  assert out["target"].shape == out["mask"].shape == (2, 32, 64, 64, 6)
  assert all(v.dtype == np.float32 for v in out.values())
  for i in range(2):
    aff, mask = _numpy_targets(demo, batch["labels"][i])
    np.testing.assert_array_equal(out["target"][i], aff)
    np.testing.assert_array_equal(out["mask"][i], mask)
    np.testing.assert_array_equal(out["image"][i], batch["image"][i, :32, :64, :64])
  # The context gives every edge of the patch its partner: no -1 labels, so the mask is all ones.
  assert (np.asarray(out["mask"]) == 1).all()
  assert 0 < float(out["target"].mean()) < 1
  # Eroded (zy plane, e=2) targets differ from uneroded ones.
  demo.target.erosion = 0
  try:
    plain = pipeline.make_device_transform(demo, data.read_shape, train=False)(
      None, batch["image"], batch["labels"]
    )
  finally:
    demo.target.erosion = 2
  assert float(plain["target"].sum()) > float(out["target"].sum())
  with pytest.raises(ValueError, match=r"read_shape \(32, 64, 64\) is not"):
    pipeline.make_device_transform(demo, (32, 64, 64), train=False)


def test_device_transform_matches_numpy_snemi(tmp_path):
  config, _, _ = _snemi(tmp_path)
  data = pipeline.TrainData(config, "train")
  batch = data.batch(2, 3)
  assert (batch["labels"] == -1).any()
  out = pipeline.make_device_transform(config, data.read_shape, train=False)(
    None, batch["image"], batch["labels"]
  )
  assert out["target"].shape == (3, 4, 16, 16, 12)
  for i in range(3):
    aff, mask = _numpy_targets(config, batch["labels"][i])
    np.testing.assert_array_equal(out["target"][i], aff)
    np.testing.assert_array_equal(out["mask"][i], mask)
  # Target convention without context: the edge to v - (0, 0, 1) is missing at x = 0.
  assert (np.asarray(out["mask"])[..., 0, 0] == 0).all()
  np.testing.assert_array_equal(out["image"], batch["image"])


def test_device_transform_identity_aug_when_none(demo):
  data = pipeline.TrainData(demo, "train")
  batch = data.batch(1, 2)
  demo.data.aug.name = "none"
  try:
    train = pipeline.make_device_transform(demo, data.read_shape, train=True)
    got = jax.jit(train)(jax.random.key(0), batch["image"], batch["labels"])
  finally:
    demo.data.aug.name = "aug_banis"
  want = pipeline.make_device_transform(demo, data.read_shape, train=False)(
    None, batch["image"], batch["labels"]
  )
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])


def test_device_transform_with_augmentation(demo):
  """The demo recipe end to end with its real augmentation suite (aug_banis). One suite only: the
  suites themselves are tested in data_augment_test.py, and each costs many seconds to compile."""
  pytest.importorskip("jaxseg.data.augment")
  data = pipeline.TrainData(demo, "train")
  batch = data.batch(0, 2)
  transform = jax.jit(pipeline.make_device_transform(demo, data.read_shape, train=True))
  out = transform(jax.random.key(1), batch["image"], batch["labels"])
  assert out["image"].shape == (2, 32, 64, 64, 1)
  assert out["target"].shape == out["mask"].shape == (2, 32, 64, 64, 6)
  assert all(v.dtype == np.float32 for v in out.values())
  again = transform(jax.random.key(1), batch["image"], batch["labels"])
  for key in out:
    np.testing.assert_array_equal(out[key], again[key])
  other = transform(jax.random.key(2), batch["image"], batch["labels"])
  assert not np.array_equal(out["image"], other["image"])
  assert set(np.unique(np.asarray(out["mask"]))) <= {0.0, 1.0}
  assert set(np.unique(np.asarray(out["target"]))) <= {0.0, 1.0}
