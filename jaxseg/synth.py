r"""Generates NISB-style synthetic cubes: ``python -m jaxseg.synth --output=DIR``.

Writes ``DIR/{train,val,test}/seed{N}/{data.zarr/{img,seg},skeleton.pkl,preview.png}`` (NISB
layout, x-first on disk) plus ``DIR/config.json`` (the config as given), ``DIR/synth_params.json``
(every knob as resolved from the difficulty preset) and ``DIR/synth_summary.json``, and prints a summary table. Resumable: complete
cubes are skipped. Arrays are [z, y, x] in memory; see :mod:`jaxseg.synthesis.cube` for the layout.

Examples::

  python -m jaxseg.synth --output=synth_data
  python -m jaxseg.synth --output=synth_data --config.data.synth.shape='(64,128,128)'
  python -m jaxseg.synth --output=demo_data --config=configs/demo.py
  python -m jaxseg.synth --output=hard --config=jaxseg/synthesis/cli_config.py:touching_thin

Without ``--config`` the standalone config :mod:`jaxseg.synthesis.cli_config` (just
``data.synth``) is used, so ``--config.data.synth.*`` overrides work either way.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from jaxseg.common import cli, config_util

_CONFIG = config_util.define_config_flag(required=False)
_OUTPUT = flags.DEFINE_string("output", None, "Dataset folder to write.", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Regenerate cubes that are already complete.")

_STANDALONE = os.path.join(os.path.dirname(__file__), "synthesis", "cli_config.py")


def _with_default_config(argv: list[str]) -> list[str]:
  """Adds ``--config=<standalone>`` when no config file is named (overrides need a config)."""
  names = ("--config", "-config")
  given = any(a.split("=", 1)[0] in names for a in argv[1:])
  return argv if given else [argv[0], f"--config={_STANDALONE}", *argv[1:]]


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from jaxseg.synthesis.config import resolve_config

  config = _CONFIG.value
  if "data" not in config or "synth" not in config.data:
    raise app.UsageError("the config has no data.synth section (see jaxseg/synthesis/config.py)")
  resolve_config(config.data.synth)  # a bad knob is said before the renderer and volume I/O load
  from jaxseg.synthesis import format_summary, generate_dataset

  output = _OUTPUT.value
  cli.check_output_folder(output)
  logging.info("generating into %s", output)
  # Validates every knob before writing anything, and writes config.json, synth_params.json and
  # synth_summary.json beside the cubes.
  summary = generate_dataset(
    config.data.synth, output, overwrite=_OVERWRITE.value, run_config=config
  )
  print(format_summary(summary))


def run() -> None:
  """Console-script entry point (``jaxseg-synth``)."""
  cli.run_main("jaxseg.synth", main, argv=_with_default_config(sys.argv))


if __name__ == "__main__":
  run()
