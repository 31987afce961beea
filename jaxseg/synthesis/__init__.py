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

from jaxseg.common.lazy import lazy_exports

# Loaded on first use: the demo recipe imports ``jaxseg.synthesis.config`` for its defaults, and a
# config load must not wait for the renderer and the volume I/O stack.
_EXPORTS = {
  "PRESETS": "config",
  "SynthParams": "config",
  "default_config": "config",
  "resolve_config": "config",
  "cube_stats": "cube",
  "format_summary": "cube",
  "generate_cube": "cube",
  "generate_dataset": "cube",
  "is_complete": "cube",
  "write_cube": "cube",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
