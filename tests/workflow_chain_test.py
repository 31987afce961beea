"""The chain (``python -m jaxseg.run``): baselines, report, viewer layout, stage reuse, end to end.

Unit tests use tiny generated cubes (16 x 32 x 32) and hand-made arrays. The end-to-end test runs
the shortened demo (generate, train, predict, decode with both decoders, evaluate, tune, tune-test,
report) on CPU, checks that the learned segmentation beats the trivial baselines by a wide margin
and that a rerun (a fresh process through the CLI) reuses everything without loading JAX.
"""

import http.client
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest

from jaxseg.common import outputs
from jaxseg.common.config_util import load_config
from jaxseg.common.errors import JaxsegError, OutputError
from jaxseg.io import create_zarr, open_volume
from jaxseg.io.datasets import dataset_volumes
from jaxseg.synthesis import generate_dataset
from jaxseg.training.paths import completed_steps, training_output
from jaxseg.workflow import baselines, chain, report, viewer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO_ROOT, "configs", "demo.py")

TINY_DATA = {
  "data.synth.shape": (16, 32, 32),
  "data.synth.chunks": (16, 32, 32),
  "data.synth.train_seeds": (0,),
  "data.synth.preview": False,
}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny_data")
  config = load_config(DEMO, TINY_DATA)
  generate_dataset(config.data.synth, str(root), show_progress=False)
  return str(root)


def _tiny_config(root, **overrides):
  return load_config(DEMO, {**TINY_DATA, "data.root": root, **overrides})


# -- baselines ------------------------------------------------------------------------------------


def test_trivial_baselines_have_the_promised_ids():
  image = np.full((2, 5, 7), 200, np.uint8)
  image[:, :, 3] = 10  # a dark membrane splits the bright voxels in two
  segs = baselines.baseline_segmentations(image[None])  # [c, z, y, x] is accepted
  assert set(segs) == set(baselines.BASELINES)
  for seg in segs.values():
    assert seg.shape == image.shape and seg.dtype == np.uint32
  assert np.all(segs["one_segment"] == 1)
  assert len(np.unique(segs["per_voxel"])) == image.size and segs["per_voxel"].min() == 1
  thr = segs["image_threshold"]
  assert np.all(thr[:, :, 3] == 0)
  assert len(np.unique(thr[:, :, :3])) == 1 and len(np.unique(thr[:, :, 4:])) == 1
  assert thr[0, 0, 0] != thr[0, 0, 6]


def test_baselines_are_scored_with_the_eval_settings(tiny_root):
  config = _tiny_config(tiny_root)
  volume = dataset_volumes(config.data, "test")[0].windowed()
  scores = baselines.score_baselines(volume, config)
  one, per_voxel = scores["one_segment"], scores["per_voxel"]
  # Everything merged: no splits, and every skeleton merges into one segment (NERL 0).
  assert one["voi_split"] == pytest.approx(0.0, abs=1e-9) and one["nerl"] == 0.0
  assert one["segments"] == 1
  # Everything split: no merges, adapted Rand error ~ 1.
  assert per_voxel["voi_merge"] == pytest.approx(0.0, abs=1e-9)
  assert per_voxel["adapted_rand"] > 0.99
  assert per_voxel["segments"] == int(np.prod(volume.spatial_shape))
  learned = {"adapted_rand": 0.1, "nerl": 0.9, "voi": 0.5}
  best_arand = min(s["adapted_rand"] for s in scores.values())
  assert baselines.margin(learned, scores, "adapted_rand") == pytest.approx(best_arand - 0.1)
  assert baselines.margin({}, scores, "nerl") is None


# -- report ---------------------------------------------------------------------------------------


def test_label_colours_are_stable_and_background_black():
  ids = np.array([[0, 1, 2], [1, 2, 0]])
  rgb = report.label_colours(ids)
  assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
  assert np.all(rgb[0, 0] == 0) and np.all(rgb[1, 2] == 0)
  assert np.all(rgb[0, 1] == rgb[1, 0]) and np.any(rgb[0, 1] != rgb[0, 2])
  assert rgb[0, 1].max() >= 64  # a segment is never drawn black


