"""Generated NISB-style cubes: one cube in memory, on disk, and whole ``{train,val,test}`` datasets.

Owns :func:`generate_cube` (pure: config + seed -> arrays + skeleton graph), :func:`write_cube`,
:func:`generate_dataset` (resumable) and the summary helpers.

In memory everything is canonical: ``img`` uint8 [z, y, x], ``seg`` uint32 [z, y, x]. On disk the
NISB layout, x-first::

  {root}/{train,val,test}/seed{N}/data.zarr/img   zarr v2, (X, Y, Z, 1) uint8   axis_order "xyzc"
  {root}/{train,val,test}/seed{N}/data.zarr/seg   zarr v2, (X, Y, Z) uint32     axis_order "xyz"
  {root}/{train,val,test}/seed{N}/skeleton.pkl    networkx Graph (see segmentation.py)
  {root}/{train,val,test}/seed{N}/preview.png     a few xy slices, image and label overlay
  {root}/{train,val,test}/seed{N}/synth_complete.json   written last: the cube's statistics

Both arrays carry the attributes ``resolution`` (z, y, x nm), ``axis_order``, ``generator``,
``seed``, ``difficulty``, ``config`` (every resolved knob) and ``fingerprint``. A cube counts as
complete only when ``synth_complete.json`` exists (it is written after everything else), so an
interrupted run resumes by regenerating just the unfinished cubes.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import networkx as nx
import numpy as np

from jaxseg.common import config_util, outputs
from jaxseg.common.errors import OutputError
from jaxseg.common.files import write_json
from jaxseg.common.outputs import Decision, StageOutput, is_jaxseg_folder
from jaxseg.common.progress import progress
from jaxseg.io.preview import save_preview
from jaxseg.synthesis.config import SynthParams, resolve_config
from jaxseg.synthesis.render import membrane_mask, render_image
from jaxseg.synthesis.segmentation import build_segmentation

GENERATOR = "jaxseg.synthesis"
COMPLETE_MARKER = "synth_complete.json"
SPLITS = ("train", "val", "test")
_CUBE_FILES = ("data.zarr", "skeleton.pkl", "preview.png", COMPLETE_MARKER)
# What a dataset root holds beside the split folders.
PARAMS_FILE = "synth_params.json"
SUMMARY_FILE = "synth_summary.json"


def generate_cube(config, seed: int) -> tuple[np.ndarray, np.ndarray, nx.Graph]:
  """Generates one cube; a pure function of the config and the seed.

  Args:
    config: the ``data.synth`` ConfigDict (:func:`jaxseg.synthesis.default_config`) or resolved
      :class:`SynthParams`.
    seed: the cube's seed (NISB names the cube ``seed{N}``).

  Returns:
    ``(img, seg, graph)``: uint8 [z, y, x] image, uint32 [z, y, x] neuron ids (0 =
    extracellular space) and the skeleton graph (node ``id`` == seg id at the node).
  """
  params = resolve_config(config)
  rng = np.random.default_rng(int(seed))
  gt = build_segmentation(params, rng)
  img = render_image(gt.seg, params, rng)
  return img, gt.seg, gt.graph


def cube_stats(seg: np.ndarray, graph: nx.Graph) -> dict[str, Any]:
  """Summary numbers of one cube (JSON-ready).

  ``membrane_fraction`` counts voxels drawn as membrane (in-plane or along z) over all voxels.
  """
  lengths = [d for _, _, d in graph.edges(data="edge_length")]
  return {
    "shape": [int(s) for s in seg.shape],
    "neurons": int(len(np.unique(seg)) - (1 if (seg == 0).any() else 0)),
    "fill_fraction": float(np.count_nonzero(seg) / seg.size),
    "membrane_fraction": float(np.count_nonzero(membrane_mask(seg)) / seg.size),
    "skeleton_nodes": int(graph.number_of_nodes()),
    "skeleton_length_um": float(sum(lengths) / 1000.0),
  }


def is_complete(directory: str) -> bool:
  """True if ``directory`` holds a complete cube (its marker exists)."""
  return os.path.isfile(os.path.join(directory, COMPLETE_MARKER))


def read_marker(directory: str) -> dict[str, Any]:
  """The statistics / provenance stored in a complete cube's marker."""
  with open(os.path.join(directory, COMPLETE_MARKER)) as f:
    return json.load(f)


