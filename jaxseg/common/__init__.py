"""Helpers shared by every stage: config flags and resolved-config files, progress reporting.

Nothing here imports JAX, so the decoder, QC and metrics entry points can use it.
"""
