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

Every entry is validated when opened: image and labels must share a spatial shape, images must
be uint8 / uint16 / float, labels integer; errors name the files and what was expected.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from jaxseg.common.errors import ConfigError
from jaxseg.io.errors import VolumeError
from jaxseg.io.volume import Volume, open_volume

SPLITS = ("train", "val", "test")
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
    skeleton: path of a ``skeleton.pkl`` or None.
    z_range: ``(z0, z1)`` of the usable sections, or None for all of them.
  """

  name: str
  image: Volume
  labels: Volume | None = None
  skeleton: str | None = None
  z_range: tuple[int, int] | None = None

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
    )


def check_pair(image: Volume, labels: Volume | None) -> None:
  """Checks that an image and its labels can be used together (shape, dtypes)."""
  if image.dtype not in IMAGE_DTYPES:
    raise VolumeError(
      f"{image.path}: image dtype {image.dtype} is not supported; expected uint8, uint16 or float"
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
  else:
    raise ConfigError(
      f"config.data.layout: unknown layout {layout!r}; expected 'nisb', 'snemi' or 'cremi'"
    )
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
