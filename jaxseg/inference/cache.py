"""The affinity cache: each split's predictions made once per checkpoint and input, then reused.

Layout under ``cache_root`` (``DIR/predictions`` in a run)::

  <key>/cache.json                       what the key was made of (checkpoint, steps, inputs, ...)
  <key>/<name>.zarr/affinities           [C, z, y, x] affinities (jaxseg.predict's layout)
  <key>/<name>_predict.json              what predict ran (its manifest entry says complete)
  <key>/<name>_qc/report.md, mask.zarr   QC report and affinity mask (when config.qc.enabled)

``<key>`` is a short hash of the absolute checkpoint folder, the sorted step folder names in it,
the step spec (``run.checkpoint_step``), ``run.use_ema``, every input (path, z range, shape), the
input normalisation (``data.normalize``, ``normalize_scope``, and ``normalize_percentiles`` for
``"percentile"``) and the ``infer`` fingerprint: a new checkpoint or input gets a new folder, an
identical one is reused. When every volume's predict entry is complete nothing is
predicted and JAX is never imported; otherwise :func:`jaxseg.inference.predict_lib.predict`
(imported only then), or the ``predict`` function the caller passes, fills in what is missing
(finished blocks are kept).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

from jaxseg.common import config_util, outputs
from jaxseg.common.files import local_abspath, write_json
from jaxseg.common.outputs import StageOutput, input_identity, is_complete
from jaxseg.data.normalize import normalize_settings
from jaxseg.decoding.scoring import CachedAffinities
from jaxseg.inference import layout
from jaxseg.io import VolumeError
from jaxseg.io.datasets import LabeledVolume, dataset_volumes
from jaxseg.training.paths import checkpoint_dir, completed_steps

CACHE_FILE = "cache.json"
_KEY_CHARS = 12


def _step_spec(config) -> int | str:
  step = config.run.checkpoint_step
  return int(step) if isinstance(step, int) or str(step).isdigit() else str(step)


def cache_key(config, checkpoint: str, split: str) -> tuple[str, dict]:
  """The cache key of a split's predictions and what it was made of.

  Opens the split's volumes lazily (no voxels are read) and lists the checkpoint folder; needs
  no JAX.

  Returns:
    ``(key, ingredients)``: a 12-character hex hash and the JSON-ready dict it hashes.
  """
  folder = checkpoint_dir(checkpoint)
  # A step folder's name and time: retraining into the same workdir writes the same step
  # numbers, and must not reuse the old model's affinities.
  steps = [
    [str(n), os.stat(os.path.join(folder, str(n))).st_mtime_ns] for n in completed_steps(folder)
  ]
  volumes = []
  for v in dataset_volumes(config.data, split):
    w = v.windowed()
    volumes.append(
      {
        "name": v.name,
        "path": local_abspath(str(v.image.path)),
        "z_range": list(v.z_range) if v.z_range else None,
        "shape": list(w.image.shape),
        # Data regenerated or edited at the same path is other data: its files' sizes and times.
        "content": input_identity(v.image.path)["content"],
        "attrs": hashlib.sha256(
          json.dumps(w.image.attrs, sort_keys=True, default=str).encode()
        ).hexdigest()[:16],
      }
    )
  ingredients = {
    "checkpoint_dir": folder,
    "steps": steps,
    "step": _step_spec(config),
    "use_ema": bool(config.run.use_ema),
    "split": split,
    "inputs": volumes,
    "normalize": _normalize_fingerprint(config),
    "infer": _infer_fingerprint(config),
  }
  ingredients = json.loads(json.dumps(ingredients))
  digest = hashlib.sha256(json.dumps(ingredients, sort_keys=True).encode()).hexdigest()
  return digest[:_KEY_CHARS], ingredients


def _normalize_fingerprint(config) -> list:
  """``data.normalize`` and ``normalize_scope``, plus ``normalize_percentiles`` in the one mode
  that reads them (so the keys of the other modes' caches stay what they were)."""
  out = [config.data.get("normalize", None), config.data.get("normalize_scope", None)]
  settings = normalize_settings(config.data)
  if settings.mode == "percentile":
    out.append(list(settings.percentiles))
  return out


def _infer_fingerprint(config) -> dict:
  """``config.infer`` and the target's preset and convention: what changes predicted bytes.

  Read from the config rather than through :func:`jaxseg.inference.settings.inference_settings`,
  which checks the window against the model and so imports ``jaxseg.models`` (and JAX).
  """
  infer = config_util.config_to_dict(config.infer)
  infer.pop("sw_batch_size", None)  # how many windows share a call: the same bytes
  target = config.get("target", {})
  return {
    "infer": infer,
    "preset": target.get("preset", None),
    "convention": target.get("convention", None),
    "in_channels": config.model.get("in_channels", None),
  }


def _complete(out_dir: str, name: str) -> bool:
  """True when ``jaxseg.predict`` finished this volume in ``out_dir`` (its manifest says so)."""
  return is_complete(out_dir, layout.entry_name(name))


@outputs.writes_outputs
def cached_predictions(
  config,
  checkpoint: str,
  split: str,
  cache_root: str,
  *,
  show_progress: bool = True,
  predict: Callable[..., Any] | None = None,
  skeleton_dir: str | None = None,
) -> list[CachedAffinities]:
  """The split's affinities, predicted now only if not cached; QC'd when ``config.qc.enabled``.

  Args:
    config: the run config (``data``, ``infer``, ``model``, ``run.checkpoint_step``,
      ``run.use_ema``, ``qc``).
    checkpoint: the training workdir or its ``checkpoints`` folder.
    split: ``train`` / ``val`` / ``test``.
    cache_root: folder holding the ``<key>`` folders.
    show_progress: progress bars while predicting.
    predict: fills in missing predictions, called as :func:`jaxseg.inference.predict_lib.predict`
      is (default: that function, imported only when something must be predicted; tests pass a
      fake one that needs no JAX).
    skeleton_dir: when ``config.eval.metrics`` asks for NERL, a volume with labels but no skeleton
      gets one made from its labels (:func:`jaxseg.metrics.skeletonize.cached_skeleton`), cached
      here (the work dir's ``cache/skeletons``); None leaves such volumes without NERL.

  Returns:
    One :class:`CachedAffinities` per volume of the split, in the split's order.

  Raises:
    VolumeError: the split has no volumes, or prediction did not complete.
  """
  volumes = [v.windowed() for v in dataset_volumes(config.data, split)]
  if not volumes:
    raise VolumeError(f"config.data has no volumes in split {split!r}")
  key, ingredients = cache_key(config, checkpoint, split)
  out_dir = os.path.join(cache_root, key)
  reused = all(_complete(out_dir, v.name) for v in volumes)
  if not reused:
    # The key is a hash of the ingredients: the same key is always the same cache.
    StageOutput(
      out_dir, name="cache", stage="affinity cache", fingerprint=ingredients, paths=(CACHE_FILE,)
    ).open()
    write_json(os.path.join(out_dir, CACHE_FILE), ingredients)
    if predict is None:
      # Imported here: JAX is loaded only when something must be predicted.
      from jaxseg.inference.predict_lib import predict
    predict(
      config,
      checkpoint,
      [f"split:{split}"],
      out_dir,
      step=_step_spec(config),
      use_ema=bool(config.run.use_ema),
      show_progress=show_progress,
    )
    missing = [v.name for v in volumes if not _complete(out_dir, v.name)]
    if missing:
      raise VolumeError(
        f"{out_dir}: prediction of {missing} did not complete (another process's blocks are "
        "pending?); rerun to finish it"
      )
  out = []
  for v in volumes:
    cached = CachedAffinities(
      name=v.name,
      affinities=os.path.join(out_dir, layout.group_name(v.name), layout.AFFINITIES),
      volume=_with_skeleton(config, v, skeleton_dir),
      reused=reused,
    )
    if config.qc.enabled:
      _quality_check(config, cached, out_dir, show_progress)
    out.append(cached)
  return out


def _with_skeleton(config, volume: LabeledVolume, skeleton_dir: str | None) -> LabeledVolume:
  """``volume`` with a skeleton made from its labels, when NERL is asked and it has none."""
  wanted = "nerl" in tuple(config.eval.metrics)
  if not wanted or skeleton_dir is None or volume.skeleton or volume.labels is None:
    return volume
  from jaxseg.metrics.skeletonize import cached_skeleton  # kimimaro, only when one is needed

  path = cached_skeleton(
    volume.labels, tuple(volume.image.resolution), skeleton_dir, mask=volume.mask
  )
  return dataclasses.replace(volume, skeleton=path)


def _quality_check(config, cached: CachedAffinities, out_dir: str, show_progress: bool) -> None:
  """Runs (or reuses) the affinity QC and fills ``cached.mask`` and ``cached.qc``."""
  from jaxseg.quality import run_qc

  # The QC folder is derived from the cached affinities and belongs to the cache: when the qc
  # settings change it is redone in place (decodes record the mask's spec, so none made with
  # the old mask passes for new).
  result = run_qc(
    config,
    cached.affinities,
    os.path.join(out_dir, f"{cached.name}_qc"),
    image=cached.volume.image,
    show_progress=show_progress,
    overwrite=True,
  )
  cached.mask = str(result.mask) if result.mask else None
  cached.qc = result.summary()
