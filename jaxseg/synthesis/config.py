"""Configuration of the NISB-style cube generator: every knob, difficulty presets, resolution.

Owns :func:`default_config` (the ``ml_collections.ConfigDict`` that recipes embed as
``config.data.synth``), the difficulty presets and :func:`resolve_config`, which turns a config into
a plain :class:`SynthParams` with every knob concrete.

Conventions: shapes are voxels in canonical ``(z, y, x)`` order; ``resolution`` is nm per voxel
``(z, y, x)``; lengths and radii are in nm (neurites are tubes in physical space, so in voxels they
are squashed along the coarser z axis).

Knobs that a difficulty preset sets default to ``None`` ("take it from the preset"), so
``--config.data.synth.difficulty=touching_thin`` changes all of them at once while an explicit
override of a single knob (``--config.data.synth.noise_std=0.1``) still wins.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import ml_collections

from jaxseg.common.config_util import triple
from jaxseg.common.errors import ConfigError

# Values every preset shares; a preset below overrides some of them.
_COMMON: dict[str, Any] = {
  # Geometry.
  "fill_fraction": 0.65,  # target share of the cube covered by grown tubes (before expansion)
  "radius_thick_nm": (60.0, 135.0),  # base radius range (log-uniform) of thick processes
  "radius_thin_nm": (27.0, 50.0),  # base radius range of thin processes (axons)
  "thin_fraction": 0.5,  # probability that a new neurite is thin
  "radius_variation": 0.2,  # std of log(radius) along a path (varicosities, tapering)
  "branch_rate_per_um": 0.25,  # expected branch points per um of path
  "expand_nm": 30.0,  # how far tubes grow into free space to pack like neuropil
  "touch_probability": 0.4,  # share of neighbour pairs that touch (share a face in ``seg``)
  "gap_nm": 18.0,  # width of the extracellular gap carved between non-touching neighbours
  # Image.
  "membrane_intensity": 0.12,  # membrane grey value (0 = black, 1 = white)
  "cytoplasm_intensity": 0.68,  # mean intracellular grey value
  "extracellular_intensity": 0.42,  # extracellular space grey value
  "cell_intensity_std": 0.06,  # per-neuron brightness spread
  "texture_std": 0.06,  # smooth intracellular texture amplitude
  "vesicle_density": 0.004,  # dark dots per intracellular voxel (max, per-neuron random)
  "organelle_fraction": 0.03,  # share of an organelle-bearing neuron's interior in dark blobs
  "blur_sigma_nm": (12.0, 6.0, 6.0),  # anisotropic PSF, (z, y, x) nm
  "noise_std": 0.06,  # additive Gaussian noise (intensity units)
  # Slice defects (per z slice, image only: ``seg`` stays correct).
  "missing_slice_prob": 0.0,
  "shifted_slice_prob": 0.0,
}

PRESETS: dict[str, dict[str, Any]] = {
  # Thick, well separated processes, crisp membranes: the sanity-check setting.
  "easy": {
    "radius_thick_nm": (80.0, 150.0),
    "radius_thin_nm": (45.0, 70.0),
    "thin_fraction": 0.3,
    "touch_probability": 0.0,
    "gap_nm": 27.0,
    "membrane_intensity": 0.05,
    "noise_std": 0.03,
    "organelle_fraction": 0.0,
    "fill_fraction": 0.5,
    "expand_nm": 40.0,
  },
  # Mixed thick / thin, occasional touching, moderate noise (like NISB ``base``).
  "base": {},
  # Thin processes that mostly touch, fainter membranes, more noise (like NISB touching_thin).
  "touching_thin": {
    "radius_thick_nm": (40.0, 80.0),
    "radius_thin_nm": (22.0, 36.0),
    "thin_fraction": 0.75,
    "touch_probability": 0.9,
    "expand_nm": 54.0,
    "membrane_intensity": 0.25,
    "noise_std": 0.08,
    "blur_sigma_nm": (16.0, 8.0, 8.0),
  },
  # base plus dropped and shifted slices (like NISB ``slice_perturbed``).
  "slice_perturbed": {
    "missing_slice_prob": 0.03,
    "shifted_slice_prob": 0.03,
  },
}

_TUPLE_KNOBS = ("radius_thick_nm", "radius_thin_nm", "blur_sigma_nm")


def default_config(difficulty: str = "base") -> ml_collections.ConfigDict:
  """The generator config; preset-controlled knobs are ``None`` (resolved from ``difficulty``).

  Args:
    difficulty: preset name, one of :data:`PRESETS` (``easy``, ``base``, ``touching_thin``,
      ``slice_perturbed``).

  Returns:
    An unlocked ``ConfigDict``; recipes override ``shape`` and the seeds.
  """
  if difficulty not in PRESETS:
    raise ConfigError(f"data.synth.difficulty={difficulty!r} unknown; known: {sorted(PRESETS)}")
  c = ml_collections.ConfigDict()
  c.shape = (128, 128, 128)  # voxels (z, y, x)
  c.resolution = (20.0, 9.0, 9.0)  # nm (z, y, x), NISB base voxel size
  c.train_seeds = (0, 1)
  c.val_seeds = (100,)
  c.test_seeds = (101,)
  c.difficulty = difficulty
  # Preset-controlled knobs: None = take the preset's value.
  for name, value in _COMMON.items():
    kind = tuple if isinstance(value, tuple) else float
    c[name] = ml_collections.FieldReference(None, field_type=kind)
  # Fixed knobs (no preset changes them).
  c.max_neurites = 0  # cap on the number of neurites; 0 = until fill_fraction is reached
  c.persistence_nm = 1200.0  # direction persistence of the random walks (larger = straighter)
  c.node_spacing_nm = 36.0  # step between skeleton nodes (>= sqrt(3) * max(resolution) ideally)
  c.min_length_nm = 300.0  # shorter neurites (blocked right after seeding) are discarded
  c.shifted_slice_max_voxels = 8  # max in-plane shift of a shifted slice
  c.chunks = (64, 64, 64)  # on-disk chunk shape (z, y, x), clipped to the cube shape
  c.preview = True  # write preview.png beside each cube
  return c


@dataclasses.dataclass(frozen=True)
class SynthParams:
  """Every knob of one generator run, concrete (see :func:`default_config` for meanings)."""

  shape: tuple[int, int, int]
  resolution: tuple[float, float, float]
  difficulty: str
  fill_fraction: float
  radius_thick_nm: tuple[float, float]
  radius_thin_nm: tuple[float, float]
  thin_fraction: float
  radius_variation: float
  branch_rate_per_um: float
  expand_nm: float
  touch_probability: float
  gap_nm: float
  membrane_intensity: float
  cytoplasm_intensity: float
  extracellular_intensity: float
  cell_intensity_std: float
  texture_std: float
  vesicle_density: float
  organelle_fraction: float
  blur_sigma_nm: tuple[float, float, float]
  noise_std: float
  missing_slice_prob: float
  shifted_slice_prob: float
  max_neurites: int
  persistence_nm: float
  node_spacing_nm: float
  min_length_nm: float
  shifted_slice_max_voxels: int
  chunks: tuple[int, int, int]

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(self)))

  def fingerprint(self) -> str:
    """Short hash of every knob that changes the generated data (for resume checks)."""
    data = self.to_dict()
    data.pop("chunks")  # storage layout only, the data are the same
    blob = json.dumps(data, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _numbers(value, name: str, kind=float) -> tuple:
  """``value`` as a tuple of ``kind``, or a ConfigError naming ``data.synth.<name>``."""
  try:
    return tuple(kind(v) for v in value)
  except (TypeError, ValueError):
    what = "integers" if kind is int else "numbers"
    raise ConfigError(f"data.synth.{name} must be a tuple of {what}, got {value!r}") from None


def _number(value, name: str, kind=float):
  try:
    return kind(value)
  except (TypeError, ValueError):
    what = "an integer" if kind is int else "a number"
    raise ConfigError(f"data.synth.{name} must be {what}, got {value!r}") from None


def resolve_config(config: ml_collections.ConfigDict | SynthParams) -> SynthParams:
  """Fills preset-controlled knobs from ``config.difficulty`` and validates everything.

  Args:
    config: a ConfigDict from :func:`default_config` (possibly overridden), or already-resolved
      params (returned unchanged).

  Returns:
    The concrete parameters.

  Raises:
    ConfigError: unknown difficulty or an out-of-range knob; the message names the key
      (``data.synth.<name>``). Also a ``ValueError``.
  """
  if isinstance(config, SynthParams):
    return config
  difficulty = str(config.difficulty)
  if difficulty not in PRESETS:
    raise ConfigError(f"data.synth.difficulty={difficulty!r} unknown; known: {sorted(PRESETS)}")
  values = dict(_COMMON, **PRESETS[difficulty])
  for name in _COMMON:
    if config.get(name) is not None:
      values[name] = config[name]
  for name in _TUPLE_KNOBS:
    values[name] = _numbers(values[name], name)
  for name in set(_COMMON) - set(_TUPLE_KNOBS):
    values[name] = _number(values[name], name)
  params = SynthParams(
    shape=triple(config.shape, "data.synth.shape", 8),
    resolution=_numbers(config.resolution, "resolution"),
    difficulty=difficulty,
    max_neurites=_number(config.max_neurites, "max_neurites", int),
    persistence_nm=_number(config.persistence_nm, "persistence_nm"),
    node_spacing_nm=_number(config.node_spacing_nm, "node_spacing_nm"),
    min_length_nm=_number(config.min_length_nm, "min_length_nm"),
    shifted_slice_max_voxels=_number(
      config.shifted_slice_max_voxels, "shifted_slice_max_voxels", int
    ),
    chunks=triple(config.chunks, "data.synth.chunks", 1),
    **values,
  )
  _validate(params)
  return params


def _validate(p: SynthParams) -> None:
  def need(ok: bool, name: str, expected: str):
    if not ok:
      raise ConfigError(f"data.synth.{name} must be {expected}, got {getattr(p, name)}")

  need(
    len(p.resolution) == 3 and min(p.resolution) > 0,
    "resolution",
    "three positive numbers (z, y, x)",
  )
  need(0.0 < p.fill_fraction <= 0.9, "fill_fraction", "in (0, 0.9]")
  for name in ("radius_thick_nm", "radius_thin_nm"):
    lo_hi = getattr(p, name)
    need(len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1], name, "(min, max) with 0 < min <= max")
  need(len(p.blur_sigma_nm) == 3, "blur_sigma_nm", "three sigmas (z, y, x)")
  for name in ("thin_fraction", "touch_probability", "missing_slice_prob", "shifted_slice_prob"):
    need(0.0 <= getattr(p, name) <= 1.0, name, "in [0, 1]")
  need(p.node_spacing_nm > 0, "node_spacing_nm", "> 0")
  need(p.persistence_nm > 0, "persistence_nm", "> 0")
