"""PyTC (PyTorch Connectomics) checkpoints into jaxseg: the name mapping, the conversion, the save.

Owns :func:`read_pytc_checkpoint` (a PyTorch Lightning ``.ckpt`` -> numpy state dicts),
:func:`expected_names` (PyTC's parameter names for a jaxseg ``config.model``, each with its
jaxseg path and how its array converts), :func:`convert` (a PyTC state dict -> jaxseg's plain
parameter dict, refusing unknown, missing and mis-shaped keys) and :func:`import_checkpoint`
(all of it, written as an orbax step in a work dir that ``predict``, ``run`` and ``tune`` read
as if jaxseg had trained it). ``docs/import_checkpoint.md`` lists the names.

Array layouts (PyTorch is channels-first, jaxseg channels-last):

- ``Conv3d`` weight ``[out, in/groups, kz, ky, kx]`` -> kernel ``[kz, ky, kx, in/groups, out]``.
- ``ConvTranspose3d`` weight ``[in, out/groups, kz, ky, kx]`` -> kernel ``[kz, ky, kx,
  in/groups, out]`` *flipped in space*: jaxseg runs a transposed conv as a forward conv over the
  dilated input (``jaxseg.models.layers.ConvTranspose``). MedNeXt's 1x1x1 ``ConvTranspose3d``
  heads become jaxseg's pointwise ``Conv`` heads the same way (the flip is then a no-op).
- ``GroupNorm`` ``weight`` / ``bias`` ``[c]`` -> ``scale`` / ``bias``; conv biases ``[out]`` as is.

torch is an optional extra (``pip install -e ".[pytc]"``), imported only to read the file.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxseg.common import config_util
from jaxseg.common.errors import (
  ConfigError,
  InputError,
  JaxsegError,
  MissingInputError,
  OutputError,
)
from jaxseg.common.outputs import Decision
from jaxseg.models import layers
from jaxseg.training import paths

# Where a Lightning checkpoint keeps the module's weights, and the module attribute that PyTC's
# LightningModule holds the network in (``self.model``); MedNeXt sits one level deeper, in
# PyTC's ``MedNeXtWrapper.model``.
STATE_DICT_KEY = "state_dict"
LIGHTNING_MODEL_PREFIX = "model."
_COMPILED = "_orig_mod."  # what torch.compile inserts into module paths
_SHOWN = 8


class TorchMissingError(JaxsegError, ImportError):
  """torch (the optional ``pytc`` extra) is not installed."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One PyTC tensor: where it goes in jaxseg and how it converts.

  ``kind``: ``conv`` (``Conv3d`` weight), ``conv_t`` (``ConvTranspose3d`` weight, ``groups``),
  ``vector`` (a bias or a norm's weight), ``bilinear`` (RSUNet's fixed upsampling buffer: checked,
  not stored) or ``unused`` (MedNeXt's ``dummy_tensor``: a checkpointing workaround).
  """

  path: tuple | None
  kind: str
  groups: int = 1


# -- reading --------------------------------------------------------------------------------------


def _torch():
  try:
    import torch
  except ImportError as e:
    raise TorchMissingError(
      'reading a PyTC checkpoint needs torch, an optional extra: pip install -e ".[pytc]"'
    ) from e
  return torch


def _numpy_tree(tree: Any) -> Any:
  """Every tensor of ``tree`` (dicts of tensors) as a float32-or-native numpy array."""
  torch = _torch()
  if isinstance(tree, torch.Tensor):
    return tree.detach().cpu().float().numpy() if tree.is_floating_point() else tree.numpy()
  if isinstance(tree, Mapping):
    return {str(k): _numpy_tree(v) for k, v in tree.items()}
  return tree


def _ema_state(callbacks: Any) -> dict | None:
  """The EMA weights a Lightning callback saved, when one did (``checkpoint["callbacks"]``).

  Lightning stores each callback's ``state_dict()`` under its state key (the class name, plus its
  arguments). PyTC's ``EMAWeightsCallback`` keeps the average of ``pl_module.model.state_dict()``
  in ``_ema_state``; releases that persist it return it from ``state_dict()``, as ``ema_state``
  (or the bare name -> tensor dict). Releases that do not leave nothing here.
  """
  if not isinstance(callbacks, Mapping):
    return None
  for key, state in callbacks.items():
    if "ema" not in str(key).lower() or not isinstance(state, Mapping):
      continue
    for name in ("ema_state", "_ema_state", "shadow", "state_dict"):
      if isinstance(state.get(name), Mapping) and state[name]:
        return dict(state[name])
    if state and all(hasattr(v, "shape") for v in state.values()):
      return dict(state)
  return None


def read_pytc_checkpoint(path: str, *, allow_pickle: bool = False) -> dict:
  """Reads a PyTorch Lightning checkpoint (or a bare state dict) into numpy.

  Args:
    path: the ``.ckpt`` / ``.pt`` file.
    allow_pickle: also unpickle Python objects (PyTC stores its Hydra config in
      ``hyper_parameters``), which runs code from the file: only for files one trusts.

  Returns:
    ``{"state_dict": {name: array}, "ema": {name: array} or None, "global_step": int or None}``.

  Raises:
    MissingInputError / InputError: no such file, or not a checkpoint (one line).
    TorchMissingError: torch is not installed.
  """
  if not os.path.isfile(path):
    raise MissingInputError(f"--checkpoint={path}: no such file")
  torch = _torch()
  try:
    raw = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
  except Exception as e:  # torch raises many types for a file that is not its pickle
    if not allow_pickle and "weights_only" in str(e):
      raise InputError(
        f"--checkpoint={path}: holds Python objects besides tensors (e.g. the training's Hydra "
        "config); if you trust the file, pass --allow_pickle"
      ) from None
    raise InputError(
      f"--checkpoint={path}: not a PyTorch checkpoint ({type(e).__name__})"
    ) from None
  if not isinstance(raw, Mapping):
    raise InputError(f"--checkpoint={path}: holds a {type(raw).__name__}, not a state dict")
  state = raw.get(STATE_DICT_KEY, raw)
  if not isinstance(state, Mapping) or not any(isinstance(v, torch.Tensor) for v in state.values()):
    raise InputError(f"--checkpoint={path}: no {STATE_DICT_KEY!r} of tensors in it")
  tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
  ema = _ema_state(raw.get("callbacks"))
  step = raw.get("global_step")
  return {
    "state_dict": _numpy_tree(tensors),
    "ema": _numpy_tree(ema) if ema else None,
    "global_step": int(step) if isinstance(step, int) else None,
  }


# -- the names ------------------------------------------------------------------------------------


def _rsunet_names(model) -> dict[str, Entry]:
  """PyTC ``connectomics/models/arch/rsunet.py`` names for jaxseg's RSUNet."""
  levels = len(model.widths)
  out = {}

  def conv_block(prefix: str, path: tuple):
    units = {
      "pre.0": ("pre", "norm"), "pre.1": ("pre", "conv"),
      "res.norm_act1": ("res1", "norm"), "res.conv1": ("res1", "conv"),
      "res.norm_act2": ("res2", "norm"), "res.conv2": ("res2", "conv"),
      "post.0": ("post", "norm"), "post.1": ("post", "conv"),
    }  # fmt: skip
    for name, (unit, part) in units.items():
      if part == "norm":  # NormAct holds the norm as .norm (and the activation as .act)
        out[f"{prefix}.{name}.norm.weight"] = Entry((*path, unit, "norm", "scale"), "vector")
        out[f"{prefix}.{name}.norm.bias"] = Entry((*path, unit, "norm", "bias"), "vector")
      else:
        out[f"{prefix}.{name}.weight"] = Entry((*path, unit, "conv", "kernel"), "conv")

  conv_block("input_conv", ("input_block",))
  for d in range(levels - 1):  # DownBlock: .pool (no state), .conv
    conv_block(f"down_blocks.{d}.conv", ("down_blocks", d))
  for i in range(levels - 1):  # deepest first in both
    out[f"up_blocks.{i}.up.weight"] = Entry(None, "bilinear")
    out[f"up_blocks.{i}.proj.weight"] = Entry(("up_proj", i, "kernel"), "conv")
    conv_block(f"up_blocks.{i}.conv", ("up_blocks", i))
  out["final_norm.norm.weight"] = Entry(("head_norm", "scale"), "vector")
  out["final_norm.norm.bias"] = Entry(("head_norm", "bias"), "vector")
  out["output_head.weight"] = Entry(("head", "kernel"), "conv")
  out["output_head.bias"] = Entry(("head", "bias"), "vector")
  return out


