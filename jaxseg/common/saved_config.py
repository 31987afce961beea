"""A config file that loads a work dir's resolved ``config.json``, for ``--config=THIS:PATH``.

``jaxseg.predict`` / ``jaxseg.tune`` / ``jaxseg.run`` given ``--checkpoint=W`` and no ``--config``
read ``W/config.json`` through this file (:func:`jaxseg.common.cli.with_saved_config` names it), so
``--config.a.b=value`` overrides apply on top exactly as they do over a recipe. JSON has no
tuples: every list comes back as the tuple the recipes wrote, so the config equals the one saved
(``config_util.config_to_dict`` of both is the same).
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections


def _tuples(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def get_config(path: str) -> ml_collections.ConfigDict:
  """The config saved at ``path`` (a ``config.json`` that jaxseg wrote)."""
  with open(path) as f:
    saved = json.load(f)
  if not isinstance(saved, dict):
    raise ValueError(f"{path} holds no jaxseg config (a JSON object)")
  return ml_collections.ConfigDict(_tuples(saved))
