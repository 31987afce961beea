"""Dataset layouts (NISB, SNEMI3D, CREMI): paths from the config, shapes checked on open."""

import dataclasses
from pathlib import Path

import h5py
import ml_collections
import numpy as np
import pytest
import tifffile

from jaxseg.io import VolumeError, create_zarr, write_volume
from jaxseg.io.datasets import dataset_volumes

RNG = np.random.default_rng(0)
REPO_ROOT = Path(__file__).resolve().parents[1]


def _write_nisb_cube(folder, shape_zyx=(6, 8, 10), seg_shape=None):
  img = RNG.integers(0, 255, (1, *shape_zyx)).astype(np.uint8)
  seg = RNG.integers(0, 5, seg_shape or shape_zyx).astype(np.uint32)
  # NISB files carry no attributes; write raw x, y, z(, c) arrays as the benchmark ships them.
  import tensorstore as ts

  for name, arr in (("img", img.transpose(3, 2, 1, 0)), ("seg", seg.transpose(2, 1, 0))):
    path = folder / "data.zarr" / name
    path.mkdir(parents=True)
    store = ts.open(
      {
        "driver": "zarr",
        "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {"shape": list(arr.shape), "chunks": list(arr.shape), "dtype": arr.dtype.str},
      },
      create=True,
      delete_existing=True,
    ).result()
    store.write(arr).result()
  (folder / "skeleton.pkl").write_bytes(b"")
  return img, seg


def test_nisb_layout_reads_xyz_as_zyx(tmp_path):
  img, seg = _write_nisb_cube(tmp_path / "val" / "seed100")
  data = ml_collections.ConfigDict(
    {"layout": "nisb", "root": str(tmp_path), "val_seeds": (100,), "resolution": (20.0, 9.0, 9.0)}
  )
  (cube,) = dataset_volumes(data, "val")
  assert cube.name == "seed100" and cube.image.shape == img.shape
  np.testing.assert_array_equal(cube.image.read(), img)
  np.testing.assert_array_equal(cube.labels.read(), seg)
  assert cube.labels.resolution == (20.0, 9.0, 9.0)
  assert cube.skeleton.endswith("skeleton.pkl")


def test_nisb_shape_mismatch_is_refused(tmp_path):
  _write_nisb_cube(tmp_path / "train" / "seed0", seg_shape=(6, 8, 9))
  data = ml_collections.ConfigDict(
    {"layout": "nisb", "root": str(tmp_path), "train_seeds": (0,), "resolution": (20.0, 9.0, 9.0)}
  )
  with pytest.raises(VolumeError, match=r"spatial shape \(6, 8, 10\).*\(6, 8, 9\)"):
    dataset_volumes(data, "train")


def test_missing_nisb_cube(tmp_path):
  data = ml_collections.ConfigDict(
    {"layout": "nisb", "root": str(tmp_path), "test_seeds": (101,), "resolution": (20.0, 9.0, 9.0)}
  )
  with pytest.raises(VolumeError, match=r"seed101: no data\.zarr"):
    dataset_volumes(data, "test")


def test_snemi_layout_with_validation_holdout(tmp_path):
  img = RNG.integers(0, 255, (10, 16, 16)).astype(np.uint8)
  lab = RNG.integers(0, 9, (10, 16, 16)).astype(np.uint16)
  tifffile.imwrite(tmp_path / "train-input.tif", img)
  tifffile.imwrite(tmp_path / "train-labels.tif", lab)
  tifffile.imwrite(tmp_path / "test-input.tif", img)
  write_volume(str(tmp_path / "test-labels.h5") + ":main", lab)
  data = ml_collections.ConfigDict({
      "layout": "snemi", "root": str(tmp_path), "train_image": "train-input.tif",
      "train_labels": "train-labels.tif", "test_image": "test-input.tif",
      "test_labels": "test-labels.h5", "val_sections": 3, "axis_order": "zyx",
      "resolution": (30.0, 6.0, 6.0)})  # fmt: skip
  (train,) = dataset_volumes(data, "train")
  (val,) = dataset_volumes(data, "val")
  (test,) = dataset_volumes(data, "test")
  assert train.z_range == (0, 7) and val.z_range == (7, 10) and test.z_range is None
  assert train.spatial_shape == (7, 16, 16) and val.spatial_shape == (3, 16, 16)
  np.testing.assert_array_equal(test.labels.read(), lab)
  # Prediction and scoring of the held-out sections see only them, read lazily.
  held_out = val.windowed()
  assert held_out.z_range is None and held_out.image.shape == (3, 16, 16)
  np.testing.assert_array_equal(held_out.image.read(), img[7:])
  np.testing.assert_array_equal(held_out.labels[1:3, 4:9, :], lab[8:10, 4:9, :])
  assert "[z 7:10]" in held_out.image.path
  with pytest.raises(VolumeError, match="belongs to the whole volume"):
    dataclasses.replace(val, skeleton="skeleton.pkl").windowed()
  with pytest.raises(VolumeError, match=r"z range \[5, 11\) is outside its 10 sections"):
    train.image.z_window(5, 11)
  data.val_sections = 0
  assert dataset_volumes(data, "val") == []
  assert dataset_volumes(data, "train")[0].z_range is None


