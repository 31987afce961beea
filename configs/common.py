"""Sections shared by several recipes (``from configs import common``); not a recipe itself."""

import math

import ml_collections

from jaxseg.decoding.settings import default_config as decode_config
from jaxseg.quality.settings import default_config as qc_config


def qc_defaults(enabled: bool) -> ml_collections.ConfigDict:
  """Affinity QC parameters (``docs/quality.md``, "Parameters"), identical in every PyTC recipe;
  their one copy is :class:`jaxseg.quality.settings.QcSettings`."""
  return qc_config(enabled)


def decode_defaults() -> ml_collections.ConfigDict:
  """Every decoder key with PyTC's numbers: the one copy lives with the decoder's settings."""
  return decode_config()


def tempered(probability: float, temperature: float) -> float:
  """A threshold set for plain ``sigmoid(x)`` affinities, moved onto ``sigmoid(x / temperature)``
  affinities: the same logit, so it cuts the same edges (``docs/decoding.md``, "Watershed
  thresholds"). Rounded to 3 decimals, as a config value is read."""
  logit = math.log(probability / (1.0 - probability))
  return round(1.0 / (1.0 + math.exp(-logit / temperature)), 3)


def contrast_gamma_aug(aug: ml_collections.ConfigDict, p: float = 0.0) -> None:
  """Adds jaxseg's contrast / gamma augmentation to an ``aug`` section, with probability ``p``.

  Another microscope's contrast: U(contrast_range) about the crop's mean, then gamma
  U(gamma_range) on the crop rescaled to [0, 1] (``docs/recipes.md``, "Normalisation across
  microscopes"). At ``p = 0`` the step is left out entirely (the PyTC recipes' outputs unchanged).
  """
  aug.contrast_gamma_p = p
  aug.contrast_range = (0.5, 1.5)
  aug.gamma_range = (0.7, 1.5)


def grid_warp_aug(aug: ml_collections.ConfigDict, p: float = 0.0) -> None:
  """Adds jaxseg's control-grid elastic deformation to an ``aug`` section, with probability ``p``.

  Normal displacements of std ``warp_sigma`` voxels (z, y, x) at control points ``warp_spacing``
  voxels apart, carried to every voxel by a cubic B-spline (``docs/recipes.md``, "Elastic
  deformation on a control grid"). For anisotropic voxels scale z down, e.g. spacing (4, 16, 16)
  and sigma (0.5, 2, 2) at 30 x 6 x 6 nm. At ``p = 0`` the step is left out entirely (the PyTC
  recipes' outputs unchanged).
  """
  aug.warp_p = p
  aug.warp_spacing = (16, 16, 16)
  aug.warp_sigma = (2.0, 2.0, 2.0)


def lsd_defaults() -> ml_collections.ConfigDict:
  """The ``target.lsd`` section: local shape descriptors as an auxiliary target (MTLSD), off.

  When enabled, the model predicts 10 descriptor channels after the affinities, so
  ``model.out_channels`` must grow by 10 (training and prediction refuse a mismatch);
  predictions still write only affinities. ``docs/targets_and_losses.md``, "Local shape
  descriptors". While off, none of these keys enters the training fingerprint.
  """
  lsd = ml_collections.ConfigDict()
  lsd.enabled = False
  lsd.sigma_nm = (80.0, 80.0, 80.0)  # Gaussian window (z, y, x), nm; cut at 3 sigma and the crop
  lsd.downsample = (2, 2, 2)  # computed every d voxels per axis, then interpolated; 1 = exact
  lsd.max_objects = 128  # objects per patch with descriptors (smallest ids); the rest masked
  lsd.weight = 1.0  # loss = affinity loss + weight x masked MSE of sigmoid(LSD logits)
  return lsd


def tune_defaults() -> ml_collections.ConfigDict:
  """Decoder tuning (``docs/tuning.md``): one sub-section per decoder, all always present.

  ``jaxseg.tune`` tunes ``decode.method`` (or each of ``run.decoders`` in ``jaxseg.run``) on the
  ``split`` volumes, reusing cached affinities; trials only decode and score. The objective's
  direction follows from its name: ``nerl`` is maximised, ``adapted_rand`` and ``voi`` minimised.
  """
  tune = ml_collections.ConfigDict()
  # PyTC tunes SNEMI3D on its test volume; we tune on validation volumes and refuse the test
  # split unless force_test is set (or --force_test is given).
  tune.split = "val"
  tune.force_test = False
  tune.trial_timeout_s = 300.0  # per trial, in a child process; a timed-out trial scores worst
  # The Optuna study's name in tune/<decoder>/study.db; "{decoder}" is replaced by the decoder.
  tune.study_name = "jaxseg-{decoder}"
  # Which tried setting each decoder keeps: "best" (the best score) or "flat" (the one whose grid
  # neighbours, one step along each numeric parameter and waterz's merge threshold, score best
  # on average: a small validation crop ranks single points by noise, a flat optimum transfers).
  tune.selection = "best"
  # -- connected components (NISB): a grid over the threshold
  tune.cc = cc = ml_collections.ConfigDict()
  cc.sampler = "grid"
  cc.objective = "nerl"
  cc.threshold_grid = (0.50, 0.90, 0.02)  # (low, high, step): 21 points, both ends included
  # -- waterz (SNEMI): TPE over the merge function and the watershed thresholds
  tune.waterz = wz = ml_collections.ConfigDict()
  wz.sampler = "tpe"
  wz.objective = "adapted_rand"
  wz.n_trials = 25
  wz.n_startup_trials = 10
  wz.enqueue_defaults = True  # trial 0 runs the config's own decode settings
  wz.merge_functions = (
    "aff85_his256",
    "aff75_his256",
    "aff50_his256",
    "aff25_his256",
    "aff15_his256",
  )
  wz.aff_threshold_low = (0.0, 0.5, 0.1)  # (low, high, step)
  wz.aff_threshold_high = (0.7, 1.0, 0.1)
  # Not sampled: every trial decodes all of them in one pass and reports the best.
  wz.thresholds = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
  # -- mutex watershed: TPE over its two biases (decode.mws; whole volumes with dense labels)
  tune.mws = mws = ml_collections.ConfigDict()
  mws.sampler = "tpe"  # or "grid": all 13 x 13 points
  mws.objective = "adapted_rand"
  mws.n_trials = 25
  mws.n_startup_trials = 10
  mws.enqueue_defaults = True  # trial 0 runs the config's own decode.mws biases
  mws.bias_short = (0.2, 0.8, 0.05)  # (low, high, step)
  mws.bias_long = (0.2, 0.8, 0.05)
  return tune


def run_defaults(decoders: tuple[str, ...]) -> ml_collections.ConfigDict:
  """The chain (``python -m jaxseg.run``): which decoders ``test`` / ``tune`` run, and how."""
  run = ml_collections.ConfigDict()
  # Each is decoded, scored and tuned: any of "cc", "waterz" and "mws" (the mutex watershed
  # needs the long-range channels: infer.output_channels = () predicts all of them).
  run.decoders = decoders
  run.checkpoint_step = "best"  # "best" (by train.monitor), "latest" or a step number
  run.use_ema = True
  run.baselines = True  # score trivial segmentations of the test volumes for the report
  run.preview_slices = 3  # z sections per volume in the report's PNG previews
  return run
