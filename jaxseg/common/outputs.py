"""Stage outputs: the one rule for reusing, resuming, refusing or replacing what a stage writes.

Every folder jaxseg writes into holds a manifest, ``.jaxseg.json``, written by jaxseg alone. It
has one entry per stage output in the folder (a decode, one predicted volume, a QC, a study, a
training run, ...)::

  {"jaxseg_manifest": 1,
   "entries": {"decode": {"stage": "decode", "version": 1, "fingerprint": {...},
                          "paths": ["segmentation", "preview.png", "decode.json"],
                          "complete": true}}}

``paths`` are the names (relative to the folder) that the entry created or is about to create;
they are recorded *before* anything is written, so a killed stage still owns its partial files.
Before writing, a stage opens its entry with :meth:`StageOutput.open`, which decides:

* **reuse**: the entry is complete, its fingerprint equals the stage's and its paths exist.
* **resume**: the entry is incomplete with the same fingerprint: the stage continues, keeping
  what is finished (its own partial files are its to redo).
* **replace**: the fingerprint differs and ``overwrite`` was given, or only the contents of an
  input changed in place (same path: the old result is stale, and it is jaxseg's own): exactly the entry's listed
  paths are deleted, nothing else.
* **refuse** (:class:`~jaxseg.common.errors.OutputError`, one line naming the path, the
  differences and the flag): other settings without ``overwrite``; a folder that is not empty
  and has no manifest (the user's folder: refused even with ``overwrite``); a path the stage
  needs that exists but no entry lists (the user's file); an output folder that lies inside,
  or contains, one of the stage's inputs.

Fingerprints name inputs by content (:func:`input_identity`): a zarr / N5 / PNG folder by its
metadata files and every file's size and mtime, a single file (HDF5, TIFF) by size and mtime, a
checkpoint by its step folders. Fingerprint keys under ``"inputs"`` are such identities: when only
their contents differ, the stage's result is stale and is redone without ``overwrite``, so a changed input
invalidates everything downstream (predict -> QC -> decode -> scores -> report).

The manifest is updated under an exclusive ``flock`` on the folder, so several processes (many
hosts predicting, tuning workers) can share it. Never imports JAX.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

from absl import logging

from jaxseg.common.errors import OutputError
from jaxseg.common.files import json_ready

P = ParamSpec("P")
R = TypeVar("R")

MANIFEST = ".jaxseg.json"
LOCK = ".jaxseg.lock"  # held by a long stage (a study) so that a second one stops at once
_MANIFEST_LOCK = ".jaxseg.manifest.lock"
_ENTRY_LOCKS = ".jaxseg.entry."  # + a hash of the entry's name + ".lock"
# Names jaxseg keeps in every folder it writes: the manifest, its locks and temporary files.
_OWN_PREFIX = ".jaxseg"
_FORMAT = 1
# Folder names that mark a container: an input inside one protects the whole container.
_CONTAINER_SUFFIXES = (".zarr", ".zarr3", ".n5", ".h5", ".hdf5", ".hdf", ".tif", ".tiff")
_METADATA_FILES = (".zarray", ".zattrs", ".zgroup", "zarr.json", "attributes.json", "info")
# Files of a folder that say nothing about the user's data (a folder holding only these is empty).
_IGNORED_NAMES = (".DS_Store",)
_INPUTS_KEY = "inputs"
# ``file.h5:dataset`` (any case of the extension), and the z window a split can add to a path.
_HDF5 = re.compile(r"^(?P<file>.+?\.(?:h5|hdf5|hdf))(?::.*)?$", re.IGNORECASE)
_Z_WINDOW = re.compile(r"\[z \d+:\d+\]$")
_SHOWN_DIFFERENCES = 6


class Decision(enum.Enum):
  """What :meth:`StageOutput.open` decided; see the module docstring."""

  CREATE = "create"
  REUSE = "reuse"
  RESUME = "resume"
  REPLACE = "replace"


# -- input identity ------------------------------------------------------------------------------


def local_file_part(spec: Any) -> str | None:
  """The local filesystem path behind a volume spec, or None for remote / in-memory ones.

  ``file.h5:dataset`` -> ``file.h5``; ``precomputed://file:///abs/x`` -> ``/abs/x``; a z window
  ``x.tif[z 80:100]`` -> ``x.tif``; ``gs://...`` -> None; a path -> its absolute form.
  """
  if spec is None or isinstance(spec, Mapping):
    return None
  spec = _Z_WINDOW.sub("", os.fspath(spec))
  if "://" in spec:
    _, _, rest = spec.partition("://")
    if rest.startswith("file://"):
      return os.path.abspath(rest[len("file://") :])
    if spec.startswith("file://"):
      return os.path.abspath(spec[len("file://") :])
    return None
  match = _HDF5.match(spec)
  if match:
    return os.path.abspath(match.group("file"))
  return os.path.abspath(spec)


def protected_root(spec: Any) -> str | None:
  """The real path that writing must stay out of for an input: the input itself, or the
  outermost container (``x.zarr``, ``x.n5``, ``x.h5``) holding it, so an array inside a zarr
  group protects the whole group."""
  path = local_file_part(spec)
  if path is None:
    return None
  path = os.path.realpath(path)
  parts = path.split(os.sep)
  for i in range(1, len(parts) + 1):
    if parts[i - 1].lower().endswith(_CONTAINER_SUFFIXES):
      return os.sep.join(parts[:i]) or os.sep
  return path


def _within(path: str, root: str) -> bool:
  return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_outside_inputs(
  output: str, inputs: Iterable[Any], *, what: str = "output folder"
) -> None:
  """Refuses an output that lies inside, or contains, one of the inputs.

  Raises:
    OutputError: one line naming the output and the input it would touch.
  """
  out = os.path.realpath(os.path.abspath(os.fspath(output)))
  for spec in inputs:
    root = protected_root(spec)
    if root is None:
      continue
    if _within(out, root):
      raise OutputError(
        f"{output}: this {what} lies inside the input {root}; jaxseg never writes into its "
        "inputs: choose an output folder outside it"
      )
    if _within(root, out):
      raise OutputError(
        f"{output}: this {what} contains the input {root}; choose an output folder that does "
        "not hold the inputs"
      )


def _tree_identity(folder: str) -> str:
  """A hash of a folder's metadata files' bytes and every file's name, size and mtime.

  Hidden names other than zarr's metadata (``.DS_Store``, ``._x``, ``.nfs123``, a writer's
  temporary file) are skipped: a file browser or an NFS client must not make an input look changed.
  """
  digest = hashlib.sha256()
  for root, dirs, names in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in sorted(names):
      if name.startswith(".") and name not in _METADATA_FILES:
        continue
      path = os.path.join(root, name)
      try:
        st = os.stat(path)
        rel = os.path.relpath(path, folder)
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        if name in _METADATA_FILES and st.st_size < (1 << 20):
          with open(path, "rb") as f:
            digest.update(f.read())
      except OSError:  # removed or unreadable while we walked: it counts as absent
        continue
  return digest.hexdigest()[:20]


def input_identity(spec: Any) -> dict:
  """What a stage records of an input so that a change in place is seen (no data is read).

  Returns:
    ``{"path": ..., "content": ...}``: the absolute path (or the spec as given when remote) and
    a hash of the file's size and mtime, or of a folder's files (zarr, N5, PNG stacks,
    checkpoints). ``content`` is None when the input does not exist (yet) or is remote.
  """
  if isinstance(spec, Mapping):
    return {"path": json.loads(json.dumps(spec, sort_keys=True, default=str)), "content": None}
  spec = os.fspath(spec)
  path = local_file_part(spec)
  if path is None:
    return {"path": spec, "content": None}
  # The path as given, made absolute, keeping an HDF5 ':dataset' suffix.
  shown = spec if "://" in spec else os.path.abspath(spec)
  if os.path.isdir(path):
    return {"path": shown, "content": _tree_identity(path)}
  if os.path.isfile(path):
    st = os.stat(path)
    return {"path": shown, "content": f"{st.st_size}:{st.st_mtime_ns}"}
  return {"path": shown, "content": None}


# -- differences ---------------------------------------------------------------------------------


def differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
  """``key: saved -> current`` lines for every leaf that differs (dicts compared key by key)."""
  if isinstance(saved, Mapping) and isinstance(current, Mapping):
    out = []
    for key in sorted(set(saved) | set(current), key=str):
      name = f"{prefix}.{key}" if prefix else str(key)
      if key not in saved:
        out.append(f"{name}: (absent) -> {_short(current[key])}")
      elif key not in current:
        out.append(f"{name}: {_short(saved[key])} -> (absent)")
      else:
        out += differences(saved[key], current[key], name)
    return out
  if _plain(saved) == _plain(current):
    return []
  return [f"{prefix or '(value)'}: {_short(saved)} -> {_short(current)}"]


def _plain(value: Any) -> Any:
  return json.loads(json.dumps(json_ready(value), sort_keys=True, default=str))


def _short(value: Any, limit: int = 60) -> str:
  text = json.dumps(_plain(value))
  return text if len(text) <= limit else text[: limit - 3] + "..."


def _only_contents_changed(diff: Sequence[str]) -> bool:
  """True when the differences are only inputs changed in place (same paths, new contents).

  An input that vanished or appeared (``null`` on one side) is not a change in place: that is
  refused like any other difference rather than redone on its own.
  """
  if not diff:
    return False
  for line in diff:
    key, _, change = line.partition(": ")
    if not (key.startswith(f"{_INPUTS_KEY}.") and key.endswith(".content")):
      return False
    if "null" in change.split(" -> ") or "(absent)" in change:
      return False
  return True


# -- the manifest --------------------------------------------------------------------------------


def manifest_path(folder: str) -> str:
  return os.path.join(os.fspath(folder), MANIFEST)


def read_manifest(folder: str) -> dict | None:
  """The folder's manifest, or None when jaxseg never wrote into it."""
  path = manifest_path(folder)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      manifest = json.load(f)
  except ValueError:
    manifest = None
  if not isinstance(manifest, dict) or "entries" not in manifest:
    raise OutputError(
      f"{path}: not a readable jaxseg manifest; jaxseg will not guess what it owns there: "
      "choose another output folder"
    )
  return manifest


