"""Every entry point ends a user's mistake in one line naming the key or file, never a traceback.

Each case runs the real command in a fresh process (absl flags are process-global, and each CLI
defines its own): bad config keys, files and values, an output that is a file, every synth
validation error, a corrupt zarr chunk, and a full disk. The full disk is simulated inside the
CLI's process by patching ``os.replace`` (every small output goes through it) or a block
function, then running the module as ``python -m`` would (:data:`_HARNESS`). All volumes are tiny
and nothing trains for more than one step.
"""

import errno
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from cli_asserts import one_line as _one_line

from jaxseg.io import write_volume

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO_ROOT, "configs", "demo.py")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _run(module: str, *args: str, code: str | None = None) -> subprocess.CompletedProcess:
  command = [sys.executable, "-c", code] if code else [sys.executable, "-m", module, *args]
  return subprocess.run(
    command, capture_output=True, text=True, cwd=REPO_ROOT, env=ENV, timeout=300
  )


@pytest.fixture(scope="module")
def affinities(tmp_path_factory):
  """A small ``[3, z, y, x]`` float32 affinity zarr: edges inside blobs high, between them low."""
  rng = np.random.default_rng(0)
  aff = rng.uniform(0.6, 1.0, size=(3, 16, 32, 32)).astype(np.float32)
  aff[:, :, :, 15:17] = 0.1
  return write_volume(str(tmp_path_factory.mktemp("aff") / "aff.zarr"), aff).path


# -- config keys, files and values ----------------------------------------------------------------


@pytest.mark.parametrize(
  "flag, named",
  [
    ("--config.decode.nosuch=1", "decode.nosuch"),
    ("--config.nosuch.x=1", "nosuch"),
    ("--config.decode.block_shape.x=1", "decode.block_shape.x"),
    ("--config=configs/nope.py", "configs/nope.py"),
    ("--config.decode.block_shape=abc", "decode.block_shape"),
    ("--config.decode.threshold=abc", "decode.threshold"),
    ("--config.decode.method=watershed", "decode.method"),
    ("--config.decode.channels[5]=1", "decode.channels"),
    ("--config=configs/common.py", "configs/common.py"),  # no get_config()
    ("--config=README.md", "README.md"),  # not Python
  ],
)
def test_decode_config_mistakes_are_one_line(flag, named, affinities, tmp_path):
  proc = _run(
    "jaxseg.decode", f"--config={DEMO}", flag, f"--affinities={affinities}",
    f"--output={tmp_path / 'out'}",
  )  # fmt: skip
  _one_line(proc, "jaxseg.decode", named)
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
  "args, named",
  [
    ([f"--config={DEMO}"], ["--affinities", "--output"]),
    ([], ["--config", "--affinities", "--output"]),
  ],
)
def test_missing_required_flags_are_one_usage_line(args, named):
  proc = _run("jaxseg.decode", *args)
  _one_line(proc, "jaxseg.decode", *named)
  assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_config_file_that_raises_keeps_its_traceback(tmp_path):
  """A bug in a real config file is not the user's command line: absl's message holds its
  traceback, which is shown."""
  config = tmp_path / "broken.py"
  config.write_text("def get_config():\n  raise ValueError('a bug in the recipe')\n")
  proc = _run("jaxseg.decode", f"--config={config}", "--affinities=x", "--output=y")
  assert proc.returncode != 0
  assert "Traceback" in proc.stderr and "a bug in the recipe" in proc.stderr


def test_bad_tuning_space_is_one_line_naming_the_key(tmp_path):
  proc = _run(
    "jaxseg.tune", f"--config={DEMO}", "--config.tune.cc.threshold_grid=(0.5,0.1,0.1)",
    f"--workdir={tmp_path / 'tune'}",
  )  # fmt: skip
  _one_line(proc, "jaxseg.tune", "tune.cc.threshold_grid")
  assert not (tmp_path / "tune").exists()


