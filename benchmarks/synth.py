"""Synthetic-data speed benchmark (run by hand): generating and writing NISB-style cubes.

Times :func:`jaxseg.synthesis.generate_cube` (split into ground truth and image rendering) and
:func:`jaxseg.synthesis.write_cube` (zarr ``img`` / ``seg`` in NISB x-first order, skeleton pickle,
preview PNG) for 128^3 and 256^3 cubes (z, y, x voxels at 20 x 9 x 9 nm) per difficulty preset.
A 32^3 warm-up runs first and is reported on its own: it includes the numba compilation on the
first run after an install or a code change (empty cache, ~17 s on 2 cores), otherwise only loading
the cached machine code. Goal: 256^3 under 30 s.

Usage::

  .venv/bin/python benchmarks/synth.py [--sizes=128,256] [--difficulties=base,touching_thin]

Prints a markdown table with the machine and date.
"""

from __future__ import annotations

import datetime
import os
import platform
import tempfile
import time

import numpy as np
from absl import app, flags

from jaxseg.synthesis import cube_stats, default_config, resolve_config, write_cube
from jaxseg.synthesis.render import render_image
from jaxseg.synthesis.segmentation import build_segmentation

_SIZES = flags.DEFINE_list("sizes", ["128", "256"], "Cube edge lengths (voxels, all axes).")
_DIFFICULTIES = flags.DEFINE_list("difficulties", ["base", "touching_thin"], "Presets to time.")
_SEED = flags.DEFINE_integer("seed", 0, "Cube seed.")


def _machine() -> str:
  mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {mem_gib:.0f} GiB"


def _time_cube(difficulty: str, size: int, seed: int, directory: str) -> dict:
  config = default_config(difficulty)
  config.shape = (size, size, size)
  params = resolve_config(config)
  rng = np.random.default_rng(seed)
  t0 = time.perf_counter()
  gt = build_segmentation(params, rng)
  t1 = time.perf_counter()
  img = render_image(gt.seg, params, rng)
  t2 = time.perf_counter()
  write_cube(directory, img, gt.seg, gt.graph, params.resolution, chunks=params.chunks)
  t3 = time.perf_counter()
  stats = cube_stats(gt.seg, gt.graph)
  return dict(stats, gt_s=t1 - t0, render_s=t2 - t1, write_s=t3 - t2, total_s=t3 - t0)


def main(argv):
  del argv
  # Warm-up: compiles (or loads from the numba cache) every jitted function once.
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    _time_cube("base", 32, 0, os.path.join(tmp, "warmup"))
  warmup = time.perf_counter() - t0
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for difficulty in _DIFFICULTIES.value:
      for size in (int(s) for s in _SIZES.value):
        r = _time_cube(difficulty, size, _SEED.value, os.path.join(tmp, f"{difficulty}{size}"))
        rows.append((difficulty, size, r))
        print(f"{difficulty} {size}^3: {r['total_s']:.1f} s", flush=True)
  print()
  print(
    f"Machine: {_machine()}; date {datetime.date.today().isoformat()}; "
    f"warm-up (32^3, includes numba compile or cache load) {warmup:.1f} s."
  )
  print()
  print(
    "| preset | cube (z,y,x) | ground truth s | image s | write s | total s | neurons | "
    "fill | membrane | skeleton nodes | path um |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for difficulty, size, r in rows:
    print(
      f"| {difficulty} | {size}^3 | {r['gt_s']:.2f} | {r['render_s']:.2f} | "
      f"{r['write_s']:.2f} | **{r['total_s']:.1f}** | {r['neurons']} | "
      f"{r['fill_fraction']:.3f} | {r['membrane_fraction']:.3f} | {r['skeleton_nodes']} | "
      f"{r['skeleton_length_um']:.0f} |"
    )


if __name__ == "__main__":
  app.run(main)
