"""Procedurally generated NISB-style cubes: EM-like image, dense neuron labels, exact skeletons.

The embedded default dataset: anyone can run jaxseg without a download. A cube is a pure function
of ``(config, seed)``:

- ``img`` uint8 [z, y, x]: dark membranes, textured cytoplasm, anisotropic blur, noise, optional
  slice defects;
- ``seg`` uint32 [z, y, x]: densely packed branching neurites of varying radius (0 = extracellular
  space), each id one 6-connected component;
- ``graph``: networkx skeletons, the generating paths, so NERL of ``seg`` against them is exactly 1.

Modules: ``config`` (knobs and difficulty presets), ``neurites`` (random-walk growth and tube
rasterisation), ``segmentation`` (packing, gaps, ids, skeleton graph), ``render`` (image),
``cube`` (cubes and datasets on disk in the NISB layout, with a ``jaxseg.io.preview`` PNG). Never
imports JAX.

Usage::

  config = default_config("base")
  config.shape = (64, 128, 128)
  img, seg, graph = generate_cube(config, seed=0)
  summary = generate_dataset(config, "/data/synth")   # {train,val,test}/seed{N}/...
"""

from jaxseg.synthesis.config import PRESETS, SynthParams, default_config, resolve_config
from jaxseg.synthesis.cube import (
  cube_stats,
  format_summary,
  generate_cube,
  generate_dataset,
  is_complete,
  write_cube,
)

__all__ = [
  "PRESETS",
  "SynthParams",
  "cube_stats",
  "default_config",
  "format_summary",
  "generate_cube",
  "generate_dataset",
  "is_complete",
  "resolve_config",
  "write_cube",
]
