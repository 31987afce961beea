r"""Tunes a decoder on cached affinities: ``python -m jaxseg.tune --config=... --workdir=DIR``.

A thin entry point over :mod:`jaxseg.tuning.tune_lib`. ``--mode=tune`` (default) predicts the
``config.tune.split`` volumes once (cached under ``DIR/predictions/<key>``; JAX is loaded only
then), runs an Optuna study in ``DIR/tune/<decoder>/study.db`` whose trials only decode and score
(cc: every threshold of ``tune.cc.threshold_grid``, objective NERL; waterz: TPE over the merge
function and watershed thresholds, every merge threshold decoded in each trial; mws: TPE over
``decode.mws.bias_short`` / ``bias_long``), and writes
``best_params.json``, ``trials.csv``, ``objective.png`` and ``tune.json`` there. A killed run
resumes where it stopped; a finished study is not rerun. ``--mode=tune-test`` decodes and scores
the test volumes with the best parameters into ``DIR/tune/<decoder>/test/<name>``. Examples::

  python -m jaxseg.tune --config=configs/demo.py --workdir=runs/demo --decoder=waterz
  python -m jaxseg.tune --config=configs/demo.py --workdir=runs/demo --mode=tune-test
  python -m jaxseg.tune --config=configs/snemi.py --workdir=runs/snemi --n_trials=50

Tuning on the test split is refused unless ``--force_test`` (or ``config.tune.force_test``).
``--checkpoint`` (default ``--workdir``) names a work dir, its ``checkpoints`` folder or one step
folder (``W/checkpoints/1500``: that step, as ``--config.run.checkpoint_step=1500``); it is only
read. Without ``--config`` the ``--checkpoint`` (else ``--workdir``) work dir's resolved
``config.json`` is the config, with ``--config.a.b=value`` overrides on top.
"""

from __future__ import annotations

from absl import app, flags

from jaxseg.common import cli, config_util

_CONFIG = config_util.define_config_flag(
  help_text="Config file (configs/*.py[:arg]); default: the config.json of the --checkpoint (else "
  "--workdir) work dir (--config.a.b=value overrides apply to either)."
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Run folder: predictions, tune/<decoder> outputs.", required=True
)
_CHECKPOINT = flags.DEFINE_string(
  "checkpoint",
  None,
  "Training work dir, its checkpoints folder or a step folder (W/checkpoints/<step>) "
  "(default: --workdir).",
)
_MODE = flags.DEFINE_enum(
  "mode", "tune", ["tune", "tune-test"], "tune: run the study; tune-test: apply the best params."
)
_DECODER = flags.DEFINE_enum(
  "decoder", None, ["cc", "waterz", "mws"], "Decoder to tune (default: config.decode.method)."
)
_FORCE_TEST = flags.DEFINE_bool(
  "force_test", None, "Allow tune.split == 'test' (default: config.tune.force_test)."
)
_N_TRIALS = flags.DEFINE_integer(
  "n_trials", None, "Complete trials the study should have (default: grid size / tune.*.n_trials)."
)
_OVERWRITE = flags.DEFINE_bool(
  "overwrite", False, "Start a new study instead of refusing one made with other settings."
)
_PROGRESS = flags.DEFINE_bool("progress", True, "One line per trial; progress bars.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.check_output_folder(_WORKDIR.value, flag="--workdir")
  from jaxseg.common import runtime
  from jaxseg.tuning import tune_lib
  from jaxseg.tuning.trials import TrialError

  runtime.quiet_libraries()
  # Trials predict with the same compiled steps: each study run loads them instead of compiling.
  runtime.enable_compilation_cache()
  config = _CONFIG.value
  workdir = _WORKDIR.value
  checkpoint = _CHECKPOINT.value or workdir
  if _CHECKPOINT.value:
    found = cli.resolve_checkpoint(_CHECKPOINT.value)
    checkpoint = found.path
    if found.step is not None:
      config_util.set_checkpoint_step(config, found.step)
  # The user's mistakes (input, settings, state of the workdir) raise JaxsegError: one line.
  try:
    if _MODE.value == "tune":
      result = tune_lib.tune(
        config,
        workdir,
        checkpoint=checkpoint,
        decoder=_DECODER.value,
        force_test=_FORCE_TEST.value,
        n_trials=_N_TRIALS.value,
        show_progress=_PROGRESS.value,
        overwrite=_OVERWRITE.value,
      )
    else:
      results = tune_lib.tune_test(
        config,
        workdir,
        checkpoint=checkpoint,
        decoder=_DECODER.value,
        show_progress=_PROGRESS.value,
      )
  except TrialError as e:
    raise TrialError(
      f"a trial failed: {e} (its traceback is stored with the trial in study.db)", e.details
    ) from e
  if _MODE.value == "tune":
    print(
      f"{result['decoder']}: best {result['objective']} {result['best_value']:.4f} "
      f"({result['direction']}) with {result['best_params']} (trial {result['best_trial']})"
    )
    if result["skipped"]:
      print(
        f"already tuned ({result['n_complete']} trials; --overwrite redoes it): "
        f"{result['best_params_path']}"
      )
    else:
      print(f"wrote {result['best_params_path']}, {result['trials_csv']}, {result['plot']}")
    return
  for r in results:
    best = r["results"][r["best"]] if r.get("best") is not None else r["results"][0]
    metrics = ", ".join(
      f"{k} {best[k]:.4f}" for k in ("adapted_rand", "voi", "nerl") if best.get(k) is not None
    )
    print(
      f"{r['volume']}: {r['decoder']} {r['params']}: {metrics or 'no ground truth'}; "
      f"{best['segments']} segments; {best['segmentation']}"
      + (" (reused)" if r.get("reused") else "")
    )


def run() -> None:
  """Console-script entry point (``jaxseg-tune``)."""
  cli.run_main("jaxseg.tune", main, config_from=("checkpoint", "workdir"))


if __name__ == "__main__":
  run()
