"""What machine a benchmark ran on: the host part every ``benchmarks/*.py`` records.

Owns :func:`host_info` (date, CPUs, memory, load, Python) and :func:`package_version`. Each
benchmark adds its own libraries (numba threads, JAX backend, ...). Loaded by path with
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
