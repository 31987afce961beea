"""Nothing of the user's is ever changed or deleted, and no stale result is ever reused.

Two halves:

* Every command line (synth, train, predict, decode, qc, tune, evaluate, run) is pointed at a
  folder of "user files" (an image zarr and HDF5, a NISB-layout cube without jaxseg's marker, a
  proofread segmentation, a report, previews, a config.json, metrics), with and without
  ``--overwrite``. Each must refuse in one line, and every byte of the folder must be unchanged.
* The numbered cases of the safe-outputs issue, in process: predicting into or beside the input,
  generating over a user's cubes, QC into a user's report folder, decode --overwrite beside a
  proofread segmentation, re-predicting in place then decoding, an image changed in place, and a
  whole-volume decode killed midway.
"""

import hashlib
import os
import pickle
import subprocess
import sys

import h5py
import jax.numpy as jnp
import networkx as nx
import numpy as np
import pytest

from jaxseg.common import outputs
from jaxseg.common.config_util import load_config
from jaxseg.common.errors import OutputError
from jaxseg.decoding import decode_lib
from jaxseg.decoding.settings import decode_settings
from jaxseg.inference import predict_lib
from jaxseg.io import create_zarr, open_volume, reopen_zarr, write_volume
from jaxseg.quality import run_qc
from jaxseg.synthesis import generate_dataset

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO_ROOT, "configs", "demo.py")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
TINY_MODEL = {"model.widths": (4, 8), "model.norm_groups": 2}


def snapshot(folder) -> dict[str, str]:
  """Every file under ``folder`` (relative path) -> sha256 of its bytes."""
  out = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _affinities(shape=(16, 32, 32), seed=0) -> np.ndarray:
  """``[3, z, y, x]`` float32: high inside two slabs, low across the cut between them."""
  rng = np.random.default_rng(seed)
  aff = rng.uniform(0.6, 1.0, size=(3, *shape)).astype(np.float32)
  aff[:, :, :, shape[2] // 2 - 1 : shape[2] // 2 + 1] = 0.1
  return aff


def _user_cube(folder: str, seed: int = 0) -> None:
  """A cube in the NISB layout as a lab would have it: no jaxseg marker, no manifest."""
  rng = np.random.default_rng(seed)
  img = rng.integers(0, 255, size=(16, 24, 24, 1), dtype=np.uint8)  # x, y, z, c on disk
  seg = rng.integers(1, 5, size=(16, 24, 24), dtype=np.uint32)
  create_zarr(f"{folder}/data.zarr/img", img.shape, np.uint8, axis_order="xyzc").write(
    (0, 0, 0, 0), img
  ).result()
  create_zarr(f"{folder}/data.zarr/seg", seg.shape, np.uint32, axis_order="xyz").write(
    (0, 0, 0), seg
  ).result()
  graph = nx.Graph()
  graph.add_node(0, id=1, index_position=np.array([1, 1, 1]), nm_position=np.array([9, 9, 20]))
  with open(f"{folder}/skeleton.pkl", "wb") as f:
    pickle.dump(graph, f)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
  """A folder of a lab's own files, and where each is."""
  root = tmp_path_factory.mktemp("lab")
  image = np.random.default_rng(1).integers(0, 255, size=(16, 32, 32), dtype=np.uint8)
  write_volume(str(root / "vol.zarr"), image, resolution=(20.0, 9.0, 9.0))
  with h5py.File(root / "vol.h5", "w") as f:
    f["raw"] = image
  write_volume(str(root / "aff.zarr"), _affinities())
  labels = np.ones((16, 32, 32), np.uint32)
  labels[:, :, 16:] = 2
  write_volume(str(root / "segmentation_proofread.zarr"), labels)
  for split in ("train", "val", "test"):
    _user_cube(str(root / split / "seed0"))
  for name, text in {
    "report.md": "# our QC notes\n",
    "config.json": '{"ours": true}\n',
    "metrics.json": '{"adapted_rand": 0.1}\n',
  }.items():
    (root / name).write_text(text)
  for name in ("means.png", "preview.png"):
    (root / name).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  return root


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    capture_output=True,
    text=True,
    cwd=REPO_ROOT,
    env=ENV,
    timeout=300,
  )