@outputs.writes_outputs
def write_cube(
  directory: str,
  img: np.ndarray,
  seg: np.ndarray,
  graph: nx.Graph,
  resolution,
  *,
  chunks=(64, 64, 64),
  attributes: dict[str, Any] | None = None,
  preview: bool = True,
  overwrite: bool = False,
) -> dict[str, Any]:
  """Writes a cube in the NISB layout (see the module docstring).

  The folder must be new, empty, or a cube jaxseg wrote (its manifest says so): an identical
  cube is written again, one made with other attributes only with ``overwrite``, and a folder
  of the user's data never (:mod:`jaxseg.common.outputs`).

  Args:
    directory: the cube folder, e.g. ``root/train/seed0``.
    img: uint8 [z, y, x] image.
    seg: [z, y, x] neuron ids (stored as uint32).
    graph: skeleton graph.
    resolution: nm per voxel (z, y, x).
    chunks: on-disk chunk shape (z, y, x).
    attributes: extra array attributes (seed, config, ...), also stored in the marker.
    preview: also write ``preview.png``.
    overwrite: replace a cube jaxseg wrote here with other attributes.

  Returns:
    The marker contents: :func:`cube_stats` plus ``attributes``.

  Raises:
    OutputError: the folder holds data jaxseg did not generate, or (without ``overwrite``) a
      cube made with other attributes.
  """
  # Imported here so the geometry / rendering library does not depend on the I/O stack.
  from jaxseg.io import create_zarr
  from jaxseg.io.skeleton import save_skeleton_graph

  if img.shape != seg.shape or img.ndim != 3:
    raise ValueError(f"img {img.shape} and seg {seg.shape} must be equal [z, y, x] shapes")
  attrs = dict(attributes or {})
  attrs.setdefault("generator", GENERATOR)
  chunks = tuple(int(c) for c in chunks)
  resolution = tuple(float(r) for r in resolution)
  stage = cube_output(directory, attrs, resolution, chunks)
  if stage.open(overwrite=overwrite) is Decision.REUSE:
    stage.invalidate()  # asked to write it again: incomplete until everything below is
  marker = os.path.join(directory, COMPLETE_MARKER)
  for name in _CUBE_FILES:  # only this cube's own files, from an earlier or killed write
    stage.remove_own(name)
  zarr_path = os.path.join(directory, "data.zarr")
  out = create_zarr(
    os.path.join(zarr_path, "img"),
    (1, *img.shape),
    np.uint8,
    chunks=(1, *chunks),
    axis_order="xyzc",
    resolution=resolution,
    attributes=attrs,
  )
  out.write((0, 0, 0, 0), img[None])
  out.flush()
  out = create_zarr(
    os.path.join(zarr_path, "seg"),
    seg.shape,
    np.uint32,
    chunks=chunks,
    axis_order="xyz",
    resolution=resolution,
    attributes=attrs,
  )
  out.write((0, 0, 0), seg.astype(np.uint32, copy=False))
  out.flush()
  save_skeleton_graph(graph, os.path.join(directory, "skeleton.pkl"))
  if preview:
    save_preview(os.path.join(directory, "preview.png"), img, seg)
  info = dict(cube_stats(seg, graph), resolution=list(resolution), **attrs)
  write_json(marker, info)
  stage.finish()
  return info


def cube_output(directory: str, attributes: dict, resolution, chunks) -> StageOutput:
  """A cube folder's entry in its manifest: the arrays, skeleton, preview and marker."""
  return StageOutput(
    directory,
    name="cube",
    stage="generated cube",
    fingerprint={
      "attributes": attributes,
      "resolution": [float(r) for r in resolution],
      "chunks": [int(c) for c in chunks],
    },
    paths=_CUBE_FILES,
    what="cube folder",
  )


def split_seeds(config) -> dict[str, tuple[int, ...]]:
  """``{'train': (...), 'val': (...), 'test': (...)}`` from the config's ``*_seeds`` fields."""
  return {split: tuple(int(s) for s in (config.get(f"{split}_seeds") or ())) for split in SPLITS}


