r"""Exports to PyTC's files: ``python -m jaxseg.export --input=SPEC --output=DIR --axis_order=xyz``.

Writes jaxseg's predictions and segmentations the way PyTorch Connectomics (PyTC) writes its own,
so scripts that read PyTC's outputs keep working (``docs/export.md``):

* affinities ``[C, z, y, x]`` (a ``jaxseg.predict`` group ``<name>.zarr``, or any 4-D array) become
  ``DIR/<name>/raw_x<n>_ch<c0-c1-...>.h5``: ``n`` test-time views, the channel numbers joined by
  ``-``; channels first, then the spatial axes in ``--axis_order`` (``xyz``: PyTC's
  ``(c, x, y, z)``);
* a segmentation ``[z, y, x]`` of integers (a ``jaxseg.decode`` folder, one of its
  ``segmentation*`` arrays, or any 3-D integer array) becomes
  ``DIR/<name>/decoded_x<n>_ch<...>_<decoder>_<threshold>.h5``, axes in ``--axis_order``.

Each file holds one dataset, ``main``, in the input's dtype, gzip-compressed, with jaxseg's
``axis_order`` (on-disk, e.g. ``cxyz``) and ``resolution`` (z, y, x) attributes so jaxseg reads it
back as it was, and the prediction's ``offsets`` / ``convention`` / ``channels``. Examples::

  python -m jaxseg.export --input=runs/nisb/predictions/seed6.zarr --output=pytc --axis_order=xyz
  python -m jaxseg.export --input=runs/nisb/segmentation/seed6 --output=pytc --axis_order=xyz
  python -m jaxseg.export --input=seg.zarr --output=out --axis_order=zyx --name=test_im_seg.h5

Streamed: boxes of ``--block`` voxels (z, y, x) are read, transposed and written one at a time, so
memory stays bounded whatever the volume's size. Each file is written as ``<file>.partial`` and
renamed when complete, and is an entry of its folder's jaxseg manifest
(:mod:`jaxseg.common.outputs`): an identical export is reused, one made differently is replaced
only with ``--overwrite``, and a folder holding files jaxseg did not write (PyTC's own results, say)
is refused. This process never imports JAX.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re

from absl import app, flags

from jaxseg.common import cli, outputs
from jaxseg.common.errors import InputError
from jaxseg.common.outputs import Decision, StageOutput, input_identity

_INPUT = flags.DEFINE_string(
  "input",
  None,
  "What to export: a jaxseg.predict group (<name>.zarr), a jaxseg.decode output folder, or an "
  "array ([C, z, y, x] affinities or a [z, y, x] integer segmentation; zarr / N5 / 'file.h5:ds').",
  required=True,
)
_OUTPUT = flags.DEFINE_string(
  "output", None, "Folder to write into; files go to DIR/<volume>/ (see --volume).", required=True
)
_AXIS_ORDER = flags.DEFINE_string(
  "axis_order",
  None,
  "Spatial axis order on disk, a permutation of 'xyz' ('xyz': PyTC's NISB files, 'zyx': z "
  "first); affinities always keep their channels first ('cxyz' may be given too).",
  required=True,
)
_FORMAT = flags.DEFINE_string("format", "h5", "Output format; 'h5' (PyTC's HDF5 layout).")
_VOLUME = flags.DEFINE_string(
  "volume",
  None,
  "The per-volume folder under --output (PyTC's <volume_stem>). Default: the input's name "
  "(seed6 for seed6.zarr or a decode folder named seed6); '' writes into --output itself.",
)
_NAME = flags.DEFINE_string(
  "name", None, "File name (*.h5) instead of PyTC's raw_... / decoded_... name; one array only."
)
_BLOCK = flags.DEFINE_list(
  "block",
  ["64", "512", "512"],
  "Voxels (z, y, x) read and written at once (rounded up to the input's chunks): bounds memory.",
)
_OVERWRITE = flags.DEFINE_bool(
  "overwrite", False, "Replace a file this export wrote earlier from another input or settings."
)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")

FORMATS = ("h5",)
DATASET = "main"  # the dataset name PyTC reads and writes in every HDF5 file
H5_CHUNK = 64
# The attribute keys jaxseg.predict and jaxseg.decode write (predict_lib.ATTR_KEY,
# segmentation_io.ATTR_KEY); spelled here so that this process never imports the predictor.
PREDICT_ATTR = "jaxseg_predict"
DECODE_ATTR = "jaxseg_decode"
# The prediction attributes worth keeping in the file: what a reader needs to use the channels.
_KEPT_ATTRS = ("offsets", "convention", "channels")
# PyTC's tag of its connected-components decoder (decode_affinity_cc); jaxseg's others keep
# their own names.
_DECODER_TAGS = {"cc": "affinity_cc"}


# -- what to export ----------------------------------------------------------------------------


def _usage(message: str) -> app.UsageError:
  return app.UsageError(message, exitcode=cli.USAGE_STATUS)


def _spatial_order(value: str) -> str:
  order = value.strip().lower()
  if order.startswith("c") and len(order) == 4:
    order = order[1:]
  if sorted(order) != ["x", "y", "z"]:
    raise _usage(
      f"--axis_order={value}: expected a permutation of 'xyz' ('xyz' for PyTC's NISB files, "
      "'zyx' for z first); channels always come first"
    )
  return order


def _block(values) -> tuple[int, int, int]:
  try:
    sizes = [int(v) for v in values]
  except ValueError:
    sizes = []
  if len(sizes) == 1:
    sizes *= 3
  if len(sizes) != 3 or min(sizes) < 1:
    raise _usage(f"--block={','.join(values)}: expected one or three positive integers (z, y, x)")
  return tuple(sizes)


def _is_array(path: str) -> bool:
  return any(os.path.isfile(os.path.join(path, m)) for m in (".zarray", "zarr.json"))


def _arrays(spec: str) -> tuple[list[str], str]:
  """The arrays ``--input`` names and the default volume name.

  A jaxseg.predict group gives its affinities, a jaxseg.decode folder its segmentation arrays;
  anything else is one array as given.
  """
  from jaxseg.inference import layout

  path = spec.rstrip("/")
  if os.path.isdir(path) and not _is_array(path):
    if _is_array(os.path.join(path, layout.AFFINITIES)):
      return [os.path.join(path, layout.AFFINITIES)], _stem(path)
    segs = sorted(
      n for n in os.listdir(path) if n.startswith("segmentation") and _is_array(f"{path}/{n}")
    )
    if segs:
      return [os.path.join(path, n) for n in segs], os.path.basename(os.path.abspath(path))
  return [spec], _array_volume_name(spec)


def _stem(path: str) -> str:
  name = os.path.basename(os.path.abspath(path.rstrip("/")))
  return re.sub(r"\.(zarr3?|n5|h5|hdf5|hdf)$", "", name, flags=re.IGNORECASE)


def _array_volume_name(spec: str) -> str:
  """``seed6`` for ``seed6.zarr/affinities``, ``a.h5:main`` or ``decode/seed6/segmentation``."""
  path = re.sub(r"\.(h5|hdf5|hdf):.*$", r".\1", spec, flags=re.IGNORECASE).rstrip("/")
  name, parent = os.path.basename(path), os.path.dirname(os.path.abspath(path))
  if re.search(r"\.(zarr3?|n5)$", parent, re.IGNORECASE):
    return _stem(parent)
  if name.startswith("segmentation"):
    return os.path.basename(parent)
  return _stem(path)


def _check_finished(array_path: str) -> None:
  """Refuses an input whose jaxseg stage has not finished (a killed predict or decode)."""
  path = outputs.local_file_part(array_path)
  for _ in range(3 if path else 0):  # the array, its group, the group's folder
    folder, name = os.path.split(path)
    manifest = outputs.read_manifest(folder) if os.path.isdir(folder) else None
    for entry_name, entry in ((manifest or {}).get("entries") or {}).items():
      if name in entry.get("paths", ()):
        if not entry.get("complete"):
          raise InputError(
            f"--input={array_path}: {os.path.join(folder, name)} is not finished (jaxseg's "
            f"{entry_name!r} there is incomplete); finish or resume that run first"
          )
        return
    path = folder


def _views(affinities_attrs: dict) -> int:
  """PyTC's ``x<n>``: the test-time views the prediction averaged (1 when not recorded)."""
  views = (affinities_attrs.get(PREDICT_ATTR) or {}).get("views")
  return len(views) if isinstance(views, list) and views else 1


