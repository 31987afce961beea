"""Affinity QC and the affinity mask: planted bad sections found exactly, NaN / Inf counted, bounded
reads, the report's front matter round trip, the border check, mask -> decode round trip, reuse,
and the CLI (one clear line on bad input, no JAX).

Affinities are synthetic ``[3, z, y, x]`` float16 zarrs written the way ``jaxseg.predict`` writes
them (``offsets`` / ``convention`` / ``channels`` attributes); volumes are tiny.
"""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT

from jaxseg.common import config_util
from jaxseg.common.errors import OutputError
from jaxseg.decoding import decode_lib
from jaxseg.decoding.settings import decode_settings
from jaxseg.io import Volume, create_zarr, open_volume, write_volume
from jaxseg.quality import (
  MASK_ATTR,
  QcSettings,
  affinity_qc,
  build_affinity_mask,
  qc_settings,
  read_report,
  run_qc,
  scan_affinities,
  write_report,
)
from jaxseg.quality import scan as qc_scan

SOURCE_XYZ = [[0, 0, 1], [0, 1, 0], [1, 0, 0]]  # channel 0: x edge, 1: y, 2: z
PLANTED = QcSettings(z_stride=4, k_edge=2, refine_window=8, drift_thresh=0.05)


def write_affinities(path, aff, chunks=None):
  create_zarr(
    path, aff.shape, aff.dtype, chunks=chunks or aff.shape, resolution=(20, 9, 9),
    attributes={"offsets": SOURCE_XYZ, "convention": "source", "channels": [0, 1, 2]},
  ).write((0, 0, 0, 0), aff).result()  # fmt: skip
  return str(path)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
  """3 x 60 x 32 x 32; channel means 0.85, 0.85, 0.70 (z edges lower, as in anisotropic data).

  Start: z 0-2 low in every channel, z 3 low in channel 1 only, z 4 has a NaN, z 6 low (after the
  first good section, so kept): low_z = 5. End: z 58-59 low, z 57 has an Inf, z 53 low (before the
  last good one): high_z = 57. Two more NaN in the interior (z 30).
  """
  rng = np.random.default_rng(0)
  aff = np.array([0.85, 0.85, 0.70], np.float32)[:, None, None, None] + rng.normal(
    0, 0.03, (3, 60, 32, 32)
  ).astype(np.float32)
  aff[:, 0:3] -= 0.2
  aff[1, 3] -= 0.1
  aff[:, 6] -= 0.2
  aff[:, 53] -= 0.2
  aff[:, 58:60] -= 0.2
  aff = aff.astype(np.float16)
  aff[0, 4, 5, 5] = np.nan
  aff[2, 30, 1, 1] = aff[2, 30, 7, 9] = np.nan
  aff[2, 57, 3, 3] = np.inf
  path = tmp_path_factory.mktemp("planted") / "pred.zarr" / "affinities"
  return write_affinities(path, aff, chunks=(3, 8, 16, 16)), aff


@pytest.fixture(scope="module")
def bordered(tmp_path_factory):
  """3 x 16 x 32 x 32 at 0.8, bad sections 0 and 15 (0.6: still above a 0.5 decode threshold),
  and an image [c, z, y, x] (stored x, y, z, c like NISB) with a dark padded margin (rows y < 4,
  columns x >= 28) where the affinities are high (0.95), and a dark interior spot (aff 0.55)."""
  root = tmp_path_factory.mktemp("bordered")
  aff = np.full((3, 16, 32, 32), 0.8, np.float32)
  aff[:, [0, 15]] = 0.6
  img = np.full((1, 16, 32, 32), 120, np.uint8)
  margin = np.zeros((32, 32), bool)
  margin[:4, :] = True
  margin[:, 28:] = True
  img[0, :, margin] = 0
  aff[:, 1:15][:, :, margin] = 0.95
  img[0, :, 10:13, 10:13] = 10
  aff[:, 1:15, 10:13, 10:13] = 0.55
  aff_path = write_affinities(root / "pred.zarr" / "affinities", aff.astype(np.float16))
  img_path = str(root / "data.zarr" / "img")
  write_volume(img_path, img, axis_order="xyzc", resolution=(20, 9, 9))
  settings = QcSettings(
    z_stride=2, k_edge=1, refine_window=3, border_width=6, bg_thresh=30, n_z_border=3
  )
  return aff_path, img_path, margin, settings