def test_preview_png_has_one_row_per_section_and_four_columns(tmp_path):
  shape = (10, 12, 16)
  image = create_zarr(str(tmp_path / "img"), (1, *shape), np.uint8)
  image.write(
    (0, 0, 0, 0), np.random.default_rng(0).integers(0, 255, (1, *shape), np.uint8)
  ).result()
  seg = np.arange(np.prod(shape), dtype=np.uint32).reshape(shape) % 7

  class Affinities:  # what decode_lib.AffinitySource.read gives: [3, z, y, x]
    def read(self, box):
      return np.full((3, 1, *shape[1:]), 0.5, np.float16)

  path = report.write_preview(
    str(tmp_path / "p.png"),
    open_volume(str(tmp_path / "img")),
    seg,
    affinity_source=Affinities(),
    labels=seg,
    sections=2,
  )
  from PIL import Image

  with Image.open(path) as im:
    width, height = im.size
  scale = int(np.ceil(192 / 12))
  panel_h, panel_w = 12 * scale + 8, 16 * scale + 8
  assert (width, height) == (4 * panel_w, 2 * panel_h)
  assert report.preview_sections(10, 2) == [3, 6]
  assert report.preview_sections(2, 5) == [0, 1]


def _decode_metrics(path, threshold, **metrics):
  return {"volume": "v", "results": [{"threshold": threshold, "segmentation": path, **metrics}]}


def test_report_rows_and_files(tmp_path):
  results = {
    "name": "demo",
    "workdir": str(tmp_path),
    "test": {"cc": {"seed101": _decode_metrics("a", 0.5, adapted_rand=0.3, nerl=0.4)}},
    "tuned": {
      "cc": {
        "best": {"params": {"threshold": 0.55}, "best_value": 0.5, "objective": "nerl"},
        "volumes": {"seed101": _decode_metrics("b", 0.55, adapted_rand=0.2, nerl=float("nan"))},
      }
    },
    "baselines": {"seed101": {"one_segment": {"adapted_rand": 0.9, "nerl": 0.0, "segments": 1}}},
    "stages": [{"stage": "train", "status": "reused", "seconds": 0.1, "detail": "x"}],
    "images": {"seed101: cc (config)": "previews/seed101_cc.png"},
  }
  rows = report.metric_rows(results)
  assert [r["row"] for r in rows] == ["cc (config)", "cc (tuned)", "baseline: one_segment"]
  assert rows[0]["params"] == "threshold=0.5" and rows[1]["params"] == "threshold=0.55"
  paths = report.write_report(str(tmp_path / "results"), results)
  with open(paths["metrics"]) as f:
    saved = json.load(f)  # NaN became null: strict JSON
  assert saved["table"][1]["nerl"] is None
  with open(paths["report"]) as f:
    text = f.read()
  assert "| seed101 | cc (tuned) | threshold=0.55 | 0.2000 |" in text
  assert "best adapted Rand error: **0.2000**" in text and "0.9000 (one_segment)" in text
  assert "![seed101: cc (config)](previews/seed101_cc.png)" in text
  assert "| train | reused | 0.1 |" in text


# -- viewer ---------------------------------------------------------------------------------------


def _viewer_fixture(tmp_path):
  work, data = tmp_path / "work", tmp_path / "data"
  shape = (6, 8, 10)
  img = create_zarr(str(data / "c" / "data.zarr" / "img"), (1, *shape), np.uint8, axis_order="xyzc")
  img.write((0, 0, 0, 0), np.ones((1, *shape), np.uint8)).result()
  seg_path = str(work / "test" / "cc" / "c" / "segmentation")
  create_zarr(seg_path, shape, np.uint16)
  aff = create_zarr(str(work / "pred.zarr" / "affinities"), (3, *shape), np.float16)
  aff.write((0, 0, 0, 0), np.full((3, *shape), 0.5, np.float16)).result()
  (tmp_path / "x.tif").write_bytes(b"")
  return work, data, shape, seg_path


