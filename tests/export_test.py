"""``python -m jaxseg.export``: jaxseg's predictions and segmentations in PyTC's files.

Read back equal (values, dtype, and the axis permutation exactly: every axis has its own size),
named as PyTC names them (``<volume>/raw_x<n>_ch<...>.h5``, ``decoded_x<n>_ch<...>_...h5``, dataset
``main``), streamed (a block smaller than the volume gives the same data, and no read is larger
than a block), and the output rule: reused when identical, a user's file never written over, an
export made differently replaced only with --overwrite; bad flags end in one line. Volumes are
tiny, the CLI runs in subprocesses (as a user runs it).
"""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from cli_asserts import one_line
from conftest import REPO_ROOT

from jaxseg.common import config_util
from jaxseg.common.outputs import StageOutput
from jaxseg.decoding import decode_lib
from jaxseg.decoding.settings import decode_settings
from jaxseg.io import create_zarr, open_volume, write_volume

SHAPE = (3, 6, 10, 13)  # C, z, y, x: every axis its own size
AFF_NAME = "raw_x1_ch0-1-2.h5"  # PyTC's NISB tutorial: one view, channels 0, 1 and 2


def _predicted(folder, name, aff, attributes, complete=True):
  """``folder/<name>.zarr/affinities`` with its manifest entry, as jaxseg.predict leaves it."""
  stage = StageOutput(
    str(folder), name=f"predict:{name}", stage="predict", fingerprint={}, paths=[f"{name}.zarr"]
  )
  stage.open()
  create_zarr(
    folder / f"{name}.zarr" / "affinities", aff.shape, aff.dtype, chunks=(aff.shape[0], 2, 4, 4),
    resolution=(20, 9, 9), attributes=attributes,
  ).write((0, 0, 0, 0), aff, check_alignment=False).result()  # fmt: skip
  if complete:
    stage.finish()
  return str(folder / f"{name}.zarr")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
  """A run's folder: predictions/seed6.zarr (float16 affinities, channels 0-2 with their offsets)
  and segmentation/seed6 (jaxseg.decode's connected components of it)."""
  root = tmp_path_factory.mktemp("work")
  rng = np.random.default_rng(0)
  aff = rng.random(SHAPE).astype(np.float16)
  offsets = [[0, 0, 1], [0, 1, 0], [1, 0, 0]]
  attrs = {"offsets": offsets, "convention": "source", "channels": [0, 1, 2]}
  group = _predicted(root / "predictions", "seed6", aff, attrs)
  config = config_util.load_config(
    str(REPO_ROOT / "configs" / "demo.py"), {"decode.method": "cc", "decode.threshold": 0.5}
  )
  seg_folder = root / "segmentation" / "seed6"
  decode_lib.decode(decode_settings(config), group, str(seg_folder), show_progress=False)
  seg = open_volume(seg_folder / "segmentation")[:]
  assert seg.max() > 1  # several segments: a transposition would show
  return root, aff, seg


def _export(*args, cwd=REPO_ROOT):
  return subprocess.run(
    [sys.executable, "-m", "jaxseg.export", *map(str, args), "--noprogress"],
    capture_output=True, text=True, cwd=cwd,
  )  # fmt: skip


def _one_line(proc, *parts, status=1):
  return one_line(proc, "jaxseg.export", *parts, status=status, alone=True)


def _main(path):
  with h5py.File(path, "r") as f:
    assert list(f) == ["main"]
    return f["main"][...], dict(f["main"].attrs)


