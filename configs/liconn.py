"""NISB ``liconn`` setting: the BANIS+ recipe of ``nisb_base.py`` on LICONN data.

Only the data paths and the resolution differ from ``nisb_base.py``. The affinity mask (bad z-ends,
background ring) comes from the QC that ``python -m jaxseg.run`` runs on every prediction
(``qc.enabled``); for a standalone decode, ``python -m jaxseg.qc`` writes one and
``--config.decode.affinity_mask_path`` points at it.
"""

from configs import nisb_base


def get_config(arg=None):
  config = nisb_base.get_config(arg)
  config.name = "liconn"
  config.data.root = "datasets/nisb/liconn"
  config.data.train_seeds = (0, 1, 2, 3, 4)
  config.data.val_seeds = (5,)
  config.data.test_seeds = (6,)
  # PyTC's LICONN config sets [18, 18, 25] nm in x, y, z (the NISB site quotes 9 x 9 x 12 nm for
  # the raw LICONN cubes); the recipe's value is kept.
  config.data.resolution = (25.0, 18.0, 18.0)
  return config
