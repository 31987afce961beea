"""Affinities to segmentations: waterz agglomeration and connected components, blockwise on daisy.

Never imports JAX: decoding runs on machines without accelerators.
"""
