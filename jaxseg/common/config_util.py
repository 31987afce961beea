"""ml_collections configs for the absl entry points.

Every entry point takes ``--config=configs/x.py[:arg]`` plus ``--config.a.b=value`` overrides. The
config is locked, so an override of a key that does not exist is an error instead of a silent
no-op. Each run writes the resolved config beside its outputs (``config.json``), so a result can
always be traced back to the exact parameters that made it.
"""

from __future__ import annotations

import importlib.util
import json
import numbers
import os
from collections.abc import Mapping
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from jaxseg.common import files
from jaxseg.common.errors import ConfigError

RESOLVED_CONFIG_NAME = "config.json"


# Names of the config-file flags defined here (jaxseg.common.cli checks their files and keys).
CONFIG_FLAGS: set[str] = set()


class UnknownConfigKeyError(ConfigError, KeyError):
  """An override names a key or section the config lacks (a ``KeyError`` too, as before)."""

  __str__ = Exception.__str__  # KeyError's would quote the message


def define_config_flag(name: str = "config", required: bool = True, help_text: str | None = None):
  """Defines the ``--config`` file flag (locked: unknown override keys raise)."""
  holder = config_flags.DEFINE_config_file(
    name,
    None,
    help_text or "Path to a config file (configs/*.py), optionally with ':arg'.",
    lock_config=True,
  )
  CONFIG_FLAGS.add(name)
  if required:
    flags.mark_flag_as_required(name)
  return holder


