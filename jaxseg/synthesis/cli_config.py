"""The standalone config of ``python -m jaxseg.synth`` when no ``--config`` is given.

Holds just ``data.synth`` (see :func:`jaxseg.synthesis.config.default_config`), so the same
``--config.data.synth.<knob>=...`` overrides work with and without a recipe. ``get_config(arg)``
takes an optional difficulty preset name (``easy``, ``base``, ``touching_thin``,
``slice_perturbed``).
"""

import ml_collections

from jaxseg.synthesis.config import default_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.data = ml_collections.ConfigDict()
  config.data.synth = default_config(arg or "base")
  return config
