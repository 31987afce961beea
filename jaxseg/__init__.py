"""jaxseg: dense neuron segmentation in electron microscopy with JAX.

Sub-packages, in the order data flows through them:

- ``jaxseg.io``: lazy volumes in canonical ``[c,] z, y, x`` order over every common format.
- ``jaxseg.synthesis``: procedurally generated NISB-style cubes (image, labels, skeletons).
- ``jaxseg.data``: affinity targets, label erosion.
- ``jaxseg.metrics``: adapted Rand, VOI, NERL. Never imports JAX.

The ``absl`` entry points (``python -m jaxseg.synth``, ``python -m jaxseg.evaluate``) are thin
wrappers over these libraries.
"""

__version__ = "0.1.0"