def _commands(lab) -> dict[str, tuple[str, list[str]]]:
  """Each command line, pointed at the lab's folder (or files in it) as its output."""
  demo = f"--config={DEMO}"
  data = [f"--config.data.root={lab}", "--config.model.widths=(4,8)"]
  return {
    "synth": ("jaxseg.synth", [demo, f"--output={lab}"]),
    "train": ("jaxseg.train", [demo, *data, f"--workdir={lab}"]),
    "predict": (
      "jaxseg.predict",
      [demo, f"--checkpoint={lab}", f"--input={lab}/vol.zarr", f"--output={lab}"],
    ),
    "decode": ("jaxseg.decode", [demo, f"--affinities={lab}/aff.zarr", f"--output={lab}"]),
    "qc": ("jaxseg.qc", [demo, f"--affinities={lab}/aff.zarr", f"--output={lab}"]),
    "tune": ("jaxseg.tune", [demo, *data, f"--workdir={lab}", f"--checkpoint={lab}"]),
    "evaluate": (
      "jaxseg.evaluate",
      [
        f"--seg={lab}/segmentation_proofread.zarr",
        f"--gt={lab}/segmentation_proofread.zarr",
        f"--output={lab}/metrics.json",
      ],
    ),
    "run": ("jaxseg.run", [demo, *data, f"--workdir={lab}"]),
    "export": (
      "jaxseg.export",
      [f"--input={lab}/aff.zarr", "--format=h5", "--axis_order=xyz", f"--output={lab}"],
    ),
  }


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize(
  "command", ["synth", "train", "predict", "decode", "qc", "tune", "evaluate", "run", "export"]
)
def test_no_command_touches_the_users_folder(lab, command, overwrite):
  before = snapshot(lab)
  module, args = _commands(lab)[command]
  done = _cli(module, *args, *(["--overwrite"] if overwrite else []))
  assert done.returncode != 0, done.stdout[-2000:]
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  lines = [line for line in done.stderr.splitlines() if line.startswith(f"{module}: ")]
  assert len(lines) == 1, done.stderr[-3000:]
  assert str(lab) in lines[0]
  assert snapshot(lab) == before  # not a byte changed, nothing added, nothing deleted


def test_run_never_generates_over_the_users_cubes(lab, tmp_path):
  """A config with data.synth pointed at a lab's NISB-layout cubes (case 2)."""
  before = snapshot(lab)
  done = _cli(
    "jaxseg.run",
    f"--config={DEMO}",
    f"--config.data.root={lab}",
    f"--workdir={tmp_path / 'work'}",
  )
  assert done.returncode != 0
  assert "holds data jaxseg did not generate" in done.stderr and "data.synth" in done.stderr
  assert snapshot(lab) == before


# -- the numbered cases, in process ----------------------------------------------------------------


def _scaled_apply(scale: float):
  """A 'model' whose logits are the image times ``scale`` on 6 channels (no weights)."""

  def apply(variables, x):
    return jnp.asarray(np.repeat(x[..., :1] * scale - 0.5 * scale, 6, axis=-1))

  return apply


def _predict(image_spec, out_dir, *, scale=1.0, overwrite=False, step=1):
  config = load_config(DEMO, {**TINY_MODEL, "infer.window": (8, 16, 16)})
  sources = predict_lib.resolve_inputs(config, [image_spec])
  (summary,) = predict_lib.predict_volumes(
    config,
    _scaled_apply(scale),
    None,
    sources,
    str(out_dir),
    model_info={"step": step, "scale": scale},
    overwrite=overwrite,
    show_progress=False,
    num_devices=1,
  )
  return summary


def test_predict_never_writes_into_or_beside_its_input(lab, tmp_path):
  """Case 1: --output = the folder holding the input, or the input array itself; and an output
  folder holding the user's own ``vol.zarr`` while the input is ``vol.h5``."""
  before = snapshot(lab)
  for overwrite in (False, True):
    with pytest.raises(OutputError, match="contains the input"):
      _predict(str(lab / "vol.zarr"), lab, overwrite=overwrite)
    with pytest.raises(OutputError, match="lies inside the input"):
      _predict(str(lab / "vol.zarr"), lab / "vol.zarr", overwrite=overwrite)
    with pytest.raises(OutputError, match="contains the input"):
      _predict(f"{lab}/vol.h5:raw", lab, overwrite=overwrite)
  assert snapshot(lab) == before
  # The user's vol.zarr in another folder, the input vol.h5 elsewhere: the same output name.
  theirs = tmp_path / "theirs"
  write_volume(str(theirs / "vol.zarr"), np.zeros((4, 4, 4), np.uint8))
  kept = snapshot(theirs)
  for overwrite in (False, True):
    with pytest.raises(OutputError, match="jaxseg did not make"):
      _predict(f"{lab}/vol.h5:raw", theirs, overwrite=overwrite)
  assert snapshot(theirs) == kept


def test_generated_data_never_lands_on_the_users_cubes(lab):
  """Case 2: data.synth with a data.root of the user's cubes and config.json."""
  config = load_config(DEMO).data.synth
  before = snapshot(lab)
  for overwrite in (False, True):
    with pytest.raises(OutputError, match="holds data jaxseg did not generate"):
      generate_dataset(config, str(lab), overwrite=overwrite, show_progress=False)
  assert snapshot(lab) == before


def test_qc_never_writes_over_the_users_report(lab, tmp_path):
  """Case 3: the user's report.md and means.png in the QC output folder."""
  folder = tmp_path / "notes"
  folder.mkdir()
  (folder / "report.md").write_text("mine\n")
  (folder / "means.png").write_bytes(b"mine")
  before = snapshot(folder)
  for overwrite in (False, True):
    with pytest.raises(OutputError, match="jaxseg did not make"):
      run_qc(None, str(lab / "aff.zarr"), str(folder), overwrite=overwrite)
  assert snapshot(folder) == before


def _decode_config(**overrides):
  return decode_settings(load_config(DEMO, {"decode.method": "cc", **overrides}))


