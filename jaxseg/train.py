r"""Trains a network: ``python -m jaxseg.train --config=configs/x.py --workdir=DIR``.

A thin entry point over :func:`jaxseg.training.train_lib.train_and_evaluate`: parses the config
(``--config.a.b=value`` overrides), sets up multi-host JAX when asked, and trains in ``--workdir``
(resuming from its latest checkpoint). Examples::

  python -m jaxseg.synth --config=configs/demo.py --output=demo_data
  python -m jaxseg.train --config=configs/demo.py --workdir=runs/demo
  python -m jaxseg.train --config=configs/snemi.py --workdir=runs/snemi --config.train.batch_size=2

Multi-host: ``jax.distributed.initialize()`` runs when ``config.train.distributed`` is true or a
coordinator is set in the environment (``JAX_COORDINATOR_ADDRESS``, or a cluster JAX detects
itself when ``train.distributed`` is set: SLURM, Open MPI, Kubernetes / Cloud TPU). Every process
runs the same command; each reads its own share of the batch.
"""

from __future__ import annotations

import os

from absl import app, flags

from jaxseg.common import cli, config_util, runtime

_CONFIG = config_util.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (checkpoints, logs).", required=True)
_OVERWRITE = flags.DEFINE_bool(
  "overwrite",
  False,
  "Start afresh in a work dir trained with other settings: deletes only that run's checkpoints, "
  "logs and config.json.",
)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  cli.check_output_folder(_WORKDIR.value, flag="--workdir")
  runtime.quiet_libraries()
  root = config.data.get("root", None)
  if "synth" in config.data and root and not os.path.isdir(root):
    raise app.UsageError(
      f"no data at data.root={root!r}; this config trains on generated data, make it first with "
      f"python -m jaxseg.synth --config=<this config> --output={root}"
    )
  # Imported after flag parsing: keeps --help fast and lets JAX see the final environment.
  import jax

  runtime.initialize_distributed(config)
  runtime.enable_compilation_cache()  # repeated runs load their compiled steps
  from jaxseg.training.train_lib import train_and_evaluate

  result = train_and_evaluate(config, _WORKDIR.value, overwrite=_OVERWRITE.value)
  if jax.process_index() == 0:
    print(
      f"trained to step {result['step']}: train loss {_fmt(result['train_loss'])}, "
      f"val loss {_fmt(result['val_loss'])}, best {result['monitor']} "
      f"{_fmt(result['best_value'])} (step {result['best_step']}); checkpoints in "
      f"{result['checkpoint_dir']}; curves in {_WORKDIR.value}/training_curves.png"
    )


def _fmt(value) -> str:
  return "n/a" if value is None else f"{value:.4g}"


def run() -> None:
  """Console-script entry point (``jaxseg-train``)."""
  cli.run_main("jaxseg.train", main)


if __name__ == "__main__":
  run()
