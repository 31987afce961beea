"""NISB ``base`` setting with the BANIS+ recipe (PyTC ``liconn_banis_v3_erosion2`` chain).

MedNeXt-L (k=3), 6 affinity channels (``banis6``, source-voxel storage), per-channel BCE, EMA,
label erosion 2, AdamW + cosine to 0 over 200k steps, 128^3 sliding windows with distance
blending of tempered probabilities, thresholded connected components, NERL. Numbers follow
``docs/`` (``recipes.md``, NISB / LICONN; ``inference.md``; ``decoding.md``; ``tuning.md``).

Data layout (``data.root``): ``{train,val,test}/seed{N}/data.zarr`` with ``img`` (x, y, z, 1) uint8
and ``seg`` (x, y, z), plus ``skeleton.pkl``; jaxseg reads them as (z, y, x) through a lazy
transpose. ``:pytc`` restores PyTC's behaviour where we fix a bug.
"""

import ml_collections

from configs import common


def get_config(arg=None):
  pytc_compat = arg == "pytc"
  config = ml_collections.ConfigDict()
  config.name = "nisb_base"
  config.seed = 0

  # -- data ------------------------------------------------------------------------------------
  config.data = data = ml_collections.ConfigDict()
  data.layout = "nisb"
  data.root = "datasets/nisb/base"
  data.train_seeds = (0, 1, 2, 3, 4)
  data.val_seeds = (100,)
  data.test_seeds = (101,)
  data.image_axis_order = "xyzc"
  data.labels_axis_order = "xyz"
  data.resolution = (20.0, 9.0, 9.0)  # nm, (z, y, x); PyTC writes [9, 9, 20] in x, y, z
  data.patch_size = (128, 128, 128)
  data.normalize = "divide_255"
  data.aug = _aug_banis()
  data.prefetch = 4  # host batches read ahead on background threads
  data.in_memory = False  # crops are read lazily from the zarr (cubes are tens of GB)

  # -- target ----------------------------------------------------------------------------------
  config.target = target = ml_collections.ConfigDict()
  target.preset = "banis6"
  target.convention = "source"  # BANIS: the edge v -> v + o is stored at v
  target.erosion = 2
  # PyTC erodes in the plane of array axes (1, 2) of an x, y, z array: the (y, z) plane, i.e.
  # slices along x. In canonical (z, y, x) order that plane is "zy".
  target.erosion_plane = "zy"
  target.target_context = (10, 10, 10)  # read 138^3, compute targets, crop to [0:128]^3
  target.relabel_connected_components = False
  target.lsd = common.lsd_defaults()  # MTLSD auxiliary head, off; see configs/common.py

  # -- model -----------------------------------------------------------------------------------
  config.model = model = ml_collections.ConfigDict()
  model.name = "mednext"
  model.size = "L"  # exp_r = block_counts = (3, 4, 8, 8, 8, 8, 8, 4, 3)
  model.kernel_size = 3
  model.in_channels = 1
  model.out_channels = 6
  model.base_channels = 32
  model.deep_supervision = False
  model.compute_dtype = "bfloat16"
  model.param_dtype = "float32"
  model.remat = True  # per-block gradient checkpointing, as PyTC's "outside_block"

  # -- optimiser -------------------------------------------------------------------------------
  config.optim = optim = ml_collections.ConfigDict()
  optim.name = "adamw"
  optim.lr = 1e-3
  optim.weight_decay = 0.01
  optim.decay_norm_and_bias = False
  optim.b1 = 0.9
  optim.b2 = 0.999
  optim.eps = 1e-8
  optim.grad_clip = 1.0
  optim.schedule = "cosine"  # per step, T_max = num_steps, eta_min = 0, no warmup
  optim.warmup_steps = 0
  optim.warmup_start_factor = 0.0
  optim.min_lr = 0.0
  optim.steps_per_epoch = 1
  optim.step_per_epoch = False

  # -- training --------------------------------------------------------------------------------
  config.train = train = ml_collections.ConfigDict()
  train.num_steps = 200_000
  train.batch_size = 2  # per device
  train.mixed_precision = True
  train.loss = "per_channel_bce"
  train.max_pos_weight = 10.0
  train.logit_clamp = 20.0
  train.ema = ml_collections.ConfigDict()
  train.ema.enabled = True
  train.ema.decay = 0.999
  train.ema.warmup_steps = 500  # decay 0 (a plain copy) for the first 500 updates
  train.log_every = 100
  train.eval_every = 5000  # validation on the EMA weights; each validation also checkpoints
  # 100 random 128^3 crops of the validation cube. PyTC reseeds them every epoch; we use the same
  # crops at every validation so the monitored loss compares models, not draws of crops.
  train.eval_batches = 100
  train.preview_every = 0  # validation previews its crops (snemi.py: previews without validation)
  # Checkpoints: every 5000 steps (resume granularity) and at every validation; kept are the
  # latest, the top-3 by val_loss and PyTC's permanent every-50k-steps checkpoints.
  train.checkpoint_every = 5000
  train.keep_every = 50_000
  train.keep_top_k = 3
  train.monitor = "val_loss"  # "val_loss", "val_accuracy" (mode max) or "train_loss"
  train.monitor_mode = "min"
  train.mesh_devices = 0  # devices of the ('data',) mesh; 0 = all (global batch = 2 x devices)
  train.distributed = False  # jax.distributed.initialize(); also on JAX_COORDINATOR_ADDRESS

  # -- inference -------------------------------------------------------------------------------
  config.infer = infer = ml_collections.ConfigDict()
  infer.window = (128, 128, 128)
  infer.overlap = 0.5  # stride 64
  infer.snap_to_edge = True
  infer.pad = (0, 0, 0)
  infer.pad_mode = "constant"
  infer.crop_pad = (0, 0, 0, 0, 0, 0)
  infer.sw_batch_size = 8
  infer.blending = "distance"  # chessboard distance to the window face: 1 at faces, 64 centre
  infer.activation = "scale_sigmoid"
  infer.temperature = 5.0  # sigmoid(logit / 5), the BANIS temperature
  infer.activation_before_blend = True  # blend the tempered probabilities
  infer.output_channels = (0, 1, 2)
  infer.output_dtype = "float16"
  # Windows straddling a block face run once per block they touch: 128^3 windows at stride 64
  # cost (9/8)^3 = 1.42x the unique windows with 512^3 blocks, (5/4)^3 = 1.95x with 256^3.
  infer.block_shape = (512, 512, 512)
  infer.chunk_shape = ()  # () = per axis the largest divisor of block_shape <= 128
  infer.tta = ml_collections.ConfigDict()
  infer.tta.enabled = False
  infer.tta.views = "custom"  # the three keys below; or "xy8", "zyx16" (inference.md)
  infer.tta.flip_axes = ("z", "y", "x")
  infer.tta.rot90_yx = False  # y and x share a resolution, z does not
  infer.tta.permute_axes = False  # swaps only axes of equal resolution when enabled
  infer.tta.ensemble = "mean"

  # -- decoding --------------------------------------------------------------------------------
  config.decode = decode = common.decode_defaults()
  decode.method = "cc"
  decode.channel_order = "xyz"  # banis6 channels 0-2 are +x, +y, +z
  decode.convention = "source"
  decode.threshold = 0.75  # strict >; tuned values: about 0.66 (base), 0.70 (LICONN)
  decode.min_size = 0  # PyTC applies no size filter
  # waterz (when asked for): its watershed thresholds 0.1 / 0.999 are for plain sigmoid outputs;
  # on the tempered ones the same logits are 0.392 / 0.799 (0.999 is almost never reached there).
  decode.aff_threshold_low = common.tempered(0.1, infer.temperature)
  decode.aff_threshold_high = common.tempered(0.999, infer.temperature)
  decode.block_shape = (256, 512, 512)

  # -- affinity QC -----------------------------------------------------------------------------
  config.qc = common.qc_defaults(enabled=True)

  # -- evaluation ------------------------------------------------------------------------------
  config.eval = ev = ml_collections.ConfigDict()
  ev.metrics = ("nerl", "adapted_rand", "voi")
  ev.arand = "snemi"
  ev.crop_fraction = 1.0  # the whole volume
  ev.merge_threshold = 1  # node count; PyTC moved to 50 in 78264698, funlib uses > 0

  # -- tuning ----------------------------------------------------------------------------------
  config.tune = tune = common.tune_defaults()
  tune.split = "val"
  tune.trial_timeout_s = 3600.0
  tune.cc.objective = "nerl"
  # The NISB / LICONN tutorial's grid and study name (nisb_base_banis_cc_tuning).
  tune.cc.threshold_grid = (0.40, 0.94, 0.06)  # (low, high, step): 10 points, inclusive
  tune.study_name = "nisb_base_banis_{decoder}_tuning"

  # -- the chain (python -m jaxseg.run) ---------------------------------------------------------
  config.run = common.run_defaults(decoders=("cc",))
  # Trivial baselines are for small cubes: "every voxel its own segment" alone costs about 12 s
  # and 1 GB per 8 M voxels to score. The demo scores them.
  config.run.baselines = False
  del pytc_compat  # every NISB fix (EMA saved, same normalisation) has no PyTC switch
  return config


