"""Process setup shared by the entry points: log filtering, multi-host init, malloc arenas.

Importing this module does not import JAX; :func:`initialize_distributed` does, after the flags
are parsed, so ``--help`` stays fast and JAX sees the final environment.
"""

from __future__ import annotations

import ctypes
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


_M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas(count: int = 2) -> bool:
  """Caps glibc's malloc arenas for this process (like ``MALLOC_ARENA_MAX``).

  Block loops that free and reallocate large buffers from several threads (numba kernels on
  thread pools, tensorstore's I/O threads) otherwise spread them over one arena per thread, and
  the freed pages stay mapped: blockwise decoding of 8 blocks peaked 1.42x one block's memory,
  1.13x with 2 arenas (``benchmarks/decode.py``, memory). Returns whether the cap was applied
  (False off glibc).
  """
  try:
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(_M_ARENA_MAX, int(count)))
  except (OSError, AttributeError):
    return False


def release_free_memory() -> bool:
  """Returns freed heap pages of every malloc arena to the system (glibc ``malloc_trim``).

  Cheap next to a block of work; keeps a block loop's resident memory at one block's worth even
  in arenas made before :func:`limit_malloc_arenas`. Returns False off glibc.
  """
  try:
    return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
  except (OSError, AttributeError):
    return False