def test_settings_defaults_config_sections_and_refusals():
  assert qc_settings(None) == QcSettings()
  # The code's defaults are the recipes' (configs/common.py qc_defaults, PyTC's numbers).
  nisb = config_util.load_config(str(REPO_ROOT / "configs" / "nisb_base.py"))
  assert qc_settings(nisb) == QcSettings(enabled=True)
  demo = config_util.load_config(str(REPO_ROOT / "configs" / "demo.py"))
  s = qc_settings(demo)
  assert (s.z_stride, s.k_edge, s.refine_window, s.border_width, s.n_z_border) == (4, 2, 8, 8, 4)
  assert qc_settings(demo.qc) == s
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['zstride'\]"):
    qc_settings({"zstride": 3})
  with pytest.raises(ValueError, match="z_stride must be an integer >= 1"):
    qc_settings({"z_stride": 0})
  with pytest.raises(ValueError, match="drift_thresh"):
    qc_settings({"drift_thresh": -0.1})


def test_scan_finds_planted_sections_and_counts_non_finite(planted):
  path, aff = planted
  report = scan_affinities(path, PLANTED)
  assert (report.low_z, report.high_z) == (5, 57)
  assert report.nan_count == [1, 0, 2] and report.inf_count == [0, 0, 1]
  assert report.slice_nonfinite[4] == 1 and report.slice_nonfinite[57] == 1
  assert report.slice_nonfinite[30] == 2 and sum(report.slice_nonfinite) == 4
  # Each channel against its own interior mean: one mean over all channels (0.80) would put
  # the z channel (0.70) below every cutoff and cut the whole refine windows.
  np.testing.assert_allclose(report.interior_mean, [0.85, 0.85, 0.70], atol=0.01)
  np.testing.assert_allclose(report.cutoff, np.array(report.interior_mean) - 0.05)
  assert report.sampled_z == list(range(0, 60, 4)) and report.interior_z == list(range(8, 52, 4))
  finite = np.where(np.isfinite(aff), aff, np.nan).astype(np.float64)
  np.testing.assert_allclose(report.min, np.nanmin(finite, axis=(1, 2, 3)))
  np.testing.assert_allclose(report.max, np.nanmax(finite, axis=(1, 2, 3)))
  np.testing.assert_allclose(
    report.slice_mean[2][30], np.nanmean(finite[2, 30]), rtol=1e-6
  )  # NaN left out of the mean, not propagated
  assert any("3 NaN and 1 Inf" in w for w in report.warnings)


def test_scan_reads_bounded_boxes(planted, monkeypatch):
  path, _ = planted
  whole = scan_affinities(path, PLANTED)
  reads = []
  original = Volume.__getitem__

  def recording(self, key):
    out = original(self, key)
    if self.path == path:
      reads.append(out.shape)
    return out

  monkeypatch.setattr(Volume, "__getitem__", recording)
  # Slabs of max(chunk z 8, z_stride 4) sections; a budget of half a slab splits them in y along
  # the 16-row chunks.
  monkeypatch.setattr(qc_scan, "BOX_VOXELS", 3 * 8 * 16 * 32)
  tiled = scan_affinities(path, PLANTED)
  assert reads == [(3, 8, 16, 32)] * 14 + [(3, 4, 16, 32)] * 2
  assert (tiled.low_z, tiled.high_z, tiled.nan_count) == (whole.low_z, whole.high_z, [1, 0, 2])
  np.testing.assert_allclose(
    np.array(tiled.slice_mean[1], float), np.array(whole.slice_mean[1], float), rtol=1e-9
  )