def _aug_banis():
  """PyTC ``aug_banis``, applied in this order before erosion and targets (section 3)."""
  aug = ml_collections.ConfigDict()
  aug.name = "aug_banis"
  aug.permute_axes_p = 1.0  # identity allowed
  aug.rot90_all_planes = True  # k uniform in 0..3 in each of the 3 planes
  aug.flip_p = 0.5  # per axis
  aug.slice_drop_p = 0.5  # one random axis; each slice zeroed w.p. slice_drop_rate
  aug.slice_drop_rate = 0.05
  aug.slice_shift_p = 0.5  # one random axis; each slice rolled (wrap) w.p. slice_shift_rate
  aug.slice_shift_rate = 0.05
  aug.slice_shift_max = 10  # voxels, U{-10..10} in-plane
  aug.affine_p = 0.5  # image + labels (nearest), reflection padding
  aug.affine_rotation = 3.141592653589793  # +- on every axis
  aug.affine_scale = 0.2
  aug.affine_shear = 0.5
  aug.intensity_p = 0.5
  aug.intensity_mul = (0.9, 1.1)
  aug.intensity_add = (-0.1, 0.1)
  aug.noise_p = 0.5
  aug.noise_std = (0.0, 0.5)
  common.grid_warp_aug(aug)  # jaxseg's own, off in this recipe
  common.contrast_gamma_aug(aug)  # jaxseg's own, off in this recipe
  return aug