def test_cremi_layout_and_label_dtype_check(tmp_path):
  with h5py.File(tmp_path / "sample_A.h5", "w") as f:
    f["volumes/raw"] = RNG.integers(0, 255, (4, 8, 8)).astype(np.uint8)
    f["volumes/labels/neuron_ids"] = RNG.integers(0, 9, (4, 8, 8)).astype(np.uint64)
  with h5py.File(tmp_path / "sample_B.h5", "w") as f:
    f["volumes/raw"] = RNG.integers(0, 255, (4, 8, 8)).astype(np.uint8)
    f["volumes/labels/neuron_ids"] = RNG.random((4, 8, 8)).astype(np.float32)
  data = ml_collections.ConfigDict(
    {
      "layout": "cremi",
      "root": str(tmp_path),
      "train_files": ("sample_A.h5",),
      "val_files": ("sample_B.h5",),
      "resolution": (40.0, 4.0, 4.0),
    }
  )
  (a,) = dataset_volumes(data, "train")
  assert a.name == "sample_A" and a.labels.dtype == np.uint64
  with pytest.raises(VolumeError, match=r"sample_B\.h5:volumes/labels/neuron_ids.*integer"):
    dataset_volumes(data, "val")


def test_image_dtype_check(tmp_path):
  out = create_zarr(tmp_path / "img.zarr", (4, 4, 4), "int64")
  out.flush()
  from jaxseg.io.datasets import check_pair
  from jaxseg.io.volume import open_volume

  with pytest.raises(VolumeError, match="image dtype int64"):
    check_pair(open_volume(tmp_path / "img.zarr"), None)


def test_generated_demo_data_opens_through_the_nisb_reader(tmp_path):
  """The generator's output is a NISB dataset: the reader opens it, skeletons match seg."""
  from pathlib import Path

  from jaxseg.common.config_util import load_config
  from jaxseg.io.skeleton import load_skeletons
  from jaxseg.metrics import expected_run_length, lookup_node_labels
  from jaxseg.synthesis import generate_dataset

  config = load_config(
    str(Path(__file__).resolve().parents[1] / "configs" / "demo.py"),
    {
      "data.root": str(tmp_path),
      "data.synth.shape": (24, 48, 48),
      "data.synth.train_seeds": (3,),
      "data.synth.val_seeds": (),
      "data.synth.test_seeds": (7,),
      "data.synth.preview": False,
    },
  )
  generate_dataset(config.data.synth, str(tmp_path), show_progress=False)
  assert dataset_volumes(config.data, "val") == []
  for split, seed in (("train", 3), ("test", 7)):
    (cube,) = dataset_volumes(config.data, split)
    assert cube.name == f"seed{seed}"
    assert cube.image.shape == (1, 24, 48, 48) and cube.image.dtype == np.uint8
    assert cube.labels.shape == (24, 48, 48) and cube.labels.resolution == (20.0, 9.0, 9.0)
    skeletons = load_skeletons(cube.skeleton, cache=False)
    seg = cube.labels.read()
    np.testing.assert_array_equal(
      lookup_node_labels(seg, skeletons.voxel_zyx), skeletons.skeleton_ids
    )
    assert set(np.unique(seg[seg > 0])) == set(np.unique(skeletons.skeleton_ids))
    assert expected_run_length(skeletons, cube.labels).nerl == 1.0


