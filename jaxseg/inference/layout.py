"""What ``jaxseg.predict`` writes into its output folder, named in one place (no JAX).

For each input ``<name>``::

  <name>.zarr/affinities     [C, z, y, x] affinities
  <name>.zarr/blocks_done    uint8 per block, 1 once the block is durable
  <name>.zarr/scratch/       partial sums carried between blocks (``<key>.npy``), removed
                             once every block is done
  <name>_predict.json        what was run, timings
  <name>_preview.png         the middle section beside its affinities

and the entry ``predict:<name>`` in the folder's jaxseg manifest (:mod:`jaxseg.common.outputs`),
complete once every block is written. The affinity cache and the chain read predictions through
these names without importing the inference engine.
"""

from __future__ import annotations

AFFINITIES = "affinities"
BLOCKS_DONE = "blocks_done"
SCRATCH = "scratch"


def group_name(name: str) -> str:
  return f"{name}.zarr"


def summary_name(name: str) -> str:
  return f"{name}_predict.json"


def preview_name(name: str) -> str:
  return f"{name}_preview.png"


def entry_name(name: str) -> str:
  """The volume's entry in the output folder's manifest."""
  return f"predict:{name}"