def test_affinities_in_pytc_layout_read_back_equal(work, tmp_path):
  root, aff, _ = work
  out = tmp_path / "pytc"
  args = [f"--input={root / 'predictions' / 'seed6.zarr'}", f"--output={out}", "--axis_order=xyz"]
  # Runs the CLI in a process that reports, at exit, whether anything imported JAX.
  probe = (
    "import atexit, runpy, sys; "
    "atexit.register(lambda: print('jax imported:', any(m == 'jax' or m.startswith('jax.') "
    "for m in sys.modules))); "
    f"sys.argv = ['jaxseg.export', *{args!r}, '--noprogress']; "
    "runpy.run_module('jaxseg.export', run_name='__main__')"
  )
  done = subprocess.run(
    [sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT
  )
  assert done.returncode == 0, done.stderr
  assert "jax imported: False" in done.stdout
  path = out / "seed6" / AFF_NAME
  assert f"{path}:main (c, x, y, z) float16" in done.stdout
  data, attrs = _main(path)
  # PyTC's (c, x, y, z): the sizes say which axis went where, the values that nothing moved.
  assert data.shape == (3, 13, 10, 6) and data.dtype == np.float16
  np.testing.assert_array_equal(data, aff.transpose(0, 3, 2, 1))
  assert attrs["axis_order"] == "cxyz" and list(attrs["resolution"]) == [20, 9, 9]
  assert attrs["offsets"].tolist() == [[0, 0, 1], [0, 1, 0], [1, 0, 0]]
  # jaxseg reads its export back as the prediction it was.
  back = open_volume(f"{path}:main")
  assert back.shape == SHAPE and back.resolution == (20, 9, 9)
  np.testing.assert_array_equal(back[:], aff)

  zyx = _export(args[0], f"--output={tmp_path / 'zyx'}", "--axis_order=zyx")
  assert zyx.returncode == 0, zyx.stderr
  np.testing.assert_array_equal(_main(tmp_path / "zyx" / "seed6" / AFF_NAME)[0], aff)

  again = _export(*args)
  assert again.returncode == 0 and "reused an identical export" in again.stdout


def test_names_follow_views_and_channels(tmp_path):
  """Eight test-time views of channels 1 and 4: x8, ch1-4; a lone array is named by its group."""
  aff = np.zeros((2, 3, 4, 5), np.float32)
  views = {"views": [f"view{i}" for i in range(8)]}
  group = _predicted(tmp_path, "cube", aff, {"channels": [1, 4], "jaxseg_predict": views})
  done = _export(f"--input={group}/affinities", f"--output={tmp_path / 'out'}", "--axis_order=xyz")
  assert done.returncode == 0, done.stderr
  assert (tmp_path / "out" / "cube" / "raw_x8_ch1-4.h5").is_file()


def test_streaming_gives_the_same_data_in_bounded_reads(work, tmp_path):
  root = work[0]
  whole = _export(
    f"--input={root / 'predictions' / 'seed6.zarr'}", f"--output={tmp_path / 'whole'}",
    "--axis_order=xyz", "--block=64",
  )  # fmt: skip
  assert whole.returncode == 0, whole.stderr
  # Small blocks, and every read recorded: none is larger than a block (rounded to the input's
  # 2 x 4 x 4 chunks), so memory does not grow with the volume.
  args = [
    f"--input={root / 'predictions' / 'seed6.zarr'}", f"--output={tmp_path / 'slabs'}",
    "--axis_order=xyz", "--block=2,3,3", "--noprogress",
  ]  # fmt: skip
  probe = (
    "import atexit, runpy, sys; from jaxseg.io import volume; reads = []; "
    "read = volume.Volume.__getitem__; "
    "volume.Volume.__getitem__ = lambda self, key: reads.append(key) or read(self, key); "
    "atexit.register(lambda: print('reads', len(reads), max("
    "tuple(s.stop - s.start for s in k[-3:]) for k in reads))); "
    f"sys.argv = ['jaxseg.export', *{args!r}]; "
    "runpy.run_module('jaxseg.export', run_name='__main__')"
  )
  done = subprocess.run(
    [sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT
  )
  assert done.returncode == 0, done.stderr
  assert "reads 36 (2, 4, 4)" in done.stdout  # 3 x 3 x 4 boxes of 2 x 4 x 4, the last clipped
  small, _ = _main(tmp_path / "slabs" / "seed6" / AFF_NAME)
  large, _ = _main(tmp_path / "whole" / "seed6" / AFF_NAME)
  assert small.dtype == large.dtype and small.tobytes() == large.tobytes()


def test_segmentation_in_pytc_layout(work, tmp_path):
  root, _, seg = work
  done = _export(
    f"--input={root / 'segmentation' / 'seed6'}", f"--output={tmp_path}", "--axis_order=xyz"
  )
  assert done.returncode == 0, done.stderr
  path = tmp_path / "seed6" / "decoded_x1_ch0-1-2_affinity_cc_0.5.h5"
  data, attrs = _main(path)
  assert data.shape == (13, 10, 6) and data.dtype == seg.dtype and attrs["axis_order"] == "xyz"
  np.testing.assert_array_equal(data, seg.transpose(2, 1, 0))
  np.testing.assert_array_equal(open_volume(f"{path}:main")[:], seg)


def test_never_writes_over_what_it_did_not_write(work, tmp_path):
  root = work[0]
  group = root / "predictions" / "seed6.zarr"
  # PyTC's results folder: not jaxseg's, so nothing is written into it, not even a new folder.
  results = tmp_path / "pytc_results"
  (results / "seed6").mkdir(parents=True)
  (results / "seed6" / "eval.txt").write_text("PyTC's scores")
  for extra in ([], ["--overwrite"]):
    proc = _export(f"--input={group}", f"--output={results}", "--axis_order=xyz", *extra)
    _one_line(proc, str(results), "files jaxseg did not make (seed6)")
  assert os.listdir(results) == ["seed6"] and os.listdir(results / "seed6") == ["eval.txt"]
  # A folder jaxseg exported into, where a file of the user's took the name since.
  seg_args = [f"--input={root / 'segmentation' / 'seed6'}", "--axis_order=xyz"]
  assert _export(*seg_args, f"--output={tmp_path / 'mine'}").returncode == 0
  (tmp_path / "mine" / "seed6" / AFF_NAME).write_text("the user's")
  for extra in ([], ["--overwrite"]):
    proc = _export(f"--input={group}", f"--output={tmp_path / 'mine'}", "--axis_order=xyz", *extra)
    _one_line(proc, AFF_NAME, "jaxseg did not make", "not even with --overwrite")
  assert (tmp_path / "mine" / "seed6" / AFF_NAME).read_text() == "the user's"

  # Its own export made another way: replaced only with --overwrite.
  args = [f"--input={group}", f"--output={tmp_path / 'own'}", "--volume=other", "--name=pred.h5"]
  assert _export(*args, "--axis_order=zyx").returncode == 0
  refused = _export(*args, "--axis_order=xyz")
  _one_line(refused, "made differently", "axis_order", "--overwrite")
  assert _main(tmp_path / "own" / "other" / "pred.h5")[0].shape == SHAPE
  assert _export(*args, "--axis_order=xyz", "--overwrite").returncode == 0
  assert _main(tmp_path / "own" / "other" / "pred.h5")[0].shape == (3, 13, 10, 6)
  manifest = json.loads((tmp_path / "own" / "other" / ".jaxseg.json").read_text())
  assert list(manifest["entries"]) == ["export:pred.h5"]


def test_unfinished_prediction_is_refused(tmp_path):
  group = _predicted(tmp_path, "killed", np.zeros(SHAPE, np.float16), {}, complete=False)
  proc = _export(f"--input={group}", f"--output={tmp_path / 'out'}", "--axis_order=xyz")
  _one_line(proc, "--input", "is not finished", "predict:killed")
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
  "flag, parts, status",
  [
    ("--input=MISSING", ["nowhere.zarr", "no such file or folder"], 1),
    ("--input=FLOAT3D", ["flat.zarr", "float32", "segmentation [z, y, x] of integers"], 1),
    ("--input=PLAIN", ["plain.zarr", "not a jaxseg.decode segmentation", "--name"], 1),
    ("--format=tif", ["--format=tif", "'h5'"], 2),
    ("--axis_order=xyq", ["--axis_order=xyq", "permutation of 'xyz'"], 2),
    ("--block=0,4", ["--block=0,4", "positive integers"], 2),
    ("--name=sub/pred.txt", ["--name=sub/pred.txt", "ending in .h5"], 2),
  ],
)
def test_bad_flags_are_one_line(flag, parts, status, work, tmp_path):
  root = work[0]
  write_volume(tmp_path / "flat.zarr", np.zeros((4, 5, 6), np.float32))
  write_volume(tmp_path / "plain.zarr", np.zeros((4, 5, 6), np.uint32))
  inputs = {
    "MISSING": tmp_path / "nowhere.zarr",
    "FLOAT3D": tmp_path / "flat.zarr",
    "PLAIN": tmp_path / "plain.zarr",
  }
  args = {"input": root / "predictions" / "seed6.zarr", "output": tmp_path / "out"}
  args["axis_order"] = "xyz"
  name, _, value = flag[2:].partition("=")
  args[name] = inputs.get(value, value)
  proc = _export(*(f"--{k}={v}" for k, v in args.items()))
  _one_line(proc, *parts, status=status)
  assert not (tmp_path / "out").exists()
