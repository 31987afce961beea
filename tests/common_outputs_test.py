"""The stage-output rule every command uses: reuse, resume, refuse or replace, and nothing else."""

import json
import os
import time

import h5py
import numpy as np
import pytest

from jaxseg.common import outputs
from jaxseg.common.errors import OutputError
from jaxseg.io import write_volume


def _stage(folder, fingerprint=None, paths=("result.txt", "scratch"), **kwargs):
  return outputs.StageOutput(
    str(folder),
    name="job",
    stage="job",
    fingerprint=fingerprint if fingerprint is not None else {"threshold": 0.5},
    paths=paths,
    **kwargs,
  )


def _run(stage, text="done", *, overwrite=False):
  decision = stage.open(overwrite=overwrite)
  if decision is not outputs.Decision.REUSE:
    with open(stage.path("result.txt"), "w") as f:
      f.write(text)
    stage.finish()
  return decision


def test_create_reuse_resume_and_refuse(tmp_path):
  out = tmp_path / "out"
  assert _run(_stage(out)) is outputs.Decision.CREATE
  manifest = json.loads((out / outputs.MANIFEST).read_text())
  # Scratch that was claimed but never made is not listed once the stage finished.
  assert manifest["entries"]["job"]["paths"] == ["result.txt"]
  assert manifest["entries"]["job"]["complete"] is True
  assert _run(_stage(out)) is outputs.Decision.REUSE
  # A listed file gone: the result is incomplete, and the stage resumes (no flag needed).
  os.remove(out / "result.txt")
  assert _run(_stage(out)) is outputs.Decision.RESUME
  with pytest.raises(OutputError, match=r"threshold: 0\.5 -> 0\.7.*--overwrite"):
    _stage(out, {"threshold": 0.7}).open()
  assert (out / "result.txt").read_text() == "done"


def test_overwrite_deletes_only_the_listed_paths(tmp_path):
  out = tmp_path / "out"
  _run(_stage(out))
  (out / "proofread.zarr").mkdir()
  (out / "proofread.zarr" / "0.0.0").write_bytes(b"user")
  assert _run(_stage(out, {"threshold": 0.7}), "new", overwrite=True) is outputs.Decision.REPLACE
  assert (out / "result.txt").read_text() == "new"
  assert (out / "proofread.zarr" / "0.0.0").read_bytes() == b"user"


def test_a_users_folder_or_file_is_never_written(tmp_path):
  theirs = tmp_path / "theirs"
  theirs.mkdir()
  (theirs / "notes.txt").write_text("mine")
  for overwrite in (False, True):
    with pytest.raises(OutputError, match=r"jaxseg did not make.*not even with --overwrite"):
      _stage(theirs).open(overwrite=overwrite)
  assert sorted(os.listdir(theirs)) == ["notes.txt"]
  # In a jaxseg folder, a name the stage needs that the user made is refused too.
  out = tmp_path / "out"
  _run(_stage(out, paths=("other.txt",)))
  (out / "result.txt").write_text("user's")
  with pytest.raises(OutputError, match=r"result\.txt: exists and is a file jaxseg did not make"):
    _stage(out).open(overwrite=True)
  assert (out / "result.txt").read_text() == "user's"
  # An output folder that is a file.
  (tmp_path / "file").write_text("x")
  with pytest.raises(OutputError, match="existing file"):
    _stage(tmp_path / "file").open()


def test_a_named_file_may_go_into_the_users_folder(tmp_path):
  theirs = tmp_path / "theirs"
  theirs.mkdir()
  (theirs / "notes.txt").write_text("mine")
  stage = _stage(theirs, paths=("result.txt",), shared=True)
  assert _run(stage) is outputs.Decision.CREATE
  assert (theirs / "notes.txt").read_text() == "mine"
  (theirs / "metrics.json").write_text("mine")
  with pytest.raises(OutputError, match="jaxseg did not make"):
    _stage(theirs, paths=("metrics.json",), shared=True).open(overwrite=True)