def _channel_tag(channels) -> str:
  return "_ch" + "-".join(str(int(c)) for c in channels)


def pytc_name(volume) -> str:
  """PyTC's file name for ``volume``: ``raw_x<n>_ch<..>.h5`` for affinities,
  ``decoded_x<n>_ch<..>_<decoder>_<threshold>.h5`` for a jaxseg.decode segmentation.

  Raises:
    InputError: a segmentation without jaxseg.decode's attributes (nothing to name it by).
  """
  from jaxseg.io import open_volume

  if volume.ndim == 4:
    channels = volume.attrs.get("channels") or range(volume.shape[0])
    return f"raw_x{_views(volume.attrs)}{_channel_tag(channels)}.h5"
  decode = volume.attrs.get(DECODE_ATTR)
  if not isinstance(decode, dict) or not isinstance(decode.get("threshold"), (int, float)):
    raise InputError(
      f"{volume.path}: not a jaxseg.decode segmentation (no {DECODE_ATTR!r} attribute), so there "
      "is no PyTC name to give it; pass --name=FILE.h5"
    )
  views = 1
  source = decode.get("affinities")
  local = outputs.local_file_part(source) if isinstance(source, str) else None
  # Only the prediction's attributes are read; once it is gone (or unreadable) x1 is assumed.
  with contextlib.suppress(OSError, ValueError):
    if local and os.path.exists(local):
      views = _views(open_volume(source).attrs)
  method = str(decode.get("method", "decoded"))
  tag = f"{_DECODER_TAGS.get(method, method)}_{decode['threshold']:g}"
  return f"decoded_x{views}{_channel_tag(decode.get('channels', ()))}_{tag}.h5"


