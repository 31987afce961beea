"""The whole chain behind ``python -m jaxseg.run``: data, train, test, tune, tune-test, report.

Owns the stages, the modes (which stages run) and the work-dir layout they share::

  DIR/config.json, checkpoints/, metrics.jsonl, training_curves.png   train (jaxseg.training)
  DIR/predictions/<key>/<name>.zarr, <name>_predict.json, <name>_qc/  affinity cache (+ QC)
  DIR/test/<decoder>/<name>/segmentation*, decode.json, metrics.json  test: the config's decoder
  DIR/test/baselines/<name>.json                                     trivial baselines, scored
  DIR/tune/<decoder>/...                                             tune (jaxseg.tuning)
  DIR/tune/<decoder>/test/<name>/...                                 tune-test: tuned on test
  DIR/cache/erl/                                                     parsed skeletons (ERL)
  DIR/results/config.json, metrics.json, report.md, stages.json, previews/*.png,
              neuroglancer.json, viewer/<name>_affinities.zarr        report

Every stage reuses complete outputs (a finished training, cached affinities, finished decodes,
finished studies), so a killed or repeated run continues where it stopped; each stage prints one
line with what it did or reused and its time. JAX is imported only by the stages that train or
predict, and only when they have work to do: a rerun over complete outputs, or ``--mode=tune``
with cached affinities, needs no accelerator.

A trained model from elsewhere (``checkpoint=``: another work dir, its checkpoints folder, a step
folder, or a work dir of ``python -m jaxseg.import_checkpoint``) replaces the train stage: it is
skipped (``--mode=all`` runs data, test, tune, tune-test and report; ``--mode=train`` is refused),
the later stages predict with that checkpoint, and everything they write goes into this work dir;
the checkpoint's folder is only read. A step folder selects its step (``run.checkpoint_step``).

Volumes are the ``[c,] z, y, x`` arrays of ``jaxseg.io``; segmentations ``[z, y, x]``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging

from jaxseg.common import cli, config_util, files, outputs
from jaxseg.common.errors import JaxsegError
from jaxseg.decoding.scoring import DECODERS
from jaxseg.io.skeleton import workdir_skeleton_dir
from jaxseg.training import paths

STAGES = ("data", "train", "test", "tune", "tune-test", "report")
MODES = {
  "all": STAGES,
  "train": ("data", "train"),
  "test": ("test", "report"),
  "tune": ("tune", "report"),
  "tune-test": ("tune-test", "report"),
  "report": ("report",),
}
# The config sections that decide what a checkpoint is (the later stages' sections may change),
# less the keys inside them that do not: where data lives, the test split, logging and I/O.
STAGES_NAME = "stages.json"


class ChainError(JaxsegError, ValueError):
  """A setting or a state of the work dir that stops the chain (one clear line)."""


@dataclasses.dataclass
class StageResult:
  """What one stage did.

  Attributes:
    stage: its name (:data:`STAGES`).
    status: ``ran`` (did work), ``reused`` (everything was complete) or ``skipped`` (nothing to
      do for this config).
    seconds: wall time of this call.
    detail: one line for the log and the report.
    computed_seconds: the wall time of the call that last did the work (this one when it ran).
  """

  stage: str
  status: str
  seconds: float
  detail: str
  computed_seconds: float | None = None


def _read_if_any(path: str) -> Any:
  """``path``'s JSON, or None when it does not exist (a stage not run yet)."""
  return files.read_json(path, missing_ok=True)


