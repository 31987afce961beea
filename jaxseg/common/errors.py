"""The exceptions that mean "the user asked for something that cannot be done", told in one line.

Every entry point catches :class:`JaxsegError` (and only it, plus the ``OSError`` s that
:func:`from_os_error` explains; see :mod:`jaxseg.common.cli`) and prints its message as one line
naming the file, array or config key and what was expected; any other exception is a bug in
jaxseg and keeps its traceback. Library code raises the most specific subclass:

* :class:`ConfigError`: a config key, value or section is wrong (names the key).
* :class:`InputError`: an input file or array is missing or malformed (names the file / array);
  :class:`MissingInputError` when it does not exist (also a ``FileNotFoundError``).
* :class:`OutputError`: an output cannot be written there: it holds the user's files, another
  run's results, lies inside an input, or the disk is full (names the path and the way out).

The subclasses also derive from ``ValueError`` / ``OSError`` so callers that caught those before
keep working.
"""

from __future__ import annotations

import errno


class JaxsegError(Exception):
  """A user's mistake or a problem of the machine, explained in one line."""


class ConfigError(JaxsegError, ValueError):
  """A config key, section or value is not what jaxseg expects; the message names the key."""


class InputError(JaxsegError, ValueError):
  """An input is missing, unreadable or not what was expected; the message names the file."""


class MissingInputError(InputError, FileNotFoundError):
  """An input file or folder (a checkpoint, a report, tuned parameters) does not exist.

  Also a ``FileNotFoundError``, which is what these places raised before.
  """


class OutputError(JaxsegError, OSError):
  """An output cannot be (re)written at that path; the message names it and what to do."""


def from_os_error(error: OSError, what: str) -> JaxsegError | None:
  """The one-line :class:`JaxsegError` for a machine problem (disk full, no permission), or None.

  Args:
    error: the ``OSError`` raised while reading or writing.
    what: the path (or stage) being read or written, for the message.
  """
  if error.errno == errno.ENOSPC:
    return OutputError(f"{what}: no space left on the device; free some or choose another output")
  if error.errno == errno.EDQUOT:
    return OutputError(f"{what}: disk quota exceeded; free some or choose another output")
  if error.errno == errno.EROFS:
    return OutputError(f"{what}: read-only file system; choose another output")
  # The rest happen as much when reading an input as when writing an output: neutral words.
  if error.errno in (errno.EACCES, errno.EPERM):
    return JaxsegError(f"{what}: permission denied ({errno.errorcode[error.errno]})")
  if error.errno == errno.ENOTDIR:
    return JaxsegError(f"{what}: a part of the path is a file, not a folder")
  if error.errno == errno.ENAMETOOLONG:
    return JaxsegError(f"{what}: the path or a name in it is too long")
  return None