def test_outputs_stay_outside_their_inputs(tmp_path):
  write_volume(str(tmp_path / "data.zarr" / "img"), np.zeros((2, 2, 2), np.uint8))
  with h5py.File(tmp_path / "vol.h5", "w") as f:
    f["raw"] = np.zeros((2, 2, 2), np.uint8)
  image = str(tmp_path / "data.zarr" / "img")
  for folder, message in (
    (tmp_path, "contains the input"),
    (tmp_path / "data.zarr", "lies inside the input"),  # the container of the input array
    (tmp_path / "data.zarr" / "other", "lies inside the input"),
    (tmp_path / "data.zarr" / "img" / "out", "lies inside the input"),
  ):
    with pytest.raises(OutputError, match=message):
      _stage(folder, inputs=[image]).open(overwrite=True)
  with pytest.raises(OutputError, match="lies inside the input"):
    _stage(tmp_path / "vol.h5", inputs=[f"{tmp_path}/vol.h5:raw"]).open()
  link = tmp_path / "link"
  os.symlink(tmp_path / "data.zarr", link)  # a symlink does not hide the input
  with pytest.raises(OutputError, match="lies inside the input"):
    _stage(link / "out", inputs=[image]).open()
  assert _run(_stage(tmp_path / "elsewhere", inputs=[image])) is outputs.Decision.CREATE


def test_an_input_changed_in_place_makes_the_result_stale(tmp_path):
  image = str(tmp_path / "image.zarr")
  write_volume(image, np.zeros((4, 4, 4), np.uint8))

  def stage():
    return _stage(tmp_path / "out", {"inputs": {"image": outputs.input_identity(image)}})

  _run(stage())
  assert _run(stage()) is outputs.Decision.REUSE
  time.sleep(0.01)
  write_volume(image, np.ones((4, 4, 4), np.uint8), overwrite=True)
  # Same path, other files: redone without --overwrite (the old result is jaxseg's, and stale).
  again = stage()
  assert _run(again, "redone") is outputs.Decision.REPLACE
  assert any("inputs.image.content" in d for d in again.replaced_because)
  assert (tmp_path / "out" / "result.txt").read_text() == "redone"
  # Another input path is another job: refused, not replaced.
  other = str(tmp_path / "other.zarr")
  write_volume(other, np.ones((4, 4, 4), np.uint8))
  with pytest.raises(OutputError, match=r"inputs\.image\.path"):
    _stage(tmp_path / "out", {"inputs": {"image": outputs.input_identity(other)}}).open()


def test_identity_of_files_folders_and_remote_specs(tmp_path):
  with h5py.File(tmp_path / "a.h5", "w") as f:
    f["raw"] = np.zeros(3)
  one = outputs.input_identity(f"{tmp_path}/a.h5:raw")
  assert one["path"] == f"{tmp_path}/a.h5:raw" and one["content"]
  assert outputs.input_identity("gs://bucket/x.zarr") == {
    "path": "gs://bucket/x.zarr",
    "content": None,
  }
  assert outputs.input_identity(tmp_path / "missing.zarr")["content"] is None
  write_volume(str(tmp_path / "v.zarr"), np.zeros((4, 4, 4), np.uint8))
  before = outputs.input_identity(tmp_path / "v.zarr")
  attrs = tmp_path / "v.zarr" / ".zattrs"
  attrs.write_text(attrs.read_text().replace("}", ', "note": 1}', 1))
  assert outputs.input_identity(tmp_path / "v.zarr")["content"] != before["content"]


def test_peek_refuses_without_writing(tmp_path):
  theirs = tmp_path / "theirs"
  theirs.mkdir()
  (theirs / "x").write_text("mine")
  with pytest.raises(OutputError):
    _stage(theirs).peek()
  assert os.listdir(theirs) == ["x"]
  assert _stage(tmp_path / "new").peek() is outputs.Decision.CREATE
  assert not (tmp_path / "new").exists()