def _fmt_seconds(seconds: float) -> str:
  return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class Chain:
  """The stages of one work dir; ``run(mode)`` runs the stages of a mode in order.

  Args:
    config: the resolved run config (locked ``ConfigDict``).
    workdir: the run folder (created).
    overwrite: let decodes and studies replace outputs made with other settings (else they
      refuse).
    force_test: allow tuning on the test split (default ``config.tune.force_test``).
    show_progress: progress bars inside the stages.
    echo: where the one-line stage summaries go (default ``print``).
    checkpoint: a trained model to use instead of training into ``workdir`` (a work dir, its
      checkpoints folder or a step folder; only read). A step folder sets
      ``config.run.checkpoint_step`` (in ``config`` itself).
  """

  def __init__(
    self,
    config,
    workdir: str,
    *,
    overwrite: bool = False,
    force_test: bool | None = None,
    show_progress: bool = True,
    echo: Callable[[str], None] = print,
    checkpoint: str | None = None,
  ):
    self.config = config
    self.workdir = os.path.abspath(workdir)
    self.overwrite = overwrite
    self.force_test = force_test
    self.show_progress = show_progress
    self.echo = echo
    self.decoders = tuple(str(d) for d in config.run.decoders)
    unknown = [d for d in self.decoders if d not in DECODERS]
    if unknown or not self.decoders:
      raise ChainError(f"config.run.decoders must name some of {DECODERS}, got {self.decoders}")
    # Resolved (and checked) now, before any stage writes.
    self.external = None if checkpoint is None else cli.resolve_checkpoint(checkpoint)
    if self.external is not None and self.external.step is not None:
      config_util.set_checkpoint_step(config, self.external.step)

  # -- paths -------------------------------------------------------------------------------------

  @property
  def checkpoint_dir(self) -> str:
    """The checkpoints folder the stages predict with (``--checkpoint``'s, else this work dir's)."""
    if self.external is not None:
      return self.external.folder
    return os.path.join(self.workdir, paths.CHECKPOINT_DIR)

  @property
  def checkpoint(self) -> str:
    """What the stages pass as ``checkpoint``: ``--checkpoint``'s work dir or folder, else this
    work dir."""
    return self.workdir if self.external is None else self.external.path

  @property
  def train_workdir(self) -> str:
    """The work dir that trained the model (its curves); another one's only for reading."""
    return self.workdir if self.external is None else self.external.workdir

  @property
  def cache_root(self) -> str:
    return os.path.join(self.workdir, "predictions")

  @property
  def results_dir(self) -> str:
    return os.path.join(self.workdir, "results")

  @property
  def erl_cache_dir(self) -> str:
    """Parsed skeletons, shared with the tuner (never written beside the user's data)."""
    from jaxseg.io.skeleton import workdir_cache_dir

    return workdir_cache_dir(self.workdir)

  def results_output(self, name: str, paths: Sequence[str]) -> outputs.StageOutput:
    """An entry of ``results/``: made from the work dir's other outputs, so always replaced."""
    return outputs.StageOutput(
      self.results_dir, name=name, stage="report", fingerprint={}, paths=paths, what="results"
    )

  def test_dir(self, decoder: str, name: str) -> str:
    return os.path.join(self.workdir, "test", decoder, name)

  def tuned_test_dir(self, decoder: str, name: str) -> str:
    return os.path.join(self.workdir, "tune", decoder, "test", name)

  def baseline_path(self, name: str) -> str:
    return os.path.join(self.workdir, "test", "baselines", f"{name}.json")

  # -- running -----------------------------------------------------------------------------------

  def run(self, mode: str = "all") -> list[StageResult]:
    """Runs the stages of ``mode`` (:data:`MODES`); returns what each did."""
    if mode not in MODES:
      raise ChainError(f"unknown mode {mode!r}; expected one of {sorted(MODES)}")
    if mode == "train" and self.external is not None:
      raise ChainError(
        "--mode=train trains into --workdir, and --checkpoint names a model trained elsewhere "
        "to use instead; drop one of them"
      )
    if "mws" in self.decoders and {"test", "tune", "tune-test"} & set(MODES[mode]):
      from jaxseg.decoding import mws

      # Before hours of training and predicting.
      mws.check_predicted_channels(self.config, f"config.run.decoders={self.decoders}")

    out = []
    for stage in MODES[mode]:
      out.append(self.run_stage(stage))
    return out

  @outputs.writes_outputs
  def run_stage(self, stage: str) -> StageResult:
    """Runs one stage, prints its line and records it in ``results/stages.json``."""
    method = {
      "data": self.stage_data,
      "train": self.stage_train,
      "test": self.stage_test,
      "tune": self.stage_tune,
      "tune-test": self.stage_tune_test,
      "report": self.stage_report,
    }[stage]
    # Before the stage writes: the work dir is new, empty or one jaxseg made, and apart from
    # the data.
    root = self.config.data.get("root")
    outputs.check_outside_inputs(self.workdir, [root] if root else [], what="work dir")
    outputs.prepare_folder(self.workdir, what="work dir")
    start = time.perf_counter()
    status, detail = method()
    result = StageResult(stage, status, time.perf_counter() - start, detail)
    self._record(result)
    self.echo(f"[{stage}] {status}: {detail} ({_fmt_seconds(result.seconds)})")
    return result

  def _record(self, result: StageResult) -> None:
    """Keeps the latest call of each stage, and the time of the call that last did its work."""
    path = os.path.join(self.results_dir, STAGES_NAME)
    stages = _read_if_any(path) or {}
    previous = stages.get(result.stage, {})
    if result.status == "ran":
      result.computed_seconds = result.seconds
    else:
      result.computed_seconds = previous.get("computed_seconds")
    stages[result.stage] = {
      **dataclasses.asdict(result),
      "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
      "jax_imported": "jax" in sys.modules,
    }
    entry = self.results_output("stages", (STAGES_NAME,))
    if entry.open(overwrite=True) is outputs.Decision.REUSE:
      entry.invalidate()
    files.write_json(path, stages)
    entry.finish()

  def recorded_stages(self) -> list[dict]:
    """The ``stages.json`` entries in chain order."""
    stages = _read_if_any(os.path.join(self.results_dir, STAGES_NAME)) or {}
    return [stages[s] for s in STAGES if s in stages]

  # -- stages ------------------------------------------------------------------------------------

  def stage_data(self) -> tuple[str, str]:
    """Generates the dataset when the config describes generated data (``data.synth``)."""
    data = self.config.data
    root = str(data.get("root", ""))
    if "synth" not in data:
      if root and not os.path.exists(root):
        raise ChainError(f"data.root={root!r} does not exist (and the config generates no data)")
      return "skipped", f"data at {root} (not generated)"
    from jaxseg.synthesis import generate_dataset

    summary = generate_dataset(
      data.synth,
      root,
      show_progress=self.show_progress,
      run_config=self.config,
      flag="python -m jaxseg.synth --overwrite",
    )
    generated = sum(s["generated"] for s in summary.values())
    cubes = sum(s["cubes"] for s in summary.values())
    if generated:
      return "ran", f"generated {generated} of {cubes} cubes into {root}"
    return "reused", f"{cubes} cubes in {root}"

  def stage_train(self) -> tuple[str, str]:
    """Trains to ``train.num_steps`` (resuming), unless a checkpoint of that step exists."""
    if self.external is not None:
      # Not even the training manifest: the checkpoint may be another work dir's, only read.
      step = "" if self.external.step is None else f" (step {self.external.step})"
      return "skipped", f"not trained here: using the checkpoint {self.checkpoint_dir}{step}"
    target = int(self.config.train.num_steps)
    # Refuses checkpoints that another training config made (or, with --overwrite, removes them).
    paths.training_output(self.config, self.workdir).open(overwrite=self.overwrite)
    steps = paths.completed_steps(self.checkpoint_dir)
    if steps and steps[-1] >= target:
      return "reused", f"checkpoint step {steps[-1]} in {self.checkpoint_dir}"
    # Imported here: JAX only when there is training to do.
    from jaxseg.training.train_lib import train_and_evaluate

    result = train_and_evaluate(self.config, self.workdir)
    val = result.get("val_loss")
    start = result.get("resumed_from") or 0
    return "ran", (
      f"trained steps {start}..{result['step']}, train loss {result['train_loss']:.4g}"
      + ("" if val is None else f", val loss {val:.4g}")
    )

  def stage_test(self) -> tuple[str, str]:
    """Test volumes: cached affinities -> each decoder with the config's settings -> metrics."""
    from jaxseg.decoding import scoring
    from jaxseg.inference import cache

    cached = cache.cached_predictions(
      self.config,
      self.checkpoint,
      "test",
      self.cache_root,
      show_progress=self.show_progress,
      skeleton_dir=workdir_skeleton_dir(self.workdir),
    )
    did = []
    if not all(c.reused for c in cached):
      did.append(f"predicted {sum(not c.reused for c in cached)} volume(s)")
    decoded = 0
    for decoder in self.decoders:
      config = scoring.decoder_config(self.config, decoder)
      for c in cached:
        result = scoring.decode_and_evaluate(
          config,
          c,
          self.test_dir(decoder, c.name),
          overwrite=self.overwrite,
          show_progress=self.show_progress,
          erl_cache_dir=self.erl_cache_dir,
        )
        decoded += int(not result.get("reused", False))
    if decoded:
      did.append(f"decoded + scored {decoded} segmentation set(s)")
    if self.config.run.baselines:
      # Unlabeled test volumes (public SNEMI3D / CREMI test data) are decoded, not scored.
      labeled = [c for c in cached if c.volume.labels is not None or c.volume.skeleton]
      scored = sum(self._baselines(c.volume) for c in labeled)
      if scored:
        did.append(f"scored baselines of {scored} volume(s)")
    names = ", ".join(c.name for c in cached)
    what = f"{names} x {'/'.join(self.decoders)}"
    return ("ran", f"{'; '.join(did)} ({what})") if did else ("reused", what)

  def _baselines(self, volume) -> bool:
    """Scores the trivial baselines of one test volume unless an identical score exists."""
    from jaxseg.decoding import scoring
    from jaxseg.workflow import baselines, boundary_baseline

    path = self.baseline_path(volume.name)
    fingerprint = {
      "image": os.path.abspath(str(volume.image.path)),
      "shape": list(volume.image.shape),
      "labels": None if volume.labels is None else os.path.abspath(str(volume.labels.path)),
      "skeleton": volume.skeleton,
      "resolution": list(volume.image.resolution),
      "eval": scoring.eval_settings(self.config),
      "baselines": list(baselines.BASELINES),
    }
    inputs = {
      "image": outputs.input_identity(volume.image.path),
      "labels": None if volume.labels is None else outputs.input_identity(volume.labels.path),
      "skeleton": outputs.input_identity(volume.skeleton) if volume.skeleton else None,
    }
    boundary_val = self._boundary_val() if volume.boundaries is not None else []
    if boundary_val:
      # Another tool's boundary map, tuned on the validation maps like the learned affinities.
      fingerprint["boundaries"] = {
        "test": os.path.abspath(str(volume.boundaries.path)),
        "val": [[v.name, os.path.abspath(str(v.boundaries.path))] for v in boundary_val],
        "decoders": [d for d in self.decoders if d in boundary_baseline.DECODERS],
        "decode": self.config.decode.to_dict(),
        "tune": {d: self.config.tune[d].to_dict() for d in boundary_baseline.DECODERS},
      }
      inputs["boundaries"] = [
        outputs.input_identity(v.boundaries.path) for v in [volume, *boundary_val]
      ]
    entry = outputs.StageOutput(
      os.path.dirname(path),
      name=f"baselines:{volume.name}",
      stage="baseline scores",
      fingerprint={**fingerprint, "inputs": inputs},
      paths=(os.path.basename(path),),
      what="baselines folder",
    )
    # Scores derived from the inputs alone: other settings or inputs replace them.
    if entry.open(overwrite=True) is outputs.Decision.REUSE:
      return False
    scores = baselines.score_baselines(volume, self.config, erl_cache_dir=self.erl_cache_dir)
    if boundary_val:
      scores.update(
        boundary_baseline.score_boundary_map(
          volume, boundary_val, self.config, self.decoders, erl_cache_dir=self.erl_cache_dir
        )
      )
    files.write_json(
      path,
      files.json_ready({"volume": volume.name, "fingerprint": fingerprint, "baselines": scores}),
    )
    entry.finish()
    return True

  def _boundary_val(self) -> list:
    """The tuning split's labelled volumes with a boundary map (windowed), or [] when any of
    them lacks one (a reference tuned on part of the split would not be tuned like the model)."""
    from jaxseg.io.datasets import dataset_volumes

    volumes = [v.windowed() for v in dataset_volumes(self.config.data, str(self.config.tune.split))]
    if not volumes or any(v.boundaries is None or v.labels is None for v in volumes):
      logging.warning(
        "test volumes have boundary maps but the %s volumes do not all have one (and labels): "
        "the boundary-map reference is not scored",
        self.config.tune.split,
      )
      return []
    return volumes

  def stage_tune(self) -> tuple[str, str]:
    """Tunes each decoder on ``tune.split`` (resuming studies; finished ones are kept)."""
    from jaxseg.tuning import tune_lib

    parts, ran = [], False
    for decoder in self.decoders:
      result = tune_lib.tune(
        self.config,
        self.workdir,
        checkpoint=self.checkpoint,
        decoder=decoder,
        force_test=self.force_test,
        show_progress=self.show_progress,
        overwrite=self.overwrite,
      )
      ran |= not result.get("skipped", False)
      parts.append(
        f"{decoder}: {result.get('objective')} {_num(result.get('best_value'))} "
        f"({result.get('n_complete')} trials) {_params(result.get('best_params'))}"
      )
    return ("ran" if ran else "reused"), "; ".join(parts)

  def stage_tune_test(self) -> tuple[str, str]:
    """Applies each decoder's tuned parameters to the test volumes."""
    from jaxseg.tuning import tune_lib

    parts, ran = [], False
    for decoder in self.decoders:
      results = tune_lib.tune_test(
        self.config,
        self.workdir,
        checkpoint=self.checkpoint,
        decoder=decoder,
        show_progress=self.show_progress,
      )
      ran |= not all(r.get("reused", False) for r in results)
      parts.append(f"{decoder} on {', '.join(str(r.get('volume')) for r in results)}")
    return ("ran" if ran else "reused"), "; ".join(parts)

  def stage_report(self) -> tuple[str, str]:
    """Writes ``results/``: config, metrics.json, report.md, previews, neuroglancer.json."""
    paths = write_results(self)
    return "ran", f"{paths['report']}"


