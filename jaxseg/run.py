r"""The whole chain: ``python -m jaxseg.run --config=configs/demo.py --workdir=DIR``.

A thin entry point over :func:`jaxseg.workflow.chain.run_chain`. The default mode ``all``
generates the data when the config describes generated data (``data.synth``) and ``data.root``
lacks it, trains (resuming; skipped when the checkpoint of ``train.num_steps`` exists), predicts
the test volumes (cached), decodes them with every decoder of ``run.decoders`` and scores them
(adapted Rand, VOI, NERL) next to trivial baselines, tunes each decoder on the validation
volumes, applies the tuned parameters to the test volumes and writes ``DIR/results/report.md``.
Every stage reuses complete outputs, so a rerun continues. Examples::

  python -m jaxseg.run --config=configs/demo.py --workdir=runs/demo
  python -m jaxseg.run --config=configs/demo.py --workdir=runs/demo --mode=tune
  python -m jaxseg.run --config=configs/demo.py --workdir=runs/demo --view

Modes: ``all``, ``train`` (data + train), ``test`` (predict, decode, evaluate), ``tune``,
``tune-test`` (tuned parameters on the test volumes), ``report`` (rewrite ``results/`` only).
``--view`` then serves the volumes in Neuroglancer (``pip install neuroglancer``) until Ctrl-C.

``--checkpoint`` uses a model trained elsewhere instead of training: a work dir, its
``checkpoints`` folder, a step folder (``W/checkpoints/1500``: that step) or a work dir of
``python -m jaxseg.import_checkpoint``. The train stage is skipped (``--mode=all`` runs the other
stages; ``--mode=train`` is refused), every output goes to ``--workdir``, and the checkpoint is
only read. Without ``--config`` its work dir's resolved ``config.json`` is the config, with
``--config.a.b=value`` overrides on top::

  python -m jaxseg.run --checkpoint=runs/demo --workdir=runs/demo_eval --mode=test
"""

from __future__ import annotations

import importlib.util

from absl import app, flags

from jaxseg.common import cli, config_util, runtime

# As jaxseg.workflow.chain.MODES, spelled out so that --help needs no import of the chain.
_MODES = ("all", "train", "test", "tune", "tune-test", "report")

_CONFIG = config_util.define_config_flag(
  help_text="Config file (configs/*.py[:arg]); default: the --checkpoint work dir's config.json "
  "(--config.a.b=value overrides apply to either)."
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "The run folder (all stages' outputs).", required=True
)
_MODE = flags.DEFINE_enum("mode", "all", list(_MODES), "Which stages to run.")
_CHECKPOINT = flags.DEFINE_string(
  "checkpoint",
  None,
  "Use this trained model instead of training (a work dir, its checkpoints folder or a step "
  "folder W/checkpoints/<step>; only read): the train stage is skipped, --mode=train refused.",
)
_OVERWRITE = flags.DEFINE_bool(
  "overwrite",
  False,
  "Let decodes and tuning studies replace outputs made with other settings (else they refuse).",
)
_FORCE_TEST = flags.DEFINE_bool(
  "force_test", False, "Allow tuning on the test split (tune.split=test); leaks test data."
)
_VIEW = flags.DEFINE_bool(
  "view", False, "Afterwards serve the volumes in Neuroglancer (needs the neuroglancer package)."
)
_VIEW_PORT = flags.DEFINE_integer(
  "view_port",
  8000,
  "Port of the --view file server (0 = any).",
  lower_bound=0,
  upper_bound=65535,
)
_PROGRESS = flags.DEFINE_bool("progress", True, "Progress bars inside the stages.")


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.check_output_folder(_WORKDIR.value, flag="--workdir")
  if _VIEW.value and importlib.util.find_spec("neuroglancer") is None:
    # Said now, not after the chain ran for hours.
    from jaxseg.workflow.viewer import INSTALL_HINT, NeuroglancerMissingError

    raise NeuroglancerMissingError(f"--view: {INSTALL_HINT}")
  runtime.quiet_libraries()
  # Stages and the processes they start (tuning trials) load compiled steps of earlier runs.
  runtime.enable_compilation_cache()
  # Imported after flag parsing: --help stays fast; JAX loads only in stages that need it.
  from jaxseg.workflow import chain

  # The user's mistakes (settings, inputs, a taken --view_port, no neuroglancer) raise
  # JaxsegError (ChainError, VolumeError, TrialError, ...): cli.run_main reports them in one line.
  result = chain.run_chain(
    _CONFIG.value,
    _WORKDIR.value,
    mode=_MODE.value,
    overwrite=_OVERWRITE.value,
    force_test=True if _FORCE_TEST.value else None,
    show_progress=_PROGRESS.value,
    checkpoint=_CHECKPOINT.value,
  )
  total = sum(s.seconds for s in result["stages"])
  print(f"done in {total:.1f} s" + (f"; report: {result['report']}" if result["report"] else ""))
  if _VIEW.value:
    chain.view(
      chain.Chain(_CONFIG.value, _WORKDIR.value, show_progress=False, checkpoint=_CHECKPOINT.value),
      port=_VIEW_PORT.value,
    )
  return 0


def run() -> None:
  """Console-script entry point (``jaxseg-run``)."""
  cli.run_main("jaxseg.run", main, config_from=("checkpoint",))


if __name__ == "__main__":
  run()
