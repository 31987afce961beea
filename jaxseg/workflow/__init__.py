"""The whole chain (``python -m jaxseg.run``): stages and modes, report, baselines, viewer.

Modules: ``chain`` (the stages data -> train -> test -> tune -> tune-test -> report over one work
dir, each reusing complete outputs), ``report`` (``results/metrics.json``, ``report.md``, PNG
previews), ``baselines`` (trivial segmentations scored like the learned ones), ``viewer``
(Neuroglancer layout and ``--view``). JAX is imported only inside the train / predict stages.
"""
