"""jaxseg: dense neuron segmentation in electron microscopy with JAX.

Sub-packages, bottom layer first (``ARCHITECTURE.md``; the facts they rely on are in ``docs/``):

- ``jaxseg.common``: errors, one-line CLI failures, configs, stage outputs and manifests. No JAX.
- ``jaxseg.io``: lazy volumes in canonical ``[c,] z, y, x`` order, dataset layouts (a lab's own
  volumes too), skeletons.
- ``jaxseg.data``: affinity targets, label erosion, augmentation, the training crop pipeline.
- ``jaxseg.models``: RSUNet and MedNeXt (Flax NNX).
- ``jaxseg.metrics``: adapted Rand, VOI, ERL / NERL, skeletons from labels, ``evaluate``. No JAX.
- ``jaxseg.synthesis``: procedurally generated NISB-style cubes (image, labels, skeletons).
- ``jaxseg.training``: optimiser, losses, EMA, sharding, checkpoints, the training loop.
- ``jaxseg.inference``: sliding windows, blending, TTA, block-streamed affinity prediction.
- ``jaxseg.decoding``: waterz with dust / branch merges, connected components, blockwise. No JAX.
- ``jaxseg.quality``: affinity QC (per-section statistics, z range) and the affinity mask. No JAX.
- ``jaxseg.tuning``: Optuna studies over decoder parameters on cached affinities.
- ``jaxseg.workflow``: the whole chain, the report, baselines, the Neuroglancer viewer.

Entry points, thin ``absl`` wrappers over those libraries:

- ``python -m jaxseg.synth``: generate NISB-style data.
- ``python -m jaxseg.train``: train a network (resumes).
- ``python -m jaxseg.predict``: predict affinities into zarr, block by block (resumes).
- ``python -m jaxseg.qc``: affinity QC report and mask.
- ``python -m jaxseg.decode``: affinities to a segmentation.
- ``python -m jaxseg.evaluate``: score a segmentation.
- ``python -m jaxseg.skeletonize``: a NISB ``skeleton.pkl`` from dense labels (for NERL).
- ``python -m jaxseg.tune``: tune a decoder on validation volumes.
- ``python -m jaxseg.run``: the whole chain and its report.
"""

__version__ = "0.1.0"
