"""Sliding-window inference: volumes ``[c,] z, y, x`` in, affinity zarrs ``[C, z, y, x]`` out.

- ``jaxseg.inference.settings``: ``config.infer`` checked and resolved (no jax).
- ``jaxseg.inference.geometry``: window grids, padding, blending weights and the block plan that
  streams a volume in chunk-aligned blocks with bounded memory, each window owned by one block
  (numpy only, no jax).
- ``jaxseg.inference.schedule``: the tasks one process runs: its blocks in order, the partial
  sums carried between them, halos for carries not at hand (numpy only, no jax).
- ``jaxseg.inference.tta``: test-time views (flips, yx rotations, axis permutations) with the
  affinity-correct inverse (channel moves and re-anchoring shifts) and running ensembles.
- ``jaxseg.inference.engine``: the device side: windows cut from hulls and packed into full
  batches, predicted through every view, folded into rows, planes and blocks in a fixed order,
  one compiled set of steps per geometry, sharded over local devices.
- ``jaxseg.inference.layout``: the names of what predict writes (no jax).
- ``jaxseg.inference.streaming``: the streamed block loop: hulls read ahead, tasks computed,
  blocks and carries written behind (prefetch / carry / write threads), previews.
- ``jaxseg.inference.predict_lib``: batch predict: inputs, output zarrs, resume, multi-host split,
  summaries (``python -m jaxseg.predict``).
- ``jaxseg.inference.cache``: a split's affinities predicted once per checkpoint and input, in keyed
  folders under ``DIR/predictions``, QC'd when ``config.qc.enabled`` (used by the chain's test
  stage and the tuner; imports JAX only when a prediction is missing).

This package imports nothing itself; import the submodules.
"""
