r"""Affinity QC: throughput and peak host memory against the volume size.

``python benchmarks/qc.py [--depths=64,256] [--output=qc.json]``

The QC (``jaxseg.quality.run_qc``: scan, report, plot and mask) streams ``[3, z, y, x]`` float16
affinities one z-slab at a time, so its peak memory should not grow with the depth of the volume.
Each case writes a chunked affinity zarr of ``3 x depth x 512 x 512`` (bad sections planted at
both ends, as a real prediction's edges look) and a uint8 image, then runs the QC in a fresh
child process that reports its peak RSS (``VmHWM``) after the imports and after the QC. The
reference measured in the same run is the size of the affinities themselves: a QC that loaded the
volume would need at least that much.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import shutil
import tempfile
import time

import numpy as np
from absl import app, flags

from jaxseg.common.config_util import load_sibling

_DEPTHS = flags.DEFINE_list("depths", ["64", "256"], "Depths (z sections) of the test volumes.")
_SIDE = flags.DEFINE_integer("side", 512, "y and x size of the test volumes.")
_OUTPUT = flags.DEFINE_string("output", "", "Write the results here as JSON.")
_BAD = 6  # sections planted at each end with a drop of the affinity mean


def _make_volume(folder: str, depth: int, side: int) -> tuple[str, str]:
  """Writes the affinities (bad ends planted) and a matching image, slab by slab."""
  from jaxseg.io import create_zarr

  chunks = (1, 32, 128, 128)
  aff = create_zarr(
    os.path.join(folder, "pred.zarr", "affinities"),
    (3, depth, side, side),
    "float16",
    chunks=chunks,
    attributes={"offsets": [[0, 0, 1], [0, 1, 0], [1, 0, 0]], "convention": "source"},
  )
  image = create_zarr(
    os.path.join(folder, "image.zarr"), (depth, side, side), "uint8", chunks=(32, 128, 128)
  )
  rng = np.random.default_rng(0)
  for z0 in range(0, depth, 32):
    n = min(32, depth - z0)
    slab = rng.normal(0.8, 0.1, (3, n, side, side)).astype(np.float16)
    for z in range(z0, z0 + n):
      if z < _BAD or z >= depth - _BAD:
        slab[:, z - z0] -= 0.3  # a bad section: every channel drops
    aff.write((0, z0, 0, 0), slab)
    img = rng.integers(40, 255, (n, side, side), dtype=np.uint8)
    img[:, :, :16] = 10  # a dark left margin: background in the border ring
    image.write((z0, 0, 0), img)
  aff.flush()
  image.flush()
  return aff.path, image.path


def _qc_child(aff_path: str, image_path: str, out: str, queue) -> None:
  memory = load_sibling(__file__, "memory_probe")
  from jaxseg.common import config_util
  from jaxseg.quality import run_qc

  config = config_util.load_config(
    os.path.join(os.path.dirname(__file__), "..", "configs", "nisb_base.py")
  )
  imported = memory.status_mb("VmHWM")
  start = time.perf_counter()
  result = run_qc(config, aff_path, out, image=image_path)
  seconds = time.perf_counter() - start
  queue.put(
    {
      "imports_peak_mb": imported,
      "peak_mb": memory.status_mb("VmHWM"),
      "seconds": seconds,
      "low_z": result.low_z,
      "high_z": result.high_z,
    }
  )


def main(argv):
  del argv
  side = _SIDE.value
  rows = []
  ctx = multiprocessing.get_context("spawn")
  for depth in (int(d) for d in _DEPTHS.value):
    folder = tempfile.mkdtemp(prefix=f"qc_bench_{depth}_")
    try:
      aff_path, image_path = _make_volume(folder, depth, side)
      queue = ctx.Queue()
      child = ctx.Process(
        target=_qc_child, args=(aff_path, image_path, os.path.join(folder, "qc"), queue)
      )
      child.start()
      row = queue.get()
      child.join()
      voxels = 3 * depth * side * side
      row.update(
        depth=depth,
        affinity_mb=voxels * 2 / 2**20,
        qc_mb=row["peak_mb"] - row["imports_peak_mb"],
        mvoxels_per_s=voxels / row["seconds"] / 1e6,
        found=[row["low_z"], row["high_z"]] == [_BAD, depth - _BAD],
      )
      rows.append(row)
      print(
        f"3 x {depth} x {side} x {side}: {row['seconds']:.2f} s ({row['mvoxels_per_s']:.0f} "
        f"Mvoxel/s), peak RSS {row['peak_mb']:.0f} MB ({row['imports_peak_mb']:.0f} MB after "
        f"imports), affinities {row['affinity_mb']:.0f} MB; low_z / high_z {row['low_z']} / "
        f"{row['high_z']} (planted {_BAD} / {depth - _BAD})"
      )
    finally:
      shutil.rmtree(folder, ignore_errors=True)

  print(f"\nMachine: {platform.platform()}, {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d')}\n")
  print(
    "| affinities (3 x z x y x x) | MB | QC s | Mvoxel/s | peak RSS MB | of which QC MB | found |"
  )
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| 3 x {r['depth']} x {side} x {side} | {r['affinity_mb']:.0f} | {r['seconds']:.2f} | "
      f"{r['mvoxels_per_s']:.0f} | {r['peak_mb']:.0f} | {r['qc_mb']:.0f} | {r['found']} |"
    )
  if len(rows) > 1:
    growth = rows[-1]["qc_mb"] / max(rows[0]["qc_mb"], 1e-9)
    size = rows[-1]["affinity_mb"] / rows[0]["affinity_mb"]
    print(f"\nvolume {size:.1f}x larger -> QC memory {growth:.2f}x")
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  app.run(main)
