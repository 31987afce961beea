"""Sliding-window inference: volumes ``[c,] z, y, x`` in, affinity zarrs ``[C, z, y, x]`` out.

- ``jaxseg.inference.settings``: ``config.infer`` checked and resolved (no jax).
- ``jaxseg.inference.geometry``: window grids, padding, blending weights and the block plan that
  streams a volume in chunk-aligned blocks with bounded memory (numpy only, no jax).
- ``jaxseg.inference.tta``: test-time views (flips, yx rotations, axis permutations) with the
  affinity-correct inverse (channel moves and re-anchoring shifts) and running ensembles.
- ``jaxseg.inference.engine``: the device side: windows cut from a hull, predicted through every
  view, blended into an accumulator, one compiled step per geometry, sharded over local devices.
- ``jaxseg.inference.layout``: the names of what predict writes (no jax).
- ``jaxseg.inference.predict_lib``: batch predict: inputs, output zarrs, prefetch / write threads,
  resume, multi-host split, previews (``python -m jaxseg.predict``).
- ``jaxseg.inference.cache``: a split's affinities predicted once per checkpoint and input, in keyed
  folders under ``DIR/predictions``, QC'd when ``config.qc.enabled`` (used by the chain's test
  stage and the tuner; imports JAX only when a prediction is missing).

This package imports nothing itself; import the submodules.
"""
