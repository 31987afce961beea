"""Metric speed benchmark (run by hand): adapted Rand + VOI on 512^3, NERL on 1M skeleton nodes.

Dense part: the 512^3 uint32 pinky40 automatic segmentation (``shared/data/pinky40_autoseg_512``)
as "GT" against a perturbed copy (merged, split and dropped segments), timed against
``skimage.metrics.adapted_rand_error`` + ``variation_of_information`` in the same run; the values
are checked to agree. Skeleton part: 1000 random-walk skeletons of 1000 nodes each (1M nodes) over
the same volume, NERL through ``jaxseg.metrics.expected_run_length`` on a numpy array and on a lazy
zarr volume, plus the NISB pickle load (first time and cached).

Usage::

  .venv/bin/python benchmarks/metrics.py [--skip_skimage] [--skip_pickle]

Prints a markdown table with the machine and date.
"""

from __future__ import annotations

import datetime
import gzip
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import crackle
import networkx as nx
import numpy as np
from absl import app, flags
from skimage.metrics import adapted_rand_error, variation_of_information

from jaxseg.io import write_volume
from jaxseg.io.skeleton import Skeletons, load_skeletons, save_skeleton_graph
from jaxseg.metrics import (
  adapted_rand,
  adapted_rand_from_table,
  contingency_table,
  expected_run_length,
  voi,
  voi_from_table,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PINKY = DATA / "pinky40_autoseg_512" / "connectomics.npy.ckl.gz"

_SKIP_SKIMAGE = flags.DEFINE_bool("skip_skimage", False, "Do not time the skimage reference.")
_SKIP_PICKLE = flags.DEFINE_bool("skip_pickle", False, "Do not time the networkx pickle load.")
_WALKS = flags.DEFINE_integer("walks", 1000, "Synthetic random walks (skeleton chains).")
_NODES = flags.DEFINE_integer("nodes_per_skeleton", 1000, "Nodes per synthetic skeleton.")


def load_pinky() -> np.ndarray:
  """The 512^3 volume as a C-contiguous [z, y, x] uint32 array (crackle gives x, y, z F-order)."""
  xyz = crackle.decompress(gzip.decompress(PINKY.read_bytes()))
  return np.ascontiguousarray(xyz.T)


def perturb(gt: np.ndarray, seed: int = 0) -> np.ndarray:
  """Splits the 20 largest segments at the middle z plane, merges 10% of all segments into
  random others and drops 2% to label 0."""
  rng = np.random.default_rng(seed)
  sizes = np.bincount(gt.ravel())
  sizes[0] = 0
  ids = np.flatnonzero(sizes)
  lut = np.arange(sizes.size, dtype=np.uint32)
  largest = ids[np.argsort(sizes[ids])[-20:]]
  rest = rng.permutation(np.setdiff1d(ids, largest))
  merged, dropped = rest[: ids.size // 10], rest[ids.size // 10 : ids.size // 10 + ids.size // 50]
  lut[merged] = rng.choice(ids, merged.size)
  lut[dropped] = 0
  seg = lut[gt]
  split_new = np.zeros(sizes.size, np.uint32)
  split_new[largest] = np.arange(largest.size, dtype=np.uint32) + np.uint32(sizes.size)
  half = gt.shape[0] // 2
  lower = split_new[gt[half:]]
  seg[half:] = np.where(lower > 0, lower, seg[half:])
  return seg


def random_walk_skeletons(
  gt: np.ndarray, n_skeletons: int, n_nodes: int, seed: int = 0
) -> Skeletons:
  """Random walks that stay inside the GT segment they start in; skeleton id = that segment.

  A step that would leave the segment is not taken (the node repeats), so the skeletons are a
  plausible GT for ``gt`` (NERL of ``gt`` itself is 1). Walks start on random foreground voxels.
  """
  rng = np.random.default_rng(seed)
  shape = np.asarray(gt.shape)
  fg = np.flatnonzero(gt.ravel())
  pos = np.stack(np.unravel_index(rng.choice(fg, n_skeletons), gt.shape), axis=1)
  label = gt[tuple(pos.T)]
  walk = np.empty((n_nodes, n_skeletons, 3), np.int64)
  walk[0] = pos
  # Loop over steps only; every step moves all skeletons at once.
  for t in range(1, n_nodes):
    proposal = np.clip(pos + rng.integers(-1, 2, pos.shape), 0, shape - 1)
    ok = gt[tuple(proposal.T)] == label
    pos = np.where(ok[:, None], proposal, pos)
    walk[t] = pos
  voxels = walk.transpose(1, 0, 2).reshape(-1, 3)
  # Walks in the same segment form one skeleton, or GT itself would count as a merge.
  ids = np.repeat(label.astype(np.int64), n_nodes)
  first = np.arange(n_skeletons * n_nodes).reshape(n_skeletons, n_nodes)
  edges = np.stack([first[:, :-1].ravel(), first[:, 1:].ravel()], axis=1)
  nm = voxels * np.array([40.0, 32.0, 32.0])
  lengths = np.linalg.norm(nm[edges[:, 0]] - nm[edges[:, 1]], axis=1)
  return Skeletons(ids, voxels, nm, edges, lengths)


def _time(fn, repeat: int = 1):
  best, out = float("inf"), None
  for _ in range(repeat):
    start = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - start)
  return best, out


def bench_dense(gt: np.ndarray, rows: list) -> np.ndarray:
  """Adapted Rand + VOI on ``gt`` vs a perturbed copy, ours and skimage.

  Args:
    gt: [z, y, x] labels used as GT.
    rows: result rows are appended here.

  Returns:
    The perturbed segmentation.
  """
  seg = perturb(gt)
  print(
    f"volume {gt.shape} {gt.dtype}, {np.count_nonzero(np.bincount(gt.ravel()))} ids", flush=True
  )

  # Warm the numba kernels (compile / cache load) outside the timings.
  contingency_table(gt[:2], seg[:2])

  def ours_one_pass():
    table = contingency_table(gt, seg)
    return (
      adapted_rand_from_table(table, "pairs"),
      adapted_rand_from_table(table),
      voi_from_table(table),
    )

  t_one, (pairs, snemi, v) = _time(ours_one_pass, repeat=3)
  t_two, _ = _time(lambda: (adapted_rand(gt, seg, method="pairs"), voi(gt, seg)), repeat=3)
  rows.append(("adapted Rand (pairs + snemi) + VOI, one shared table", f"{t_one:.2f} s", ""))
  rows.append(("adapted_rand() + voi(), two passes (same calls as skimage)", f"{t_two:.2f} s", ""))
  print(f"ours: one pass {t_one:.2f} s, two passes {t_two:.2f} s", flush=True)
  print(
    f"  pairs ARE {pairs.error:.6f}, snemi ARE {snemi.error:.6f}, VOI {v.split:.4f} / "
    f"{v.merge:.4f}",
    flush=True,
  )

  if not _SKIP_SKIMAGE.value:
    start = time.perf_counter()
    are = adapted_rand_error(gt, seg)[0]
    t_are = time.perf_counter() - start
    start = time.perf_counter()
    sk_split, sk_merge = variation_of_information(gt, seg, ignore_labels=[0])
    t_voi = time.perf_counter() - start
    t_sk = t_are + t_voi
    assert abs(are - pairs.error) < 1e-9, (are, pairs.error)
    assert abs(sk_split - v.split) < 1e-9 and abs(sk_merge - v.merge) < 1e-9
    rows.append(
      (
        "skimage adapted_rand_error + variation_of_information",
        f"{t_sk:.2f} s ({t_are:.1f} + {t_voi:.1f})",
        "",
      )
    )
    rows.append(
      (
        "speed-up vs skimage (two passes / one pass)",
        f"{t_sk / t_two:.1f}x / {t_sk / t_one:.1f}x",
        "goal >= 5x",
      )
    )
    print(f"skimage: {t_sk:.2f} s; values agree", flush=True)
  return seg


def main(argv):
  del argv
  if not PINKY.exists():
    sys.exit(f"pinky40 volume not found at {PINKY}")
  rows = []
  gt = load_pinky()
  seg = bench_dense(gt, rows)

  start = time.perf_counter()
  sk = random_walk_skeletons(gt, _WALKS.value, _NODES.value)
  print(f"made {sk.num_nodes} skeleton nodes in {time.perf_counter() - start:.1f} s", flush=True)
  assert expected_run_length(sk, gt).nerl == 1.0  # also warms up
  t_erl, erl = _time(lambda: expected_run_length(sk, seg), repeat=3)
  rows.append((f"NERL, {sk.num_nodes:,} nodes, numpy volume", f"{t_erl:.2f} s", "goal < 5 s"))
  print(
    f"NERL {sk.num_nodes} nodes: {t_erl:.2f} s (nerl {erl.nerl:.4f}, mergers {erl.n_non0_mergers})",
    flush=True,
  )

  with tempfile.TemporaryDirectory() as tmp:
    vol = write_volume(os.path.join(tmp, "seg.zarr"), seg, chunks=(64, 64, 64))
    t_lazy, erl_lazy = _time(lambda: expected_run_length(sk, vol))
    assert erl_lazy.erl_nm == erl.erl_nm
    rows.append((f"NERL, {sk.num_nodes:,} nodes, lazy zarr (64^3 chunks)", f"{t_lazy:.2f} s", ""))
    print(f"NERL lazy zarr: {t_lazy:.2f} s", flush=True)

    if not _SKIP_PICKLE.value:
      g = nx.Graph()
      xyz = sk.voxel_zyx[:, ::-1]
      nm_xyz = sk.nm_zyx[:, ::-1]
      g.add_nodes_from(
        (
          i,
          {
            "id": int(sk.skeleton_ids[i]),
            "index_position": tuple(xyz[i].tolist()),
            "nm_position": tuple(nm_xyz[i].tolist()),
          },
        )
        for i in range(sk.num_nodes)
      )
      g.add_edges_from(map(tuple, sk.edges.tolist()))
      pkl = os.path.join(tmp, "skeleton.pkl")
      save_skeleton_graph(g, pkl)
      del g
      erl_cache = os.path.join(tmp, "erl_cache")  # not the user's ~/.cache: tmp goes away
      t_first, first = _time(lambda: load_skeletons(pkl, cache_dir=erl_cache))
      t_cached, _ = _time(lambda: load_skeletons(pkl, cache_dir=erl_cache))
      assert np.allclose(first.edge_length_nm, sk.edge_length_nm)
      rows.append(
        (
          f"load skeleton.pkl ({sk.num_nodes:,} nodes, tuples), first",
          f"{t_first:.1f} s",
          "unpickle + convert",
        )
      )
      rows.append(("load skeleton.pkl again (ERL cache)", f"{t_cached:.2f} s", ""))
      print(f"pickle load {t_first:.1f} s, cached {t_cached:.2f} s", flush=True)

  print()
  print(
    f"Date: {datetime.date.today()}; machine: {platform.machine()}, {os.cpu_count()} CPUs; "
    f"Python {platform.python_version()}, numpy {np.__version__}"
  )
  print("| what | time | note |\n| --- | --- | --- |")
  for row in rows:
    print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
  app.run(main)
