"""Training data: affinity targets and label erosion.

- ``jaxseg.data.affinity``: offset presets (``aff12``, ``banis6``), labels ``[z, y, x]`` ->
  affinities and masks ``[c, z, y, x]``, context crops, source/target convention conversion.
- ``jaxseg.data.erosion``: contact erosion of labels ``[z, y, x]``.

Both work on numpy and jax arrays and import jax only when handed a jax array, so the decoder can
use them without jax. This package imports nothing itself; import the submodules.
"""