def test_viewer_layout_points_at_the_arrays_with_the_right_dimensions(tmp_path):
  from jaxseg.decoding.decode_lib import open_affinities
  from jaxseg.decoding.settings import decode_settings

  work, data, shape, seg_path = _viewer_fixture(tmp_path)
  settings = decode_settings(load_config(DEMO).decode)
  display = viewer.affinity_display(
    open_affinities(str(work / "pred.zarr" / "affinities"), settings),
    str(work / "results" / "viewer" / "c_affinities.zarr"),
  )
  shown = open_volume(display)
  assert shown.dtype == np.uint8 and shown.shape == (3, *shape)
  assert np.all(shown[...] == 128)
  assert outputs.is_complete(os.path.dirname(display), f"display:{os.path.basename(display)}")
  layers = [
    viewer.Layer("image", "image", str(data / "c" / "data.zarr" / "img")),
    viewer.Layer("affinities", "image", display, rgb=True),
    viewer.Layer("cc", "segmentation", seg_path),
    viewer.Layer("tif", "image", str(tmp_path / "x.tif")),
  ]
  roots = {"workdir": str(work), "data": str(data)}
  state, skipped = viewer.neuroglancer_state(layers, roots, (20.0, 9.0, 9.0), shape)
  assert state["dimensions"] == {"x": [9e-9, "m"], "y": [9e-9, "m"], "z": [2e-8, "m"]}
  assert state["position"] == [5.0, 4.0, 3.0]  # x, y, z centre
  assert [layer["name"] for layer in state["layers"]] == ["image", "affinities", "cc"]
  assert len(skipped) == 1 and "x.tif" in skipped[0]
  by_name = {layer["name"]: layer for layer in state["layers"]}
  for layer in state["layers"]:
    url = layer["source"]["url"]
    assert url.startswith("zarr2://http://127.0.0.1:8000/")
    assert os.path.exists(os.path.join(viewer.local_path(url, roots), ".zarray"))
  # The NISB image is x, y, z, c on disk; the dimensions follow the disk order.
  image_dims = by_name["image"]["source"]["transform"]["outputDimensions"]
  assert list(image_dims) == ["x", "y", "z", "c^"] and image_dims["z"] == [2e-8, "m"]
  seg_dims = by_name["cc"]["source"]["transform"]["outputDimensions"]
  assert list(seg_dims) == ["z", "y", "x"] and seg_dims["x"] == [9e-9, "m"]
  assert by_name["cc"]["type"] == "segmentation" and "shader" in by_name["affinities"]
  with pytest.raises(ValueError, match="none of the served folders"):
    viewer.url_for(str(tmp_path / "x.tif"), roots, viewer.base_url())


def test_file_server_sends_cors_and_stays_inside_its_roots(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "f.txt").write_text("hi")
  (tmp_path / "secret.txt").write_text("no")
  (tmp_path / "a" / "link.txt").symlink_to(tmp_path / "secret.txt")
  server, base = viewer.start_file_server({"workdir": str(tmp_path / "a")}, port=0)

  def get(path, origin="http://127.0.0.1:9999"):
    request = urllib.request.Request(base + path, headers={"Origin": origin})
    with urllib.request.urlopen(request) as r:
      return r.read(), r.headers.get("Access-Control-Allow-Origin")

  try:
    # A local viewer may read the files; another web page gets no CORS grant.
    assert get("/workdir/f.txt") == (b"hi", "http://127.0.0.1:9999")
    assert get("/workdir/f.txt", "https://evil.example") == (b"hi", None)
    assert get("/workdir/f.txt", "http://[::1") == (b"hi", None)  # unparsable: no grant either
    secret = str(tmp_path / "secret.txt")
    for bad in (
      "/workdir/../secret.txt",
      "/other/f.txt",
      "/workdir/%2e%2e/secret.txt",
      f"/workdir/{secret}",  # an absolute path must not escape the root
      f"/workdir/{urllib.parse.quote(secret)}",
      "/workdir/link.txt",  # nor a link out of it
    ):
      with pytest.raises(urllib.error.HTTPError):
        get(bad)
  finally:
    server.shutdown()


def test_file_server_answers_only_its_own_host_and_rejects_undecodable_paths(tmp_path):
  """DNS rebinding (a page whose domain now resolves to 127.0.0.1) gets a 421; a path with NUL
  or bad UTF-8 a 400, and the handler itself never raises."""
  (tmp_path / "f.txt").write_text("hi")
  server, _ = viewer.start_file_server({"workdir": str(tmp_path)}, port=0)
  port = server.server_address[1]
  handler_errors = []
  server.handle_error = lambda request, address: handler_errors.append(sys.exc_info()[1])

  def status(path, host=f"127.0.0.1:{port}"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
      conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
      if host is not None:
        conn.putheader("Host", host)
      conn.endheaders()
      response = conn.getresponse()
      response.read()
      return response.status
    finally:
      conn.close()

  try:
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
      assert status("/workdir/f.txt", host) == 200, host
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", "127.0.0.1",
                 f"localhost.evil.example:{port}", "", None):  # fmt: skip
      assert status("/workdir/f.txt", host) == 421, host
    for path in ("/workdir/f.txt%00", "/workdir/%00/x", "/workdir/%ff.txt", "/%00/f.txt"):
      assert status(path) == 400, path
    assert status("/workdir/missing.txt") == 404
  finally:
    server.shutdown()
  assert handler_errors == []


