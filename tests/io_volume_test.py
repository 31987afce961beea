"""jaxseg.io: round trips for every format and both axis orders, lazy box reads, clear errors."""

import json
import os

import h5py
import numpy as np
import pytest
import tifffile

from jaxseg.io import VolumeError, create_zarr, open_volume, read_volume, write_volume

RNG = np.random.default_rng(0)
LABELS = RNG.integers(0, 2**20, (6, 10, 14)).astype(np.uint32)
IMAGE_4D = RNG.integers(0, 255, (2, 6, 10, 14)).astype(np.uint8)


def _spec(tmp_path, fmt, order):
  name = f"vol_{order}"
  return {
    "zarr": (str(tmp_path / f"{name}.zarr"), None),
    "zarr3": (str(tmp_path / f"{name}.zarr3"), None),
    "n5": (str(tmp_path / f"{name}.n5"), None),
    "h5": (str(tmp_path / "vols.h5") + f":{name}", None),
    "tif": (str(tmp_path / f"{name}.tif"), None),
    "precomputed": ("precomputed://file://" + str(tmp_path / name), None),
    "png": (str(tmp_path / name), "png"),
  }[fmt]


FORMATS_AND_ORDERS = [
  (fmt, order)
  for fmt in ("zarr", "zarr3", "n5", "h5", "tif", "precomputed")
  for order in ("zyx", "xyz")
] + [("png", "zyx")]  # a PNG folder is one file per z by construction


@pytest.mark.parametrize(("fmt", "order"), FORMATS_AND_ORDERS)
def test_round_trip_every_format_and_axis_order(tmp_path, fmt, order):
  data = LABELS.astype(np.uint16) if fmt == "png" else LABELS
  path, format_ = _spec(tmp_path, fmt, order)
  write_volume(
    path, data, format=format_, axis_order=order, resolution=(30, 6, 6), chunks=(2, 4, 4)
  )
  # TIFF and PNG carry no attributes: the caller names the axis order, as for foreign files.
  reopen_order = order if fmt in ("tif", "png") else None
  vol = open_volume(path, axis_order=reopen_order)
  assert vol.shape == data.shape
  assert vol.axis_order == ("xyz" if fmt == "precomputed" else order)
  np.testing.assert_array_equal(vol.read(), data)
  np.testing.assert_array_equal(vol[1:4, 2:9, -5:], data[1:4, 2:9, -5:])
  np.testing.assert_array_equal(vol[3], data[3])
  np.testing.assert_array_equal(vol[..., 7], data[..., 7])
  if fmt not in ("tif", "png"):
    assert vol.resolution == (30.0, 6.0, 6.0)


def test_on_disk_order_is_really_transposed(tmp_path):
  """An xyz volume is stored x-major on disk, exactly as NISB files are."""
  write_volume(tmp_path / "a.zarr", LABELS, axis_order="xyz")
  import tensorstore as ts

  raw = (
    ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / "a.zarr")}})
    .result()
    .read()
    .result()
  )
  np.testing.assert_array_equal(raw, LABELS.transpose(2, 1, 0))
  box = open_volume(tmp_path / "a.zarr")[1:5, 2:8, 3:9]
  assert box.flags.c_contiguous  # canonical C order, ready for numba / jax kernels
  np.testing.assert_array_equal(box, LABELS[1:5, 2:8, 3:9])


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_four_d_channels_and_chunk_aligned_writes(tmp_path, zarr_format):
  path = tmp_path / "img.zarr" / "img"
  out = create_zarr(
    path,
    IMAGE_4D.shape,
    "uint8",
    chunks=(2, 3, 5, 7),
    axis_order="xyzc",
    resolution=(20, 9, 9),
    source="unit test",
    zarr_format=zarr_format,
  )
  for z in (0, 3):
    for y in (0, 5):
      out.write((0, z, y, 0), IMAGE_4D[:, z : z + 3, y : y + 5, :])
  out.flush()
  vol = open_volume(path)
  assert vol.axis_order == "xyzc" and vol.shape == IMAGE_4D.shape and vol.has_channels
  np.testing.assert_array_equal(vol.read(), IMAGE_4D)
  np.testing.assert_array_equal(vol[1, 2:5, :, 3:9], IMAGE_4D[1, 2:5, :, 3:9])
  assert vol.attrs["source"] == "unit test" and vol.attrs["offset"] == [0, 0, 0]
  group_meta = ".zgroup" if zarr_format == 2 else "zarr.json"
  assert os.path.exists(tmp_path / "img.zarr" / group_meta)


def test_unaligned_write_is_refused(tmp_path):
  out = create_zarr(tmp_path / "a.zarr", (8, 8, 8), "uint8", chunks=(4, 4, 4))
  with pytest.raises(VolumeError, match="not aligned"):
    out.write((0, 2, 0), np.ones((4, 4, 4), np.uint8))
  with pytest.raises(VolumeError, match="outside the volume"):
    out.write((4, 4, 6), np.ones((4, 4, 4), np.uint8))
  out.write((4, 4, 4), np.ones((4, 4, 4), np.uint8))  # ends at the volume end: fine
  out.flush()
  assert open_volume(tmp_path / "a.zarr").read().sum() == 64