# -- the report stage ----------------------------------------------------------------------------


def _num(value) -> str:
  return "n/a" if value is None else f"{value:.4g}"


def _params(params: dict | None) -> str:
  if not params:
    return ""
  return "(" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")"


def _decode_dirs(root: str, volumes=None) -> dict[str, str]:
  """``{volume: folder}`` of the finished, scored decodes under ``root``: both the decode and
  its scores are complete in the folder's manifest (a killed or redone run's leftovers are not).

  ``volumes``: keep only these volume names (default: all).
  """
  if not os.path.isdir(root):
    return {}
  out = {}
  for name in sorted(os.listdir(root)):
    if volumes is not None and name not in volumes:
      continue
    folder = os.path.join(root, name)
    if outputs.is_complete(folder, "decode") and outputs.is_complete(folder, "scores"):
      out[name] = folder
  return out


def _metrics_of(dirs: dict[str, str]) -> dict[str, dict]:
  return {name: _read_if_any(os.path.join(folder, "metrics.json")) for name, folder in dirs.items()}


def _segmentation_of(metrics: dict) -> str | None:
  """The segmentation a preview shows: the best by the tuning objective, else the middle one."""
  entries = metrics.get("results", [])
  best = metrics.get("best")
  if isinstance(best, int) and 0 <= best < len(entries) and entries[best].get("segmentation"):
    return entries[best]["segmentation"]
  entries = [e for e in entries if e.get("segmentation")]
  return entries[len(entries) // 2]["segmentation"] if entries else None


def _affinities_of(folder: str, metrics: dict) -> str | None:
  """The affinities a decode read (its ``metrics.json``, else its ``decode.json``)."""
  if metrics.get("affinities"):
    return metrics["affinities"]
  summary = _read_if_any(os.path.join(folder, "decode.json")) or {}
  return summary.get("affinities")


def _copy_image(src: str, dst: str) -> bool:
  if not os.path.exists(src):
    return False
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  with files.atomic_output(dst) as tmp:
    shutil.copyfile(src, tmp)
  return True


def _fresh(target: str, sources: Sequence[str]) -> bool:
  """``target`` exists and is newer than every existing source (a preview to keep)."""
  if not os.path.exists(target):
    return False
  mtime = os.path.getmtime(target)
  return all(os.path.getmtime(s) <= mtime for s in sources if os.path.exists(s))


def collect_results(chain: Chain) -> dict:
  """Everything the report shows, read from the work dir (no stage is rerun).

  Only the config's current test volumes are shown: folders of an earlier test split stay on
  disk but out of the report.
  """
  from jaxseg.io.datasets import dataset_volumes
  from jaxseg.tuning import tune_lib

  current = {v.name for v in dataset_volumes(chain.config.data, "test")}

  results: dict[str, Any] = {
    "name": str(chain.config.get("name", "")),
    "workdir": chain.workdir,
    "decoders": list(chain.decoders),
    "test": {},
    "tuned": {},
    "baselines": {},
  }
  for decoder in chain.decoders:
    dirs = _decode_dirs(os.path.join(chain.workdir, "test", decoder), current)
    if dirs:
      results["test"][decoder] = _metrics_of(dirs)
    best = tune_lib.load_best_params(chain.workdir, decoder)
    tuned_dirs = _decode_dirs(os.path.join(chain.workdir, "tune", decoder, "test"), current)
    if best or tuned_dirs:
      results["tuned"][decoder] = {
        "best": best,
        "volumes": _metrics_of(tuned_dirs),
      }
  base_dir = os.path.join(chain.workdir, "test", "baselines")
  if os.path.isdir(base_dir):
    for name in sorted(os.listdir(base_dir)):
      scores = name.endswith(".json") and not name.startswith(".")  # not the manifest
      saved = _read_if_any(os.path.join(base_dir, name)) if scores else None
      if saved and saved["volume"] in current:
        results["baselines"][saved["volume"]] = saved["baselines"]
  return results


def write_results(chain: Chain) -> dict[str, str]:
  """The report stage: ``results/`` from what the work dir holds."""
  from jaxseg.decoding.decode_lib import open_affinities
  from jaxseg.decoding.settings import decode_settings
  from jaxseg.io import open_volume
  from jaxseg.io.datasets import dataset_volumes
  from jaxseg.workflow import report, viewer

  config = chain.config
  out = chain.results_dir
  previews = os.path.join(out, "previews")
  entry = chain.results_output(
    "report",
    (
      config_util.RESOLVED_CONFIG_NAME,
      "previews",
      "viewer",
      viewer.LAYOUT_NAME,
      report.METRICS_NAME,
      report.REPORT_NAME,
    ),
  )
  entry.open(overwrite=True)
  os.makedirs(previews, exist_ok=True)
  config_util.save_config(config, out)
  results = collect_results(chain)
  volumes = {v.name: v.windowed() for v in dataset_volumes(config.data, "test")}
  settings = decode_settings(config.decode)
  sections = int(config.run.preview_slices)
  images: dict[str, str] = {}
  viewer_layers: dict[str, list] = {}
  for section, label in (("test", ""), ("tuned", "_tuned")):
    for decoder in chain.decoders:
      if section == "test":
        root = os.path.join(chain.workdir, "test", decoder)
      else:
        root = os.path.join(chain.workdir, "tune", decoder, "test")
      for name, folder in _decode_dirs(root, volumes).items():
        metrics = _read_if_any(os.path.join(folder, "metrics.json")) or {}
        seg_path, aff_path = _segmentation_of(metrics), _affinities_of(folder, metrics)
        volume = volumes.get(name)
        if seg_path is None or volume is None or not os.path.exists(seg_path):
          continue
        png = os.path.join(previews, f"{name}_{decoder}{label}.png")
        if not _fresh(png, [os.path.join(folder, "metrics.json")]):
          source = open_affinities(aff_path, settings) if aff_path else None
          report.write_preview(
            png,
            volume.image,
            open_volume(seg_path),
            affinity_source=source,
            labels=volume.labels,
            sections=sections,
          )
        title = f"{name}: {decoder} ({'tuned' if label else 'config'})"
        images[title] = os.path.relpath(png, out)
        viewer_layers.setdefault(name, []).append((f"{decoder} {section}", seg_path, aff_path))
  # (title, source PNG, name in previews/): plots other stages wrote, copied beside the report.
  extras = [("training curves", os.path.join(chain.train_workdir, "training_curves.png"), "")]
  for decoder in chain.decoders:
    plot = os.path.join(chain.workdir, "tune", decoder, "objective.png")
    extras.append((f"tuning {decoder}", plot, f"tune_{decoder}.png"))
  qc = {}
  for name, layers in viewer_layers.items():
    aff = next((a for _, _, a in layers if a), None)
    if aff is None:
      continue
    qc_dir = os.path.join(os.path.dirname(os.path.dirname(aff)), f"{name}_qc")
    info = _qc_summary(qc_dir)
    if info:
      qc[name] = info
      if info.get("plot"):
        extras.append((f"QC {name}", info["plot"], f"{name}_qc.png"))
  for title, src, name in extras:
    dst = os.path.join(previews, name or os.path.basename(src))
    if (_fresh(dst, [src]) or _copy_image(src, dst)) and os.path.exists(dst):
      images[title] = os.path.relpath(dst, out)
  results["images"] = images
  results["qc"] = qc
  layout = _write_viewer(chain, volumes, viewer_layers)
  if layout:
    results["viewer"] = layout
  results["stages"] = chain.recorded_stages()
  written = report.write_report(out, results)
  entry.finish()
  return written


def _qc_summary(qc_dir: str) -> dict | None:
  """``low_z`` / ``high_z`` / plot of a QC report folder, when QC ran."""
  md = os.path.join(qc_dir, "report.md")
  if not os.path.exists(md):
    return None
  from jaxseg.quality import read_report

  front = read_report(md)
  plot = os.path.join(qc_dir, "means.png")
  return {
    "low_z": front.get("low_z"),
    "high_z": front.get("high_z"),
    "report": md,
    "plot": plot if os.path.exists(plot) else None,
  }


def viewer_roots(chain: Chain) -> dict[str, str]:
  """The folders the viewer's HTTP server serves: the work dir and the data root."""
  roots = {"workdir": chain.workdir}
  root = str(chain.config.data.get("root", ""))
  if root and os.path.isdir(root):
    roots["data"] = os.path.abspath(root)
  return roots


def _write_viewer(chain: Chain, volumes: dict, layers_by_volume: dict) -> dict | None:
  """``results/neuroglancer.json`` for the first test volume with a segmentation."""
  from jaxseg.decoding.decode_lib import open_affinities
  from jaxseg.decoding.settings import decode_settings
  from jaxseg.workflow import viewer

  if not layers_by_volume:
    return None
  name = sorted(layers_by_volume)[0]
  volume, entries = volumes[name], layers_by_volume[name]
  layers = [viewer.Layer("image", "image", _array_path(volume.image.path))]
  aff = next((a for _, _, a in entries if a), None)
  if aff:
    display = os.path.join(chain.results_dir, "viewer", f"{name}_affinities.zarr")
    viewer.affinity_display(open_affinities(aff, decode_settings(chain.config.decode)), display)
    layers.append(viewer.Layer("affinities", "image", display, visible=False, rgb=True))
  if volume.labels is not None:
    layers.append(
      viewer.Layer("ground truth", "segmentation", _array_path(volume.labels.path), visible=False)
    )
  for i, (title, seg, _) in enumerate(entries):
    layers.append(viewer.Layer(title, "segmentation", seg, visible=i == len(entries) - 1))
  roots = viewer_roots(chain)
  resolution = tuple(float(r) for r in chain.config.data.resolution)
  state, skipped = viewer.neuroglancer_state(layers, roots, resolution, volume.spatial_shape)
  path = viewer.write_layout(os.path.join(chain.results_dir, viewer.LAYOUT_NAME), state)
  return {
    "layout": os.path.relpath(path, chain.results_dir),
    "base": viewer.base_url(),
    "roots": roots,
    "volume": name,
    "skipped": skipped,
  }


def _array_path(path: str) -> str:
  """A volume's folder without a ``[z a:b]`` window suffix."""
  return str(path).split("[z ", 1)[0]


def view(chain: Chain, *, port: int = 8000) -> str:
  """``--view``: serves the work dir and the data root and opens the layout in Neuroglancer."""
  from jaxseg.workflow import viewer

  layout = os.path.join(chain.results_dir, viewer.LAYOUT_NAME)
  if not os.path.exists(layout):
    raise ChainError(f"{layout} does not exist; run the chain (e.g. --mode=test) first")
  with open(layout) as f:
    state = json.load(f)
  roots = viewer_roots(chain)
  default = viewer.base_url()

  def state_for_base(base: str) -> dict:
    return json.loads(json.dumps(state).replace(default, base))

  return viewer.serve(state_for_base, roots, port=port)


def run_chain(
  config,
  workdir: str,
  *,
  mode: str = "all",
  overwrite: bool = False,
  force_test: bool | None = None,
  show_progress: bool = True,
  echo: Callable[[str], None] = print,
  checkpoint: str | None = None,
) -> dict:
  """Runs the stages of ``mode`` in ``workdir`` (see the module docstring).

  Args:
    config: the resolved config (``configs/demo.py`` and friends).
    workdir: the run folder.
    mode: ``all``, ``train``, ``test``, ``tune``, ``tune-test`` or ``report``.
    overwrite: let decodes and studies replace outputs made with other settings.
    force_test: allow tuning on the test split (default ``config.tune.force_test``).
    show_progress: progress bars inside the stages.
    echo: receives one line per stage.
    checkpoint: a trained model to use instead of training (see :class:`Chain`).

  Returns:
    ``{"stages": [StageResult], "report": path or None, "metrics": path or None,
    "results_dir": path}``.

  Raises:
    ChainError: bad settings or work-dir state (one clear line); the libraries' own errors
      (``VolumeError``, ``FileNotFoundError``, ...) pass through.
  """
  chain = Chain(
    config,
    workdir,
    overwrite=overwrite,
    force_test=force_test,
    show_progress=show_progress,
    echo=echo,
    checkpoint=checkpoint,
  )
  stages = chain.run(mode)
  report_path = os.path.join(chain.results_dir, "report.md")
  metrics_path = os.path.join(chain.results_dir, "metrics.json")
  return {
    "stages": stages,
    "report": report_path if os.path.exists(report_path) else None,
    "metrics": metrics_path if os.path.exists(metrics_path) else None,
    "results_dir": chain.results_dir,
  }