def test_a_second_holder_of_the_lock_is_refused(tmp_path):
  study = str(tmp_path / "study")
  with (
    outputs.held_exclusively(study, "another tuner"),
    pytest.raises(OutputError, match="another tuner is running"),
    outputs.held_exclusively(study, "another tuner"),
  ):
    pass
  with outputs.held_exclusively(str(tmp_path / "study"), "another tuner"):
    pass  # released


def test_a_named_file_does_not_make_the_users_folder_jaxsegs(tmp_path):
  theirs = tmp_path / "theirs"
  theirs.mkdir()
  (theirs / "notes.txt").write_text("mine")
  _run(_stage(theirs, paths=("result.txt",), shared=True))
  assert (theirs / outputs.MANIFEST).exists()
  with pytest.raises(OutputError, match=r"notes\.txt"):
    outputs.StageOutput(str(theirs), name="decode", stage="decode", fingerprint={}).open()
  assert not outputs.is_jaxseg_folder(str(theirs))


def test_a_listed_path_someone_replaced_is_never_deleted(tmp_path):
  out = tmp_path / "out"
  _run(_stage(out))
  os.remove(out / "result.txt")
  (out / "result.txt").write_text("the user's own, at jaxseg's name")
  for overwrite in (True,):
    with pytest.raises(OutputError, match="changed since jaxseg wrote it"):
      _stage(out, {"threshold": 0.9}).open(overwrite=overwrite)
  assert (out / "result.txt").read_text() == "the user's own, at jaxseg's name"


def test_a_replace_killed_midway_is_finished_by_the_next_run(tmp_path, monkeypatch):
  out = tmp_path / "out"
  first = _stage(out, paths=("result.txt", "other.txt"))
  first.open()
  (out / "result.txt").write_text("a")
  (out / "other.txt").write_text("b")
  first.finish()
  calls = []

  def dies_after_one(path):
    if calls:
      raise KeyboardInterrupt
    calls.append(path)
    os.remove(path)

  monkeypatch.setattr(outputs, "_remove", dies_after_one)
  with pytest.raises(KeyboardInterrupt):
    _stage(out, {"threshold": 0.9}, paths=("result.txt",)).open(overwrite=True)
  monkeypatch.undo()
  saved = json.loads((out / outputs.MANIFEST).read_text())["entries"]["job"]
  assert saved["replacing"] and not saved["complete"]
  # Even with the old settings and no flag, the half-deleted output is not resumed as it was.
  assert _stage(out).open() is outputs.Decision.REPLACE


def test_an_unfinished_output_of_the_same_settings_resumes_even_with_overwrite(tmp_path):
  out = tmp_path / "out"
  _stage(out).open()
  (out / "result.txt").write_text("half")
  assert _stage(out).open() is outputs.Decision.RESUME
  assert _stage(out).open(overwrite=True) is outputs.Decision.RESUME
  assert (out / "result.txt").read_text() == "half"


def test_hidden_files_and_z_windows(tmp_path):
  write_volume(str(tmp_path / "v.zarr"), np.zeros((4, 4, 4), np.uint8))
  before = outputs.input_identity(tmp_path / "v.zarr")
  (tmp_path / "v.zarr" / ".DS_Store").write_bytes(b"finder")
  assert outputs.input_identity(tmp_path / "v.zarr") == before
  assert outputs.local_file_part(f"{tmp_path}/a.tif[z 80:100]") == f"{tmp_path}/a.tif"
  assert outputs.local_file_part(f"{tmp_path}/A.H5:raw") == f"{tmp_path}/A.H5"
  # An input that vanished is not "changed in place": refused, not redone on its own.
  stage = _stage(tmp_path / "out", {"inputs": {"x": outputs.input_identity(tmp_path / "v.zarr")}})
  _run(stage)
  gone = {"inputs": {"x": outputs.input_identity(tmp_path / "nothing.zarr")}}
  gone["inputs"]["x"]["path"] = before["path"]
  with pytest.raises(OutputError, match="made differently"):
    _stage(tmp_path / "out", gone).open()
