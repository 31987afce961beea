"""``python -m jaxseg.qc --mask_from_report``: a mask rebuilt from an edited QC report.

The round trip: QC on small generated affinities, the report's front matter edited by hand (keep
range and ring width), the mask rebuilt from it by the CLI without the affinities, and compared
with what the mask builder makes of the edited values. Then the refusals: a mask made from other
values is not replaced without --overwrite, and a user's mistake (no report, a key missing, flags
that belong to a scan) ends in one line.
"""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from cli_asserts import one_line
from conftest import REPO_ROOT

from jaxseg.io import create_zarr, open_volume, write_volume
from jaxseg.quality import MASK_ATTR, QcSettings, build_affinity_mask, read_report, run_qc

SETTINGS = QcSettings(
  z_stride=2, k_edge=1, refine_window=3, border_width=6, bg_thresh=30, n_z_border=3
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """3 x 16 x 24 x 20 affinities (bad sections 0 and 15) and a NISB-style image (stored x, y, z,
  c) whose margin (rows y < 3, columns x >= 17) is dark."""
  root = tmp_path_factory.mktemp("data")
  aff = np.full((3, 16, 24, 20), 0.8, np.float16)
  aff[:, [0, 15]] = 0.6
  aff_path = str(root / "pred.zarr" / "affinities")
  create_zarr(
    aff_path, aff.shape, aff.dtype, chunks=aff.shape, resolution=(20, 9, 9),
    attributes={"channels": [0, 1, 2]},
  ).write((0, 0, 0, 0), aff).result()  # fmt: skip
  img = np.full((1, 16, 24, 20), 120, np.uint8)
  img[0, :, :3, :] = 0
  img[0, :, :, 17:] = 0
  img_path = str(root / "data.zarr" / "img")
  write_volume(img_path, img, axis_order="xyzc", resolution=(20, 9, 9))
  return aff_path, open_volume(img_path, default_axis_order="xyzc")


def _qc_folder(data, tmp_path):
  """A finished QC in ``tmp_path/qc``: its report, its mask's array and the image."""
  aff_path, image = data
  result = run_qc(SETTINGS, aff_path, tmp_path / "qc", image=image)
  assert (result.low_z, result.high_z) == (1, 15)
  return tmp_path / "qc" / "report.md", open_volume(result.mask)[:], image


def _edit(report, **values):
  """Changes ``key: value`` lines of the front matter in place, as a user would by hand."""
  text = report.read_text()
  for key, value in values.items():
    text, n = re.subn(rf"^{key}: .*$", f"{key}: {value}", text, count=1, flags=re.MULTILINE)
    assert n == 1, key
  report.write_text(text)


def _qc(*args, cwd=REPO_ROOT):
  return subprocess.run(
    [sys.executable, "-m", "jaxseg.qc", *map(str, args), "--noprogress"],
    capture_output=True, text=True, cwd=cwd,
  )  # fmt: skip


def _one_line(proc, *parts, status=1):
  return one_line(proc, "jaxseg.qc", *parts, status=status, alone=True)


def test_mask_rebuilt_from_an_edited_report(data, tmp_path):
  report, original, image = _qc_folder(data, tmp_path)
  _edit(report, low_z=3, high_z=12, border_width=2)
  front = read_report(report)
  expected = build_affinity_mask(front, tmp_path / "expected.zarr", image=image)[:]
  # The edit shows: fewer sections and a narrower ring (row 2 and columns 17, 18 are kept now).
  assert not expected[:3].any() and not expected[12:].any() and expected[3:12].any()
  assert expected[5, 2, 5] == 1 and original[5, 2, 5] == 0
  assert not np.array_equal(expected, original)

  # A named array: written, whatever the QC folder holds.
  named = tmp_path / "edited.zarr"
  done = _qc(f"--mask_from_report={report}", f"--output={named}")
  assert done.returncode == 0, done.stderr
  assert f"keep z [3, 12), ring 2 px where {image.path} <= 30" in done.stdout
  np.testing.assert_array_equal(open_volume(named)[:], expected)
  spec = open_volume(named).attrs[MASK_ATTR]
  assert (spec["low_z"], spec["high_z"], spec["border_width"]) == (3, 12, 2)

  # The default is the QC's own mask.zarr beside the report: made from other values, so it is
  # replaced only with --overwrite, and nothing is touched before.
  beside = report.parent / "mask.zarr"
  refused = _qc(f"--mask_from_report={report}")
  _one_line(refused, str(report.parent), "made differently", "spec.low_z: 1 -> 3", "--overwrite")
  np.testing.assert_array_equal(open_volume(beside)[:], original)
  replaced = _qc(f"--mask_from_report={report}", "--overwrite")
  assert replaced.returncode == 0, replaced.stderr
  np.testing.assert_array_equal(open_volume(beside)[:], expected)
  # Run again: the same mask is reused as it is.
  stamp = os.stat(beside / ".zarray").st_mtime_ns
  assert _qc(f"--mask_from_report={report}").returncode == 0
  assert os.stat(beside / ".zarray").st_mtime_ns == stamp


def test_image_flag_empty_drops_the_ring_rule(data, tmp_path):
  report, _, _ = _qc_folder(data, tmp_path)
  done = _qc(f"--mask_from_report={report}", f"--output={tmp_path / 'out'}", "--image=")
  assert done.returncode == 0, done.stderr
  assert "no ring rule" in done.stdout
  mask = open_volume(tmp_path / "out" / "mask.zarr")[:]
  expected = np.zeros((16, 24, 20), np.uint8)
  expected[1:15] = 1  # only the report's z range
  np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize(
  "case",
  [
    "no report", "missing key", "high_z past the end", "scan flags", "no flags", "foreign report",
    "foreign output",
  ],
)  # fmt: skip
def test_bad_use_is_one_line(case, data, tmp_path):
  report, _, _ = _qc_folder(data, tmp_path)
  out = f"--output={tmp_path / 'out.zarr'}"
  if case == "no report":
    missing = tmp_path / "nowhere" / "report.md"
    _one_line(_qc(f"--mask_from_report={missing}", out), str(missing), "no such QC report")
  elif case == "missing key":
    report.write_text(re.sub(r"^border_width: .*\n", "", report.read_text(), flags=re.M))
    _one_line(_qc(f"--mask_from_report={report}", out), str(report), "border_width")
  elif case == "high_z past the end":
    _edit(report, high_z=40)
    _one_line(_qc(f"--mask_from_report={report}", out), str(report), "high_z 40", "<= 16")
  elif case == "scan flags":
    proc = _qc(f"--mask_from_report={report}", "--affinities=x.zarr", "--nomask", out)
    _one_line(proc, "--mask_from_report", "drop --affinities, --nomask", status=2)
  elif case == "no flags":
    _one_line(_qc(), "--affinities, --output", "--mask_from_report", status=2)
  elif case == "foreign output":  # a folder of the user's: nothing written into it
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("the user's")
    proc = _qc(f"--mask_from_report={report}", f"--output={notes}")
    _one_line(proc, str(notes), "files jaxseg did not make", "NAME.zarr")
    assert os.listdir(notes) == ["todo.txt"]
  else:  # a report in a folder jaxseg did not make, no --output: nothing written there
    foreign = tmp_path / "notes"
    foreign.mkdir()
    shutil.copy(report, foreign / "report.md")
    proc = _qc(f"--mask_from_report={foreign / 'report.md'}")
    _one_line(proc, str(foreign), "not made by jaxseg", "--output", status=2)
    assert os.listdir(foreign) == ["report.md"]
  assert not (tmp_path / "out.zarr").exists()
