"""The entry points' rule for errors: a user's mistake ends in one line, a bug keeps its traceback.

Every ``python -m jaxseg.<program>`` starts its absl ``main`` through :func:`run_main`::

  def run() -> None:
    cli.run_main("jaxseg.decode", main)

What ends in one line ``<program>: <message>`` on stderr and exit status 1 (2 for flags):

* a :class:`~jaxseg.common.errors.JaxsegError` raised anywhere (library code raises
  ``ConfigError`` / ``InputError`` / ``OutputError`` for the user's mistakes);
* an ``OSError`` that :func:`~jaxseg.common.errors.from_os_error` explains (disk full, quota,
  no permission), named by the file being written;
* ``app.UsageError`` and every flag problem: a bad flag value (absl's ``flags.Error``), a config
  file that does not exist (``--config=configs/nope.py``; ml_collections only fails when the
  config is first used), and an override of a key or section the config lacks
  (``--config.decode.nosuch=1``; ml_collections raises ``AttributeError`` / ``KeyError`` /
  ``TypeError`` from inside absl's parser for those).

Anything else is a bug in jaxseg and propagates with its traceback. :func:`call` applies the same
rule to one function call (tests run a ``main`` in-process with it). :func:`check_output_folder`
is the check every entry point makes on its output folder before doing any work.
:func:`resolve_checkpoint` reads a ``--checkpoint`` (a work dir, its checkpoints folder or one
step folder) and :func:`with_saved_config` lets such a work dir stand in for ``--config``.

Never imports JAX.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags

from jaxseg.common.errors import (
  ConfigError,
  JaxsegError,
  MissingInputError,
  OutputError,
  from_os_error,
)

FLAGS = flags.FLAGS
# The exit status of a bad command line (absl's own is 1; argparse and most tools use 2).
USAGE_STATUS = 2


def one_line(text: str) -> str:
  """``text`` with its lines joined: the message of an error becomes one terminal line."""
  return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def user_message(error: BaseException) -> str | None:
  """The one-line explanation of a user's mistake or a machine problem, or None for a bug."""
  if isinstance(error, JaxsegError):
    return one_line(str(error))
  if isinstance(error, app.UsageError):
    return one_line(str(error))
  if isinstance(error, OSError):
    # os.replace(tmp, path) names the target second: the file the user asked for.
    what = error.filename2 or error.filename
    named = isinstance(what, (str, bytes, os.PathLike))  # not a file descriptor
    known = from_os_error(error, os.fsdecode(what) if named else "output")
    return None if known is None else one_line(str(known))
  return None


