"""Training augmentations of one sample: PyTC's ``aug_em_neuron`` (SNEMI) and ``aug_banis`` (NISB).

This module owns the recipes: every random transform applied to a training crop before label
erosion and affinity targets (``docs/recipes.md``, the two "Augmentation" sections), composed by
``make_augment(aug_config, shape)`` in the recipe order with the probabilities of the config; the
data pipeline vmaps the result over the batch with split keys. The transforms themselves, and the
one-sample contract they share (``image`` ``[z, y, x, c]`` float32, ``labels`` ``[z, y, x]``
int32, ``fn(key, image, labels, *, params) -> (image, labels)``), are in
``jaxseg.data.augment_ops`` and ``jaxseg.data.augment_sections``.

Both recipes take two optional steps of jaxseg's own, off in the shipped configs, in this order
right after the recipe's geometric steps (``aug_banis``: after the affine; ``aug_em_neuron``: after
the elastic) and before its intensity and noise steps:

- an elastic deformation from random displacements at control points (``data.aug.warp_p``,
  ``warp_spacing``, ``warp_sigma``; :func:`grid_warp`);
- the contrast and gamma of another microscope (``data.aug.contrast_gamma_p``, ``contrast_range``,
  ``gamma_range``; :func:`contrast_gamma`).

While a step's probability is 0 (or its keys are absent) the step is left out entirely, so the
recipe's random numbers and outputs are those it had without it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax

from jaxseg.common.errors import ConfigError
from jaxseg.data.augment_ops import (
  AxisMap,
  Impl,
  Shape3,
  _affine,
  _check_sample,
  _compose,
  _contrast_gamma,
  _elastic,
  _flip_map,
  _gamma_contrast,
  _gaussian_noise,
  _grid_warp,
  _identity_map,
  _intensity_scale_shift,
  _intensity_shift,
  _permute_map,
  _rot90_map,
  _Uniforms,
  _with_key,
  affine,
  affine_coords,
  affine_matrix,
  allowed_permutations,
  allowed_rot90,
  apply_axis_map,
  contrast_gamma,
  elastic,
  flip,
  gamma_contrast,
  gaussian_filter_zero_padded,
  gaussian_noise,
  grid_warp,
  grid_warp_weights,
  intensity_scale_shift,
  intensity_shift,
  permute_axes,
  rot90,
  warp,
)
from jaxseg.data.augment_sections import (
  DEFECTS,
  _random_defect,
  _slice_drop,
  _slice_shift,
  blur_sections,
  lost_section,
  misalignment,
  missing_parts,
  missing_sections,
  random_defect,
  slice_drop,
  slice_shift,
)

__all__ = [
  "AUGMENTATIONS",
  "DEFECTS",
  "affine",
  "affine_coords",
  "affine_matrix",
  "allowed_permutations",
  "allowed_rot90",
  "apply_axis_map",
  "blur_sections",
  "contrast_gamma",
  "elastic",
  "flip",
  "gamma_contrast",
  "gaussian_filter_zero_padded",
  "gaussian_noise",
  "grid_warp",
  "grid_warp_weights",
  "intensity_scale_shift",
  "intensity_shift",
  "lost_section",
  "make_augment",
  "misalignment",
  "missing_parts",
  "missing_sections",
  "permute_axes",
  "random_defect",
  "rot90",
  "slice_drop",
  "slice_shift",
  "warp",
]

AUGMENTATIONS = ("aug_em_neuron", "aug_banis", "none")

Augmentation = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


# -- recipes ---------------------------------------------------------------------------------------


def _index_step(draws: Sequence[Callable[[_Uniforms], AxisMap]]) -> Impl:
  """One step applying the composition of several random axis maps in one gather."""

  def step(u, image, labels):
    axis_map = _identity_map()
    for draw in draws:
      axis_map = _compose(axis_map, draw(u))
    return apply_axis_map(image, labels, axis_map)

  return step


def _range(aug: Any, key: str) -> tuple[float, float]:
  value = getattr(aug, key, None)
  try:
    low, high = (float(v) for v in value)
    ok = math.isfinite(low) and math.isfinite(high) and 0.0 < low <= high
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ConfigError(f"data.aug.{key} must be two numbers 0 < low <= high, got {value!r}")
  return low, high


def _optional_probability(aug: Any, key: str) -> float:
  """``data.aug.<key>`` of an optional step as a probability (0 when absent)."""
  p = getattr(aug, key, 0.0)
  try:
    ok = 0.0 <= float(p) <= 1.0
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ConfigError(f"data.aug.{key} must be a probability in [0, 1], got {p!r}")
  return float(p)


def _contrast_gamma_steps(aug: Any) -> list[Impl]:
  """The contrast and gamma of another microscope (``data.aug.contrast_gamma_p``,
  ``contrast_range``, ``gamma_range``): no step at all when the probability is 0 or absent, so
  a recipe with it off draws exactly the random numbers, and makes the bytes, it did without it.
  """
  p = _optional_probability(aug, "contrast_gamma_p")
  # Declared ranges are checked even while off; both are needed when on.
  ranges = {
    key: _range(aug, key)
    for key in ("contrast_range", "gamma_range")
    if p > 0.0 or getattr(aug, key, None) is not None
  }
  if p == 0.0:
    return []
  return [
    functools.partial(
      _contrast_gamma, p=p, contrast=ranges["contrast_range"], gamma=ranges["gamma_range"]
    )
  ]


def _triple(aug: Any, key: str, low: float) -> tuple[float, float, float]:
  value = getattr(aug, key, None)
  try:
    numbers = tuple(float(v) for v in value)
    ok = len(numbers) == 3 and all(math.isfinite(v) and v >= low for v in numbers)
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ConfigError(f"data.aug.{key} must be three numbers >= {low:g} (z, y, x), got {value!r}")
  return numbers


def _grid_warp_steps(aug: Any) -> list[Impl]:
  """The control-grid elastic deformation (``data.aug.warp_p``, ``warp_spacing`` in voxels >= 1,
  ``warp_sigma`` in voxels >= 0): no step at all when the probability is 0 or absent, so a recipe
  with it off draws exactly the random numbers, and makes the bytes, it did without it.
  """
  p = _optional_probability(aug, "warp_p")
  # Declared values are checked even while off; both are needed when on.
  values = {
    key: _triple(aug, key, low)
    for key, low in (("warp_spacing", 1.0), ("warp_sigma", 0.0))
    if p > 0.0 or getattr(aug, key, None) is not None
  }
  if p == 0.0:
    return []
  return [
    functools.partial(_grid_warp, p=p, spacing=values["warp_spacing"], sigma=values["warp_sigma"])
  ]


def _em_neuron_steps(aug: Any, shape: Shape3) -> list[Impl]:
  """``aug_em_neuron`` in recipe order (``docs/recipes.md``, SNEMI3D augmentation)."""
  return [
    _index_step(
      [
        lambda u: _flip_map(u, float(aug.flip_p)),
        lambda u: _rot90_map(u, shape, (1, 2), float(aug.rot90_yx_p), (1, 2, 3)),
      ]
    ),
    functools.partial(
      _elastic,
      p=float(aug.elastic_p),
      sigma=tuple(aug.elastic_sigma),
      magnitude=tuple(aug.elastic_magnitude),
    ),
    *_grid_warp_steps(aug),
    *_contrast_gamma_steps(aug),
    functools.partial(_gaussian_noise, p=float(aug.noise_p), std=tuple(aug.noise_std)),
    functools.partial(
      _intensity_shift, p=float(aug.intensity_shift_p), shift=float(aug.intensity_shift)
    ),
    functools.partial(_gamma_contrast, p=float(aug.gamma_p), gamma=tuple(aug.gamma)),
    functools.partial(_random_defect, defects=aug.defects),
  ]


def _banis_steps(aug: Any, shape: Shape3) -> list[Impl]:
  """``aug_banis`` in recipe order (``docs/recipes.md``, NISB augmentation)."""
  draws = [lambda u: _permute_map(u, shape, float(aug.permute_axes_p))]
  if aug.rot90_all_planes:
    # BANIS turns in its (z, y), (z, x), (y, x) planes in that order: our axes (0, 1), (0, 2),
    # (1, 2). k is uniform in 0..3, so the turning direction does not matter.
    for plane in ((0, 1), (0, 2), (1, 2)):
      draws.append(functools.partial(_rot90_map, shape=shape, axes=plane, p=1.0, ks=range(4)))
  draws.append(lambda u: _flip_map(u, float(aug.flip_p)))
  return [
    _index_step(draws),
    functools.partial(_slice_drop, p=float(aug.slice_drop_p), rate=float(aug.slice_drop_rate)),
    functools.partial(
      _slice_shift,
      p=float(aug.slice_shift_p),
      rate=float(aug.slice_shift_rate),
      max_shift=int(aug.slice_shift_max),
    ),
    functools.partial(
      _affine,
      p=float(aug.affine_p),
      rotation=float(aug.affine_rotation),
      scale=float(aug.affine_scale),
      shear=float(aug.affine_shear),
    ),
    *_grid_warp_steps(aug),
    *_contrast_gamma_steps(aug),
    functools.partial(
      _intensity_scale_shift,
      p=float(aug.intensity_p),
      mul=tuple(aug.intensity_mul),
      add=tuple(aug.intensity_add),
    ),
    functools.partial(_gaussian_noise, p=float(aug.noise_p), std=tuple(aug.noise_std)),
  ]


def make_augment(aug_config: Any, shape: Sequence[int]) -> Augmentation:
  """Builds ``augment(key, image, labels) -> (image, labels)`` for one sample of ``shape``.

  Args:
    aug_config: ``data.aug`` (``configs/snemi.py`` ``_aug_em_neuron``, ``configs/nisb_base.py``
      ``_aug_banis``); ``name`` is one of ``AUGMENTATIONS``. Values are read once, here.
    shape: the spatial ``(z, y, x)`` shape of the crops (it decides which permutations and odd
      rot90 turns keep the shape).

  Returns:
    A pure function of a PRNG key, ``image [z, y, x, c]`` and ``labels [z, y, x]`` of ``shape``;
    jit and vmap it (the pipeline vmaps over the batch with split keys). ``'none'`` returns its
    inputs.

  Raises:
    ValueError: for an unknown ``name`` or a ``shape`` that is not 3 sizes; the returned function
      raises at trace time for inputs of another shape.
  """
  shape = tuple(int(n) for n in shape)
  if len(shape) != 3:
    raise ValueError(f"shape must be (z, y, x), got {shape}")
  name = aug_config.name
  if name == "none":
    steps = []
  elif name == "aug_em_neuron":
    steps = _em_neuron_steps(aug_config, shape)
  elif name == "aug_banis":
    steps = _banis_steps(aug_config, shape)
  else:
    raise ValueError(f"unknown augmentation {name!r}; known: {AUGMENTATIONS}")

  def recipe(u, image, labels):
    for step in steps:
      image, labels = step(u, image, labels)
    return image, labels

  def augment(key, image, labels):
    _check_sample(image, labels)
    if tuple(labels.shape) != shape:
      raise ValueError(f"augment was built for shape {shape}, got {tuple(labels.shape)}")
    if not steps:
      return image, labels
    return _with_key(recipe, key, image, labels)  # one threefry call for the whole recipe

  return augment