@pytest.mark.parametrize(
  "flag, key",
  [
    ("--config.model.name=nosuch", "model.name"),
    ("--config.model.widths=(4,0)", "model.widths"),
    ("--config.model.depth_2d=9", "model.depth_2d"),
  ],
)
def test_bad_model_settings_are_one_line_naming_the_key(flag, key, tmp_path):
  (tmp_path / "data").mkdir()  # train checks that data.root exists before the model
  proc = _run(
    "jaxseg.train", f"--config={DEMO}", flag, f"--config.data.root={tmp_path / 'data'}",
    f"--workdir={tmp_path / 'run'}",
  )  # fmt: skip
  _one_line(proc, "jaxseg.train", key)


@pytest.mark.parametrize(
  "flags, named",
  [
    (["--crop_fraction=0"], "--crop_fraction"),
    (["--merge_threshold=0", "--skeleton=SKEL"], "--merge_threshold"),
  ],
)
def test_bad_evaluate_settings_are_one_line(flags, named, tmp_path):
  seg, gt = _labels(tmp_path / "seg.zarr", 0), _labels(tmp_path / "gt.zarr", 1)
  flags = [f.replace("SKEL", str(tmp_path / "skeleton.pkl")) for f in flags]
  proc = _run("jaxseg.evaluate", f"--seg={seg}", f"--gt={gt}", *flags)
  _one_line(proc, "jaxseg.evaluate", named)


def test_view_problems_are_said_before_the_chain_runs(tmp_path):
  work = tmp_path / "work"
  proc = _run("jaxseg.run", f"--config={DEMO}", f"--workdir={work}", "--view_port=70000")
  _one_line(proc, "jaxseg.run", "--view_port")
  assert proc.returncode == 2
  # Without the neuroglancer package (hidden here, in case it is installed).
  setup = "sys.modules['neuroglancer'] = None"
  proc = _full_disk("jaxseg.run", [f"--config={DEMO}", f"--workdir={work}", "--view"], work, setup)
  _one_line(proc, "jaxseg.run", "--view", "pip install neuroglancer")
  assert not work.exists()


def test_unknown_config_key_names_the_keys_there_are(affinities, tmp_path):
  proc = _run(
    "jaxseg.decode", f"--config={DEMO}", "--config.decode.thershold=0.5",
    f"--affinities={affinities}", f"--output={tmp_path / 'out'}",
  )  # fmt: skip
  line = _one_line(proc, "jaxseg.decode", "decode.thershold")
  assert "threshold" in line.split("thershold", 2)[-1]  # the key that was meant is listed


# -- an output that is a regular file --------------------------------------------------------------


@pytest.mark.parametrize("under", ["", "sub/out"])  # the file itself, or a folder below it
@pytest.mark.parametrize(
  "module, args, flag",
  [
    ("jaxseg.decode", [f"--config={DEMO}", "--affinities=AFF"], "--output"),
    ("jaxseg.qc", ["--affinities=AFF", "--noprogress"], "--output"),
    ("jaxseg.predict", [f"--config={DEMO}", "--checkpoint=nowhere", "--input=AFF"], "--output"),
    ("jaxseg.tune", [f"--config={DEMO}"], "--workdir"),
    ("jaxseg.train", [f"--config={DEMO}"], "--workdir"),
    ("jaxseg.synth", ["--config.data.synth.shape=(16,32,32)"], "--output"),
    ("jaxseg.run", [f"--config={DEMO}"], "--workdir"),
  ],
)
def test_output_that_is_a_file_is_refused_before_any_work(
  module, args, flag, under, affinities, tmp_path
):
  target = tmp_path / "results.txt"
  target.write_text("the user's notes")
  args = [a.replace("AFF", affinities) for a in args]
  proc = _run(module, *args, f"{flag}={os.path.join(target, under)}".rstrip("/"))
  _one_line(proc, module, flag, str(target), "not a folder")
  assert target.read_text() == "the user's notes"
  assert sorted(os.listdir(tmp_path)) == ["results.txt"]