def load_config(path: str, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """Loads ``configs/x.py[:arg]`` from Python (tests, the tuner) and applies dotted overrides.

  Args:
    path: the config file, optionally followed by ``:arg`` passed to ``get_config(arg)``.
    overrides: ``{"optim.lr": 1e-4}``-style overrides.

  Returns:
    The locked, resolved config.

  Raises:
    ConfigError: the file does not exist or its ``get_config()`` returns no ConfigDict.
    UnknownConfigKeyError: an override names a key the config lacks (also a ``KeyError``).
  """
  file_path, _, arg = path.partition(":")
  if not os.path.isfile(file_path):
    raise ConfigError(f"config file {file_path!r} does not exist")
  module = _load_module(file_path)
  config = module.get_config(arg) if arg else module.get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{file_path}: get_config() must return an ml_collections.ConfigDict")
  config.lock()
  for dotted, value in (overrides or {}).items():
    apply_override(config, dotted, value)
  return config


def check_key(config: ml_collections.ConfigDict, dotted: str) -> None:
  """Raises :class:`UnknownConfigKeyError` unless ``dotted`` (``'a.b'``) is a key of ``config``.

  The message names the key, the missing part and the keys there are instead.
  """
  node, done = config, []
  for part in dotted.split("."):
    # ``a.b[0]``-style indexing is ml_collections' to check.
    name = part.split("[", 1)[0]
    if not isinstance(node, ml_collections.ConfigDict):
      raise UnknownConfigKeyError(
        f"unknown config key {dotted!r}: {'.'.join(done)} is a value, not a section"
      )
    if name not in node:
      where = f"section {'.'.join(done)!r}" if done else "the config"
      kind = "key" if len(done) == len(dotted.split(".")) - 1 else "section"
      raise UnknownConfigKeyError(
        f"unknown config key {dotted!r}: {where} has no {kind} {name!r}; it has "
        f"{', '.join(sorted(node.keys()))}"
      )
    if name != part:
      # ``a.b[5]``: an index past the end, or into a tuple or a string (which ml_collections
      # cannot set an item of), fails inside absl's parser with a bare IndexError.
      node, where = node[name], ".".join([*done, name])
      for index in part[len(name) :].strip("[]").split("]["):
        if not isinstance(node, list):
          raise UnknownConfigKeyError(
            f"config key {dotted!r}: {where} is a {type(node).__name__}, not a list; set it "
            f"whole (--config.{where}=...)"
          )
        try:
          node = node[int(index)]
        except (IndexError, ValueError):
          raise UnknownConfigKeyError(
            f"config key {dotted!r}: {where} has {len(node)} items; no index [{index}]"
          ) from None
        where = f"{where}[{index}]"
      return
    node = node[name]
    done.append(name)


def apply_override(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  """Sets ``config[a][b] = value`` for ``dotted == 'a.b'``.

  Raises:
    UnknownConfigKeyError: unknown key or section (also a ``KeyError``).
    ConfigError: the value has the wrong type for the key.
  """
  check_key(config, dotted)
  *parents, leaf = dotted.split(".")
  node = config
  for part in parents:
    node = node[part]
  try:
    node[leaf] = value  # a locked ConfigDict still type-checks the new value
  except TypeError as e:
    raise ConfigError(f"config key {dotted!r}: {e}") from e


def triple(value: Any, key: str, minimum: int = 1, *, scalar: bool = False) -> tuple[int, int, int]:
  """``value`` as three ints ``(z, y, x)``: whole numbers, each ``>= minimum``.

  The one check of every shape-like setting (windows, pads, block shapes, kernel sizes).

  Args:
    value: three whole numbers (``(16, 224, 224)``, ``[8.0, 32, 32]``); with ``scalar``, also one
      integer, used on every axis. ``2.5``, ``'3'`` or two numbers are refused, not rounded.
    key: what ``value`` is, for the message: the dotted config key (``'infer.window'``,
      ``'config.decode.block_shape'``), or a function's argument (``'blend_weights: window'``).
    minimum: the smallest value allowed on each axis (1 for sizes, 0 for pads).
    scalar: accept one integer for all three axes.

  Returns:
    ``(z, y, x)`` as Python ints.

  Raises:
    ConfigError: anything else; the message starts with ``key`` (also a ``ValueError``).
  """
  try:
    values = (value,) * 3 if scalar and isinstance(value, numbers.Integral) else tuple(value)
    out = tuple(int(v) for v in values)
    whole = all(o == v for o, v in zip(out, values, strict=True))  # 2.5 and '3' are not
  except (TypeError, ValueError, OverflowError):  # not a sequence, 'abc', NaN, inf
    out, whole = (), False
  if len(out) != 3 or not whole or min(out) < minimum:
    expected = "one integer or three integers" if scalar else "three integers"
    raise ConfigError(f"{key} must be {expected} >= {minimum} (z, y, x), not {value!r}")
  return out  # type: ignore[return-value]


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  """A JSON-ready plain-dict copy (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def set_checkpoint_step(config: ml_collections.ConfigDict, step: int) -> None:
  """Sets ``config.run.checkpoint_step`` to ``step`` (a ``--checkpoint`` step folder's), in the
  type the config has for it (the recipes say ``"best"``, a string).

  Raises:
    ConfigError: ``config.run.checkpoint_step`` already names another step number (the step
      folder replaces only ``"best"`` / ``"latest"``, never a number the user gave).
  """
  current = config.run.checkpoint_step
  if str(current).strip().isdigit() and int(current) != step:
    raise ConfigError(
      f"config.run.checkpoint_step={current} contradicts the --checkpoint step folder (step "
      f"{step}); drop one of them"
    )
  apply_override(config, "run.checkpoint_step", step if isinstance(current, int) else str(step))


def save_config(
  config: ml_collections.ConfigDict, directory: str, name: str = RESOLVED_CONFIG_NAME
) -> str:
  """Writes the resolved config as JSON into ``directory``; returns the file path."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, name)
  files.write_json(path, config_to_dict(config))
  return path


def _load_module(path: str):
  name = "jaxseg_configs_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_sibling(this_file: str, name: str):
  """Imports ``name.py`` from the folder of ``this_file``.

  For the benchmark scripts: ``benchmarks/`` is a folder of scripts run by path, not a package, and
  ``load_sibling(__file__, "machine")`` gives one of them its neighbour. Recipes import each other
  as the ``configs`` package instead.
  """
  return _load_module(os.path.join(os.path.dirname(os.path.abspath(this_file)), f"{name}.py"))
