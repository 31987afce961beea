"""Decoder tuning on cached affinities (``python -m jaxseg.tune``).

- ``jaxseg.tuning.cache``: each split's affinities predicted once per checkpoint and input, keyed
  folders under ``DIR/predictions``, QC'd when ``config.qc.enabled``.
- ``jaxseg.tuning.scoring``: a decoder's config with tuned parameters, metrics of a segmentation,
  decode-and-score of one cached volume (``metrics.json``), objectives and their directions.
- ``jaxseg.tuning.search``: search spaces, grid / TPE samplers, resumable fingerprinted studies.
- ``jaxseg.tuning.trials``: the child process that decodes and scores trials with a timeout.
- ``jaxseg.tuning.tune_lib``: ``tune``, ``tune_test``, ``load_best_params``.
- ``jaxseg.tuning.plot``: ``objective.png``.

This package imports nothing itself (Optuna loads only with ``search`` / ``tune_lib``); none of it
imports JAX, except ``cache`` when a prediction is missing.
"""
