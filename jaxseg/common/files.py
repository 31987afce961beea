"""Atomic file outputs: a reader (or a resumed run) never sees half a file.

Every small output jaxseg writes (resolved configs, metrics, completion markers, skeleton pickles,
caches, previews) goes through :func:`atomic_output`: write to a temporary file beside the target,
then ``os.replace`` it onto the target, which is atomic on one filesystem. A run killed midway
leaves either the old file or none, never a truncated one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from jaxseg.common.errors import InputError, MissingInputError


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary path to write; on success it replaces ``path``, on error it is removed.

  The temporary name keeps ``path``'s extension (``preview.tmp.<pid>.png``), so writers that pick
  the format from the name (PIL, ``np.savez``) behave as they would for ``path`` itself.
  """
  path = os.fspath(path)
  root, ext = os.path.splitext(path)
  tmp = f"{root}.tmp.{os.getpid()}{ext}"
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str | os.PathLike, data: Any, *, sort_keys: bool = True) -> None:
  """Writes ``data`` as indented JSON (with a final newline) atomically."""
  with atomic_output(path) as tmp, open(tmp, "w") as f:
    json.dump(data, f, indent=2, sort_keys=sort_keys)
    f.write("\n")


def read_json(
  path: str | os.PathLike,
  *,
  missing_ok: bool = False,
  what: str = "file",
  hint: str = "",
  error: type[InputError] = InputError,
) -> Any:
  """The value stored in the JSON file ``path``; a file that is not valid JSON names itself.

  The one JSON reader of jaxseg's own small files (metrics, summaries, volume metadata).

  Args:
    path: the file.
    missing_ok: return None when ``path`` does not exist (else :class:`MissingInputError`).
    what: what the file is, for the message (``"metadata"``; default ``"file"``).
    hint: appended to the message of an unreadable file, e.g. ``"; delete it to redo the job"``.
    error: the :class:`InputError` subclass raised for an unreadable file (``VolumeError``).

  Raises:
    MissingInputError: ``path`` does not exist and not ``missing_ok`` (a ``FileNotFoundError``).
    InputError: (or ``error``) ``path`` cannot be read or is not valid JSON (e.g. half written).
  """
  path = os.fspath(path)
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    if missing_ok:
      return None
    raise MissingInputError(f"{path}: no such file") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise error(f"{path}: corrupt {what}, not valid JSON ({e}){hint}") from None
  except OSError as e:
    raise error(f"{path}: unreadable {what} ({e}){hint}") from e


def json_ready(value: Any) -> Any:
  """A strict-JSON copy: numpy scalars as Python numbers, tuples as lists, NaN / Inf as null."""
  if isinstance(value, Mapping):
    return {str(k): json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_ready(v) for v in value]
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None  # JSON has no NaN / Inf
  return value


def local_abspath(path: str | os.PathLike) -> str:
  """``path`` made absolute when it is local; URLs (``gs://``, ``s3://``) are kept as they are.

  Fingerprints use it, so a saved run does not depend on the working directory it ran in.
  """
  path = os.fspath(path)
  return path if "://" in path else os.path.abspath(path)