def _mednext_names(model) -> dict[str, Entry]:
  """MedNeXt v1 (``MIC-DKFZ/MedNeXt``, ``mednextv1/MedNextV1.py`` and ``blocks.py``) names."""
  from jaxseg.models import mednext

  _, counts = mednext.SIZES[str(model.get("size", "S"))]
  stages = mednext.NUM_STAGES
  channels = [int(model.get("base_channels", 32)) * 2**i for i in range(stages + 1)]
  out = {
    "stem.weight": Entry(("stem", "kernel"), "conv"),
    "stem.bias": Entry(("stem", "bias"), "vector"),
  }

  def block(prefix: str, path: tuple, transposed_width: int | None = None):
    # conv1: depthwise (a ConvTranspose3d with groups=C in the up blocks); norm; conv2 expands,
    # conv3 compresses (1x1x1 Conv3d).
    if transposed_width is None:
      out[f"{prefix}.conv1.weight"] = Entry((*path, "body", "depthwise", "kernel"), "conv")
    else:
      kernel = (*path, "body", "depthwise", "kernel")
      out[f"{prefix}.conv1.weight"] = Entry(kernel, "conv_t", transposed_width)
    out[f"{prefix}.conv1.bias"] = Entry((*path, "body", "depthwise", "bias"), "vector")
    out[f"{prefix}.norm.weight"] = Entry((*path, "body", "norm", "scale"), "vector")
    out[f"{prefix}.norm.bias"] = Entry((*path, "body", "norm", "bias"), "vector")
    for torch_name, ours in (("conv2", "expand"), ("conv3", "compress")):
      out[f"{prefix}.{torch_name}.weight"] = Entry((*path, "body", ours, "kernel"), "conv")
      out[f"{prefix}.{torch_name}.bias"] = Entry((*path, "body", ours, "bias"), "vector")

  def residual(prefix: str, path: tuple, transposed: bool):
    out[f"{prefix}.res_conv.weight"] = Entry(
      (*path, "residual", "kernel"), "conv_t" if transposed else "conv"
    )
    out[f"{prefix}.res_conv.bias"] = Entry((*path, "residual", "bias"), "vector")

  for i in range(stages):
    for j in range(counts[i]):
      block(f"enc_block_{i}.{j}", ("encoders", i, j))
    block(f"down_{i}", ("downs", i))
    residual(f"down_{i}", ("downs", i), transposed=False)
  for j in range(counts[stages]):
    block(f"bottleneck.{j}", ("bottleneck", j))
  for j in range(stages):  # jaxseg's ups[j] / decoders[j] are MedNeXt's up_{3-j} / dec_block_{3-j}
    level = stages - 1 - j
    block(f"up_{level}", ("ups", j), transposed_width=channels[level + 1])
    residual(f"up_{level}", ("ups", j), transposed=True)
    for k in range(counts[stages + 1 + j]):
      block(f"dec_block_{level}.{k}", ("decoders", j, k))
  # OutBlock.conv_out is a 1x1x1 ConvTranspose3d; deep-supervision heads out_1..out_4.
  out["out_0.conv_out.weight"] = Entry(("head", "kernel"), "conv_t")
  out["out_0.conv_out.bias"] = Entry(("head", "bias"), "vector")
  if model.get("deep_supervision", False):
    for s in range(1, stages + 1):
      out[f"out_{s}.conv_out.weight"] = Entry(("ds_heads", s - 1, "kernel"), "conv_t")
      out[f"out_{s}.conv_out.bias"] = Entry(("ds_heads", s - 1, "bias"), "vector")
  out["dummy_tensor"] = Entry(None, "unused")
  return out