def call(program: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
  """Returns ``fn(*args, **kwargs)``; a user's mistake exits with ``<program>: <message>``.

  Raises:
    SystemExit: for the errors listed in the module docstring (status 1, or the
      ``UsageError``'s own exit code).
  """
  try:
    return fn(*args, **kwargs)
  except (JaxsegError, app.UsageError, OSError) as e:
    message = user_message(e)
    if message is None:
      raise
    print(f"{program}: {message}", file=sys.stderr, flush=True)
    code = getattr(e, "exitcode", 1) if isinstance(e, app.UsageError) else 1
    raise SystemExit(code) from None


def run_main(
  program: str,
  main: Callable[[list[str]], Any],
  argv: Sequence[str] | None = None,
  *,
  config_from: Sequence[str] = (),
) -> None:
  """``app.run(main)`` with the error rule of the module docstring, for flags and ``main``.

  Args:
    program: the name the messages start with, e.g. ``"jaxseg.decode"``.
    main: the absl main (``main(argv)``; an int it returns is the exit status).
    argv: the command line (default ``sys.argv``).
    config_from: flags naming a work dir whose ``config.json`` stands in for a missing
      ``--config`` (:func:`with_saved_config`), e.g. ``("checkpoint",)``.
  """

  def parse(args: list[str]) -> list[str]:
    return call(program, lambda a: parse_flags(with_saved_config(a, config_from)), args)

  def guarded(args: list[str]) -> Any:
    return call(program, main, args)

  app.run(guarded, argv=None if argv is None else list(argv), flags_parser=parse)


def check_output_folder(path: str | os.PathLike | None, *, flag: str = "--output") -> None:
  """Refuses an output folder that is an existing file, or lies under one, before any work.

  Raises:
    OutputError: ``path``, or the nearest part of it that exists, is not a folder (names the
      flag and the path).
  """
  if path is None:
    return
  path = os.fspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise OutputError(f"{flag}={path} is an existing file, not a folder; choose a folder")
  # A folder under a file (--output=notes.txt/seg) fails much later with NotADirectoryError from
  # whatever creates it first; the nearest part of the path that exists tells now.
  ancestor = os.path.dirname(os.path.abspath(path))
  while not os.path.lexists(ancestor) and os.path.dirname(ancestor) != ancestor:
    ancestor = os.path.dirname(ancestor)
  if os.path.lexists(ancestor) and not os.path.isdir(ancestor):
    raise OutputError(
      f"{flag}={path}: {ancestor} is an existing file, not a folder; choose a folder"
    )


# -- --checkpoint ----------------------------------------------------------------------------------

# What a --checkpoint may name, for the messages.
CHECKPOINT_FORMS = "a work dir, its checkpoints folder or a step folder (W/checkpoints/<step>)"
# As jaxseg.training.paths.CHECKPOINT_DIR (that package builds on this one, not the other way).
CHECKPOINT_DIR = "checkpoints"
# The items of an orbax step folder (jaxseg.training.checkpoint): any one makes it a checkpoint.
_STEP_ITEMS = ("params", "ema", "meta", "train")


@dataclasses.dataclass(frozen=True)
class CheckpointArg:
  """A resolved ``--checkpoint``.

  Attributes:
    path: what the libraries take (the work dir, or the checkpoints folder when that was named).
    folder: the checkpoints folder (absolute).
    workdir: the work dir holding ``folder`` (absolute; may lack a ``config.json``).
    step: the step a step folder selects, else None (``--step`` / ``run.checkpoint_step`` do).
  """

  path: str
  folder: str
  workdir: str
  step: int | None = None

  @property
  def config_path(self) -> str | None:
    """The work dir's resolved ``config.json``, or None when it has none."""
    from jaxseg.common.config_util import RESOLVED_CONFIG_NAME

    path = os.path.join(self.workdir, RESOLVED_CONFIG_NAME)
    return path if os.path.isfile(path) else None


def _step_folders(path: str) -> list[str]:
  try:
    return [n for n in os.listdir(path) if n.isdigit() and os.path.isdir(os.path.join(path, n))]
  except OSError:
    return []


def resolve_checkpoint(value: str, *, flag: str = "--checkpoint") -> CheckpointArg:
  """Reads ``value`` as a work dir, its checkpoints folder or one step folder; reads only.

  Raises:
    MissingInputError: ``value`` does not exist, or holds no checkpoint (the message names the
      forms a checkpoint may take).
  """
  path = os.path.abspath(os.path.expanduser(value))
  if not os.path.exists(path):
    raise MissingInputError(f"{flag}={value} does not exist; name {CHECKPOINT_FORMS}")
  if not os.path.isdir(path):
    raise MissingInputError(f"{flag}={value} is a file, not a folder; name {CHECKPOINT_FORMS}")
  sub = os.path.join(path, CHECKPOINT_DIR)
  if os.path.isdir(sub):
    return CheckpointArg(value, sub, path)
  name = os.path.basename(path)
  parent = os.path.dirname(path)
  if name.isdigit():
    items = [n for n in _STEP_ITEMS if os.path.isdir(os.path.join(path, n))]
    if not items:
      raise MissingInputError(
        f"{flag}={value} is not a checkpoint step folder (it has none of "
        f"{', '.join(_STEP_ITEMS)}); name {CHECKPOINT_FORMS}"
      )
    return CheckpointArg(parent, parent, os.path.dirname(parent), int(name))
  if _step_folders(path):
    return CheckpointArg(value, path, parent)
  raise MissingInputError(
    f"{flag}={value} holds no checkpoints (no {CHECKPOINT_DIR}/ folder, no step folders); "
    f"name {CHECKPOINT_FORMS}"
  )


def _flag_value(argv: Sequence[str], name: str) -> str | None:
  """The value of the last ``--name=V`` / ``--name V`` in ``argv`` (None when absent)."""
  found = None
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if arg == "--":
      break
    key, eq, value = arg.lstrip("-").partition("=")
    if not arg.startswith("-") or key != name:
      continue
    if eq:
      found = value
    elif i + 1 < len(args):
      found = args[i + 1]
  return found


def with_saved_config(
  argv: Sequence[str], sources: Sequence[str], name: str = "config"
) -> list[str]:
  """``argv``, with ``--config`` taken from a work dir's ``config.json`` when it names none.

  The first of the ``sources`` flags given (``--checkpoint=W``, a checkpoints folder or a step
  folder of W) supplies ``W/config.json``, the resolved config jaxseg saved when it trained W; it
  is loaded through :mod:`jaxseg.common.saved_config`, so ``--config.a.b=value`` overrides still
  apply on top. Without any of them ``argv`` is returned as it is (absl then asks for
  ``--config``).

  Raises:
    MissingInputError: the flag names no checkpoint (:func:`resolve_checkpoint`).
    ConfigError: its work dir has no ``config.json``.
  """
  from jaxseg.common.config_util import RESOLVED_CONFIG_NAME

  argv = list(argv)
  if not sources or any(key == name for key, _ in _config_specs(argv, [name])):
    return argv
  for source in sources:
    value = _flag_value(argv, source)
    if value is None:
      continue
    here = os.path.join(os.path.expanduser(value), RESOLVED_CONFIG_NAME)
    if os.path.isfile(here):
      saved = os.path.abspath(here)
    else:
      saved = resolve_checkpoint(value, flag=f"--{source}").config_path
    if saved is None:
      raise ConfigError(
        f"--{name} is missing and --{source}={value} has no config.json (the resolved config a "
        f"jaxseg run saves in its work dir); pass --{name}=configs/<recipe>.py"
      )
    if ":" in saved:
      raise ConfigError(
        f"--{source}={value}: a path with ':' cannot be read as a config; pass --{name}"
      )
    from jaxseg.common import saved_config

    loader = os.path.abspath(saved_config.__file__)
    return [argv[0], f"--{name}={loader}:{saved}", *argv[1:]]
  return argv


# -- flags -----------------------------------------------------------------------------------------


def parse_flags(argv: Sequence[str]) -> list[str]:
  """Parses ``argv`` into absl's ``FLAGS`` (the ``flags_parser`` of :func:`run_main`).

  Raises:
    app.UsageError: a bad flag (absl's message, which names it) or missing required flags (all
      of them named), exit status 2.
    ConfigError: a config file that does not exist, defines no ``get_config`` or is not Python,
      or an override of a key the config lacks (names the key and the keys there are).
  """
  argv = list(argv)
  names = _config_flag_names()
  for name, spec in _config_specs(argv, names):
    _check_config_file(name, spec)
  try:
    args = FLAGS(argv)
  except flags.Error as e:
    # A config file's get_config() that raised: ml_collections and absl re-raise a ValueError
    # with its traceback in the message. A JaxsegError (cli_config.py:nosuch) is the user's.
    cause = _jaxseg_cause(e)
    if cause is not None:
      raise cause from None
    if "Traceback (most recent call last)" in str(e):
      raise  # a bug in the config file: its traceback is in the message
    # absl joins the messages of several failed validators with newlines (two required flags
    # missing); those are still the user's.
    missing = re.findall(r"Flag --(\S+) must have a value other than None", str(e))
    if missing:
      named = ", ".join(f"--{name}" for name in missing)
      raise _usage(f"missing required flag(s): {named}; --helpshort lists the flags") from None
    override = re.search(r"Unknown command line flag '(\w+)\.", str(e))
    if override and override.group(1) in names:
      # --config.a.b=v without --config: there is no config for it to apply to.
      name = override.group(1)
      raise _usage(
        f"{e}: --{name}.a.b=value overrides need --{name}=FILE (or, where the program takes "
        "one, a --checkpoint work dir with a config.json)"
      ) from None
    raise _usage(f"{e}; --helpshort lists the flags") from None
  except (AttributeError, KeyError, TypeError, IndexError) as e:
    # ml_collections resolves an override against the loaded config inside absl's parser; a
    # key it lacks (or a value taken for a section, or an index past a tuple's end) fails there
    # with these.
    unknown = _unknown_override(argv, names)
    if unknown is None:
      raise
    raise unknown from e
  for name in names:
    error = getattr(FLAGS[name].value, "_error", None)  # ml_collections' stand-in for a failure
    if isinstance(error, Exception):
      raise ConfigError(f"--{name}: the config file cannot be loaded: {one_line(str(error))}")
  return args


def _usage(message: str) -> app.UsageError:
  return app.UsageError(one_line(message), exitcode=USAGE_STATUS)


def _jaxseg_cause(error: BaseException) -> JaxsegError | None:
  """The JaxsegError among the exceptions ``error`` was raised while handling, if any."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, JaxsegError) and "\n" not in str(error):
      return error
    error = error.__cause__ or error.__context__
  return None


def _config_flag_names() -> list[str]:
  from jaxseg.common import config_util

  return sorted(name for name in config_util.CONFIG_FLAGS if name in FLAGS)


def _config_specs(argv: Sequence[str], names: Sequence[str]) -> list[tuple[str, str]]:
  """``(flag name, value)`` of each ``--config=...`` / ``--config ...`` in ``argv``."""
  out = []
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if arg == "--":
      break
    key, eq, value = arg.lstrip("-").partition("=")
    if not arg.startswith("-") or key not in names:
      continue
    if eq:
      out.append((key, value))
    elif i + 1 < len(args):
      out.append((key, args[i + 1]))
  return out


def _check_config_file(name: str, spec: str) -> None:
  path = spec.split(":", 1)[0]
  if not path:
    raise ConfigError(f"--{name} is empty; name a config file, e.g. --{name}=configs/demo.py")
  if not os.path.isfile(path):
    what = "is a folder, not" if os.path.isdir(path) else "does not exist; expected"
    raise ConfigError(f"--{name}={spec}: {path} {what} a config file (configs/*.py)")
  # ml_collections calls get_config() on whatever the file defines: a file without one (a shared
  # module such as configs/common.py) or a file that is not Python fails there with an
  # AttributeError / NameError traceback. Loading it here once more is cheap (configs only build
  # ConfigDicts) and names the file.
  module_name = f"_jaxseg_check_{name}_config"
  loader = importlib.machinery.SourceFileLoader(module_name, path)
  module = importlib.util.module_from_spec(importlib.util.spec_from_loader(module_name, loader))
  try:
    loader.exec_module(module)
  except Exception as e:
    if path.endswith(".py"):
      raise  # a bug in a real config file (a syntax error, a failing import) keeps its traceback
    raise ConfigError(
      f"--{name}={spec}: {path} is not a Python config file (configs/*.py): "
      f"{type(e).__name__}: {one_line(str(e))}"
    ) from None
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(
      f"--{name}={spec}: {path} defines no get_config(); name a config file, e.g. configs/demo.py"
    )


def _overrides(argv: Sequence[str], name: str) -> list[str]:
  """The dotted keys of the ``--<name>.a.b[=value]`` overrides in ``argv``."""
  keys = []
  for arg in argv[1:]:
    if arg == "--":
      break
    if not arg.startswith("-"):
      continue
    key = arg.lstrip("-").partition("=")[0]
    if key.startswith(f"no{name}."):
      key = key[2:]
    if key.startswith(f"{name}."):
      keys.append(key[len(name) + 1 :])
  return keys


def _unknown_override(argv: Sequence[str], names: Sequence[str]) -> ConfigError | None:
  """The error for the first override naming a key its config lacks, or None if none does."""
  from jaxseg.common import config_util

  specs = dict(_config_specs(argv, names))
  for name in names:
    keys = _overrides(argv, name)
    if not keys:
      continue
    spec = specs.get(name) or FLAGS[name].default
    if not isinstance(spec, str):
      continue
    config = FLAGS[name].parser.parse(spec)  # loads the file again: the parse failed midway
    for key in keys:
      try:
        config_util.check_key(config, key)
      except ConfigError as e:
        return e
  return None