def test_file_server_is_quiet_when_a_viewer_hangs_up_mid_file(tmp_path, capfd):
  """Neuroglancer drops chunk requests it no longer needs: no traceback for those."""
  import socket
  import struct

  with open(tmp_path / "big.bin", "wb") as f:
    f.truncate(64 << 20)  # sparse: larger than any socket buffer, costs no disk
  server, _ = viewer.start_file_server({"workdir": str(tmp_path)}, port=0)
  port = server.server_address[1]
  seen = []

  def handle_error(request, address):  # records, then does what the server does
    seen.append(sys.exc_info()[1])
    type(server).handle_error(server, request, address)

  server.handle_error = handle_error
  try:
    for _ in range(2):
      client = socket.create_connection(("127.0.0.1", port), timeout=10)
      client.sendall(f"GET /workdir/big.bin HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
      client.recv(65536)
      # Linger 0: close with a reset, as a browser cancelling a fetch may.
      client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
      client.close()
    deadline = time.monotonic() + 20
    while len(seen) < 2 and time.monotonic() < deadline:
      time.sleep(0.05)
  finally:
    server.shutdown()
  assert len(seen) == 2 and all(
    isinstance(e, (BrokenPipeError, ConnectionResetError)) for e in seen
  ), seen
  err = capfd.readouterr().err
  assert "Traceback" not in err and "Error" not in err, err


def test_file_server_on_a_taken_port_says_which_flag_to_change(tmp_path):
  server, _ = viewer.start_file_server({"workdir": str(tmp_path)}, port=0)
  try:
    with pytest.raises(JaxsegError, match=r"--view_port=\d+: .*try another --view_port"):
      viewer.start_file_server({"workdir": str(tmp_path)}, port=server.server_address[1])
  finally:
    server.shutdown()


def test_view_without_neuroglancer_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "neuroglancer", None)  # import fails
  with pytest.raises(ImportError, match="pip install neuroglancer") as error:
    viewer.serve(lambda base: {}, {}, port=0)
  assert isinstance(error.value, JaxsegError)  # jaxseg.run --view: one line, no traceback


# -- chain stages ---------------------------------------------------------------------------------


def test_completed_steps_ignore_unfinished_checkpoints(tmp_path):
  for name in ("100", "200", "300.orbax-checkpoint-tmp-1", "tmp"):
    (tmp_path / name).mkdir()
  assert completed_steps(str(tmp_path)) == [100, 200]
  assert completed_steps(str(tmp_path / "missing")) == []


def test_data_and_train_stages_reuse_complete_outputs(tmp_path):
  root = str(tmp_path / "data")
  config = _tiny_config(root, **{"data.synth.train_seeds": (0,), "train.num_steps": 5})
  lines = []
  c = chain.Chain(config, str(tmp_path / "work"), show_progress=False, echo=lines.append)
  assert c.run_stage("data").status == "ran"
  assert os.path.exists(os.path.join(root, "synth_summary.json"))
  assert c.run_stage("data").status == "reused"
  # A finished checkpoint of train.num_steps, made as jaxseg.train makes it (its manifest entry).
  training_output(config, c.workdir).open()
  os.makedirs(os.path.join(c.checkpoint_dir, "5"))
  result = c.run_stage("train")
  assert result.status == "reused" and "step 5" in result.detail
  assert lines[0].startswith("[data] ran: generated 3 of 3 cubes") and len(lines) == 3
  recorded = c.recorded_stages()
  assert [s["stage"] for s in recorded] == ["data", "train"]
  # The data stage's time is the one of the call that generated the cubes.
  assert recorded[0]["status"] == "reused" and recorded[0]["computed_seconds"] > 0
  # Checkpoints of another training config are not this config's model; moving the data or
  # changing what is only logged is fine.
  from jaxseg.common import config_util

  config_util.save_config(config, c.workdir)  # what jaxseg.train writes at its start
  moved = _tiny_config(root + "_moved", **{"data.synth.train_seeds": (0,), "train.num_steps": 5})
  moved.train.log_every = 1
  assert chain.Chain(moved, c.workdir, show_progress=False).run_stage("train").status == "reused"
  other = _tiny_config(root, **{"data.synth.train_seeds": (0,), "train.num_steps": 5})
  other.optim.lr = 0.5
  with pytest.raises(OutputError, match=r"optim\.lr: 0\.003 -> 0\.5"):
    chain.Chain(other, c.workdir, show_progress=False).run_stage("train")