def expected_names(model_config) -> dict[str, Entry]:
  """PyTC's names (below the network module) for the network ``model_config`` describes."""
  name = model_config.get("name")
  if name == "rsunet":
    return _rsunet_names(model_config)
  if name == "mednext":
    return _mednext_names(model_config)
  raise ConfigError(f"model.name={name!r}: PyTC checkpoints import for 'rsunet' and 'mednext'")


# Candidate module prefixes, most specific first: PyTC's Lightning module keeps the network in
# ``self.model``; MedNeXt sits in ``MedNeXtWrapper.model`` below it. A bare network state dict
# has no prefix.
_PREFIXES = ("model.model.", "model.", "")


def _strip_prefix(state: Mapping[str, Any], names: Mapping[str, Entry]) -> tuple[dict, str]:
  """``state`` below the network's prefix (the one under which most expected names occur).

  Keys outside the prefix are the Lightning module's other members (a loss's buffers), not the
  network's, and are left out.
  """
  cleaned = {k.replace(_COMPILED, ""): v for k, v in state.items()}
  best, best_hits = "", -1
  for prefix in _PREFIXES:
    hits = sum(1 for k in cleaned if k.startswith(prefix) and k[len(prefix) :] in names)
    if hits > best_hits:
      best, best_hits = prefix, hits
  if best_hits == 0:
    # Nothing matched: compare everything, so the refusal lists what the file holds.
    best = (
      LIGHTNING_MODEL_PREFIX if all(k.startswith(LIGHTNING_MODEL_PREFIX) for k in cleaned) else ""
    )
  return {k[len(best) :]: v for k, v in cleaned.items() if k.startswith(best)}, best


