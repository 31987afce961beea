r"""Decodes affinities: ``python -m jaxseg.decode --config=... --affinities=SPEC --output=DIR``.

A thin entry point over :func:`jaxseg.decoding.decode_lib.decode`. ``config.decode`` picks the
decoder: ``cc`` (NISB: thresholded connected components), ``waterz`` (SNEMI: watershed,
agglomeration, dust and branch merges) or ``mws`` (mutex watershed over every channel, the
long-range ones included; whole volumes up to ``decode.mws.max_voxels``). Volumes larger than
``config.decode.block_shape`` are decoded by cc and waterz block by block with bounded memory
(daisy schedules the blocks; a killed run resumes). Examples::

  python -m jaxseg.decode --config=configs/demo.py \
      --affinities=runs/demo/predictions/seed101.zarr --output=runs/demo/segmentation/seed101
  python -m jaxseg.decode --config=configs/snemi.py --affinities=pred/test.zarr/affinities \
      --output=seg/test --config.decode.thresholds='(0.3,0.5,0.7)'
  python -m jaxseg.decode --config=configs/nisb_base.py --affinities=big.zarr/affinities \
      --output=seg --config.decode.num_workers=8
  python -m jaxseg.decode --config=configs/snemi.py --affinities=pytc_pred.h5:main \
      --axis_order=cxyz --output=seg/pytc
  python -m jaxseg.decode --config=configs/snemi.py --affinities=pred/test.zarr/affinities \
      --output=seg/mws --config.decode.method=mws --config.decode.mws.bias_long=0.6
  python -m jaxseg.decode --tuned=runs/fibsem --config.decode.method=waterz \
      --affinities=pred/new.zarr/affinities --output=seg/new

``--tuned=W`` decodes with the settings W's tuning kept (``W/tune/<method>/best_params.json``:
merge function, watershed and merge thresholds, cc threshold or mws biases); its
``config.json`` is the config unless ``--config`` is given.

Writes ``DIR/segmentation`` (or ``DIR/segmentation_t<thr>`` per waterz threshold), ``[z, y, x]``
zarr arrays in the smallest unsigned dtype, plus ``DIR/preview.png`` and ``DIR/decode.json``.
This process never imports JAX.
"""

from __future__ import annotations

from absl import app, flags

from jaxseg.common import cli, config_util

_CONFIG = config_util.define_config_flag(
  help_text="Config file (configs/*.py[:arg]); default: the --tuned work dir's config.json "
  "(--config.a.b=value overrides apply to either)."
)
_AFFINITIES = flags.DEFINE_string(
  "affinities",
  None,
  "Affinity array ([C, z, y, x]: zarr / N5 / 'file.h5:dataset'), or a jaxseg.predict output "
  "folder holding 'affinities'.",
  required=True,
)
_OUTPUT = flags.DEFINE_string("output", None, "Output folder.", required=True)
_OVERWRITE = flags.DEFINE_bool(
  "overwrite", False, "Replace a decode made with other settings instead of refusing."
)
_AXIS_ORDER = flags.DEFINE_string(
  "axis_order",
  None,
  "On-disk axis order of --affinities when the file names none ('cxyz': PyTC); a file's own "
  "axis_order attribute must agree.",
)
_TUNED = flags.DEFINE_string(
  "tuned",
  None,
  "A work dir tuned by jaxseg.tune / jaxseg.run: decode with the settings its tuning kept "
  "(W/tune/<config.decode.method>/best_params.json); without --config, W/config.json is the "
  "config.",
)
_VERBOSE = flags.DEFINE_bool("verbose", False, "Let waterz print its progress.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars for blockwise decoding.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.check_output_folder(_OUTPUT.value)
  from jaxseg.decoding.decode_lib import decode
  from jaxseg.decoding.settings import decode_settings

  # The user's mistakes (input, settings, a full disk) raise JaxsegError: one line via cli.
  config = _CONFIG.value
  if _TUNED.value:
    from jaxseg.tuning.tune_lib import tuned_config

    method = str(config.decode.method)
    config, best = tuned_config(config, _TUNED.value, method)
    print(f"{method} settings tuned in {_TUNED.value}: {best['params']}")
  settings = decode_settings(config)
  summary = decode(
    settings,
    _AFFINITIES.value,
    _OUTPUT.value,
    overwrite=_OVERWRITE.value,
    verbose=_VERBOSE.value,
    show_progress=_PROGRESS.value,
    axis_order=_AXIS_ORDER.value,
  )
  done = " (already decoded)" if summary.get("already_done") else ""
  # The mutex watershed has no threshold: its one segmentation is filed under bias_short.
  name = "bias_short" if summary["method"] == "mws" else "threshold"
  for path, threshold, count in zip(
    summary["arrays"], summary["thresholds"], summary["segments"], strict=True
  ):
    print(f"{path}: {name} {threshold:g}, {count} segments{done}")
  print(
    f"{summary['method']} decode of {tuple(summary['shape'])} in {summary['seconds']:.1f} s"
    + (f", {summary['blocks']} blocks" if summary.get("blockwise") else "")
    + f"; preview {summary['preview']}"
  )


def run() -> None:
  """Console-script entry point (``jaxseg-decode``)."""
  cli.run_main("jaxseg.decode", main, config_from=("tuned",))


if __name__ == "__main__":
  run()
