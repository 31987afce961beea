"""Process setup shared by the entry points: log filtering, multi-host init, the persistent
compilation cache, malloc arenas.

Importing this module does not import JAX; :func:`initialize_distributed` and
:func:`enable_compilation_cache` do, after the flags are parsed, so ``--help`` stays fast and JAX
sees the final environment.
"""

from __future__ import annotations

import ctypes
import logging as py_logging
import os
import sys

from absl import logging

# Environment variables that name a JAX coordinator: their presence means a multi-process run.
_COORDINATOR_ENV = ("JAX_COORDINATOR_ADDRESS",)
# jaxseg's cache root (as for the ERL caches, jaxseg.io.skeleton): $JAXSEG_CACHE_DIR, else
# ~/.cache/jaxseg ($XDG_CACHE_HOME/jaxseg when set). XLA executables go in its "jax" folder.
_CACHE_ENV = "JAXSEG_CACHE_DIR"
# "0" (or off / false / no) turns the persistent compilation cache off.
_COMPILATION_CACHE_ENV = "JAXSEG_COMPILATION_CACHE"
# JAX reads these when it is imported (its config options' environment variables).
_JAX_CACHE_DIR_ENV = "JAX_COMPILATION_CACHE_DIR"
_JAX_MIN_COMPILE_TIME_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


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


def compilation_cache_dir(environ=os.environ) -> str:
  """Where :func:`enable_compilation_cache` keeps XLA executables by default:
  ``$JAXSEG_CACHE_DIR/jax``, else ``~/.cache/jaxseg/jax``."""
  root = environ.get(_CACHE_ENV)
  if not root:
    home_cache = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = os.path.join(home_cache, "jaxseg")
  return os.path.join(os.path.abspath(os.path.expanduser(root)), "jax")


def enable_compilation_cache(directory: str | None = None, environ=os.environ) -> str | None:
  """Turns on JAX's persistent compilation cache, so a repeated predict, tuning trial or training
  start loads its compiled steps instead of compiling them again.

  The folder is ``directory``, else the one ``JAX_COMPILATION_CACHE_DIR`` already names, else
  :func:`compilation_cache_dir`. Every compilation is cached, not only those over JAX's default
  second: the prediction engine compiles a dozen small fold steps per volume geometry. Before JAX
  is imported this only sets JAX's environment variables (so an entry point that may not need JAX
  does not load it, and the processes it starts share the cache); after, it updates JAX's config,
  which must happen before the first compilation. ``JAXSEG_COMPILATION_CACHE=0`` turns it off; a
  folder that cannot be made is skipped with a warning (the run compiles as usual).

  Returns:
    The cache folder, or ``None`` when the cache is off.
  """
  if environ.get(_COMPILATION_CACHE_ENV, "1").strip().lower() in ("0", "off", "false", "no"):
    return None
  jax = sys.modules.get("jax")
  current = jax.config.jax_compilation_cache_dir if jax else environ.get(_JAX_CACHE_DIR_ENV)
  directory = directory or current or compilation_cache_dir(environ)
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    logging.warning("no persistent compilation cache: cannot make %s (%s)", directory, e)
    return None
  if jax is None:
    environ[_JAX_CACHE_DIR_ENV] = directory
    environ[_JAX_MIN_COMPILE_TIME_ENV] = "0"
  else:
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return directory


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