# -- synth validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "flag, key",
  [
    ("--config.data.synth.difficulty=nope", "data.synth.difficulty"),
    ("--config.data.synth.shape=(4,32,32)", "data.synth.shape"),
    ("--config.data.synth.shape=(16,32)", "data.synth.shape"),
    ("--config.data.synth.resolution=(0.0,9.0,9.0)", "data.synth.resolution"),
    ("--config.data.synth.resolution=(20.0,9.0)", "data.synth.resolution"),
    ("--config.data.synth.fill_fraction=1.5", "data.synth.fill_fraction"),
    ("--config.data.synth.radius_thick_nm=(0.0,50.0)", "data.synth.radius_thick_nm"),
    ("--config.data.synth.radius_thin_nm=(30.0,10.0)", "data.synth.radius_thin_nm"),
    ("--config.data.synth.radius_thin_nm=(10.0,)", "data.synth.radius_thin_nm"),
    ("--config.data.synth.blur_sigma_nm=(1.0,1.0)", "data.synth.blur_sigma_nm"),
    ("--config.data.synth.thin_fraction=1.5", "data.synth.thin_fraction"),
    ("--config.data.synth.touch_probability=-0.1", "data.synth.touch_probability"),
    ("--config.data.synth.missing_slice_prob=2.0", "data.synth.missing_slice_prob"),
    ("--config.data.synth.shifted_slice_prob=2.0", "data.synth.shifted_slice_prob"),
    ("--config.data.synth.node_spacing_nm=0.0", "data.synth.node_spacing_nm"),
    ("--config.data.synth.persistence_nm=-1.0", "data.synth.persistence_nm"),
    ("--config.data.synth.chunks=(0,32,32)", "data.synth.chunks"),
    ("--config.data.synth.chunks=(16,32)", "data.synth.chunks"),
    ("--config.data.synth.noise_std=abc", "data.synth.noise_std"),
    (f"--config={REPO_ROOT}/jaxseg/synthesis/cli_config.py:nope", "data.synth.difficulty"),
  ],
)
def test_synth_validation_errors_are_one_line_and_write_nothing(flag, key, tmp_path):
  out = tmp_path / "synth"
  proc = _run("jaxseg.synth", f"--output={out}", "--config.data.synth.shape=(16,32,32)", flag)
  _one_line(proc, "jaxseg.synth", key)
  assert not out.exists()  # no config.json of a config that was refused


# -- a corrupt input -------------------------------------------------------------------------------


def _corrupt_h5(tmp_path):
  (tmp_path / "seg.h5").write_text("not HDF5")
  return tmp_path / "seg.h5", tmp_path / "seg.h5"


def _corrupt_tif(tmp_path):
  (tmp_path / "seg.tif").write_text("not a TIFF")
  return tmp_path / "seg.tif", tmp_path / "seg.tif"


def _corrupt_metadata(name, **kwargs):
  def make(tmp_path):
    from jaxseg.io import create_zarr

    path = tmp_path / "seg"
    if name == "info":
      write_volume(str(path), np.ones((4, 8, 8), np.uint32), format="precomputed")
      info = json.loads((path / "info").read_text())
      del info["scales"][0]["resolution"]
      (path / "info").write_text(json.dumps(info))
    elif name == "attributes.json":
      write_volume(str(path), np.ones((4, 8, 8), np.uint32), format="n5")
    else:
      create_zarr(str(path), (4, 8, 8), np.uint32, **kwargs)
    if name != "info":
      (path / name).write_text('{"half written')
    return path, path

  return make


@pytest.mark.parametrize(
  "make",
  [
    _corrupt_h5,
    _corrupt_tif,
    _corrupt_metadata(".zattrs"),
    _corrupt_metadata("zarr.json", zarr_format=3),
    _corrupt_metadata("attributes.json"),
    _corrupt_metadata("info"),
  ],
  ids=["h5", "tif", "zattrs", "zarr.json", "attributes.json", "info"],
)
def test_a_corrupt_or_mistyped_volume_names_the_file(make, tmp_path):
  seg, named = make(tmp_path)
  gt = _labels(tmp_path / "gt.zarr", 1)
  proc = _run("jaxseg.evaluate", f"--seg={seg}", f"--gt={gt}")
  _one_line(proc, "jaxseg.evaluate", str(named))


