r"""Predicts affinities: ``python -m jaxseg.predict --config=... --checkpoint=... --input=... --output=DIR``.

A thin entry point over :func:`jaxseg.inference.predict_lib.predict`. Each ``--input`` (repeat the
flag for several) becomes ``DIR/<name>.zarr/affinities``, a ``[C, z, y, x]`` zarr streamed block by
block with bounded memory; a killed run resumes where it stopped when started again with the same
arguments. Examples::

  python -m jaxseg.predict --config=configs/demo.py --checkpoint=runs/demo \
      --input=split:test --output=runs/demo/predictions
  python -m jaxseg.predict --config=configs/snemi.py --checkpoint=runs/snemi \
      --input=snemi/test-input.tif --output=pred --config.infer.tta.enabled=True
  python -m jaxseg.predict --checkpoint=runs/demo/checkpoints/1500 --input=split:test \
      --output=pred_1500

``--checkpoint`` names a work dir, its ``checkpoints`` folder or one step folder
(``W/checkpoints/1500``: that step; a ``--step`` saying otherwise is refused); a work dir made by
``python -m jaxseg.import_checkpoint`` is one too. Without ``--config`` the work dir's resolved
``config.json`` (saved when it was trained or imported) is the config, and ``--config.a.b=value``
overrides apply on top of it. The checkpoint is only read.

Inputs: a volume path (zarr / N5 / HDF5 ``file.h5:dataset`` / TIFF / PNG folder / precomputed),
a NISB cube folder (``.../seed101``), or ``split:test`` (the images of a split of
``config.data``). Multi-host: run the same command on every host (``--config.train.distributed``
or ``JAX_COORDINATOR_ADDRESS``); each process predicts a range of slabs of blocks. Compiled steps
are kept in JAX's persistent compilation cache (``~/.cache/jaxseg/jax``, or
``$JAXSEG_CACHE_DIR/jax``; ``JAXSEG_COMPILATION_CACHE=0`` turns it off), so a repeated predict
does not compile them again.
"""

from __future__ import annotations

from absl import app, flags

from jaxseg.common import cli, config_util, runtime

_CONFIG = config_util.define_config_flag(
  help_text="Config file (configs/*.py[:arg]); default: the --checkpoint work dir's config.json "
  "(--config.a.b=value overrides apply to either)."
)
_CHECKPOINT = flags.DEFINE_string(
  "checkpoint",
  None,
  "Training work dir, its checkpoints folder or a step folder (W/checkpoints/<step>).",
  required=True,
)
_STEP = flags.DEFINE_string(
  "step",
  "best",
  "Checkpoint step: 'best' (by train.monitor), 'latest' or a number (a step folder in "
  "--checkpoint selects its own).",
)
_INPUT = flags.DEFINE_multi_string(
  "input",
  None,
  "Volume to predict; repeat for several. 'split:test' = a split of config.data.",
  required=True,
)
_OUTPUT = flags.DEFINE_string("output", None, "Output folder.", required=True)
_OVERWRITE = flags.DEFINE_bool(
  "overwrite", False, "Replace outputs made with other settings instead of refusing."
)
_AXIS_ORDER = flags.DEFINE_string(
  "axis_order", None, "On-disk axis order of the inputs (e.g. 'xyz') when their files name none."
)
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 0, "Local devices to use (0 = all).")
_RAW_WEIGHTS = flags.DEFINE_bool(
  "raw_weights", False, "Use the raw trained weights instead of the EMA weights."
)


def _step(value: str) -> int | str:
  return int(value) if value.isdigit() else value


def checkpoint_and_step(checkpoint: str, step: str, step_given: bool) -> tuple[str, int | str]:
  """What ``predict`` takes for ``--checkpoint`` and ``--step``: a step folder selects its step.

  Raises:
    MissingInputError: ``checkpoint`` is no checkpoint (:func:`cli.resolve_checkpoint`).
    app.UsageError: ``--step`` names another step than the step folder.
  """
  found = cli.resolve_checkpoint(checkpoint)
  if found.step is None:
    return found.path, _step(step)
  if step_given and _step(step) != found.step:
    raise app.UsageError(
      f"--step={step} contradicts --checkpoint={checkpoint}, a step folder (step {found.step}); "
      "drop --step or name the work dir"
    )
  return found.path, found.step


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  cli.check_output_folder(_OUTPUT.value)
  checkpoint, step = checkpoint_and_step(
    _CHECKPOINT.value, _STEP.value, flags.FLAGS["step"].present
  )
  runtime.quiet_libraries()
  import jax

  runtime.initialize_distributed(config)
  runtime.enable_compilation_cache()  # repeated runs load their compiled steps
  from jaxseg.inference.predict_lib import predict

  # The user's mistakes (input, checkpoint, settings) raise JaxsegError: one line via cli.
  results = predict(
    config,
    checkpoint,
    _INPUT.value,
    _OUTPUT.value,
    step=step,
    use_ema=not _RAW_WEIGHTS.value,
    axis_order=_AXIS_ORDER.value,
    overwrite=_OVERWRITE.value,
    num_devices=_NUM_DEVICES.value,
  )
  for r in results:
    rate = r.get("voxels_per_second")
    print(
      f"{r['name']}: {r['output']} {tuple(r['shape'])} {r['dtype']}; "
      f"{r['blocks_written']} block(s) predicted, {r['blocks_already_done']} already done"
      + (f", {rate / 1e6:.2f} Mvoxel/s" if rate else "")
      + (f"; preview {r['preview']}" if r.get("preview") else "")
      + ("" if r["complete"] else f" (process {jax.process_index()}: other blocks pending)")
    )


def run() -> None:
  """Console-script entry point (``jaxseg-predict``)."""
  cli.run_main("jaxseg.predict", main, config_from=("checkpoint",))


if __name__ == "__main__":
  run()
