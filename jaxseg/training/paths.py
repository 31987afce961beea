"""Where a training run keeps its files, read without JAX or orbax.

Owns :data:`CHECKPOINT_DIR`, :func:`checkpoint_dir` (a workdir or a checkpoint folder -> the
checkpoint folder), :func:`completed_steps` (the finished step folders in it) and
:func:`training_output` (the training run's entry in the workdir's jaxseg manifest, with the
config sections that make a checkpoint this config's model). The checkpoint manager
(``jaxseg.training.checkpoint``), the training loop, the affinity cache and the chain all go
through these, so the chain can tell a finished training from a folder listing alone.
"""

from __future__ import annotations

import json
import os

from jaxseg.common import config_util
from jaxseg.common.outputs import StageOutput

CHECKPOINT_DIR = "checkpoints"
# What the training loop logs beside the checkpoints (jaxseg.training.summary writes them).
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PREVIEW_DIR = "previews"
CURVES_FILE = "training_curves.png"
# The config sections that shape the trained model; keys below them that do not (where the data
# lives, logging and checkpoint cadence, test-only seeds) are left out of the fingerprint.
TRAINING_SECTIONS = ("data", "target", "model", "optim", "train")
NOT_TRAINING_KEYS = (
  "data.root", "data.test_", "data.volumes.test", "data.synth.test_seeds", "data.synth.preview", "data.prefetch",
  "data.in_memory", "train.log_every", "train.checkpoint_every", "train.keep_every",
  "train.keep_top_k", "train.distributed",
)  # fmt: skip


def checkpoint_dir(path: str | os.PathLike) -> str:
  """The absolute checkpoint folder for ``path``: a workdir (``path/checkpoints``) or the folder."""
  path = os.path.abspath(os.fspath(path))
  sub = os.path.join(path, CHECKPOINT_DIR)
  if os.path.isdir(sub):
    return sub
  # A checkpoint folder holds numbered step folders; anything else is taken as a workdir.
  if os.path.isdir(path) and any(name.isdigit() for name in os.listdir(path)):
    return path
  return sub


def completed_steps(folder: str | os.PathLike) -> list[int]:
  """Step numbers of the finished checkpoints in a checkpoint ``folder``, ascending.

  Orbax writes a step into a temporary folder and renames it to the bare step number when it is
  complete, so a folder named by an integer is a whole checkpoint.
  """
  if not os.path.isdir(folder):
    return []
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


# Switches added to the recipes after runs were trained without them, with the keys that only
# matter when the switch is on. While a switch is off (0), it and its keys leave the fingerprint,
# so a work dir trained before they existed still resumes and is reused.
INERT_WHEN_OFF = {
  "data.aug.contrast_gamma_p": ("data.aug.contrast_range", "data.aug.gamma_range"),
  "data.aug.warp_p": ("data.aug.warp_spacing", "data.aug.warp_sigma"),
  # The whole section: while the descriptors are off, the fingerprint has no target.lsd at all.
  "target.lsd.enabled": ("target.lsd",),
}


def training_fingerprint(config) -> dict:
  """The training sections of ``config`` as a JSON-ready dict, without :data:`NOT_TRAINING_KEYS`
  and without the switches of :data:`INERT_WHEN_OFF` that are off."""
  full = json.loads(json.dumps(config_util.config_to_dict(config)))
  kept = {section: full.get(section) for section in TRAINING_SECTIONS}
  inert = set()
  for switch, dependents in INERT_WHEN_OFF.items():
    node = full
    for part in switch.split("."):
      node = node.get(part) if isinstance(node, dict) else None
    if not node:  # absent, None or 0: the step does not run
      inert.update((switch, *dependents))

  def prune(node, prefix):
    if prefix.startswith("data.volumes.") and isinstance(node, list):
      # Another tool's boundary map is only scored beside the model, never trained on.
      return [
        {k: v for k, v in e.items() if k != "boundaries"} if isinstance(e, dict) else e
        for e in node
      ]
    if not isinstance(node, dict):
      return node
    out = {}
    for key, value in node.items():
      name = f"{prefix}.{key}"
      if not name.startswith(NOT_TRAINING_KEYS) and name not in inert:
        out[key] = prune(value, name)
    return out

  return {section: prune(value, section) for section, value in kept.items()}


def training_output(config, workdir: str, *, flag: str = "--overwrite") -> StageOutput:
  """The training run's entry in ``workdir``'s manifest.

  A workdir trains one model: resuming or reusing it under other training settings is refused
  (listing the differences) unless ``flag``, which deletes only the run's own files (resolved
  config, checkpoints, logs, previews, curves) and starts again.
  """
  return StageOutput(
    os.path.abspath(workdir),
    name="train",
    stage="training run",
    fingerprint=training_fingerprint(config),
    paths=(
      config_util.RESOLVED_CONFIG_NAME,
      CHECKPOINT_DIR,
      TENSORBOARD_DIR,
      METRICS_FILE,
      PREVIEW_DIR,
      CURVES_FILE,
    ),
    # A work dir inside the data (or holding it) would write into the user's dataset.
    inputs=[config.data.root] if config.data.get("root") else [],
    what="work dir",
    flag=flag,
  )
