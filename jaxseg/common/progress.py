"""Progress reporting for long work: a bar on a terminal, periodic lines with rate and ETA in logs.

Usage::

    for block in progress(blocks, desc="predict", unit="block"):
      ...
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(
  iterable: Iterable[T],
  *,
  total: int | None = None,
  desc: str = "",
  unit: str = "it",
  disable: bool = False,
) -> Iterator[T]:
  """Wraps ``iterable`` with a progress bar (rate and ETA) on stderr.

  When stderr is not a terminal (CI, batch jobs) it prints a line at most every 10 s instead of
  redrawing, so logs stay readable.
  """
  interactive = sys.stderr.isatty()
  return iter(
    tqdm(
      iterable,
      total=total,
      desc=desc,
      unit=unit,
      disable=disable,
      file=sys.stderr,
      mininterval=0.5 if interactive else 10.0,
      dynamic_ncols=interactive,
      ascii=not interactive,
    )
  )
