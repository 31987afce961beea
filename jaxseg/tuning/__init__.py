"""Decoder tuning on cached affinities (``python -m jaxseg.tune``).

- ``jaxseg.tuning.search``: search spaces, grid / TPE samplers, resumable fingerprinted studies.
- ``jaxseg.tuning.trials``: the child process that decodes and scores trials with a timeout.
- ``jaxseg.tuning.tune_lib``: ``tune``, ``tune_test``, ``load_best_params``.
- ``jaxseg.tuning.plot``: ``objective.png``.

Trials decode and score through :mod:`jaxseg.decoding.scoring` on the affinities of
:mod:`jaxseg.inference.cache` (the chain's test stage uses the same two, without tuning). This
package imports nothing itself (Optuna loads only with ``search`` / ``tune_lib``); none of it imports
JAX, except through the cache when a prediction is missing.
"""