# -- a lab's own volumes (layout "volumes") --------------------------------------------------------


def _own_config(root, **splits):
  c = ml_collections.ConfigDict()
  c.layout, c.root, c.axis_order, c.resolution, c.volumes_file = (
    "volumes",
    str(root),
    None,
    None,
    "",
  )
  c.volumes = ml_collections.ConfigDict({s: tuple(splits.get(s, ())) for s in SPLITS})
  return c


SPLITS = ("train", "val", "test")


@pytest.fixture
def own_files(tmp_path):
  """One (6, 8, 10) image / labels / mask in each of HDF5, TIFF, zarr (x, y, z) and PNG slices."""
  image = RNG.integers(0, 255, (6, 8, 10)).astype(np.uint8)
  labels = RNG.integers(0, 4, (6, 8, 10)).astype(np.uint16)
  mask = np.zeros((6, 8, 10), np.uint8)
  mask[:, 2:6] = 1
  with h5py.File(tmp_path / "a.h5", "w") as f:
    f["raw"], f["seg"], f["mask"] = image, labels, mask
  tifffile.imwrite(tmp_path / "b-image.tif", image)
  tifffile.imwrite(tmp_path / "b-labels.tif", labels)
  write_volume(tmp_path / "c.zarr" / "img", image, axis_order="xyz")
  write_volume(tmp_path / "c.zarr" / "seg", labels, axis_order="xyz")
  write_volume(tmp_path / "d_png", image, format="png")
  return image, labels, mask


def test_own_volumes_in_every_format_read_alike(tmp_path, own_files):
  image, labels, mask = own_files
  config = _own_config(
    tmp_path,
    train=(
      {"image": "a.h5:raw", "labels": "a.h5:seg", "mask": "a.h5:mask"},
      {"image": "b-image.tif", "labels": str(tmp_path / "b-labels.tif"), "resolution": (30, 4, 4)},
    ),
    val=({"image": "c.zarr/img", "labels": "c.zarr/seg", "name": "cz", "z_range": (2, 6)},),
    test=({"image": "d_png"},),
  )
  a, b = dataset_volumes(config, "train")
  assert (a.name, b.name) == ("a", "b-image")
  for v in (a, b):
    np.testing.assert_array_equal(v.image.read(), image)
    np.testing.assert_array_equal(v.labels.read(), labels)
  np.testing.assert_array_equal(a.mask.read(), mask)
  assert b.mask is None and tuple(b.image.resolution) == (30.0, 4.0, 4.0)
  (c,) = dataset_volumes(config, "val")  # zarr written x, y, z: its attribute says so
  assert (c.name, c.z_range, c.spatial_shape) == ("cz", (2, 6), (4, 8, 10))
  np.testing.assert_array_equal(c.windowed().labels.read(), labels[2:6])
  (d,) = dataset_volumes(config, "test")
  np.testing.assert_array_equal(d.image.read(), image)
  assert d.labels is None


def test_own_volumes_from_a_yaml_or_json_file(tmp_path, own_files):
  (tmp_path / "splits.yaml").write_text(
    "train:\n  - {image: a.h5:raw, labels: a.h5:seg}\ntest:\n  - image: b-image.tif\n"
  )
  (tmp_path / "splits.json").write_text('{"val": [{"image": "a.h5:raw", "name": "v"}]}')
  config = _own_config(tmp_path)
  config.volumes_file = "splits.yaml"
  assert [v.name for v in dataset_volumes(config, "train")] == ["a"]
  assert [v.name for v in dataset_volumes(config, "test")] == ["b-image"]
  config.volumes_file = str(tmp_path / "splits.json")
  assert [v.name for v in dataset_volumes(config, "val")] == ["v"]


