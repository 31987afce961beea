"""What machine a benchmark ran on: the host part every ``benchmarks/*.py`` records.

Owns :func:`host_info` (date, CPUs, memory, load, Python), :func:`numba_info` (numpy and numba
versions, numba threads: the decoding kernels' parallelism) and :func:`package_version`. Each
benchmark adds its own libraries (JAX backend, waterz, ...). Loaded by path with
``load_sibling(__file__, "machine")``: ``benchmarks/`` is not a package.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform


def package_version(package: str) -> str | None:
  """The installed version of a pip package, or None."""
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def host_info() -> dict:
  """Date, CPU count and affinity, memory (GB), load average and Python version."""
  return {
    "date": datetime.date.today().isoformat(),
    "cpu_count": os.cpu_count(),
    "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
    "load_average": [round(v, 2) for v in os.getloadavg()],
    "python": platform.python_version(),
  }


def numba_info() -> dict:
  """numpy and numba versions and numba's thread count."""
  import numba
  import numpy

  return {
    "numpy": numpy.__version__,
    "numba": numba.__version__,
    "numba_threads": numba.get_num_threads(),
  }