@pytest.mark.parametrize(
  "attrs, named",
  [
    ({"offsets": [[3, 0, 0], [0, 3, 0], [0, 0, 3]]}, "nearest-neighbour"),  # long-range, cc
    ({"offsets": [[1, 0, 0]]}, "'offsets' attribute"),  # too few
    ({"offsets": 5}, "'offsets' attribute"),
    ({"channels": ["a", "b", "c"]}, "'channels' attribute"),
  ],
)
def test_decode_refuses_bad_affinity_attributes_before_preparing_the_output(attrs, named, tmp_path):
  aff = np.full((3, 4, 8, 8), 0.9, np.float32)
  path = write_volume(str(tmp_path / "aff.zarr"), aff, attributes=attrs).path
  out = tmp_path / "seg"
  proc = _run(
    "jaxseg.decode", f"--config={DEMO}", f"--affinities={path}", f"--output={out}",
    "--config.decode.method=cc",
  )  # fmt: skip
  _one_line(proc, "jaxseg.decode", path, named)
  assert not out.exists()


def test_train_on_a_corrupt_zarr_chunk_names_the_array_and_the_file(tmp_path):
  from jaxseg.common.config_util import load_config
  from jaxseg.synthesis import generate_dataset

  tiny = {
    "data.synth.shape": (16, 32, 32),
    "data.synth.chunks": (16, 32, 32),
    "data.synth.train_seeds": (0,),
    "data.synth.val_seeds": (),
    "data.synth.test_seeds": (),
    "data.synth.preview": False,
  }
  root = tmp_path / "data"
  generate_dataset(load_config(DEMO, tiny).data.synth, str(root), show_progress=False)
  img = root / "train" / "seed0" / "data.zarr" / "img"
  (chunk,) = [p for p in img.iterdir() if not p.name.startswith(".")]
  chunk.write_bytes(b"not a blosc chunk at all")
  overrides = {
    **tiny,
    "data.root": str(root),
    "data.patch_size": (4, 16, 16),
    "data.prefetch": 0,
    "model.widths": (4, 8),
    "model.norm_groups": 2,
    "train.batch_size": 1,
    "train.mesh_devices": 1,
    "train.num_steps": 1,
    "train.eval_every": 0,
    "train.eval_batches": 0,
  }
  flags = [f"--config.{k}={v}".replace(" ", "") for k, v in overrides.items()]
  proc = _run("jaxseg.train", f"--config={DEMO}", f"--workdir={tmp_path / 'run'}", *flags)
  _one_line(proc, "jaxseg.train", str(img), str(chunk))


# -- a full disk -----------------------------------------------------------------------------------

# Runs ``module`` as ``python -m`` does, with ``os.replace`` onto anything under ``under`` failing
# as on a full disk (every small output is written to a temporary file and moved into place).
_HARNESS = """
import errno, os, runpy, sys
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
  if os.path.abspath(os.fspath(dst)).startswith({under!r}):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(src), None, os.fspath(dst))
  return real_replace(src, dst, *args, **kwargs)
os.replace = replace
{setup}
sys.argv = [{module!r}, *{args!r}]
runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
"""


def _full_disk(module: str, args: list[str], under, setup: str = "") -> subprocess.CompletedProcess:
  code = _HARNESS.format(
    under=os.path.abspath(under), module=module, args=args, setup=textwrap.dedent(setup)
  )
  return _run(module, code=code)


def _labels(path, seed):
  labels = np.random.default_rng(seed).integers(1, 4, size=(4, 8, 8)).astype(np.uint32)
  return write_volume(str(path), labels).path


def test_evaluate_on_a_full_disk_keeps_the_metrics_and_says_where(tmp_path):
  seg, gt = _labels(tmp_path / "seg.zarr", 0), _labels(tmp_path / "gt.zarr", 1)
  out = tmp_path / "results" / "metrics.json"
  proc = _full_disk(
    "jaxseg.evaluate", [f"--seg={seg}", f"--gt={gt}", f"--output={out}"], tmp_path / "results"
  )
  line = _one_line(proc, "jaxseg.evaluate", str(out), "no space left")
  assert "adapted Rand" in proc.stdout  # the table was printed before the write failed
  kept = re.search(r"the metrics are in (\S+\.json)", line)
  assert kept, line
  try:
    with open(kept.group(1)) as f:
      metrics = json.load(f)
  finally:
    os.remove(kept.group(1))
  assert metrics["inputs"]["seg"] == seg and "adapted_rand" in metrics
  assert not out.exists()