def _write_manifest(folder: str, manifest: dict) -> None:
  # A unique temporary name: processes on several hosts can share a pid.
  fd, tmp = tempfile.mkstemp(prefix=".jaxseg.tmp.", suffix=".json", dir=folder)
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(json_ready(manifest), f, indent=1, sort_keys=True)
      f.write("\n")
    os.replace(tmp, manifest_path(folder))
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def _locked(folder: str) -> Iterator[None]:
  """An exclusive lock for a read-modify-write of the folder's manifest.

  ``flock`` on a regular file: Linux's NFS client maps it to a lock the server sees, which a lock
  on the directory itself would not get.
  """
  with open(os.path.join(folder, _MANIFEST_LOCK), "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def held_exclusively(folder: str, what: str) -> Iterator[None]:
  """Holds ``folder``'s stage lock for a whole run; a second holder is refused at once.

  Raises:
    OutputError: another process holds it (``what`` says who would: "another jaxseg.tune").
  """
  prepare_folder(folder)
  path = os.path.join(folder, LOCK)
  with open(path, "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise OutputError(
        f"{folder}: {what} is running on this folder (it holds {path}); wait for it or stop it"
      ) from None
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _ignored(name: str) -> bool:
  return name.startswith(_OWN_PREFIX) or name in _IGNORED_NAMES


def foreign_names(folder: str, manifest: dict | None) -> list[str]:
  """Names in ``folder`` that no entry of its manifest lists (the user's files)."""
  if not os.path.isdir(folder):
    return []
  owned = set()
  for entry in (manifest or {}).get("entries", {}).values():
    owned.update(p.split("/")[0] for p in entry.get("paths", ()))
  return sorted(n for n in os.listdir(folder) if n not in owned and not _ignored(n))


def _remove(path: str) -> None:
  if os.path.islink(path) or os.path.isfile(path):
    os.remove(path)
  elif os.path.isdir(path):
    shutil.rmtree(path)


def is_jaxseg_folder(folder: str) -> bool:
  """True when ``folder`` does not exist, is empty, or is a folder jaxseg made.

  A folder where jaxseg only put named files among the user's (``shared``) stays the user's: it
  counts as jaxseg's only while everything in it is listed in its manifest.
  """
  folder = os.fspath(folder)
  if not os.path.exists(folder):
    return True
  if not os.path.isdir(folder):
    return False
  manifest = read_manifest(folder)
  if manifest is not None and not manifest.get("shared"):
    return True
  return not foreign_names(folder, manifest)


def prepare_folder(folder: str, *, what: str = "output folder", shared: bool = False) -> None:
  """Creates ``folder`` (with an empty manifest) or checks that jaxseg made it.

  Args:
    folder: the output folder.
    what: what the folder is called in messages.
    shared: the output is a single file or array the user named inside a folder of their own
      (``--output=/data/mask.zarr``): the folder may hold the user's files, and the manifest
      beside them guards only the names jaxseg creates.

  Raises:
    OutputError: ``folder`` is a file, or a folder of files jaxseg did not make (unless shared).
  """
  folder = os.fspath(folder)
  if os.path.exists(folder) and not os.path.isdir(folder):
    raise OutputError(f"{folder}: this {what} is an existing file; choose a folder")
  if not shared and not is_jaxseg_folder(folder):
    shown = foreign_names(folder, read_manifest(folder))
    more = f" and {len(shown) - 3} more" if len(shown) > 3 else ""
    raise OutputError(
      f"{folder}: this folder holds files jaxseg did not make ({', '.join(shown[:3])}{more}); "
      f"jaxseg never writes into them, not even with --overwrite: choose another {what}"
    )
  os.makedirs(folder, exist_ok=True)
  with _locked(folder):
    manifest = read_manifest(folder)
    if manifest is None:
      _write_manifest(folder, {"jaxseg_manifest": _FORMAT, "shared": shared, "entries": {}})
    elif manifest.get("shared") and not shared and not foreign_names(folder, manifest):
      manifest["shared"] = False  # nothing of the user's is left: a folder of jaxseg's now
      _write_manifest(folder, manifest)


def is_complete(folder: str, name: str) -> bool:
  """True when ``folder``'s manifest has a complete entry ``name`` whose paths all exist."""
  manifest = read_manifest(folder) if os.path.isdir(folder) else None
  entry = (manifest or {}).get("entries", {}).get(name)
  if not entry or not entry.get("complete"):
    return False
  return all(os.path.lexists(os.path.join(folder, p)) for p in entry.get("paths", ()))


# -- one stage output ----------------------------------------------------------------------------


@dataclasses.dataclass
class StageOutput:
  """One stage's output in a folder: the entry ``name`` of the folder's manifest.

  Attributes:
    folder: the output folder (created on :meth:`open`).
    name: the entry's name, unique in the folder (``decode``, ``predict:seed101``, ``qc``).
    stage: what made it (``decode``, ``predict``, ...), with ``version`` of its format.
    fingerprint: the JSON-ready settings and input identities that determine the output; input
      identities go under the key ``"inputs"`` (see the module docstring).
    paths: the names (relative to ``folder``) the stage will create; more can be claimed later.
    inputs: specs of the stage's inputs, which the folder must stay outside of.
    what: what the folder is called in messages (``--output`` folder, work dir).
    flag: the option that allows replacing (named in refusals).
    shared: a single named file or array in a folder that may hold the user's files (see
      :func:`prepare_folder`); its paths are still never written over unless they are its own.
  """

  folder: str
  name: str
  stage: str
  fingerprint: Mapping[str, Any]
  paths: Sequence[str] = ()
  inputs: Sequence[Any] = ()
  version: int = 1
  what: str = "output folder"
  flag: str = "--overwrite"
  shared: bool = False
  decision: Decision | None = None
  replaced_because: tuple[str, ...] = ()

  def __post_init__(self):
    self.folder = os.fspath(self.folder)
    self.fingerprint = _plain(dict(self.fingerprint))

  def path(self, name: str) -> str:
    return os.path.join(self.folder, name)

  # -- deciding --------------------------------------------------------------------------------

  def saved(self) -> dict | None:
    """The manifest entry as saved, or None."""
    manifest = read_manifest(self.folder) if os.path.isdir(self.folder) else None
    return None if manifest is None else manifest["entries"].get(self.name)

  def peek(self, *, overwrite: bool = False) -> Decision:
    """What :meth:`open` would decide, without writing anything; raises the same refusals.

    Lets a stage refuse before hours of work (reading a checkpoint, evaluating) rather than when
    it comes to write.
    """
    manifest = self.check_free()
    decision = self._decide(manifest["entries"].get(self.name), overwrite)
    return decision

  def check_free(self) -> dict:
    """Refuses, without writing, a place jaxseg must not write to: inside or around an input,
    a folder of the user's files, or a name that exists and is not this entry's (nor any
    other entry's). Returns the folder's manifest (empty when there is none)."""
    self._check_place()
    manifest = read_manifest(self.folder) if os.path.isdir(self.folder) else None
    if manifest is None and not self.shared and not is_jaxseg_folder(self.folder):
      prepare_folder(self.folder, what=self.what)  # raises the foreign-folder refusal
    manifest = manifest or {"entries": {}}
    self._check_claims(manifest, self.paths)
    return manifest

  def _check_place(self) -> None:
    if self.shared:  # the named paths, not the folder, must stay clear of the inputs
      for rel in self.paths:
        check_outside_inputs(self.path(rel), self.inputs, what=self.what)
    else:
      check_outside_inputs(self.folder, self.inputs, what=self.what)
    if os.path.exists(self.folder) and not os.path.isdir(self.folder):
      raise OutputError(f"{self.folder}: this {self.what} is an existing file, not a folder")

  def open(self, *, overwrite: bool = False) -> Decision:
    """Decides what to do with the folder and prepares it (see the module docstring).

    After CREATE, RESUME and REPLACE the entry is recorded as incomplete with this fingerprint
    and :attr:`paths` claimed, and this process holds the entry until :meth:`finish` (another
    process opening it waits); after REUSE nothing changed.

    Raises:
      OutputError: a refusal, one line naming the path, why and the way out.
    """
    self._check_place()
    prepare_folder(self.folder, what=self.what, shared=self.shared)
    held_before = (os.path.realpath(self.folder), self.name) in _HELD
    if not self.shared:
      self._hold()
    try:
      return self._open_locked(overwrite)
    except BaseException:
      if not held_before:  # a refusal (or a kill) leaves the entry free for the next process
        self._release()
      raise

  def _open_locked(self, overwrite: bool) -> Decision:
    with _locked(self.folder):
      manifest = read_manifest(self.folder)
      entry = manifest["entries"].get(self.name)
      decision = self._decide(entry, overwrite)
      self._check_claims(manifest, self.paths)  # before anything is deleted or written
      if decision is Decision.REUSE:
        self.decision = decision
        self._release()
        return decision
      owned, stamps = [], {}
      if decision is Decision.REPLACE:
        for rel in entry.get("paths", ()):
          self._check_unchanged(entry, rel)
        # Marked before deleting: a run killed midway finds an entry that is not complete.
        entry.update(complete=False, replacing=True)
        _write_manifest(self.folder, manifest)
        for rel in entry.get("paths", ()):
          _remove(self.path(rel))
      elif entry is not None:
        owned, stamps = list(entry.get("paths", ())), dict(entry.get("stamps", {}))
      manifest["entries"][self.name] = {
        "stage": self.stage,
        "version": self.version,
        "fingerprint": self.fingerprint,
        "paths": owned + [p for p in self.paths if p not in owned],
        "stamps": stamps,
        "complete": False,
      }
      _write_manifest(self.folder, manifest)
    self.decision = decision
    return decision

  def _decide(self, entry: dict | None, overwrite: bool) -> Decision:
    if entry is None:
      return Decision.CREATE
    diff = differences(
      {"stage": entry.get("stage"), "version": entry.get("version"), **entry["fingerprint"]},
      {"stage": self.stage, "version": self.version, **self.fingerprint},
    )
    if not diff and not entry.get("replacing"):
      listed = entry.get("paths", ())
      if entry.get("complete") and all(os.path.lexists(self.path(p)) for p in listed):
        return Decision.REUSE
      # Unfinished with the same settings: resumed, even under --overwrite (which the chain
      # passes on; a killed day-long blockwise decode must not start again from zero).
      return Decision.RESUME
    if overwrite or _only_contents_changed(diff) or entry.get("replacing"):
      self.replaced_because = tuple(diff)
      return Decision.REPLACE
    shown = "; ".join(diff[:_SHOWN_DIFFERENCES])
    more = f"; and {len(diff) - _SHOWN_DIFFERENCES} more" if len(diff) > _SHOWN_DIFFERENCES else ""
    raise OutputError(
      f"{self.folder}: the {self.stage} there was made differently ({shown}{more}); pass "
      f"{self.flag} to replace it (only the files jaxseg made for it are deleted) or choose "
      f"another {self.what}"
    )

  def _check_unchanged(self, entry: dict, rel: str) -> None:
    """Refuses to delete a listed path that is not the one jaxseg finished writing there."""
    stamp = entry.get("stamps", {}).get(rel)
    path = self.path(rel)
    if stamp is None or not os.path.lexists(path) or _stamp(path) == stamp:
      return
    raise OutputError(
      f"{path}: changed since jaxseg wrote it (someone may have edited or replaced it), so "
      f"jaxseg will not delete it: move it away or choose another {self.what}"
    )

  # -- one writer per entry --------------------------------------------------------------------

  def _hold(self) -> None:
    """Takes the entry's lock for this process (waiting while another process holds it)."""
    key = (os.path.realpath(self.folder), self.name)
    if key in _HELD:
      return
    digest = hashlib.sha1(self.name.encode()).hexdigest()[:12]
    handle = open(os.path.join(self.folder, f"{_ENTRY_LOCKS}{digest}.lock"), "a")  # noqa: SIM115
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      logging.info("%s: waiting for another jaxseg process writing %s", self.folder, self.name)
      fcntl.flock(handle, fcntl.LOCK_EX)
    _HELD[key] = handle

  def _release(self) -> None:
    handle = _HELD.pop((os.path.realpath(self.folder), self.name), None)
    if handle is not None:
      fcntl.flock(handle, fcntl.LOCK_UN)
      handle.close()

  def _check_claims(self, manifest: dict, paths: Iterable[str]) -> None:
    """Refuses names that exist and are not this entry's (the user's, or another stage's)."""
    own = set(manifest["entries"].get(self.name, {}).get("paths", ()))
    for rel in paths:
      if rel in own or not os.path.lexists(self.path(rel)):
        continue
      other = [
        n for n, e in manifest["entries"].items() if n != self.name and rel in e.get("paths", ())
      ]
      whose = f"the output of {other[0]!r}" if other else "a file jaxseg did not make"
      raise OutputError(
        f"{self.path(rel)}: exists and is {whose}; jaxseg does not write over it, not even with "
        f"--overwrite: move it or choose another {self.what}"
      )

  # -- while writing ---------------------------------------------------------------------------

  def claim(self, *paths: str) -> None:
    """Records more names as this entry's before they are created (refuses foreign ones)."""
    with _locked(self.folder):
      manifest = read_manifest(self.folder)
      self._check_claims(manifest, paths)
      entry = manifest["entries"][self.name]
      entry["paths"] = list(entry["paths"]) + [p for p in paths if p not in entry["paths"]]
      _write_manifest(self.folder, manifest)

  def owns(self, rel: str) -> bool:
    entry = self.saved()
    return entry is not None and rel in entry.get("paths", ())

  def remove_own(self, rel: str) -> None:
    """Deletes one of this entry's paths (a partial file to redo); refuses any other path."""
    if not os.path.lexists(self.path(rel)):
      return
    entry = self.saved()
    if entry is None or rel not in entry.get("paths", ()):
      raise OutputError(f"{self.path(rel)}: not listed as this {self.stage}'s; not deleting it")
    self._check_unchanged(entry, rel)
    _remove(self.path(rel))

  def discard(self, rel: str) -> None:
    """Deletes one of this entry's paths (scratch) and drops it from the entry's list."""
    self.remove_own(rel)
    with _locked(self.folder):
      manifest = read_manifest(self.folder)
      entry = manifest["entries"][self.name]
      entry["paths"] = [p for p in entry["paths"] if p != rel]
      _write_manifest(self.folder, manifest)

  def finish(self, **extra: Any) -> None:
    """Marks the entry complete (written last: a killed stage is resumed, never reused).

    Records each listed path's stamp (inode, size, mtime): a later replace deletes a path only
    while it is still the one jaxseg wrote.
    """
    with _locked(self.folder):
      manifest = read_manifest(self.folder)
      entry = manifest["entries"][self.name]
      entry["complete"] = True
      # Names claimed but not there now (scratch removed, an optional file never written) are
      # dropped: a complete entry lists what it holds, and is reused only while all of it exists.
      entry["paths"] = [p for p in entry["paths"] if os.path.lexists(self.path(p))]
      entry["stamps"] = {p: _stamp(self.path(p)) for p in entry["paths"]}
      entry.update(_plain(extra))
      _write_manifest(self.folder, manifest)
    self._release()

  def invalidate(self) -> None:
    """Marks a finished entry incomplete again (a stage that adds to its own output)."""
    if not self.shared:
      self._hold()
    with _locked(self.folder):
      manifest = read_manifest(self.folder)
      manifest["entries"][self.name]["complete"] = False
      _write_manifest(self.folder, manifest)


def _stamp(path: str) -> list[int]:
  """What identifies the file or folder jaxseg wrote at ``path``: inode, size, mtime."""
  st = os.lstat(path)
  return [st.st_ino, st.st_size, st.st_mtime_ns]


# The entries this process holds, (real folder, name) -> the open lock file.
_HELD: dict[tuple[str, str], Any] = {}


def writes_outputs(fn: Callable[P, R]) -> Callable[P, R]:
  """Decorates a stage function: the entries it opened are let go when it returns or raises.

  An entry is held by its writer from :meth:`StageOutput.open` until :meth:`StageOutput.finish`;
  a stage that stops early (an error, a resumable stop, a refusal further on) must not keep it
  from the next process, which would then wait for a writer that is long done.
  """

  @functools.wraps(fn)
  def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
    before = set(_HELD)
    try:
      return fn(*args, **kwargs)
    finally:
      for key in set(_HELD) - before:
        handle = _HELD.pop(key)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()

  return wrapper
