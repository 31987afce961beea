"""What the tests that run jaxseg's command lines assert about a user's mistake: one line."""

from __future__ import annotations

import subprocess


def one_line(
  proc: subprocess.CompletedProcess,
  program: str,
  *parts: str,
  status: int | None = None,
  alone: bool = False,
) -> str:
  """Asserts that ``proc`` failed as a user's mistake should and returns the line.

  Exit status ``status`` (any non-zero when None), no traceback, and exactly one
  ``<program>: ...`` line on stderr that names every one of ``parts``; with ``alone``, that line
  is all of stderr.
  """
  if status is None:
    assert proc.returncode != 0, proc.stdout[-2000:]
  else:
    assert proc.returncode == status, (proc.stdout[-2000:], proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  prefix = f"{program}: "
  if alone:
    lines = proc.stderr.strip().splitlines()
  else:
    lines = [line for line in proc.stderr.splitlines() if line.startswith(prefix)]
  assert len(lines) == 1 and lines[0].startswith(prefix), proc.stderr[-3000:]
  for part in parts:
    assert part in lines[0], (part, lines[0])
  return lines[0]
