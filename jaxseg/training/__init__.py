"""Training library: optimiser and schedules, losses, EMA, sharding, checkpoints, summaries.

The loop itself is :func:`jaxseg.training.train_lib.train_and_evaluate`; ``python -m jaxseg.train``
is its thin command-line entry point. Submodules are imported lazily by their users so that
``import jaxseg.training`` stays cheap.
"""