@pytest.mark.parametrize(
  "entry, message",
  [
    ({"image": "nope.h5:raw"}, r"train\[0\] image: .*nope\.h5"),
    ({"image": "a.h5:raw", "labels": "c.zarr/seg", "axis_order": "zyx"}, "contradicts"),
    ({"image": "a.h5:raw", "mask": "b-labels.tif"}, r"train\[0\]: .*mask must be uint8 or bool"),
    ({"image": "a.h5:raw", "lables": "a.h5:seg"}, r"train\[0\]: unknown key.*lables"),
    ({"labels": "a.h5:seg"}, r"train\[0\]: has no 'image'"),
    ("a.h5:raw", r"train\[0\]: an entry is a mapping"),
    ({"image": "a.h5:raw", "z_range": (4, 9)}, r"train\[0\]: z_range"),
    ({"image": "a.h5:raw", "skeleton": "a.h5"}, r"train\[0\]: skeleton .* must be"),
    ({"image": "a.h5:raw", "resolution": (0, 4, 4)}, r"train\[0\]: resolution"),
  ],
)
def test_a_bad_entry_is_one_line_naming_it(tmp_path, own_files, entry, message):
  from jaxseg.common.errors import JaxsegError

  with pytest.raises(JaxsegError, match=message) as caught:
    dataset_volumes(_own_config(tmp_path, train=(entry,)), "train")
  assert "\n" not in str(caught.value)


def test_mismatched_shapes_dtypes_and_names_are_refused(tmp_path, own_files):
  from jaxseg.common.errors import ConfigError

  with h5py.File(tmp_path / "e.h5", "w") as f:
    f["small"] = np.zeros((6, 8, 9), np.uint8)
    f["float_labels"] = np.zeros((6, 8, 10), np.float32)
  bad = {
    "has spatial shape": {"image": "a.h5:raw", "labels": "e.h5:small"},
    "integer array of ids": {"image": "a.h5:raw", "labels": "e.h5:float_labels"},
    "mask .* has shape": {"image": "a.h5:raw", "mask": "e.h5:small"},
    "boundaries .* has shape": {"image": "a.h5:raw", "boundaries": "e.h5:small"},
    "boundary map must be float": {"image": "a.h5:raw", "boundaries": "a.h5:seg"},
  }
  for message, entry in bad.items():
    with pytest.raises(VolumeError, match=rf"train\[0\]: .*{message}"):
      dataset_volumes(_own_config(tmp_path, train=(entry,)), "train")
  twice = ({"image": "a.h5:raw"}, {"image": "a.h5:mask", "name": "a"})
  with pytest.raises(ConfigError, match=r"names \['a'\] are used more than once"):
    dataset_volumes(_own_config(tmp_path, train=twice), "train")
  (tmp_path / "s.json").write_text('{"train": [{"image": "a.h5:raw"}]}')
  config = _own_config(tmp_path, train=({"image": "a.h5:raw"},))
  config.volumes_file = "s.json"
  with pytest.raises(ConfigError, match=r"both in config\.data\.volumes\.train and in"):
    dataset_volumes(config, "train")


def test_training_crops_ignore_what_lies_outside_the_mask(tmp_path):
  """Voxels outside an entry's mask read as -1 (unlabeled): no target, no loss there."""
  from jaxseg.common.config_util import load_config
  from jaxseg.data.pipeline import TrainData

  labels = RNG.integers(1, 9, (24, 80, 80)).astype(np.uint32)
  mask = np.zeros(labels.shape, np.uint8)
  mask[:, :, 30:50] = 1
  with h5py.File(tmp_path / "m.h5", "w") as f:
    f["raw"], f["seg"], f["mask"] = (
      RNG.integers(0, 255, labels.shape).astype(np.uint8),
      labels,
      mask,
    )
  entry = {"image": "m.h5:raw", "labels": "m.h5:seg", "mask": "m.h5:mask"}
  config = load_config(
    str(REPO_ROOT / "configs" / "own_data_example.py"),
    {"data.root": str(tmp_path), "data.volumes.train": (entry,), "data.in_memory": False},
  )
  data = TrainData(config, "train")
  for crop in data.crops(0, 4):
    _, read = data.read_crop(crop)
    window = tuple(slice(s, s + n) for s, n in zip(crop.start, data.read_shape, strict=True))
    np.testing.assert_array_equal(
      read, np.where(mask[window] == 1, labels[window].astype(np.int64), -1)
    )
