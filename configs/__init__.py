"""The recipes: one ``get_config(arg=None)`` per file, loaded with ``--config=configs/<name>.py[:arg]``.

The folder is also a package (installed with jaxseg), so a recipe builds on another by importing it,
``from configs import nisb_base``, and shared sections come from ``configs.common``. A recipe of your
own, anywhere on disk, can do the same: ``from configs import common`` finds these.
"""