def test_few_samples_fall_back_to_all_and_say_so(tmp_path):
  rng = np.random.default_rng(1)
  aff = (0.8 + rng.normal(0, 0.01, (3, 12, 8, 8))).astype(np.float16)
  report = scan_affinities(write_affinities(tmp_path / "a.zarr", aff), PLANTED)
  assert report.interior_z == [0, 4, 8]  # 3 samples, k_edge 2 would leave none
  assert any("interior mean uses all 3 samples" in w for w in report.warnings)
  assert any("refine_window 8 is more than half" in w for w in report.warnings)
  assert (report.low_z, report.high_z) == (0, 12)


def test_report_front_matter_round_trip_and_malformed_reports(planted, tmp_path):
  path, _ = planted
  report = scan_affinities(path, PLANTED)
  paths = write_report(report, tmp_path / "report.md")
  assert paths["plot"] == str(tmp_path / "means.png")
  with open(paths["plot"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  front = read_report(paths["report"])
  assert front == report.frontmatter()
  assert {k: front[k] for k in ("img", "out", "low_z", "high_z", "bg_thresh", "border_width")} == {
    "img": None, "out": path, "low_z": 5, "high_z": 57, "bg_thresh": 30, "border_width": 32,
  }  # fmt: skip
  assert front["nan_count"] == 3 and front["inf_count"] == 1
  text = (tmp_path / "report.md").read_text()
  assert "![per-section means](means.png)" in text and "| 4 |" in text

  bad = tmp_path / "bad.md"
  for content, message in (
    ("# no front matter\n", "does not start with '---'"),
    ("---\nlow_z: 1\n", "no closing '---'"),
    ("---\nlow_z: [1\n---\n", "not valid YAML"),
    ("---\nlow_z: 1\nhigh_z: 5\n---\n", r"lacks \['bg_thresh', 'border_width'\]"),
    ("---\nlow_z: 6\nhigh_z: 5\nbg_thresh: 30\nborder_width: 0\n---\n", "must not exceed"),
  ):
    bad.write_text(content)
    with pytest.raises(ValueError, match=message) as e:
      read_report(bad)
    assert str(bad) in str(e.value)


def test_no_good_section_keeps_nothing_and_says_so(tmp_path, caplog):
  """All-NaN affinities: every section is bad, so the keep range is empty (not the middle that
  PyTC's fallback for the ends would keep), the mask is all 0, and report and log say so."""
  aff = np.full((3, 64, 8, 8), np.nan, np.float16)
  path = write_affinities(tmp_path / "nan.zarr", aff)
  with caplog.at_level("WARNING"):
    result = run_qc(PLANTED, path, tmp_path / "qc")
  assert result.low_z == result.high_z == 0
  assert not any(result.scan.good(z) for z in range(64))
  assert not open_volume(result.mask)[:].any()
  nothing = "no section passed QC: the mask keeps nothing"
  assert nothing in result.warnings and nothing in caplog.text
  front = read_report(result.report)  # an empty range is a valid report
  assert (front["low_z"], front["high_z"]) == (0, 0) and nothing in front["warnings"]
  with open(result.report) as f:
    assert "No section passed QC: the mask keeps nothing" in f.read()
  assert not build_affinity_mask(front, tmp_path / "again.zarr")[:].any()


def test_image_path_is_recorded_absolute(bordered, tmp_path, monkeypatch):
  """A QC run with relative paths records the image absolutely (report, qc.json, mask), so a
  mask built from the report in another working directory still applies the ring rule."""
  import h5py

  aff_path, img_path, margin, settings = bordered
  work = tmp_path / "work"
  work.mkdir()
  with h5py.File(work / "img.h5", "w") as f:
    f["raw"] = np.asarray(open_volume(img_path)[:])
  monkeypatch.chdir(work)
  for image in ("img.h5:raw", os.path.relpath(img_path)):
    out = f"qc_{image[:3]}"
    result = run_qc(settings, aff_path, out, image=image)
    expected = os.path.abspath(image)
    assert result.scan.image == expected and result.scan.border is not None
    assert read_report(result.report)["img"] == expected
    with open(os.path.join(out, affinity_qc.SUMMARY_NAME)) as f:
      assert json.load(f)["scan"]["image"] == expected
    assert open_volume(result.mask).attrs[MASK_ATTR]["source_image"] == expected
  report = os.path.abspath(os.path.join("qc_img", affinity_qc.REPORT_NAME))
  monkeypatch.chdir(tmp_path)
  mask = build_affinity_mask(report, tmp_path / "elsewhere.zarr")  # the image from the report
  assert not mask[:][:, margin].any() and mask[1:15][:, ~margin].all()


def test_border_check_and_mask_rules(bordered, tmp_path):
  aff_path, img_path, margin, settings = bordered
  report = scan_affinities(aff_path, settings, image=img_path)
  assert (report.low_z, report.high_z) == (1, 15)
  b = report.border
  assert b["z"] == [3, 8, 12]  # spread over [refine_window, Z - refine_window)
  assert b["ring_background"] == 3 * margin.sum() and b["interior_background"] == 3 * 9
  np.testing.assert_allclose(b["ring_background_mean"], 0.95, atol=1e-3)
  np.testing.assert_allclose(b["interior_background_mean"], 0.55, atol=1e-3)

  mask_path = str(tmp_path / "mask.zarr")
  mask = build_affinity_mask(report, mask_path)  # the image comes from the report's img
  assert mask.dtype == np.uint8 and mask.shape == (16, 32, 32)
  expected = np.ones((16, 32, 32), np.uint8)
  expected[[0, 15]] = 0
  expected[:, margin] = 0  # dark ring pixels; the dark interior spot stays
  np.testing.assert_array_equal(mask[:], expected)
  spec = mask.attrs[MASK_ATTR]
  assert (spec["low_z"], spec["high_z"], spec["bg_thresh"], spec["border_width"]) == (1, 15, 30, 6)
  assert spec["source_image"] == os.path.abspath(img_path)
  assert spec["affinities"] == os.path.abspath(aff_path)

  # Same spec: reused. Another spec: refused, nothing touched, unless overwrite.
  assert build_affinity_mask(report, mask_path).path == mask_path
  other = {**report.frontmatter(), "low_z": 2}
  with pytest.raises(OutputError, match=r"made differently \(spec.low_z: 1 -> 2\)"):
    build_affinity_mask(other, mask_path)
  np.testing.assert_array_equal(open_volume(mask_path)[:], expected)
  replaced = build_affinity_mask(other, mask_path, overwrite=True)
  assert not replaced[1].any() and replaced[2].any()
  assert not os.path.exists(mask_path + ".partial")


def test_mask_round_trip_through_the_decoder(bordered, tmp_path):
  aff_path, img_path, _, settings = bordered
  result = run_qc(settings, aff_path, tmp_path / "qc", image=img_path)
  keep = open_volume(result.mask)[:].astype(bool)

  def decode(mask_path, out):
    overrides = {"decode.method": "cc", "decode.threshold": 0.5}
    overrides["decode.affinity_mask_path"] = mask_path
    config = config_util.load_config(str(REPO_ROOT / "configs" / "demo.py"), overrides)
    decode_lib.decode(decode_settings(config), aff_path, str(out), show_progress=False)
    return open_volume(os.path.join(out, "segmentation"))[:]

  plain = decode("", tmp_path / "plain")
  masked = decode(result.mask, tmp_path / "masked")
  assert (plain > 0).all()  # every edge is above 0.5: without the mask, all foreground
  assert (masked[keep] > 0).all()
  # A masked voxel loses its own edges; an edge into it from a kept predecessor stays (PyTC's
  # mask), so only masked voxels with no kept predecessor along z, y or x must be background.
  reached = np.zeros_like(keep)
  for axis in range(3):
    head = [slice(None)] * 3
    tail = [slice(None)] * 3
    head[axis], tail[axis] = slice(1, None), slice(None, -1)
    reached[tuple(head)] |= keep[tuple(tail)]
  unreached = ~keep & ~reached
  assert unreached.sum() > 500
  assert (masked[unreached] == 0).all()

  # The decoder records the mask's spec: a mask rebuilt in place with other rules does not pass
  # for the one the earlier decode used.
  assert decode_lib.MASK_SPEC_ATTR == MASK_ATTR
  config = config_util.load_config(
    str(REPO_ROOT / "configs" / "demo.py"),
    {"decode.threshold": 0.5, "decode.affinity_mask_path": result.mask},
  )
  front = read_report(result.report)
  build_affinity_mask({**front, "low_z": front["low_z"] + 2}, result.mask, overwrite=True)
  with pytest.raises(OutputError, match="affinity_mask"):
    decode_lib.decode(decode_settings(config), aff_path, str(tmp_path / "masked"))


def test_run_qc_reuses_refuses_and_overwrites(bordered, tmp_path):
  aff_path, img_path, _, settings = bordered
  out = tmp_path / "qc"
  first = run_qc(settings, aff_path, out, image=img_path, build_mask=False)
  assert not first.reused and first.mask is None and (first.low_z, first.high_z) == (1, 15)
  stamp = os.stat(first.report).st_mtime_ns
  again = run_qc(settings, aff_path, out, image=img_path)  # adds the mask, keeps the scan
  assert again.mask == str(out / "mask.zarr") and os.stat(first.report).st_mtime_ns == stamp
  third = run_qc(settings, aff_path, out, image=img_path)
  assert third.reused and third.summary()["mask"] == again.mask
  changed = dataclasses.replace(settings, drift_thresh=0.3)
  with pytest.raises(OutputError, match="the qc there was made differently"):
    run_qc(changed, aff_path, out, image=img_path)
  redone = run_qc(changed, aff_path, out, image=img_path, overwrite=True)
  assert not redone.reused and (redone.low_z, redone.high_z) == (0, 16)  # 0.6 passes 0.8 - 0.3
  assert open_volume(redone.mask)[0].any()


def test_cli_summary_bad_input_one_line_and_no_jax(bordered, tmp_path):
  aff_path, img_path, _, _ = bordered
  out = tmp_path / "cli"
  args = [
    f"--config={REPO_ROOT / 'configs' / 'demo.py'}", f"--affinities={aff_path}",
    f"--image={img_path}", f"--output={out}", "--noprogress", "--config.qc.refine_window=3",
  ]  # fmt: skip
  # Runs the CLI in a process that reports, at exit, whether anything imported JAX.
  probe = (
    "import atexit, runpy, sys; "
    "atexit.register(lambda: print('jax imported:', any(m == 'jax' or m.startswith('jax.') "
    "for m in sys.modules))); "
    f"sys.argv = ['jaxseg.qc', *{args!r}]; runpy.run_module('jaxseg.qc', run_name='__main__')"
  )
  done = subprocess.run(
    [sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT
  )
  assert done.returncode == 0, done.stderr
  assert "keep z [1, 15) of 16" in done.stdout and "NaN 0, Inf 0" in done.stdout
  assert "jax imported: False" in done.stdout
  assert read_report(out / "report.md")["low_z"] == 1 and (out / "mask.zarr").is_dir()

  flat = write_volume(str(tmp_path / "flat.zarr"), np.zeros((4, 8, 8), np.float32))
  bad = subprocess.run(
    [sys.executable, "-m", "jaxseg.qc", f"--affinities={flat.path}", f"--output={tmp_path / 'x'}"],
    capture_output=True, text=True, cwd=REPO_ROOT,
  )  # fmt: skip
  assert bad.returncode == 1 and "Traceback" not in bad.stderr
  assert bad.stderr.strip().splitlines() == [
    f"jaxseg.qc: {flat.path}: expected affinities [C, z, y, x], got shape (4, 8, 8)"
  ]
