"""Pieces shared by several recipes (loaded by path with ``load_sibling``, not a recipe itself)."""

import ml_collections


def qc_defaults(enabled: bool) -> ml_collections.ConfigDict:
  """Affinity QC parameters (``docs/quality.md``, "Parameters"), identical in every PyTC recipe."""
  qc = ml_collections.ConfigDict()
  qc.enabled = enabled
  qc.z_stride = 10  # sample every 10th z slice
  qc.k_edge = 20  # samples excluded at each end when computing the interior mean
  qc.refine_window = 30  # low_z / high_z are searched within 30 slices of each end
  qc.drift_thresh = 0.05  # a slice is bad when a channel mean drops below interior - 0.05
  qc.border_width = 32  # XY ring (pixels) checked for background
  qc.bg_thresh = 30  # image intensity at or below this is background
  qc.n_z_border = 8  # z samples for the XY-border diagnostic
  return qc


def decode_defaults() -> ml_collections.ConfigDict:
  """Every decoder key (``docs/decoding.md``), for both methods, with PyTC's numbers.

  A recipe picks ``method`` and sets its own storage convention and block shape. Both methods'
  keys are always present so ``--config.decode.method=waterz`` works on any recipe; a key that is
  not listed here is an error (``jaxseg.decoding.settings``), never silently ignored.
  """
  decode = ml_collections.ConfigDict()
  decode.method = "cc"  # "cc" (NISB: thresholded connected components) or "waterz" (SNEMI)
  decode.channels = (0, 1, 2)  # the preset's channel numbers of the three decoded edges
  decode.channel_order = "xyz"  # axis of each channel, used when the file records no offsets
  decode.convention = "source"  # used when the file records no convention
  # -- connected components
  decode.threshold = 0.75  # strict >; tuned values: about 0.66 (base), 0.70 (LICONN)
  # -- waterz
  decode.thresholds = (0.5,)  # all decoded in one pass, one segmentation each
  decode.merge_function = "aff85_his256"
  decode.discretize_queue = 256  # waterz's binned priority queue (0 = exact float queue)
  decode.aff_threshold_low = 0.1
  decode.aff_threshold_high = 0.999
  decode.dust = ml_collections.ConfigDict()
  decode.dust.enabled = True
  decode.dust.size = 800
  decode.dust.affinity = 0.3
  decode.dust.remove_size = 600
  # PyTC silently drops these keys in decode_waterz; we apply every configured stage.
  decode.branch_merge = ml_collections.ConfigDict()
  decode.branch_merge.enabled = True
  decode.branch_merge.iou_threshold = 0.5
  decode.branch_merge.size_ratio = (0.5, 2.0)
  decode.branch_merge.best_buddy = True
  decode.branch_merge.one_sided_threshold = 0.8
  decode.branch_merge.one_sided_min_size = 100
  decode.branch_merge.affinity_threshold = 0.0  # 0 disables the mean z-affinity gate
  # -- both
  decode.affinity_mask_path = ""  # uint8 volume, 1 = keep (jaxseg.qc writes one)
  decode.min_size = 0  # segments below this many voxels become 0 (PyTC: no size filter)
  # -- blockwise (volumes larger than memory)
  decode.blockwise = "auto"  # "auto": when the volume exceeds one block; "always"; "never"
  decode.block_shape = (256, 512, 512)
  decode.context = (8, 32, 32)  # waterz only: voxels read around each block for its watershed
  decode.num_workers = 1  # daisy worker processes (1 = in this process)
  decode.worker_command = ""  # e.g. "srun -N1 -n1 -c4": how a cluster starts each worker
  return decode


def tune_defaults() -> ml_collections.ConfigDict:
  """Decoder tuning (``docs/tuning.md``): one sub-section per decoder, both always present.

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
  return tune


def run_defaults(decoders: tuple[str, ...]) -> ml_collections.ConfigDict:
  """The chain (``python -m jaxseg.run``): which decoders ``test`` / ``tune`` run, and how."""
  run = ml_collections.ConfigDict()
  run.decoders = decoders  # each is decoded, scored and tuned; "cc" and / or "waterz"
  run.checkpoint_step = "best"  # "best" (by train.monitor), "latest" or a step number
  run.use_ema = True
  run.baselines = True  # score trivial segmentations of the test volumes for the report
  run.preview_slices = 3  # z sections per volume in the report's PNG previews
  return run