def test_existing_outputs_are_never_overwritten_silently(tmp_path):
  write_volume(tmp_path / "a.zarr", LABELS)
  with pytest.raises(VolumeError, match="already exists"):
    create_zarr(tmp_path / "a.zarr", (2, 2, 2), "uint8")
  with pytest.raises(VolumeError, match="already exists"):
    write_volume(tmp_path / "a.zarr", LABELS * 0)
  np.testing.assert_array_equal(read_volume(tmp_path / "a.zarr"), LABELS)
  write_volume(tmp_path / "f.h5:main", LABELS)
  with pytest.raises(VolumeError, match="exists"):
    write_volume(tmp_path / "f.h5:main", LABELS * 0)
  write_volume(tmp_path / "a.zarr", LABELS * 0, overwrite=True)
  assert read_volume(tmp_path / "a.zarr").max() == 0


def test_zarr_metadata_attributes(tmp_path):
  create_zarr(
    tmp_path / "aff.zarr",
    (3, 4, 8, 8),
    "float16",
    resolution=(20, 9, 9),
    offset=(4, 0, 0),
    source="pred.zarr",
  )
  attrs = json.loads((tmp_path / "aff.zarr" / ".zattrs").read_text())
  assert attrs == {
    "axis_order": "czyx",
    "resolution": [20.0, 9.0, 9.0],
    "offset": [4, 0, 0],
    "source": "pred.zarr",
  }


def test_foreign_files_with_explicit_axis_order_and_resolution(tmp_path):
  with h5py.File(tmp_path / "x.h5", "w") as f:
    f["raw"] = LABELS.transpose(2, 1, 0)
    f["other"] = np.zeros((2, 2, 2))
  vol = open_volume(str(tmp_path / "x.h5") + ":raw", axis_order="xyz", resolution=(40, 4, 4))
  np.testing.assert_array_equal(vol.read(), LABELS)
  assert vol.resolution == (40.0, 4.0, 4.0)
  vol = open_volume(tmp_path / "x.h5", dataset="raw", axis_order="xyz")
  np.testing.assert_array_equal(vol[0], LABELS[0])
  tifffile.imwrite(tmp_path / "s.tif", LABELS.astype(np.uint16))
  np.testing.assert_array_equal(open_volume(tmp_path / "s.tif")[2:4], LABELS[2:4].astype(np.uint16))


@pytest.mark.realdata
def test_real_gala_h5_reads_lazily(shared_data):
  vol = open_volume(shared_data / "gala_fibsem_example" / "train-gt.lzf.h5")
  assert vol.shape == (50, 100, 200) and vol.dtype == np.int32
  with h5py.File(shared_data / "gala_fibsem_example" / "train-gt.lzf.h5") as f:
    np.testing.assert_array_equal(vol[10:20, 5:50, 100:], f["stack"][10:20, 5:50, 100:])


@pytest.mark.parametrize(
  ("make", "spec", "message"),
  [
    (None, "missing.zarr", "no such file"),
    (None, "missing.h5:main", "no such HDF5 file"),
    ("h5two", "two.h5", "name a dataset"),
    ("h5two", "two.h5:nope", "no dataset 'nope'"),
    ("group", "grp.zarr", "is a group"),
    ("rank", "rank.zarr", "3-D .* or 4-D"),
    ("complex", "c.h5:c", "unsupported dtype"),
    ("txt", "notes.txt", "unknown file type"),
    ("empty", "emptydir", "not a volume"),
  ],
)
def test_bad_input_errors_name_the_file(tmp_path, make, spec, message):
  os.chdir(tmp_path)
  if make == "h5two":
    with h5py.File("two.h5", "w") as f:
      f["a"] = np.zeros((2, 2, 2))
      f["b"] = np.zeros((2, 2, 2))
  elif make == "group":
    write_volume("grp.zarr/img", LABELS)
  elif make == "rank":
    import tensorstore as ts

    ts.open(
      {
        "driver": "zarr",
        "kvstore": {"driver": "file", "path": "rank.zarr"},
        "metadata": {"shape": [4, 4], "chunks": [2, 2], "dtype": "<u1"},
      },
      create=True,
    ).result()
  elif make == "complex":
    with h5py.File("c.h5", "w") as f:
      f["c"] = np.zeros((2, 2, 2), np.complex64)
  elif make == "txt":
    open("notes.txt", "w").close()
  elif make == "empty":
    os.mkdir("emptydir")
  with pytest.raises(VolumeError, match=message) as err:
    open_volume(spec)
  assert spec.split(":")[0] in str(err.value)


def test_wrong_axis_order_is_explained(tmp_path):
  write_volume(tmp_path / "a.zarr", LABELS)
  with pytest.raises(VolumeError, match="permutation of 'zyx'"):
    open_volume(tmp_path / "a.zarr", axis_order="xyzc")


def test_axis_order_precedence(tmp_path):
  """Explicit order > the file's attribute > the caller's default > canonical."""
  write_volume(tmp_path / "tagged.zarr", LABELS, axis_order="xyz")  # carries axis_order
  assert open_volume(tmp_path / "tagged.zarr", default_axis_order="zyx").axis_order == "xyz"
  np.testing.assert_array_equal(
    open_volume(tmp_path / "tagged.zarr", default_axis_order="zyx").read(), LABELS
  )
  with h5py.File(tmp_path / "untagged.h5", "w") as f:  # a foreign file: no attributes
    f["seg"] = LABELS.transpose(2, 1, 0)
  untagged = str(tmp_path / "untagged.h5")
  assert open_volume(untagged).axis_order == "zyx"
  vol = open_volume(untagged, default_axis_order="xyz")
  assert vol.axis_order == "xyz"
  np.testing.assert_array_equal(vol.read(), LABELS)
  assert open_volume(untagged, axis_order="zyx", default_axis_order="xyz").axis_order == "zyx"