def test_decode_overwrite_keeps_what_it_did_not_make(lab, tmp_path):
  """Case 4: --overwrite deletes only decode's own files; a plain decode over the user's
  preview.png is refused."""
  out = tmp_path / "decoded"
  decode_lib.decode(_decode_config(**{"decode.threshold": 0.5}), str(lab / "aff.zarr"), str(out))
  write_volume(str(out / "segmentation_proofread.zarr"), np.ones((16, 32, 32), np.uint32))
  (out / "notes.txt").write_text("proofread by A.\n")
  theirs = {k: v for k, v in snapshot(out).items() if k.startswith(("segmentation_p", "notes"))}
  summary = decode_lib.decode(
    _decode_config(**{"decode.threshold": 0.7}), str(lab / "aff.zarr"), str(out), overwrite=True
  )
  assert not summary.get("already_done") and summary["thresholds"] == [0.7]
  after = snapshot(out)
  assert {k: after[k] for k in theirs} == theirs

  folder = tmp_path / "previews"
  folder.mkdir()
  (folder / "preview.png").write_bytes(b"mine")
  with pytest.raises(OutputError, match="jaxseg did not make"):
    decode_lib.decode(_decode_config(), str(lab / "aff.zarr"), str(folder))
  assert (folder / "preview.png").read_bytes() == b"mine"


def test_repredicting_in_place_redoes_the_decode(tmp_path):
  """Case 6: predict, decode, predict again in place (another step, --overwrite), decode again:
  the decode is redone from the new affinities, not returned as already done."""
  image = np.zeros((8, 32, 32), np.uint8)
  image[:, :, :16] = 255
  write_volume(str(tmp_path / "image.zarr"), image, resolution=(20.0, 9.0, 9.0))
  pred = tmp_path / "pred"
  _predict(str(tmp_path / "image.zarr"), pred, scale=8.0, step=1)
  settings = _decode_config(**{"decode.threshold": 0.5})
  aff = str(pred / "image.zarr" / "affinities")
  decode_lib.decode(settings, aff, str(tmp_path / "seg"))
  first = open_volume(str(tmp_path / "seg" / "segmentation"))[:]
  assert (first[:, :, :15] > 0).all() and not (first[:, :, 17:] > 0).any()
  with pytest.raises(OutputError, match=r"model\.step"):
    _predict(str(tmp_path / "image.zarr"), pred, scale=-8.0, step=2)  # other weights: refused
  _predict(str(tmp_path / "image.zarr"), pred, scale=-8.0, step=2, overwrite=True)
  again = decode_lib.decode(settings, aff, str(tmp_path / "seg"))
  assert not again.get("already_done")
  seg = open_volume(str(tmp_path / "seg" / "segmentation"))[:]
  assert (seg[:, :, 17:] > 0).all() and not (seg[:, :, :15] > 0).any()  # the new foreground


def test_an_image_changed_in_place_is_predicted_again(tmp_path):
  """Case 7: same path, new bytes: the blocks are computed again, not taken as done."""
  image = np.full((8, 32, 32), 10, np.uint8)
  path = str(tmp_path / "image.zarr")
  write_volume(path, image, resolution=(20.0, 9.0, 9.0))
  first = _predict(path, tmp_path / "pred")
  assert first["blocks_written"] == first["blocks"]
  again = _predict(path, tmp_path / "pred")
  assert again["blocks_written"] == 0  # unchanged input: reused
  before = open_volume(str(tmp_path / "pred" / "image.zarr" / "affinities"))[:]
  reopen_zarr(path).write((0, 0, 0), np.full((8, 32, 32), 200, np.uint8)).result()
  redone = _predict(path, tmp_path / "pred")
  assert redone["blocks_written"] == redone["blocks"]
  after = open_volume(str(tmp_path / "pred" / "image.zarr" / "affinities"))[:]
  assert not np.array_equal(before, after)


def test_a_decode_killed_midway_is_resumed_without_overwrite(lab, tmp_path, monkeypatch):
  """Case 8: killed after writing its arrays, before its summary: the output is its own, so the
  rerun starts it again by itself."""
  settings = _decode_config(**{"decode.threshold": 0.5})
  out = str(tmp_path / "seg")

  def killed(*args, **kwargs):
    raise KeyboardInterrupt

  with monkeypatch.context() as patch:
    patch.setattr(decode_lib, "write_preview", killed)
    with pytest.raises(KeyboardInterrupt):
      decode_lib.decode(settings, str(lab / "aff.zarr"), out)
  assert os.path.isdir(os.path.join(out, "segmentation"))
  assert not outputs.is_complete(out, "decode")
  summary = decode_lib.decode(settings, str(lab / "aff.zarr"), out)
  assert not summary.get("already_done") and outputs.is_complete(out, "decode")
  reference = decode_lib.decode(settings, str(lab / "aff.zarr"), str(tmp_path / "uninterrupted"))
  np.testing.assert_array_equal(
    open_volume(os.path.join(out, "segmentation"))[:],
    open_volume(os.path.join(reference["arrays"][0]))[:],
  )