def test_chain_rejects_bad_settings(tmp_path, tiny_root):
  config = _tiny_config(tiny_root, **{"run.decoders": ("cc", "watershed")})
  with pytest.raises(chain.ChainError, match=r"run\.decoders"):
    chain.Chain(config, str(tmp_path))
  with pytest.raises(chain.ChainError, match="unknown mode"):
    chain.Chain(_tiny_config(tiny_root), str(tmp_path)).run("everything")


def _cli(*args, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "jaxseg.run", *args],
    cwd=REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def test_importing_the_chain_loads_no_jax():
  code = (
    "import sys; import jaxseg.run, jaxseg.workflow.chain, jaxseg.workflow.report, "
    "jaxseg.workflow.viewer, jaxseg.workflow.baselines; "
    "assert 'jax' not in sys.modules, 'jax imported'"
  )
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr


def test_cli_missing_data_is_one_clear_line(tmp_path):
  proc = _cli(
    f"--config={os.path.join(REPO_ROOT, 'configs', 'nisb_base.py')}",
    f"--config.data.root={tmp_path / 'nowhere'}",
    f"--workdir={tmp_path / 'work'}",
    "--mode=train",
  )
  assert proc.returncode == 1, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("jaxseg.run: data.root=") and "does not exist" in lines[-1]
  assert "Traceback" not in proc.stderr


# -- end to end -----------------------------------------------------------------------------------

# The shortened demo: 48 x 96 x 96 cubes (2 for training), 100 steps of 16 x 48 x 48 patches
# without validation, a 7-point cc grid and 3 waterz trials of 3 thresholds each: about a minute
# on 2 free cores. Measured margins over the best baseline: adapted Rand 0.17 vs 0.55, VOI 1.7 vs
# 4.3, NERL 0.35 vs 0.13. At 60 steps the NERL margin shrinks to 0.11 (0.24 vs 0.13): too close.
E2E = {
  "data.synth.shape": (48, 96, 96),
  "data.synth.chunks": (48, 96, 96),
  "data.synth.train_seeds": (0, 1),
  "data.synth.preview": False,
  "data.patch_size": (16, 48, 48),
  "data.prefetch": 1,
  "infer.window": (16, 48, 48),
  "infer.block_shape": (48, 96, 96),
  "decode.block_shape": (48, 96, 96),
  "train.num_steps": 100,
  "train.mesh_devices": 1,
  "train.eval_every": 0,
  "train.eval_batches": 0,
  "train.checkpoint_every": 0,
  "train.log_every": 50,
  "train.ema.warmup_steps": 25,
  "train.ema.decay": 0.9,
  "tune.cc.threshold_grid": (0.4, 0.7, 0.05),
  "tune.waterz.n_trials": 3,
  "tune.waterz.n_startup_trials": 2,
  "tune.waterz.thresholds": (0.3, 0.5, 0.7),
}
# "Wide": how much better than the best trivial baseline. Each decoder must win on the metric it
# is tuned for (cc: NERL, waterz: adapted Rand), and the better decoder on VOI.
MARGINS = {"adapted_rand": 0.2, "voi": 1.0, "nerl": 0.1}