def test_qc_on_a_full_disk_is_one_line(affinities, tmp_path):
  out = tmp_path / "qc"
  proc = _full_disk(
    "jaxseg.qc", [f"--affinities={affinities}", f"--output={out}", "--noprogress", "--nomask"], out
  )
  _one_line(proc, "jaxseg.qc", str(out), "no space left")


def test_synth_on_a_full_disk_is_one_line(tmp_path):
  out = tmp_path / "synth"
  args = [f"--output={out}", "--config.data.synth.shape=(16,32,32)"]
  proc = _full_disk("jaxseg.synth", args, out)
  _one_line(proc, "jaxseg.synth", str(out), "no space left")


def test_blockwise_decode_on_a_full_disk_is_one_line(affinities, tmp_path):
  out = tmp_path / "seg"
  # A block fails to write its labels (in-process daisy workers re-raise the block's error).
  setup = f"""
  from jaxseg.decoding import blockwise
  def full(job, block):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), {str(out / "segmentation")!r})
  blockwise._cc_fragments = full
  """
  args = [
    f"--config={DEMO}", f"--affinities={affinities}", f"--output={out}", "--noprogress",
    "--config.decode.method=cc", "--config.decode.blockwise=always",
    "--config.decode.block_shape=(8,16,16)",
  ]  # fmt: skip
  proc = _full_disk("jaxseg.decode", args, tmp_path / "elsewhere", setup)
  _one_line(proc, "jaxseg.decode", str(out / "segmentation"), "no space left")


def test_a_bug_keeps_its_traceback(affinities, tmp_path):
  """Only the user's mistakes are shortened: any other exception shows where it came from."""
  setup = """
  from jaxseg.decoding import decode_lib
  def broken(*args, **kwargs):
    raise ZeroDivisionError("a bug")
  decode_lib.decode = broken
  """
  args = [f"--config={DEMO}", f"--affinities={affinities}", f"--output={tmp_path / 'seg'}"]
  proc = _full_disk("jaxseg.decode", args, tmp_path / "elsewhere", setup)
  assert proc.returncode != 0
  assert "Traceback" in proc.stderr and "ZeroDivisionError: a bug" in proc.stderr


@pytest.mark.parametrize(
  "code, words",
  [
    (errno.EACCES, "permission denied (EACCES)"),
    (errno.EPERM, "permission denied (EPERM)"),
    (errno.ENOTDIR, "not a folder"),
    (errno.ENAMETOOLONG, "too long"),
  ],
)
def test_os_errors_of_reads_and_writes_are_one_line_in_neutral_words(code, words):
  """A permission problem happens reading an input as much as writing an output."""
  from jaxseg.common.cli import user_message

  error = OSError(code, os.strerror(code), "/data/in.zarr/.zarray")
  line = user_message(error)
  assert line.startswith("/data/in.zarr/.zarray: ") and words in line, line
  assert "writable" not in line and "output" not in line, line


def test_errno_of_the_simulated_disk():
  """The harness raises what a full disk raises, so common.errors maps it."""
  from jaxseg.common.errors import OutputError, from_os_error

  error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "a.tmp", None, "a.json")
  assert isinstance(from_os_error(error, error.filename2), OutputError)


def test_own_volumes_given_on_the_command_line_are_checked_before_anything_is_written(tmp_path):
  """``--config.data.volumes.train="({...},)"`` parses; a missing file is one line naming the
  entry, and the work dir is not created."""
  entries = "({'image': 'nope.h5:raw', 'labels': 'nope.h5:seg'},)"
  proc = _run(
    "jaxseg.train",
    f"--config={os.path.join(REPO_ROOT, 'configs', 'own_data_example.py')}",
    f"--workdir={tmp_path / 'run'}",
    f"--config.data.root={tmp_path}",
    f"--config.data.volumes.train={entries}",
  )
  _one_line(proc, "jaxseg.train", "config.data.volumes.train[0] image", "nope.h5")
  assert not (tmp_path / "run").exists()
