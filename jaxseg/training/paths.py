"""Where a training run keeps its checkpoints, read without JAX or orbax.

Owns :data:`CHECKPOINT_DIR`, :func:`checkpoint_dir` (a workdir or a checkpoint folder -> the
checkpoint folder) and :func:`completed_steps` (the finished step folders in it). The checkpoint
manager (``jaxseg.training.checkpoint``), the affinity cache and the chain all find checkpoints
through these, so the chain can tell a finished training from a folder listing alone.
"""

from __future__ import annotations

import os

CHECKPOINT_DIR = "checkpoints"


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