@pytest.mark.slow
def test_end_to_end_beats_baselines_and_a_rerun_reuses_everything(tmp_path, optimised_xla):
  overrides = {**E2E, "data.root": str(tmp_path / "data")}
  config = load_config(DEMO, overrides)
  workdir = str(tmp_path / "run")
  lines = []
  start = time.perf_counter()
  result = chain.run_chain(config, workdir, show_progress=False, echo=lines.append)
  first = time.perf_counter() - start
  assert [s.stage for s in result["stages"]] == list(chain.STAGES)
  assert all(s.status == "ran" for s in result["stages"]), lines

  results = os.path.join(workdir, "results")
  for name in ("config.json", "report.md", "metrics.json", "neuroglancer.json", "stages.json"):
    assert os.path.exists(os.path.join(results, name)), name
  with open(os.path.join(results, "metrics.json")) as f:
    metrics = json.load(f)
  rows = metrics["table"]
  kinds = {r["row"] for r in rows}
  assert {"cc (config)", "cc (tuned)", "waterz (config)", "waterz (tuned)"} <= kinds
  assert {f"baseline: {b}" for b in baselines.BASELINES} <= kinds
  base = {r["row"]: r for r in rows if r["row"].startswith("baseline")}
  table = [(r["row"], r["adapted_rand"], r["voi"], r["nerl"]) for r in rows]
  for decoder in ("cc", "waterz"):
    (tuned,) = [r for r in rows if r["row"] == f"{decoder} (tuned)"]
    objective = config.tune[decoder].objective
    got = baselines.margin(tuned, base, objective)
    assert got >= MARGINS[objective], (decoder, objective, got, table)
  best_voi = min((r for r in rows if r["row"].endswith("(tuned)")), key=lambda r: r["voi"])
  assert baselines.margin(best_voi, base, "voi") >= MARGINS["voi"], table
  for rel in metrics["images"].values():
    assert os.path.exists(os.path.join(results, rel)), rel
  assert {"seed101: cc (config)", "seed101: waterz (tuned)", "training curves"} <= set(
    metrics["images"]
  )
  with open(os.path.join(results, "neuroglancer.json")) as f:
    state = json.load(f)
  roots = metrics["viewer"]["roots"]
  assert len(state["layers"]) >= 6 and not metrics["viewer"]["skipped"]
  for layer in state["layers"]:
    assert os.path.isdir(viewer.local_path(layer["source"]["url"], roots)), layer["name"]

  # A rerun in a fresh process reuses every stage and never loads JAX.
  args = [f"--config={DEMO}", f"--workdir={workdir}", "--noprogress"]
  args += [f"--config.{k}={v}" for k, v in overrides.items()]
  start = time.perf_counter()
  proc = _cli(*args)
  again = time.perf_counter() - start
  assert proc.returncode == 0, proc.stderr[-3000:]
  stage_lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
  assert len(stage_lines) == len(chain.STAGES), proc.stdout
  for line in stage_lines[:-1]:
    assert " reused: " in line, line
  with open(os.path.join(results, "stages.json")) as f:
    assert not any(s["jax_imported"] for s in json.load(f).values())
  assert again < first / 2, (again, first)


def test_unlabeled_test_volumes_are_decoded_without_baselines(tmp_path, tiny_root, monkeypatch):
  """Public SNEMI3D / CREMI test volumes have no labels: the test stage must not fail on them."""
  from jaxseg.decoding import scoring
  from jaxseg.inference import cache

  config = _tiny_config(tiny_root, **{"run.decoders": ("cc",)})
  (volume,) = dataset_volumes(config.data, "test")
  volume.labels, volume.skeleton = None, None
  unlabeled = cache.CachedAffinities(name=volume.name, affinities="aff", volume=volume)
  monkeypatch.setattr(cache, "cached_predictions", lambda *a, **k: [unlabeled])
  decoded = []
  monkeypatch.setattr(
    scoring, "decode_and_evaluate", lambda config, c, out, **k: decoded.append(out) or {}
  )
  c = chain.Chain(config, str(tmp_path / "work"), show_progress=False, echo=lambda line: None)
  result = c.run_stage("test")
  assert result.status == "ran" and len(decoded) == 1
  assert "baselines" not in result.detail
  assert not os.path.exists(c.baseline_path(volume.name))


def test_chain_caches_parsed_skeletons_under_its_workdir(tmp_path, tiny_root, monkeypatch):
  """The test stage's scores (decodes and baselines) parse skeletons into DIR/cache/erl, never
  beside the user's skeleton.pkl."""
  from jaxseg.decoding import scoring
  from jaxseg.inference import cache

  config = _tiny_config(tiny_root, **{"run.decoders": ("cc",)})
  (volume,) = dataset_volumes(config.data, "test")
  labeled = cache.CachedAffinities(name=volume.name, affinities="aff", volume=volume)
  monkeypatch.setattr(cache, "cached_predictions", lambda *a, **k: [labeled])
  passed = []
  monkeypatch.setattr(
    scoring, "decode_and_evaluate", lambda config, c, out, **k: passed.append(k) or {}
  )
  work = tmp_path / "work"
  c = chain.Chain(config, str(work), show_progress=False, echo=lambda line: None)
  assert c.run_stage("test").status == "ran" and os.path.exists(c.baseline_path(volume.name))
  erl = str(work / "cache" / "erl")
  assert c.erl_cache_dir == erl and [k["erl_cache_dir"] for k in passed] == [erl]
  assert len(os.listdir(erl)) == 1  # the baselines parsed the skeleton once, then hit the cache
  beside = [n for _, _, names in os.walk(tiny_root) for n in names if "erl_cache" in n]
  assert not beside
