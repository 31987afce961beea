"""Dataset layouts: which image / label / skeleton files make up each split of a dataset.

``dataset_volumes(config.data, split)`` returns :class:`LabeledVolume` entries, each with a lazy
image (``[c, z, y, x]``, or ``[z, y, x]`` for single-channel formats), lazy labels ``[z, y, x]`` (or
None), a skeleton path (or None) and an optional z range. Layouts (``config.data.layout``):

* ``nisb``: ``root/{split}/seed{N}/data.zarr`` with ``img`` (x, y, z, c) and ``seg`` (x, y, z),
  plus ``skeleton.pkl``; the seeds come from ``data.{split}_seeds``. This is also the layout of
  the generated demo data (``python -m jaxseg.synth``).
* ``snemi``: ``root/train-input.tif`` + ``train-labels.tif`` and ``root/test-input.tif`` +
  ``test-labels.h5``. ``data.val_sections > 0`` holds out the last sections of the training
  volume as the ``val`` split (and removes them from ``train``).
* ``cremi``: ``data.{split}_files``: HDF5 files holding ``volumes/raw`` and
  ``volumes/labels/neuron_ids``.
* ``volumes``: a lab's own files, any format :func:`jaxseg.io.open_volume` reads. Each split is a
  list of entries in ``data.volumes.{split}`` and / or a JSON or YAML file ``data.volumes_file``
  (``{"train": [...], "val": [...], "test": [...]}``); an entry is a mapping with ``image`` and
  optionally ``labels``, ``skeleton`` (``skeleton.pkl`` or em_erl ``.npz``), ``mask`` (uint8 or bool
  ``[z, y, x]``, 1 = labelled region: voxels outside are ignored by training and scoring),
  ``boundaries`` (another tool's ``[z, y, x]`` boundary map, scored as a reference), ``name``, ``axis_order``, ``resolution`` and ``z_range`` (``(z0, z1)``: only those sections, so
  one file can give both a training and a validation entry). Relative paths resolve against ``data.root``; an
  entry's ``axis_order`` / ``resolution`` default to ``data.axis_order`` / ``data.resolution``,
  then to the file's own attributes (``docs/own_data.md``).

Every entry is validated when opened: image and labels must share a spatial shape, images must
be uint8 / uint16 / float, labels integer; errors name the files and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from jaxseg.common.errors import ConfigError
from jaxseg.io.errors import VolumeError
from jaxseg.io.volume import Volume, open_volume

SPLITS = ("train", "val", "test")
LAYOUTS = ("nisb", "snemi", "cremi", "volumes")
IMAGE_DTYPES = tuple(np.dtype(t) for t in ("uint8", "uint16", "float16", "float32", "float64"))
CREMI_RAW = "volumes/raw"
CREMI_LABELS = "volumes/labels/neuron_ids"


@dataclasses.dataclass
class LabeledVolume:
  """One volume of a split.

  Attributes:
    name: a short name for logs and output folders (``seed101``, ``train-input``).
    image: lazy image volume, canonical ``[c, z, y, x]`` or ``[z, y, x]``.
    labels: lazy label volume ``[z, y, x]`` or None (unlabeled test data).
    skeleton: path of a ``skeleton.pkl`` (or em_erl ``.npz``) or None.
    mask: lazy uint8 / bool ``[z, y, x]`` volume, 1 where the labels hold (voxels outside are
      ignored by training and scoring), or None.
    z_range: ``(z0, z1)`` of the usable sections, or None for all of them.
    boundaries: lazy ``[z, y, x]`` boundary probability map of the image made by another tool
      (float in [0, 1] or uint8, 1 = membrane), scored as a reference row, or None.
  """

  name: str
  image: Volume
  labels: Volume | None = None
  skeleton: str | None = None
  z_range: tuple[int, int] | None = None
  mask: Volume | None = None
  boundaries: Volume | None = None

  @property
  def spatial_shape(self) -> tuple[int, int, int]:
    z, y, x = self.image.shape[-3:]
    if self.z_range is not None:
      z = self.z_range[1] - self.z_range[0]
    return (z, y, x)

  def windowed(self) -> LabeledVolume:
    """The same volume with ``z_range`` applied: image and labels cut to the usable sections.

    Training reads around ``z_range`` for context; prediction and scoring of a held-out range
    (SNEMI3D's validation sections) see only the range itself.
    """
    if self.z_range is None:
      return self
    z0, z1 = self.z_range
    if self.skeleton is not None:
      # Skeleton positions are in the whole volume's voxels; scoring a window against them would
      # misplace every node by z0 sections.
      raise VolumeError(
        f"{self.name}: skeleton {self.skeleton} belongs to the whole volume; a z range "
        f"[{z0}, {z1}) of it cannot be scored against it"
      )
    return LabeledVolume(
      name=self.name,
      image=self.image.z_window(z0, z1),
      labels=self.labels.z_window(z0, z1) if self.labels is not None else None,
      skeleton=self.skeleton,
      mask=self.mask.z_window(z0, z1) if self.mask is not None else None,
      boundaries=self.boundaries.z_window(z0, z1) if self.boundaries is not None else None,
    )


def check_pair(image: Volume, labels: Volume | None, mask: Volume | None = None) -> None:
  """Checks that an image, its labels and its mask can be used together (shape, dtypes)."""
  if image.dtype not in IMAGE_DTYPES:
    raise VolumeError(
      f"{image.path}: image dtype {image.dtype} is not supported; expected uint8, uint16 or float"
    )
  _check_spatial_map(
    image, mask, "mask", ("uint8", "bool"), "a mask must be uint8 or bool (z, y, x), 1 = labelled"
  )
  if labels is None:
    return
  if labels.ndim != 3:
    raise VolumeError(f"{labels.path}: labels must be 3-D (z, y, x), found shape {labels.shape}")
  if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
    raise VolumeError(
      f"{labels.path}: labels must be an integer array of ids, found dtype {labels.dtype}"
    )
  if image.shape[-3:] != labels.shape:
    raise VolumeError(
      f"image {image.path} has spatial shape {image.shape[-3:]} (z, y, x) but labels "
      f"{labels.path} have {labels.shape}; check the axis order of both"
    )


def dataset_volumes(data_config, split: str) -> list[LabeledVolume]:
  """Opens (lazily) every volume of ``split`` for the layout in ``data_config``."""
  if split not in SPLITS:
    raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
  layout = data_config.layout
  if layout == "nisb":
    volumes = _nisb(data_config, split)
  elif layout == "snemi":
    volumes = _snemi(data_config, split)
  elif layout == "cremi":
    volumes = _cremi(data_config, split)
  elif layout == "volumes":
    return own_volumes(data_config, split)
  else:
    raise ConfigError(f"config.data.layout: unknown layout {layout!r}; expected one of {LAYOUTS}")
  for v in volumes:
    check_pair(v.image, v.labels)
  return volumes


def nisb_cube(directory: str, resolution=None) -> LabeledVolume:
  """Opens one NISB cube folder (``.../seedN`` with ``data.zarr`` and ``skeleton.pkl``)."""
  zarr_path = os.path.join(directory, "data.zarr")
  if not os.path.isdir(zarr_path):
    raise VolumeError(f"{directory}: no data.zarr (expected a NISB cube folder)")
  image = open_volume(
    os.path.join(zarr_path, "img"),
    resolution=resolution,
    default_axis_order="xyzc",
  )
  if image.ndim == 3:
    raise VolumeError(f"{image.path}: NISB img must be (x, y, z, c), found shape {image.shape}")
  labels_path = os.path.join(zarr_path, "seg")
  labels = (
    open_volume(labels_path, resolution=resolution, default_axis_order="xyz")
    if os.path.exists(labels_path)
    else None
  )
  skeleton = os.path.join(directory, "skeleton.pkl")
  return LabeledVolume(
    name=os.path.basename(os.path.normpath(directory)),
    image=image,
    labels=labels,
    skeleton=skeleton if os.path.exists(skeleton) else None,
  )


def _nisb(data_config, split: str) -> list[LabeledVolume]:
  seeds = tuple(data_config.get(f"{split}_seeds", ()))
  resolution = tuple(data_config.resolution)
  return [
    nisb_cube(os.path.join(data_config.root, split, f"seed{seed}"), resolution) for seed in seeds
  ]


def _snemi(data_config, split: str) -> list[LabeledVolume]:
  root, res = data_config.root, tuple(data_config.resolution)
  order = data_config.get("axis_order", "zyx")
  which = "test" if split == "test" else "train"
  image = open_volume(
    os.path.join(root, data_config[f"{which}_image"]), axis_order=order, resolution=res
  )
  labels_name = data_config.get(f"{which}_labels", "")
  labels = (
    open_volume(os.path.join(root, labels_name), axis_order=order, resolution=res)
    if labels_name
    else None
  )
  name = os.path.splitext(os.path.basename(data_config[f"{which}_image"]))[0]
  if which == "test":
    return [LabeledVolume(name, image, labels)]
  holdout = int(data_config.get("val_sections", 0))
  depth = image.shape[-3]
  if holdout >= depth:
    raise VolumeError(
      f"{image.path}: val_sections={holdout} leaves no training sections out of {depth}"
    )
  if split == "val":
    return (
      [LabeledVolume(f"{name}-val", image, labels, z_range=(depth - holdout, depth))]
      if holdout
      else []
    )
  return [LabeledVolume(name, image, labels, z_range=(0, depth - holdout) if holdout else None)]


def _cremi(data_config, split: str) -> list[LabeledVolume]:
  res = tuple(data_config.resolution)
  out = []
  for file in data_config.get(f"{split}_files", ()):
    path = os.path.join(data_config.root, file)
    image = open_volume(path, dataset=CREMI_RAW, resolution=res)
    try:
      labels = open_volume(path, dataset=CREMI_LABELS, resolution=res)
    except VolumeError:
      labels = None  # CREMI test samples ship without labels
    out.append(LabeledVolume(os.path.splitext(os.path.basename(file))[0], image, labels))
  return out


# -- a lab's own volumes ---------------------------------------------------------------------------

ENTRY_KEYS = (
  "image",
  "labels",
  "skeleton",
  "mask",
  "boundaries",
  "name",
  "axis_order",
  "resolution",
  "z_range",
)
SKELETON_SUFFIXES = (".pkl", ".npz")


def volume_entries(data_config) -> dict[str, list[dict]]:
  """Every split's entries of the ``volumes`` layout, as plain dicts (not yet opened).

  ``data.volumes.{split}`` holds entries given in the config or on the command line;
  ``data.volumes_file`` a JSON or YAML file of ``{split: [entry, ...]}``. A split may come from one
  of the two, not both (which would win is not obvious).

  Raises:
    ConfigError: a malformed file, a split given twice, an entry that is not a mapping, an unknown
      key, or an entry without ``image``; the message names the entry.
  """
  given = data_config.get("volumes")
  entries = {split: list((given or {}).get(split, ()) or ()) for split in SPLITS}
  where = {split: f"config.data.volumes.{split}" for split in SPLITS}
  path = data_config.get("volumes_file") or ""
  if path:
    path = os.path.join(data_config.root or "", path)
    from_file = _read_entries_file(path)
    for split, listed in from_file.items():
      if entries[split]:
        raise ConfigError(
          f"split {split!r} is given both in config.data.volumes.{split} and in {path}; "
          "give each split in one place"
        )
      entries[split], where[split] = listed, f"{path}: {split}"
  out = {}
  for split in SPLITS:
    out[split] = []
    for i, entry in enumerate(entries[split]):
      here = f"{where[split]}[{i}]"
      if hasattr(entry, "to_dict"):
        entry = entry.to_dict()
      if not isinstance(entry, dict):
        raise ConfigError(
          f"{here}: an entry is a mapping like {{'image': 'a.h5:raw'}}, not {entry!r}"
        )
      unknown = sorted(set(entry) - set(ENTRY_KEYS))
      if unknown:
        raise ConfigError(f"{here}: unknown key(s) {unknown}; an entry may have {list(ENTRY_KEYS)}")
      if not entry.get("image"):
        raise ConfigError(f"{here}: has no 'image' (the image volume's path or spec)")
      out[split].append({**entry, "_where": here})
  return out


def _read_entries_file(path: str) -> dict[str, list]:
  if not os.path.isfile(path):
    raise ConfigError(f"config.data.volumes_file: {path} does not exist")
  with open(path) as f:
    text = f.read()
  if path.endswith((".yaml", ".yml")):
    import yaml  # only YAML volume lists need it

    try:
      content = yaml.safe_load(text)
    except yaml.YAMLError as e:
      raise ConfigError(f"config.data.volumes_file: {path} is not valid YAML: {e}") from None
  else:
    try:
      content = json.loads(text)
    except json.JSONDecodeError as e:
      raise ConfigError(f"config.data.volumes_file: {path} is not valid JSON: {e}") from None
  if not isinstance(content, dict) or not set(content) <= set(SPLITS):
    raise ConfigError(
      f"config.data.volumes_file: {path} must map splits {list(SPLITS)} to lists of entries"
    )
  for split, listed in content.items():
    if not isinstance(listed, list):
      raise ConfigError(f"{path}: {split} must be a list of entries, not {type(listed).__name__}")
  return content


def own_volumes(data_config, split: str) -> list[LabeledVolume]:
  """Opens (lazily) and checks every entry of ``split`` in the ``volumes`` layout."""
  volumes = [_open_entry(data_config, e) for e in volume_entries(data_config)[split]]
  names = [v.name for v in volumes]
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    raise ConfigError(
      f"config.data.volumes.{split}: names {twice} are used more than once; give the entries "
      "distinct 'name's (outputs are named after them)"
    )
  return volumes


def _resolve(root: str, spec: str) -> str:
  if "://" in spec or os.path.isabs(spec):
    return spec
  return os.path.join(root or "", spec)


def _check_spatial_map(
  image: Volume, volume: Volume | None, role: str, dtypes, expected: str
) -> None:
  """Checks that a per-voxel map (mask, boundary map) is 3-D, of ``dtypes``, and shaped like the
  image's spatial axes."""
  if volume is None:
    return
  if volume.ndim != 3 or volume.dtype not in tuple(np.dtype(t) for t in dtypes):
    raise VolumeError(f"{volume.path}: {expected}; found {volume.dtype} of shape {volume.shape}")
  if volume.shape != image.shape[-3:]:
    raise VolumeError(
      f"{role} {volume.path} has shape {volume.shape} (z, y, x) but image {image.path} has "
      f"{image.shape[-3:]}; check the axis order of both"
    )


def check_boundaries(image: Volume, boundaries: Volume | None) -> None:
  """Checks that a boundary map is a ``[z, y, x]`` float or uint8 map of the image's shape."""
  _check_spatial_map(
    image,
    boundaries,
    "boundaries",
    ("uint8", "float16", "float32", "float64"),
    "a boundary map must be float (0..1) or uint8 (z, y, x)",
  )


def _open_entry(data_config, entry: dict) -> LabeledVolume:
  where = entry["_where"]
  root = data_config.root or ""
  order = entry.get("axis_order") or data_config.get("axis_order") or None
  resolution = entry.get("resolution") or data_config.get("resolution") or None
  if resolution is not None:
    resolution = tuple(float(r) for r in resolution)
    if len(resolution) != 3 or min(resolution) <= 0:
      raise ConfigError(
        f"{where}: resolution must be three positive nm (z, y, x), got {resolution}"
      )

  def open_one(key: str, spatial: bool) -> Volume | None:
    spec = entry.get(key)
    if not spec:
      return None
    path = _resolve(root, str(spec))
    wanted = order.replace("c", "") if (order and spatial) else order
    try:
      volume = open_volume(path, resolution=resolution)
      own = volume.attrs.get("axis_order")
      if wanted and own and str(own) != wanted:
        raise VolumeError(
          f"axis_order={wanted!r} contradicts the file's own axis_order attribute {own!r}"
        )
      if wanted:
        volume = open_volume(path, axis_order=wanted, resolution=resolution)
    except VolumeError as e:
      raise VolumeError(f"{where} {key}: {e}") from None
    return volume

  image = open_one("image", spatial=False)
  labels = open_one("labels", spatial=True)
  mask = open_one("mask", spatial=True)
  boundaries = open_one("boundaries", spatial=True)
  try:
    check_pair(image, labels, mask)
    check_boundaries(image, boundaries)
  except VolumeError as e:
    raise VolumeError(f"{where}: {e}") from None
  skeleton = entry.get("skeleton") or None
  if skeleton:
    skeleton = _resolve(root, str(skeleton))
    if not os.path.isfile(skeleton):
      raise VolumeError(f"{where}: skeleton {skeleton} does not exist")
    if not skeleton.endswith(SKELETON_SUFFIXES):
      raise VolumeError(
        f"{where}: skeleton {skeleton} must be a NISB skeleton.pkl or an em_erl .npz"
      )
  name = entry.get("name") or _default_name(str(entry["image"]))
  z_range = entry.get("z_range") or None
  if z_range is not None:
    depth = image.shape[-3]
    if len(z_range) != 2 or not 0 <= int(z_range[0]) < int(z_range[1]) <= depth:
      raise ConfigError(
        f"{where}: z_range must be (z0, z1) with 0 <= z0 < z1 <= {depth}, got {z_range}"
      )
    z_range = (int(z_range[0]), int(z_range[1]))
    if skeleton:
      raise ConfigError(
        f"{where}: a skeleton belongs to the whole volume; give z_range only to entries without "
        "one (jaxseg makes a skeleton of the range's labels when NERL needs it)"
      )
  return LabeledVolume(
    str(name), image, labels, skeleton, z_range=z_range, mask=mask, boundaries=boundaries
  )


def _default_name(spec: str) -> str:
  """``a/b/train-image.h5:stack`` -> ``train-image``; ``x.zarr/img`` -> ``x``."""
  path = spec.split("://")[-1]
  if ":" in os.path.basename(path):
    path = path.rsplit(":", 1)[0]
  parts = [p for p in path.replace("\\", "/").split("/") if p]
  for part in parts:
    if part.endswith((".zarr", ".n5", ".h5", ".hdf5", ".hdf")):
      return os.path.splitext(part)[0]
  return os.path.splitext(parts[-1])[0] if parts else "volume"
