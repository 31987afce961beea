"""The decoder job: settings checks, whole-volume vs blockwise (daisy), resume, the CLI, no JAX.

Affinities come from realistic label volumes (a Voronoi tessellation with membranes, and the
real FIB-SEM ground truth when ``../shared/data`` is staged) through ``compute_affinities``,
plus noise, written as the zarr ``jaxseg.predict`` would write.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, SHARED_DATA, require_shared

from jaxseg.common import config_util
from jaxseg.common.errors import OutputError
from jaxseg.data.affinity import compute_affinities
from jaxseg.decoding import blockwise, decode_lib
from jaxseg.decoding.settings import decode_settings
from jaxseg.io import VolumeError, create_zarr, open_volume

SOURCE_XYZ = ((0, 0, 1), (0, 1, 0), (1, 0, 0))  # banis6 channels 0-2


def voronoi_labels(shape, n, seed):
  """Cells of a random Voronoi tessellation (anisotropic), with 1-voxel membranes of 0."""
  rng = np.random.default_rng(seed)
  seeds = rng.uniform(0, 1, (n, 3)) * np.array(shape)
  grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
  d = ((grid[..., None, :] - seeds) * np.array([3.0, 1.0, 1.0])) ** 2
  cells = np.argmin(d.sum(-1), -1).astype(np.uint32) + 1
  edge = np.zeros(shape, bool)
  for axis in range(3):
    a = [slice(None)] * 3
    b = [slice(None)] * 3
    a[axis], b[axis] = slice(1, None), slice(None, -1)
    edge[tuple(a)] |= cells[tuple(a)] != cells[tuple(b)]
  return np.where(edge, 0, cells)


def write_affinities(
  path, labels, noise, seed, dtype=np.float16, attrs=True, chunks=None, convention="source"
):
  aff, _ = compute_affinities(labels, SOURCE_XYZ, convention)
  rng = np.random.default_rng(seed)
  aff = np.clip(aff.astype(np.float32) + rng.normal(0, noise, aff.shape), 0, 1).astype(dtype)
  attributes = (
    {"offsets": [list(o) for o in SOURCE_XYZ], "convention": convention, "channels": [0, 1, 2]}
    if attrs
    else {}
  )
  create_zarr(
    path, aff.shape, dtype, chunks=chunks or aff.shape, resolution=(20, 9, 9),
    attributes=attributes,
  ).write((0, 0, 0, 0), aff).result()  # fmt: skip
  return aff


def cc_settings(recipe="nisb_base", **overrides):
  config = config_util.load_config(
    str(REPO_ROOT / "configs" / f"{recipe}.py"),
    {f"decode.{k}": v for k, v in overrides.items()},
  )
  return decode_settings(config)


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
  labels = voronoi_labels((24, 40, 44), 30, seed=0)
  path = str(tmp_path_factory.mktemp("aff") / "pred.zarr" / "affinities")
  aff = write_affinities(path, labels, noise=0.25, seed=1)
  return path, labels, aff


def read_seg(output, name="segmentation"):
  return np.asarray(open_volume(os.path.join(output, name))[:])


def test_settings_refuse_unknown_keys_and_bad_values():
  settings = cc_settings()
  assert (settings.method, settings.threshold, settings.block_shape) == (
    "cc",
    0.75,
    (256, 512, 512),
  )
  snemi = decode_settings(config_util.load_config(str(REPO_ROOT / "configs" / "snemi.py")))
  assert snemi.dust.size == 800 and snemi.branch_merge.one_sided_min_size == 100
  with pytest.raises(ValueError, match="unknown key"):
    decode_settings({"method": "cc", "best_buddies": True})
  with pytest.raises(ValueError, match="unknown key"):
    decode_settings({"method": "waterz", "branch_merge": {"enabled": True, "one_side": 0.8}})
  with pytest.raises(ValueError, match="threshold"):
    decode_settings({"method": "cc", "threshold": 1.5})
  with pytest.raises(ValueError, match="aff_threshold_low"):
    decode_settings({"method": "waterz", "aff_threshold_low": 0.9, "aff_threshold_high": 0.5})


def test_blockwise_cc_equals_whole_volume_bit_for_bit(volume, tmp_path):
  path, _, _ = volume
  whole = decode_lib.decode(
    cc_settings(blockwise="never", threshold=0.5), path, str(tmp_path / "w")
  )
  # Blocks that do not divide the volume, so the last ones are shrunk on every axis.
  settings = cc_settings(blockwise="always", threshold=0.5, block_shape=(10, 16, 12))
  split = decode_lib.decode(settings, path, str(tmp_path / "b"), show_progress=False)
  assert split["blocks"] == 3 * 3 * 4 and split["segments"] == whole["segments"]
  a, b = read_seg(tmp_path / "w"), read_seg(tmp_path / "b")
  assert a.dtype == b.dtype and np.array_equal(a, b)
  assert not os.path.exists(tmp_path / "b" / blockwise.SCRATCH)  # scratch removed when done
  # min_size acts on whole components, also those that span blocks.
  whole = decode_lib.decode(
    cc_settings(blockwise="never", threshold=0.5, min_size=40), path, str(tmp_path / "w40")
  )
  split = decode_lib.decode(
    cc_settings(blockwise="always", threshold=0.5, min_size=40, block_shape=(10, 16, 12)),
    path,
    str(tmp_path / "b40"),
    show_progress=False,
  )
  assert np.array_equal(read_seg(tmp_path / "w40"), read_seg(tmp_path / "b40"))
  assert whole["segments"][0] < int(read_seg(tmp_path / "w").max())


@pytest.mark.slow
def test_blockwise_cc_with_mask_and_two_workers(volume, tmp_path):
  path, labels, _ = volume
  mask = np.ones(labels.shape, np.uint8)
  mask[:3] = 0  # QC-style: the first sections are bad
  mask[:, :, 30:] = 0
  create_zarr(str(tmp_path / "mask.zarr"), mask.shape, np.uint8).write((0, 0, 0), mask).result()
  common = dict(threshold=0.6, affinity_mask_path=str(tmp_path / "mask.zarr"))
  decode_lib.decode(cc_settings(blockwise="never", **common), path, str(tmp_path / "w"))
  decode_lib.decode(
    cc_settings(blockwise="always", block_shape=(12, 20, 22), num_workers=2, **common),
    path,
    str(tmp_path / "b"),
    show_progress=False,
  )
  a = read_seg(tmp_path / "w")
  assert np.array_equal(a, read_seg(tmp_path / "b"))
  # Masked voxels keep no edges of their own, but an unmasked neighbour's edge into them survives.
  # (source convention: x = 29's edge into x = 30 is stored at 29): x = 30 is labelled, no further.
  assert not a[:3].any() and not a[:, :, 31:].any() and a[3:, :, 30].any()


def test_blockwise_cc_of_target_convention_affinities(tmp_path):
  labels = voronoi_labels((20, 36, 36), 20, seed=7)
  path = str(tmp_path / "t.zarr")
  write_affinities(path, labels, noise=0.25, seed=8, convention="target")
  common = dict(convention="target", threshold=0.5)
  whole = decode_lib.decode(cc_settings(blockwise="never", **common), path, str(tmp_path / "w"))
  decode_lib.decode(
    cc_settings(blockwise="always", block_shape=(7, 12, 16), **common),
    path,
    str(tmp_path / "b"),
    show_progress=False,
  )
  assert whole["segments"][0] > 10
  assert np.array_equal(read_seg(tmp_path / "w"), read_seg(tmp_path / "b"))


@pytest.mark.slow
def test_blockwise_cc_through_a_cluster_worker_command(volume, tmp_path):
  path, _, _ = volume
  marks = tmp_path / "marks"
  marks.mkdir()
  # Stands in for "srun ...": a prefix that records each worker start, then runs the worker.
  command = f"sh -c 'mktemp -p {marks} && exec \"$@\"' sh"
  settings = cc_settings(
    blockwise="always", threshold=0.5, block_shape=(12, 20, 22), worker_command=command,
    num_workers=2,
  )  # fmt: skip
  decode_lib.decode(settings, path, str(tmp_path / "b"), show_progress=False)
  decode_lib.decode(cc_settings(blockwise="never", threshold=0.5), path, str(tmp_path / "w"))
  assert np.array_equal(read_seg(tmp_path / "w"), read_seg(tmp_path / "b"))
  assert len(list(marks.iterdir())) >= 3  # at least one worker per stage came through it


def test_blockwise_resumes_after_a_failure(volume, tmp_path, monkeypatch):
  path, _, _ = volume
  settings = cc_settings(blockwise="always", threshold=0.5, block_shape=(12, 20, 22))
  decode_lib.decode(cc_settings(blockwise="never", threshold=0.5), path, str(tmp_path / "w"))
  real = blockwise._relabel
  calls = []

  def flaky(job, block):
    calls.append(block.block_id)
    if len(calls) > 3:
      raise OSError("disk full (simulated)")
    real(job, block)

  monkeypatch.setattr(blockwise, "_relabel", flaky)
  with pytest.raises(OSError, match="simulated"):  # in-process workers: the error itself
    decode_lib.decode(settings, path, str(tmp_path / "b"), show_progress=False)
  assert not os.path.exists(tmp_path / "b" / decode_lib.SUMMARY)
  monkeypatch.setattr(blockwise, "_relabel", real)
  resumed = []
  monkeypatch.setattr(blockwise, "_cc_fragments", lambda job, block: resumed.append(block))
  # --overwrite replaces decodes made differently; the same job unfinished still resumes.
  summary = decode_lib.decode(
    settings, path, str(tmp_path / "b"), overwrite=True, show_progress=False
  )
  assert resumed == []  # the first stages were complete: not one block recomputed
  assert summary["complete"] and np.array_equal(read_seg(tmp_path / "w"), read_seg(tmp_path / "b"))


def waterz_settings(**overrides):
  # Small segments in a small volume: scale PyTC's dust sizes down.
  return cc_settings(
    "snemi", **{"dust.size": 60, "dust.remove_size": 20, "thresholds": (0.3, 0.6), **overrides}
  )


@pytest.fixture(scope="module")
def waterz_volume(tmp_path_factory):
  labels = voronoi_labels((16, 48, 48), 24, seed=5)
  path = str(tmp_path_factory.mktemp("aff") / "snemi.zarr" / "affinities")
  write_affinities(path, labels, noise=0.2, seed=6, dtype=np.float32, convention="target")
  return path, labels


def test_blockwise_waterz_in_one_block_equals_whole_volume_waterz(waterz_volume, tmp_path):
  path, _ = waterz_volume
  whole = decode_lib.decode(waterz_settings(blockwise="never"), path, str(tmp_path / "w"))
  one = decode_lib.decode(
    waterz_settings(blockwise="always"), path, str(tmp_path / "b"), show_progress=False
  )
  assert one["blocks"] == 1 and one["segments"] == whole["segments"]
  for name in ("segmentation_t0.3", "segmentation_t0.6"):
    assert np.array_equal(read_seg(tmp_path / "w", name), read_seg(tmp_path / "b", name))


def test_blockwise_waterz_refuses_merge_functions_it_cannot_agglomerate(waterz_volume, tmp_path):
  path, _ = waterz_volume
  settings = waterz_settings(blockwise="always", merge_function="max10")
  with pytest.raises(ValueError, match=r"blockwise waterz.*does not implement"):
    decode_lib.decode(settings, path, str(tmp_path / "b"), show_progress=False)
  assert not os.path.exists(tmp_path / "b" / blockwise.SCRATCH)  # refused before writing anything


def test_blockwise_waterz_over_many_blocks_stays_close(waterz_volume, tmp_path):
  from jaxseg.metrics.rand import adapted_rand

  path, labels = waterz_volume
  decode_lib.decode(waterz_settings(blockwise="never"), path, str(tmp_path / "w"))
  decode_lib.decode(
    waterz_settings(blockwise="always", block_shape=(8, 24, 24), context=(4, 12, 12)),
    path,
    str(tmp_path / "b"),
    show_progress=False,
  )
  for name in ("segmentation_t0.3", "segmentation_t0.6"):
    whole, split = read_seg(tmp_path / "w", name), read_seg(tmp_path / "b", name)
    gap = adapted_rand(whole.astype(np.int64), split)
    assert gap.error < 0.05, (name, gap)
    assert abs(adapted_rand(labels, split).error - adapted_rand(labels, whole).error) < 0.03


def test_existing_output_is_refused_or_reused(volume, tmp_path):
  path, _, _ = volume
  out = str(tmp_path / "o")
  first = decode_lib.decode(cc_settings(threshold=0.5), path, out)
  before = read_seg(out)
  again = decode_lib.decode(cc_settings(threshold=0.5), path, out)
  assert again["already_done"] and again["segments"] == first["segments"]
  with pytest.raises(OutputError, match=r"thresholds: \[0.5\] -> \[0.7\]"):
    decode_lib.decode(cc_settings(threshold=0.7), path, out)
  assert np.array_equal(read_seg(out), before)  # nothing already written is touched
  decode_lib.decode(cc_settings(threshold=0.7), path, out, overwrite=True)
  # A higher threshold keeps a subset of the edges: less foreground.
  assert (read_seg(out) > 0).sum() < (before > 0).sum()


def test_bad_affinities_are_refused(volume, tmp_path):
  path, labels, aff = volume
  with pytest.raises(VolumeError, match=r"decode\.channels"):
    decode_lib.open_affinities(path, cc_settings(channels=(3, 4, 5)))
  with pytest.raises(VolumeError, match="'source' convention"):
    decode_lib.open_affinities(path, cc_settings(convention="target"))
  seg_path = str(tmp_path / "labels.zarr")
  create_zarr(seg_path, labels.shape, np.uint32).write((0, 0, 0), labels).result()
  with pytest.raises(VolumeError, match=r"expected affinities \[C, z, y, x\]"):
    decode_lib.open_affinities(seg_path, cc_settings())
  nan = aff.copy()
  nan[0, 5, 5, 5] = np.nan
  nan_path = str(tmp_path / "nan.zarr")
  create_zarr(nan_path, nan.shape, nan.dtype, attributes={"convention": "source"}).write(
    (0, 0, 0, 0), nan
  ).result()
  with pytest.raises(VolumeError, match="NaN"):
    decode_lib.decode(cc_settings(), nan_path, str(tmp_path / "out"))
  with pytest.raises(VolumeError, match="affinity mask must be"):
    decode_lib.decode(cc_settings(affinity_mask_path=path), path, str(tmp_path / "o"))


def test_files_without_attributes_use_the_config_channel_order(tmp_path):
  labels = voronoi_labels((8, 20, 20), 6, seed=3)
  with_attrs = write_affinities(str(tmp_path / "a.zarr"), labels, 0.0, 0)
  write_affinities(str(tmp_path / "b.zarr"), labels, 0.0, 0, attrs=False)
  a = decode_lib.open_affinities(str(tmp_path / "a.zarr"), cc_settings())
  b = decode_lib.open_affinities(str(tmp_path / "b.zarr"), cc_settings())
  assert a.positions == b.positions == (2, 1, 0) and a.distances == b.distances == (1, 1, 1)
  assert np.array_equal(a.read()[0], with_attrs[2])  # the z edge first


def test_pytc_cxyz_affinities_are_decoded_in_their_own_axis_order(tmp_path):
  """PyTC stores affinities (c, x, y, z): an h5 says so through --axis_order, a zarr through its
  own attribute; both decode exactly as the same affinities stored (c, z, y, x), whole-volume
  and blockwise, and a flag that contradicts the file is refused in one line."""
  import h5py

  labels = voronoi_labels((10, 22, 26), 12, seed=4)  # every axis a different size
  canonical = str(tmp_path / "czyx.zarr")
  aff = write_affinities(canonical, labels, 0.2, 5)
  cxyz = np.ascontiguousarray(aff.transpose(0, 3, 2, 1))
  with h5py.File(tmp_path / "pytc.h5", "w") as f:
    f["main"] = cxyz
  h5 = f"{tmp_path / 'pytc.h5'}:main"
  attrs = {"offsets": [list(o) for o in SOURCE_XYZ], "convention": "source", "channels": [0, 1, 2]}
  zarr = str(tmp_path / "cxyz.zarr")
  create_zarr(zarr, aff.shape, aff.dtype, axis_order="cxyz", attributes=attrs).write(
    (0, 0, 0, 0), aff
  ).result()
  assert open_volume(zarr).attrs["axis_order"] == "cxyz"
  for blockwise_ in ("never", "always"):
    settings = cc_settings(threshold=0.5, blockwise=blockwise_, block_shape=(8, 16, 16))
    want = decode_lib.decode(settings, canonical, str(tmp_path / blockwise_ / "want"))
    got = decode_lib.decode(settings, h5, str(tmp_path / blockwise_ / "h5"), axis_order="CXYZ")
    assert got["shape"] == list(labels.shape) and got["segments"] == want["segments"]
    expected = read_seg(tmp_path / blockwise_ / "want")
    assert np.array_equal(read_seg(tmp_path / blockwise_ / "h5"), expected)
    decode_lib.decode(settings, zarr, str(tmp_path / blockwise_ / "zarr"))
    assert np.array_equal(read_seg(tmp_path / blockwise_ / "zarr"), expected)
    assert got["fingerprint"]["axis_order"] == "cxyz" and "axis_order" not in want["fingerprint"]
  with pytest.raises(VolumeError, match=r"axis_order='czyx'.*contradicts.*'cxyz'"):
    decode_lib.open_affinities(zarr, settings, axis_order="czyx")
  assert decode_lib.open_affinities(zarr, settings, axis_order="cxyz").spatial_shape == (10, 22, 26)
  cmd = [
    sys.executable, "-m", "jaxseg.decode", f"--config={REPO_ROOT / 'configs' / 'demo.py'}",
    f"--affinities={zarr}", f"--output={tmp_path / 'cli'}", "--axis_order=xyzc",
  ]  # fmt: skip
  bad = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
  assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
  assert "contradicts" in bad.stderr and not os.path.exists(tmp_path / "cli")
  ok = subprocess.run(
    [*cmd[:4], f"--affinities={h5}", f"--output={tmp_path / 'cli'}", "--axis_order=cxyz"],
    capture_output=True, text=True, cwd=REPO_ROOT,
  )  # fmt: skip
  assert ok.returncode == 0, ok.stderr


@pytest.mark.realdata
def test_gala_ground_truth_decodes_back_to_itself_blockwise(tmp_path):
  import h5py

  from jaxseg.metrics.rand import adapted_rand

  path = require_shared(SHARED_DATA / "gala_fibsem_example" / "test-gt.lzf.h5")
  with h5py.File(path) as f:
    gt = np.asarray(f[next(iter(f))]).astype(np.uint32)
  aff_path = str(tmp_path / "gt.zarr")
  write_affinities(aff_path, gt, 0.0, 0, chunks=(3, 25, 50, 50))
  settings = cc_settings(blockwise="always", threshold=0.5, block_shape=(25, 50, 64))
  decode_lib.decode(settings, aff_path, str(tmp_path / "seg"), show_progress=False)
  seg = read_seg(tmp_path / "seg")
  assert adapted_rand(gt, seg).error < 1e-3  # adapted Rand ignores GT 0 (the boundary)


def test_cli_decodes_without_importing_jax(volume, tmp_path):
  path, _, _ = volume
  out = tmp_path / "cli"
  cmd = [
    sys.executable, "-m", "jaxseg.decode", f"--config={REPO_ROOT / 'configs' / 'demo.py'}", f"--affinities={path}", f"--output={out}",
  ]  # fmt: skip
  probe = "import sys, jaxseg.decode, jaxseg.decoding.blockwise, jaxseg.decoding.decode_lib; "
  probe += "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')))"
  result = subprocess.run(
    [sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT
  )
  assert result.stdout.strip() == "[]", result.stderr
  done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
  assert done.returncode == 0, done.stderr
  assert "segments" in done.stdout and (out / "preview.png").exists()
  summary = json.loads((out / decode_lib.SUMMARY).read_text())
  assert summary["complete"] and summary["method"] == "cc"
  bad = subprocess.run(
    [*cmd[:-1], f"--output={out}", "--config.decode.threshold=0.9"], capture_output=True,
    text=True, cwd=REPO_ROOT,
  )  # fmt: skip
  assert bad.returncode == 1 and "the decode there was made differently" in bad.stderr
  assert "Traceback" not in bad.stderr


def test_waterz_decode_warns_before_a_watershed_that_cuts_too_finely(tmp_path, caplog):
  """Tempered affinities below aff_threshold_high leave a few voxels per watershed region: decode
  says so (and records its estimate); affinities that reach the threshold do not warn."""
  labels = voronoi_labels((16, 48, 48), 24, seed=5)
  sharp = str(tmp_path / "sharp.zarr" / "affinities")
  write_affinities(sharp, labels, noise=0.0, seed=0, dtype=np.float32, convention="target")
  tempered = str(tmp_path / "tempered.zarr" / "affinities")
  aff = 1.0 / (1.0 + np.exp(-(open_volume(sharp).read() * 8.0 - 4.0) / 5.0))  # max 0.69
  rng = np.random.default_rng(0)
  aff = (aff + rng.uniform(0, 0.01, aff.shape)).astype(np.float32)
  create_zarr(
    tempered, aff.shape, np.float32, resolution=(20, 9, 9),
    attributes={"offsets": [list(o) for o in SOURCE_XYZ], "convention": "target", "channels": [0, 1, 2]},
  ).write((0, 0, 0, 0), aff).result()  # fmt: skip
  settings = waterz_settings(blockwise="never")
  with caplog.at_level("WARNING"):
    summary = decode_lib.decode(settings, tempered, str(tmp_path / "t"), show_progress=False)
  assert summary["watershed_estimate"]["voxels_per_region"] < 20
  assert summary["watershed_estimate"]["share_above_high"] == 0.0
  (warning,) = [r.getMessage() for r in caplog.records if "watershed would leave" in r.getMessage()]
  assert "decode.aff_threshold_high=0.999" in warning and tempered in warning
  caplog.clear()
  with caplog.at_level("WARNING"):
    summary = decode_lib.decode(settings, sharp, str(tmp_path / "s"), show_progress=False)
  assert summary["watershed_estimate"]["voxels_per_region"] >= 20
  assert not [r for r in caplog.records if "watershed would leave" in r.getMessage()]


@pytest.mark.parametrize("no_mask", ["", "null", "None", "NONE", " null ", None])
def test_null_mask_path_means_no_mask(no_mask, tmp_path):
  """PyTC's tutorial turns the mask off with ``affinity_mask_path=null``: not a file name."""
  settings = decode_settings({"method": "cc", "affinity_mask_path": no_mask})
  assert settings.affinity_mask_path == ""
  real = str(tmp_path / "null.zarr")
  assert decode_settings({"method": "cc", "affinity_mask_path": real}).affinity_mask_path == real