@outputs.writes_outputs
def generate_dataset(
  config,
  root: str,
  *,
  overwrite: bool = False,
  show_progress: bool = True,
  run_config=None,
  flag: str = "--overwrite",
) -> dict[str, dict[str, Any]]:
  """Generates ``{root}/{train,val,test}/seed{N}`` for the config's seeds; resumable.

  ``root`` must be new, empty or a dataset jaxseg generated: a folder of the user's data is
  refused, even with ``overwrite``. A complete cube made with the same knobs is skipped; one made
  with different knobs is an error unless ``overwrite`` (so two configs never mix silently in one
  dataset); an incomplete cube is regenerated. Beside the splits the root gets
  ``synth_params.json`` (every resolved knob), ``synth_summary.json`` and, given ``run_config``,
  the resolved ``config.json``.

  Args:
    config: the ``data.synth`` ConfigDict (with ``train_seeds`` / ``val_seeds`` / ``test_seeds``).
    root: dataset folder.
    overwrite: replace cubes made with other knobs.
    show_progress: show a progress bar / periodic progress lines.
    run_config: the whole config, saved as ``config.json`` in the root (None: not saved).
    flag: how the caller's user asks for ``overwrite`` (named in refusals).

  Returns:
    Per split: ``cubes``, ``generated``, ``skipped``, ``seeds``, ``shape``, ``neurons`` (total),
    ``fill_fraction`` / ``membrane_fraction`` (means), ``skeleton_nodes``,
    ``skeleton_length_um`` (totals) and ``seconds`` (generation + writing time of new cubes).

  Raises:
    OutputError: ``root`` or a cube folder holds data jaxseg did not generate, or a cube was made
      with different knobs and ``overwrite`` is False.
  """
  params: SynthParams = resolve_config(config)  # bad knobs fail before anything is written
  fingerprint = params.fingerprint()
  if not is_jaxseg_folder(root):
    names = sorted(os.listdir(root))
    raise OutputError(
      f"{root}: this folder holds data jaxseg did not generate ({', '.join(names[:4])}"
      f"{', ...' if len(names) > 4 else ''}); jaxseg generates only into an empty folder or one "
      "it made, never over other data: point data.root elsewhere, or remove data.synth from the "
      "config to use the data that is there"
    )
  dataset = StageOutput(
    root,
    name="dataset",
    stage="generated dataset",
    fingerprint={"generator": fingerprint},
    paths=(PARAMS_FILE, SUMMARY_FILE, config_util.RESOLVED_CONFIG_NAME),
    what="dataset folder",
    flag=flag,
  )
  dataset.open(overwrite=overwrite)
  jobs = [(split, seed) for split, seeds in split_seeds(config).items() for seed in seeds]
  per_cube: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
  for split, seed in progress(jobs, desc="synth", unit="cube", disable=not show_progress):
    directory = os.path.join(root, split, f"seed{seed}")
    attrs = {
      "generator": GENERATOR,
      "seed": int(seed),
      "split": split,
      "difficulty": params.difficulty,
      "fingerprint": fingerprint,
      "config": params.to_dict(),
    }
    cube = cube_output(directory, attrs, params.resolution, params.chunks)
    cube.flag = flag
    if cube.open(overwrite=overwrite) is Decision.REUSE:
      per_cube[split].append(dict(read_marker(directory), seed=seed, generated=False, seconds=0.0))
      continue
    start = time.perf_counter()
    img, seg, graph = generate_cube(params, seed)
    info = write_cube(
      directory,
      img,
      seg,
      graph,
      params.resolution,
      chunks=params.chunks,
      attributes=attrs,
      preview=bool(config.get("preview", True)),
    )
    per_cube[split].append(dict(info, generated=True, seconds=time.perf_counter() - start))
  summary = {split: _aggregate(cubes) for split, cubes in per_cube.items() if cubes}
  if run_config is not None:
    config_util.save_config(run_config, root)
  # config.json keeps preset knobs as null ("from the preset"); this file has every value used.
  write_json(os.path.join(root, PARAMS_FILE), params.to_dict())
  # Unsorted: the splits stay in train, val, test order.
  write_json(os.path.join(root, SUMMARY_FILE), summary, sort_keys=False)
  dataset.finish()
  return summary


def _aggregate(cubes: list[dict[str, Any]]) -> dict[str, Any]:
  return {
    "cubes": len(cubes),
    "generated": sum(1 for c in cubes if c["generated"]),
    "skipped": sum(1 for c in cubes if not c["generated"]),
    "seeds": [int(c["seed"]) for c in cubes],
    "shape": list(cubes[0]["shape"]),
    "neurons": sum(c["neurons"] for c in cubes),
    "fill_fraction": float(np.mean([c["fill_fraction"] for c in cubes])),
    "membrane_fraction": float(np.mean([c["membrane_fraction"] for c in cubes])),
    "skeleton_nodes": sum(c["skeleton_nodes"] for c in cubes),
    "skeleton_length_um": float(sum(c["skeleton_length_um"] for c in cubes)),
    "seconds": float(sum(c["seconds"] for c in cubes)),
  }


def format_summary(summary: dict[str, dict[str, Any]]) -> str:
  """The :func:`generate_dataset` summary as a fixed-width table."""
  header = (
    "split",
    "cubes",
    "new",
    "shape zyx",
    "neurons",
    "fill",
    "membrane",
    "nodes",
    "path um",
    "time s",
  )
  rows = [header]
  for split, s in summary.items():
    rows.append(
      (
        split,
        str(s["cubes"]),
        str(s["generated"]),
        "x".join(str(v) for v in s["shape"]),
        str(s["neurons"]),
        f"{s['fill_fraction']:.3f}",
        f"{s['membrane_fraction']:.3f}",
        str(s["skeleton_nodes"]),
        f"{s['skeleton_length_um']:.1f}",
        f"{s['seconds']:.1f}",
      )
    )
  widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)