# -- conversion -----------------------------------------------------------------------------------


def _get(tree: Mapping, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _torch_shape(entry: Entry, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The PyTorch shape of the tensor that becomes a jaxseg array of ``shape``."""
  if entry.kind == "conv":  # [kz, ky, kx, in/g, out] <- [out, in/g, kz, ky, kx]
    return (shape[4], shape[3], *shape[:3])
  if entry.kind == "conv_t":  # [k.., in/g, out] <- [in, out/g, k..]
    g = entry.groups
    return (shape[3] * g, shape[4] // g, *shape[:3])
  return tuple(shape)


def _to_jaxseg(entry: Entry, array: np.ndarray) -> np.ndarray:
  if entry.kind == "conv":
    return np.transpose(array, (2, 3, 4, 1, 0))
  if entry.kind == "conv_t":
    g = entry.groups
    cin, cout_g, *kernel = array.shape
    # [g, in/g, out/g, k..] -> [k.., in/g, g, out/g] -> [k.., in/g, out]: output channel
    # ``group * out/g + j``, as a grouped forward conv orders them.
    grouped = array.reshape(g, cin // g, cout_g, *kernel).transpose(3, 4, 5, 1, 0, 2)
    return np.flip(grouped.reshape(*kernel, cin // g, g * cout_g), axis=(0, 1, 2))
  return array


def _bilinear_buffer(model, channels: int) -> np.ndarray:
  """The depthwise ``[c, 1, kz, ky, kx]`` kernel of jaxseg's fixed upsampling for one level."""
  taps = [layers.bilinear_taps(int(f)) for f in model.pool]
  kernel = np.einsum("i,j,k->ijk", *taps)
  return np.broadcast_to(kernel, (channels, 1, *kernel.shape))


def _shown(items: list[str]) -> str:
  more = f", and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
  return ", ".join(items[:_SHOWN]) + more


def convert(state: Mapping[str, np.ndarray], model_config, abstract_params: Any) -> dict:
  """A PyTC state dict as jaxseg's plain parameter dict (float32 numpy).

  Args:
    state: PyTC names -> arrays, with or without the Lightning prefix (``model.``, MedNeXt's
      ``model.model.``).
    model_config: jaxseg's ``config.model`` (which network, its widths / size / kernel).
    abstract_params: the jaxseg parameter tree (shapes), ``train_lib.model_graphdef``'s.

  Raises:
    InputError: keys that the network does not have (unknown), that it needs and the file lacks
      (missing), or whose shapes differ from the config's network (mis-shaped), each named; and
      an RSUNet upsampling kernel other than jaxseg's fixed one.
  """
  names = expected_names(model_config)
  state, prefix = _strip_prefix(state, names)
  unknown = sorted(prefix + k for k in state if k not in names)
  missing = sorted(prefix + k for k in names if k not in state)
  problems = []
  if unknown:
    problems.append(f"unknown keys (not in jaxseg's {model_config.name}): {_shown(unknown)}")
  if missing:
    problems.append(f"missing keys: {_shown(missing)}")
  params: dict = {}
  misshaped = []
  for key, entry in names.items():
    if key not in state:
      continue
    array = np.asarray(state[key])
    if entry.kind == "unused":
      continue
    if entry.kind == "bilinear":
      channels = array.shape[0] if array.ndim else 0
      want = _bilinear_buffer(model_config, channels)
      if array.shape != want.shape or not np.allclose(array, want, atol=1e-6):
        misshaped.append(f"{prefix}{key} {tuple(array.shape)} (not jaxseg's fixed bilinear kernel)")
      continue
    target = _get(abstract_params, entry.path)
    want_shape = _torch_shape(entry, tuple(target.shape))
    if tuple(array.shape) != want_shape:
      misshaped.append(f"{prefix}{key} {tuple(array.shape)}, expected {want_shape}")
      continue
    _set(params, entry.path, np.ascontiguousarray(_to_jaxseg(entry, array), dtype=np.float32))
  if misshaped:
    problems.append(f"mis-shaped keys (check model.* against the PyTC run): {_shown(misshaped)}")
  if problems:
    raise InputError("the PyTC checkpoint does not fit the config's model: " + "; ".join(problems))
  _check_complete(params, abstract_params)
  return params


def _check_complete(params: Mapping, abstract_params: Any) -> None:
  """Every jaxseg parameter was filled: a gap would be a bug in the name tables, not the user's."""
  import jax

  wanted = {p for p, _ in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  got = {p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  if wanted != got:
    raise AssertionError(
      f"pytc_import name table out of date: {sorted(map(str, wanted ^ got))[:5]}"
    )


# -- the import -----------------------------------------------------------------------------------


def import_checkpoint(
  config,
  checkpoint: str,
  workdir: str,
  *,
  step: int | None = None,
  allow_pickle: bool = False,
  overwrite: bool = False,
) -> dict:
  """Converts a PyTC checkpoint into an orbax step of a jaxseg work dir.

  The work dir then looks like a training run of ``config``: its manifest entry (the training
  fingerprint), ``config.json`` and ``checkpoints/<step>/`` with ``params``, ``ema`` (when the
  file holds EMA weights, or when ``train.ema.enabled`` asks for one: then a copy of the
  weights, as a fresh jaxseg run starts it), ``train`` (the step, a fresh optimizer state, so a
  later ``train`` fine-tunes from here) and ``meta`` (no metrics: ``best`` resolves to it).

  Args:
    config: the jaxseg config the model was trained as (its ``model`` section must match).
    checkpoint: the PyTC ``.ckpt`` file.
    workdir: the work dir; new, empty, or a jaxseg work dir of this config without checkpoints.
    step: the step number to save under; default the checkpoint's ``global_step`` (else 0).
    allow_pickle: see :func:`read_pytc_checkpoint`.
    overwrite: replace a training run of other settings in ``workdir`` (its files only).

  Returns:
    ``{"workdir", "checkpoint_dir", "step", "ema", "prefix"}``.

  Raises:
    InputError, ConfigError, OutputError: one line each; nothing is written before all checks
    (the file, every key and shape, the work dir) have passed.
  """
  import jax
  import jax.numpy as jnp

  from jaxseg.training import checkpoint as ckpt_lib
  from jaxseg.training import optim, train_lib

  workdir = os.path.abspath(workdir)
  _, abstract_params, abstract_rest = train_lib.model_graphdef(config)
  if jax.tree.leaves(abstract_rest):  # RSUNet and MedNeXt have none; a new model would need it
    raise ConfigError(f"model.name={config.model.name!r}: has non-parameter state to import")
  stage = paths.training_output(config, workdir)
  directory = os.path.join(workdir, paths.CHECKPOINT_DIR)
  decision = stage.peek(overwrite=overwrite)  # refuses the user's folder, another run's
  if decision is not Decision.REPLACE and paths.completed_steps(directory):
    raise OutputError(
      f"{workdir}: already holds checkpoints (steps {paths.completed_steps(directory)}); "
      "import into a new --workdir"
    )
  read = read_pytc_checkpoint(checkpoint, allow_pickle=allow_pickle)
  params = convert(read["state_dict"], config.model, abstract_params)
  _, prefix = _strip_prefix(read["state_dict"], expected_names(config.model))
  ema = None
  if read["ema"] is not None:
    try:
      ema = convert(read["ema"], config.model, abstract_params)
    except InputError as e:
      raise InputError(f"the EMA weights in {checkpoint}: {e}") from None
  if step is None:
    step = read["global_step"] or 0
  if int(step) < 0:
    raise ConfigError(f"--step must be >= 0, got {step}")
  step = int(step)

  params = jax.tree.map(jnp.asarray, params)
  if ema is not None:
    ema = jax.tree.map(jnp.asarray, ema)
  elif bool(config.train.ema.enabled):
    ema = jax.tree.map(jnp.copy, params)
  num_steps = int(config.train.num_steps)
  tx = optim.create_optimizer(config.optim, num_steps)
  train = {
    "step": jnp.asarray(step, jnp.int32),
    "opt_state": tx.init(params),
    "rest": abstract_rest,
  }

  stage.open(overwrite=overwrite)
  config_util.save_config(config, workdir)
  manager = ckpt_lib.CheckpointManager(
    directory,
    keep_top_k=int(config.train.keep_top_k),
    monitor=str(config.train.monitor),
    monitor_mode=str(config.train.monitor_mode),
    async_save=False,
  )
  try:
    manager.save(step, params=params, train=train, ema=ema, model_config=config.model)
  finally:
    manager.close()
  # As a training run: complete once it reached train.num_steps (else `train` continues it).
  if step >= num_steps:
    stage.finish(imported_from=os.path.abspath(checkpoint))
  return {
    "workdir": workdir,
    "checkpoint_dir": directory,
    "step": step,
    "ema": read["ema"] is not None,
    "prefix": prefix,
  }
