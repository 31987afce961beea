r"""Imports a model trained elsewhere: ``python -m jaxseg.import_checkpoint --from=pytc ...``.

Converts a PyTorch Connectomics (PyTorch Lightning) checkpoint of the SNEMI RSUNet or of the
NISB / LICONN MedNeXt into an orbax checkpoint in ``--workdir``, which ``predict``, ``run
--mode=test`` and ``tune`` then use as if jaxseg had trained it (with the EMA weights when the file
holds them). A thin entry point over :func:`jaxseg.training.pytc_import.import_checkpoint`; the
name mapping is in ``docs/import_checkpoint.md``. Needs torch: ``pip install -e ".[pytc]"``.
Examples::

  python -m jaxseg.import_checkpoint --from=pytc --checkpoint=last.ckpt \
    --config=configs/snemi.py --workdir=runs/snemi_pytc
  python -m jaxseg.import_checkpoint --from=pytc --checkpoint=mednext.ckpt \
    --config=configs/nisb_base.py --config.model.size=S --workdir=runs/nisb_pytc
  python -m jaxseg.predict --config=configs/snemi.py --checkpoint=runs/snemi_pytc \
    --input=... --output=...

The config must describe the network the checkpoint holds (``model.*``); unknown, missing or
mis-shaped keys are refused, each named, before anything is written.
"""

from __future__ import annotations

from absl import app, flags

from jaxseg.common import cli, config_util, runtime

_CONFIG = config_util.define_config_flag()
_FROM = flags.DEFINE_enum("from", None, ["pytc"], "Where the checkpoint comes from.", required=True)
_CHECKPOINT = flags.DEFINE_string(
  "checkpoint", None, "The checkpoint file (a Lightning .ckpt).", required=True
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Work dir to write the jaxseg checkpoint into (new or empty).", required=True
)
_STEP = flags.DEFINE_integer(
  "step", None, "Step number of the imported checkpoint (default: the file's global_step, else 0)."
)
_ALLOW_PICKLE = flags.DEFINE_bool(
  "allow_pickle",
  False,
  "Also unpickle the Python objects in the file (PyTC keeps its Hydra config there); this runs "
  "code from the file, so only for files you trust.",
)
_OVERWRITE = flags.DEFINE_bool(
  "overwrite",
  False,
  "Replace a training run of other settings in --workdir (deletes only that run's files).",
)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  cli.check_output_folder(_WORKDIR.value, flag="--workdir")
  runtime.quiet_libraries()
  # Imported after flag parsing: keeps --help fast and lets JAX see the final environment.
  from jaxseg.training import pytc_import

  result = pytc_import.import_checkpoint(
    config,
    _CHECKPOINT.value,
    _WORKDIR.value,
    step=_STEP.value,
    allow_pickle=_ALLOW_PICKLE.value,
    overwrite=_OVERWRITE.value,
  )
  weights = "EMA and raw weights" if result["ema"] else "weights (no EMA in the file)"
  print(
    f"imported {_FROM.value} {weights} of {config.model.name} (keys under "
    f"{result['prefix'] or '<none>'!r}) as step {result['step']} in {result['checkpoint_dir']}"
  )


def run() -> None:
  """Entry point, with one-line errors for the user's mistakes."""
  cli.run_main("jaxseg.import_checkpoint", main)


if __name__ == "__main__":
  run()
