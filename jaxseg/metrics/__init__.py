"""Segmentation metrics: adapted Rand, VOI, ERL / NERL. Never imports JAX (runs on CPU-only hosts).

Inputs are label arrays in canonical [z, y, x] order (any integer dtype, uint64 and int64 included)
or [N] per-node labels; skeleton GT comes as :class:`jaxseg.io.skeleton.Skeletons`. GT labels
<= 0 (0 = background, -1 = NISB "unlabeled") are ignored everywhere.

Public API::

  table = contingency_table(gt, seg)                 # one fast pass, shared by the two below
  adapted_rand_from_table(table, method="snemi")     # AdaptedRand(error, precision, recall)
  voi_from_table(table)                              # Voi(split, merge), bits
  adapted_rand(gt, seg, method="pairs", crop_fraction=0.33)
  voi(gt, seg)
  centered_crop(shape, fraction)                     # SNEMI3D evaluator's centred crop
  expected_run_length(skeletons, seg, merge_threshold=1)  # ErlResult (erl_nm, nerl, ...)
"""

from jaxseg.metrics.contingency import Contingency, contingency_table, merge_contingency
from jaxseg.metrics.erl import (
  ErlResult,
  erl_from_node_labels,
  expected_run_length,
  lookup_node_labels,
  segments_in_mask,
)
from jaxseg.metrics.rand import (
  ARAND_METHODS,
  AdaptedRand,
  adapted_rand,
  adapted_rand_from_table,
  centered_crop,
)
from jaxseg.metrics.voi import Voi, voi, voi_from_table

__all__ = [
  "ARAND_METHODS",
  "AdaptedRand",
  "Contingency",
  "ErlResult",
  "Voi",
  "adapted_rand",
  "adapted_rand_from_table",
  "centered_crop",
  "contingency_table",
  "erl_from_node_labels",
  "expected_run_length",
  "lookup_node_labels",
  "merge_contingency",
  "segments_in_mask",
  "voi",
  "voi_from_table",
]
