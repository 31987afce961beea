"""Package exports loaded on first use (PEP 562), so a light submodule imports light.

A recipe imports ``jaxseg.synthesis.config`` or ``jaxseg.quality.settings`` for its defaults; if
the package ``__init__`` imported everything it re-exports, every config load (and so every
command's first line of output, errors included) would wait for the volume I/O stack.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], object]:
  """A module ``__getattr__`` that imports ``package.<exports[name]>`` when ``name`` is first used.

  Args:
    package: the package's ``__name__``.
    exports: public name -> the submodule (relative to ``package``) that defines it.
  """

  def __getattr__(name: str):
    if name not in exports:
      raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

  return __getattr__
