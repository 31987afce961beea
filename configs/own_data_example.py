"""Your own labelled volumes: the template to copy, set up for the gala FIB-SEM crops.

Every field a lab changes for its own data is here, with what it means. As shipped, it trains on
the first 32 sections of ``train-image.h5`` (gala's FIB-SEM training crop, ``../shared/data``; see
the README, "Your own data"), tunes the decoders on the crop's last 18 sections and scores on the
held-out ``test-image.h5``::

  python -m jaxseg.run --config=configs/own_data_example.py --workdir=runs/own

The network, loss and decoding follow the NISB recipe (``nisb_base.py``: 6 affinity channels,
per-channel BCE, EMA, label erosion, AdamW + cosine, connected components), with a small RSUNet
and a short schedule sized for a CPU. On a GPU, take ``nisb_base``'s MedNeXt (see "model").
"""

import ml_collections

from configs import common, nisb_base


def get_config(arg=None):
  config = nisb_base.get_config(arg)
  # The NISB tutorial names its study; this recipe's studies keep jaxseg's own name.
  config.tune.study_name = common.tune_defaults().study_name
  config.name = "own_data_example"

  # -- data: which files make up each split -----------------------------------------------------
  data = config.data
  data.layout = "volumes"  # a list of files per split (instead of NISB / SNEMI / CREMI layouts)
  # Relative paths in the entries below resolve against root (absolute paths are kept).
  data.root = "../shared/data/gala_fibsem_example"
  # On-disk axis order of every file, unless an entry says otherwise; None = the file's own
  # axis_order attribute, else (z, y, x). A 4-D image with channels: "czyx" or "zyxc".
  data.axis_order = "zyx"
  # nm per voxel (z, y, x), unless an entry says otherwise; None = the file's resolution attribute.
  # gala does not state its voxel size: ~10 nm isotropic FIB-SEM (Janelia FlyEM).
  data.resolution = (10.0, 10.0, 10.0)
  # Each split: a tuple of entries. An entry is a dict with
  #   image       the image: "a.h5:dataset", "a.zarr/array", "a.tif", a folder of PNG / TIFF
  #               slices, an N5 or neuroglancer precomputed volume (uint8, uint16 or float);
  #   labels      dense neuron ids, same shape; 0 = background / membrane (ignored by the metrics);
  #   skeleton    optional NISB skeleton.pkl or em_erl .npz for NERL; without one, jaxseg makes it
  #               from the labels when NERL is asked (cached in the work dir);
  #   mask        optional uint8 / bool volume, 1 = labelled region (outside: no loss, no score);
  #   name        optional, names the outputs (default: the image file's name);
  #   axis_order, resolution   per-entry overrides of the two fields above;
  #   z_range     optional (z0, z1): only those sections (one file, two splits).
  # The same entries can come from a file instead: data.volumes_file = "splits.yaml" holding
  # {train: [...], val: [...], test: [...]} (JSON or YAML), or from the command line:
  #   --config.data.volumes.train="({'image': 'a.h5:raw', 'labels': 'a.h5:seg'},)"
  data.volumes = ml_collections.ConfigDict()
  train_crop = {"image": "train-image.h5:stack", "labels": "train-gt.lzf.h5:stack"}
  data.volumes.train = ({**train_crop, "name": "train", "z_range": (0, 32)},)
  data.volumes.val = ({**train_crop, "name": "val", "z_range": (32, 50)},)
  data.volumes.test = ({"image": "test-image.h5:stack", "labels": "test-gt.lzf.h5:stack"},)
  data.volumes_file = ""
  # How raw intensities become network inputs. "percentile": each volume's own p_low..p_high
  # (normalize_percentiles) mapped to 0..1 and clipped; "zscore": each volume's mean and std;
  # "minmax": its range; "divide_255": uint8 as is. The statistics are computed on every volume
  # it reads, training and prediction alike, so a new volume with other contrast or brightness
  # meets the network as the training volumes did.
  data.normalize = "percentile"
  data.normalize_percentiles = (1.0, 99.0)
  # Contrast (x 0.5-1.5 about the crop mean) and gamma (0.7-1.5) augmentation, with this
  # probability per crop: for data from several microscopes or sessions (0 = off).
  data.aug.contrast_gamma_p = 0.0
  data.in_memory = True  # small crops: read once, not per training crop
  data.prefetch = 2
  # Training crops (z, y, x). The 6 affinities reach 10 voxels, so crops are read with 10 more
  # (target.target_context): 8 + 10 sections fit the 18 validation sections.
  data.patch_size = (8, 64, 64)

  # -- model: a small RSUNet for a CPU ------------------------------------------------------------
  # On a GPU: config.model = nisb_base.get_config().model (MedNeXt-L), patch and window 128^3.
  config.model = model = ml_collections.ConfigDict()
  model.name = "rsunet"
  model.in_channels = 1
  model.out_channels = 6
  model.widths = (8, 16, 24, 32)
  model.pool = (2, 2, 2)  # isotropic voxels: pool every axis
  model.depth_2d = 0  # isotropic voxels: 3-D kernels at every level
  model.norm_groups = 4
  model.activation = "elu"
  model.compute_dtype = "float32"
  model.param_dtype = "float32"
  model.remat = False

  # -- training: short, validated on the val entries ----------------------------------------------
  config.optim.lr = 3e-3
  config.train.num_steps = 600
  config.train.batch_size = 1
  config.train.mixed_precision = False
  config.train.ema.warmup_steps = 100
  config.train.ema.decay = 0.98
  config.train.log_every = 50
  config.train.eval_every = 200
  config.train.eval_batches = 4
  config.train.checkpoint_every = 200

  # -- prediction, decoding, QC, tuning -------------------------------------------------------------
  config.infer.window = (16, 64, 64)  # wider than the training crops: more context
  config.infer.sw_batch_size = 4
  config.infer.block_shape = (64, 128, 256)
  config.decode.block_shape = (64, 128, 256)
  config.decode.threshold = 0.5  # a short run's tempered affinities sit near 0.5; tuning refines
  config.decode.dust.size = 100
  config.decode.dust.remove_size = 50
  # QC finds bad sections at the ends of large volumes and a background ring; a labelled crop of
  # 15 to 50 sections has neither.
  config.qc.enabled = False
  # Dense labels: adapted Rand is the direct measure (NERL is reported too, on skeletons jaxseg
  # makes from the labels).
  config.tune.cc.objective = "adapted_rand"
  config.tune.cc.threshold_grid = (0.3, 0.8, 0.05)
  config.tune.waterz.n_trials = 12
  config.tune.waterz.n_startup_trials = 6
  config.tune.trial_timeout_s = 300.0
  config.run.decoders = ("cc", "waterz")
  config.run.baselines = True
  return config
