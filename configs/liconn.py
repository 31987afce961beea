"""NISB ``liconn`` setting: the BANIS+ recipe of ``nisb_base.py`` on LICONN data.

Only the data paths, the resolution and the affinity mask path differ from ``nisb_base.py``.
"""

from jaxseg.common.config_util import load_sibling


def get_config(arg=None):
  config = load_sibling(__file__, "nisb_base").get_config(arg)
  config.name = "liconn"
  config.data.root = "datasets/nisb/liconn"
  config.data.train_seeds = (0, 1, 2, 3, 4)
  config.data.val_seeds = (5,)
  config.data.test_seeds = (6,)
  # PyTC's LICONN config sets [18, 18, 25] nm in x, y, z (the NISB site quotes 9 x 9 x 12 nm for
  # the raw LICONN cubes); the recipe's value is kept.
  config.data.resolution = (25.0, 18.0, 18.0)
  # Written by `python -m jaxseg.qc` for the test cube (drops the bad z-ends and background ring).
  config.decode.affinity_mask_path = "datasets/nisb/liconn/test/seed6/affinity_mask.zarr"
  return config
