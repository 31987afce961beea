"""Training data: affinity targets, label erosion, augmentation and the crop pipeline.

- ``jaxseg.data.affinity``: offset presets (``aff12``, ``banis6``), labels ``[z, y, x]`` ->
  affinities and masks ``[c, z, y, x]``, context crops, source/target convention conversion.
- ``jaxseg.data.erosion``: contact erosion of labels ``[z, y, x]``.
- ``jaxseg.data.augment``: the two recipe augmentation suites (``aug_em_neuron``, ``aug_banis``)
  as jittable per-sample functions on image ``[z, y, x, c]`` and labels ``[z, y, x]``; the
  transforms themselves are in ``augment_ops`` (stream, geometry, intensity) and
  ``augment_sections`` (slice perturbations, EM section defects).
- ``jaxseg.data.pipeline``: random crops read on the host (``TrainData``, batches
  ``[b, z, y, x, c]``) and the on-device transform (augment -> erode -> targets).
- ``jaxseg.data.normalize``: intensity normalisation and whole-volume statistics (training and
  inference).
- ``jaxseg.data.targets``: ``config.target`` resolved (offsets, context, erosion, ``target.lsd``),
  the read shape, the model's output channels (affinities, then local shape descriptors).
- ``jaxseg.data.lsd``: local shape descriptors of label crops ``[z, y, x]`` ->
  ``[z, y, x, 10]`` on the device (jax; the MTLSD auxiliary target).
- ``jaxseg.data.crop_io``: padding by index mapping, bounding-box reads, int32 labels.

``affinity`` and ``erosion`` work on numpy and jax arrays and import jax only when handed a jax
array, so the decoder can use them without jax; so do ``normalize``, ``targets``, ``crop_io`` and
the host side of ``pipeline``. This package imports nothing itself; import the submodules.
"""
