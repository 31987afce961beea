"""Affinities to segmentations: waterz agglomeration and connected components, blockwise on daisy.

``jaxseg.decoding.scoring`` decodes one volume's affinities and scores the result against its
ground truth (``metrics.json``), with a decoder's tuned parameters applied; the chain's test stage
and the tuner's trials both go through it.

Never imports JAX: decoding runs on machines without accelerators.
"""
