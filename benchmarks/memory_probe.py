"""Host memory of the running process, for the benchmarks' child processes (Linux ``/proc``).

Owns :func:`status_mb` (``VmRSS``, ``VmHWM``, ... in MB), :func:`reset_peak` (restart the
high-water mark, so a peak measures one phase) and :class:`RssSampler` (RSS over time on a thread,
to show whether memory keeps climbing as blocks are processed). Loaded by path with
``load_sibling(__file__, "memory_probe")``: ``benchmarks/`` is not a package.
"""

from __future__ import annotations

import threading
import time


def status_mb(key: str = "VmRSS") -> float:
  """A ``/proc/self/status`` size field (``VmRSS``, ``VmHWM``) in MB."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1]) / 1024  # kB
  raise KeyError(key)


def reset_peak() -> bool:
  """Resets the RSS high-water mark (Linux >= 4.0); False where not allowed."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


class RssSampler:
  """Samples this process's RSS every ``interval`` seconds on a thread (the course over time)."""

  def __init__(self, interval: float = 0.05):
    self.interval = interval
    self.samples: list[tuple[float, float]] = []
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self) -> None:
    t0 = time.perf_counter()
    while not self._stop.is_set():
      self.samples.append((time.perf_counter() - t0, status_mb("VmRSS")))
      self._stop.wait(self.interval)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()

  def quarters(self) -> list[float]:
    """The highest sampled RSS (MB) in each quarter of the sampled time."""
    if not self.samples:
      return []
    end = self.samples[-1][0] or 1.0
    out = [0.0] * 4
    for t, rss in self.samples:
      q = min(3, int(4 * t / end))
      out[q] = max(out[q], rss)
    return out
