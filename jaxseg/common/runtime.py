"""Process setup shared by the JAX entry points (train, predict): log filtering, multi-host init.

Importing this module does not import JAX; :func:`initialize_distributed` does, after the flags
are parsed, so ``--help`` stays fast and JAX sees the final environment.
"""

from __future__ import annotations

import logging as py_logging
import os

from absl import logging

# Environment variables that name a JAX coordinator: their presence means a multi-process run.
_COORDINATOR_ENV = ("JAX_COORDINATOR_ADDRESS",)


class QuietLibraries(py_logging.Filter):
  """Drops library INFO chatter; warnings still pass.

  orbax logs dozens of lines per checkpoint, matplotlib its font cache, and JAX's backend probe
  says it found no TPU on every start.
  """

  _NOISY = ("/orbax/", "/matplotlib/", "/jax/_src/xla_bridge.py")

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      return True
    return not any(part in record.pathname for part in self._NOISY)


def quiet_libraries() -> None:
  """Installs :class:`QuietLibraries` on absl's log handler."""
  logging.get_absl_handler().addFilter(QuietLibraries())


def wants_distributed(config, environ=os.environ) -> bool:
  """True when ``config.train.distributed`` or the environment asks for multi-host JAX."""
  if bool(config.train.get("distributed", False)):
    return True
  return any(environ.get(name) for name in _COORDINATOR_ENV)


def initialize_distributed(config) -> None:
  """Runs ``jax.distributed.initialize()`` when :func:`wants_distributed` says so.

  ``train.distributed`` also lets JAX detect a cluster itself (SLURM, Open MPI, Kubernetes /
  Cloud TPU); a ``JAX_COORDINATOR_ADDRESS`` in the environment does the same without it.
  """
  if not wants_distributed(config):
    return
  import jax

  jax.distributed.initialize()
  logging.info(
    "jax.distributed: process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