# -- writing ----------------------------------------------------------------------------------


def disk_order(volume, spatial: str) -> str:
  """The on-disk axis order of the export: ``c`` first for affinities, then ``spatial``."""
  return ("c" if volume.ndim == 4 else "") + spatial


def _boxes(shape, block):
  """Canonical boxes ``(z, y, x)`` slices tiling ``shape`` (spatial) in blocks of ``block``."""
  starts = [range(0, n, b) for n, b in zip(shape, block, strict=True)]
  for corner in itertools.product(*starts):
    yield tuple(slice(s, min(s + b, n)) for s, b, n in zip(corner, block, shape, strict=True))


def _read_block(volume, block) -> tuple[int, int, int]:
  """``block`` rounded up to whole input chunks (a chunk is then decompressed once), capped at
  the volume's size."""
  chunks = volume.chunks[-3:] if volume.chunks else (1, 1, 1)
  return tuple(
    min(n, -(-b // c) * c) for b, c, n in zip(block, chunks, volume.spatial_shape, strict=True)
  )


def write_h5(volume, path: str, order: str, block, *, show_progress: bool = False) -> None:
  """Streams ``volume`` (canonical ``[c,] z, y, x``) into ``path:main`` stored in ``order``."""
  import h5py
  import numpy as np

  from jaxseg.common.files import local_abspath
  from jaxseg.common.progress import progress

  canonical = "czyx" if volume.ndim == 4 else "zyx"
  to_disk = [canonical.index(a) for a in order]  # disk axis i holds canonical axis to_disk[i]
  shape = [volume.shape[a] for a in to_disk]
  # HDF5 chunks hold every channel and 64 voxels a side whatever --block is: the layout readers
  # see does not depend on how the file was streamed.
  chunks = [n if a == "c" else min(n, H5_CHUNK) for a, n in zip(order, shape, strict=True)]
  attrs = {k: volume.attrs[k] for k in _KEPT_ATTRS if k in volume.attrs}
  source = local_abspath(volume.path)  # usable from any working directory
  attrs.update(axis_order=order, resolution=list(volume.resolution), source=source)
  lead = (slice(None),) if volume.ndim == 4 else ()
  boxes = list(_boxes(volume.spatial_shape, block))
  with h5py.File(path, "w") as f:
    ds = f.create_dataset(
      DATASET, shape=shape, dtype=volume.dtype, chunks=tuple(chunks), compression="gzip",
      compression_opts=4,
    )  # fmt: skip
    for key, value in attrs.items():
      ds.attrs[key] = json.dumps(value) if isinstance(value, dict) else value
    for box in progress(boxes, desc="export", unit="box", disable=not show_progress):
      key = (*lead, *box)
      ds[tuple(key[a] for a in to_disk)] = np.transpose(volume[key], to_disk)


@outputs.writes_outputs
def export_array(volume, folder: str, name: str, spatial: str, block, *, overwrite, show_progress):
  """Writes (or reuses) ``folder/name`` from ``volume``; returns ``(path, reused)``.

  Raises:
    OutputError: the name exists and is not this export's, or was made differently (without
      ``overwrite``); nothing is touched then.
  """

  order = disk_order(volume, spatial)
  partial = name + ".partial"
  stage = StageOutput(
    folder,
    name=f"export:{name}",
    stage="export",
    fingerprint={
      "format": "h5",
      "dataset": DATASET,
      "axis_order": order,
      "shape": list(volume.shape),
      "dtype": volume.dtype.name,
      "inputs": {"input": input_identity(volume.path)},
    },
    paths=[name, partial],
    inputs=[volume.path],
    what="--output folder",
  )
  if stage.open(overwrite=overwrite) is Decision.REUSE:
    return stage.path(name), True
  stage.remove_own(partial)  # an export killed earlier
  read_block = _read_block(volume, block)
  write_h5(volume, stage.path(partial), order, read_block, show_progress=show_progress)
  os.replace(stage.path(partial), stage.path(name))
  stage.finish()
  return stage.path(name), False


def _open_input(path: str):
  from jaxseg.io import open_volume

  volume = open_volume(path)
  if volume.ndim == 3 and volume.dtype.kind not in "ui":
    raise InputError(
      f"--input={path}: a [z, y, x] array of {volume.dtype}; expected affinities [C, z, y, x] "
      "or a segmentation [z, y, x] of integers"
    )
  return volume


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _FORMAT.value.lower() not in FORMATS:
    raise _usage(f"--format={_FORMAT.value}: only 'h5' (PyTC's HDF5 layout) is written")
  spatial = _spatial_order(_AXIS_ORDER.value)
  block = _block(_BLOCK.value)
  if _NAME.value is not None and (
    not _NAME.value.endswith(".h5") or os.path.basename(_NAME.value) != _NAME.value
  ):
    raise _usage(f"--name={_NAME.value}: expected a file name ending in .h5 (no folder)")
  cli.check_output_folder(_OUTPUT.value)
  arrays, volume_name = _arrays(_INPUT.value)
  if _NAME.value is not None and len(arrays) > 1:
    raise _usage(f"--name names one file, but --input={_INPUT.value} holds {len(arrays)} arrays")
  volumes = []
  for path in arrays:  # all checked before anything is written
    _check_finished(path)
    volume = _open_input(path)
    volumes.append((volume, _NAME.value or pytc_name(volume)))
  sub = volume_name if _VOLUME.value is None else _VOLUME.value
  if sub:
    # The volume's folder is claimed in --output's own manifest, so --output stays a folder
    # jaxseg made: a results folder of the user's (PyTC's, say) is refused, as by every command.
    claim = StageOutput(
      _OUTPUT.value,
      name=f"export-folder:{sub}",
      stage="export folder",
      fingerprint={},
      paths=[sub],
      what="--output folder",
    )
    claimed = claim.open() is not Decision.REUSE
  folder = os.path.join(_OUTPUT.value, sub)
  for volume, name in volumes:
    dest, reused = export_array(
      volume, folder, name, spatial, block, overwrite=_OVERWRITE.value,
      show_progress=_PROGRESS.value,
    )  # fmt: skip
    order = ", ".join(disk_order(volume, spatial))
    print(
      f"{dest}:{DATASET} ({order}) {volume.dtype} from {volume.path}"
      + (" (reused an identical export)" if reused else "")
    )
  if sub and claimed:
    claim.finish()  # now that the folder exists: a complete entry lists only what is there


def run() -> None:
  """Console-script entry point (``jaxseg-export``)."""
  cli.run_main("jaxseg.export", main)


if __name__ == "__main__":
  run()
