"""Another tool's boundary map as a reference: affinities, tuning on val, scoring on test."""

import h5py
import numpy as np
import pytest

from configs import fibsem
from jaxseg.common.errors import InputError
from jaxseg.io.datasets import dataset_volumes
from jaxseg.workflow import baselines, boundary_baseline, report


def test_an_edge_is_as_strong_as_its_weaker_end():
  b = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
  aff = boundary_baseline.affinities_from_boundaries(b)
  assert aff.shape == (3, 4, 5, 6) and aff.dtype == np.float32
  for c, step in enumerate(((1, 0, 0), (0, 1, 0), (0, 0, 1))):
    for z, y, x in np.ndindex(b.shape):
      n = (z + step[0], y + step[1], x + step[2])
      want = (
        1 - max(b[z, y, x], b[n]) if all(i < s for i, s in zip(n, b.shape, strict=True)) else 0.0
      )
      assert aff[c, z, y, x] == pytest.approx(want)


def _cells(shape, seed):
  """Labelled cells (Voronoi of random seeds) separated by 1-voxel membranes (label 0)."""
  rng = np.random.default_rng(seed)
  points = rng.uniform(0, shape, (12, 3))
  grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
  d = ((grid[..., None, :] - points) ** 2).sum(-1)
  labels = d.argmin(-1).astype(np.int32) + 1
  edge = np.zeros(shape, bool)
  for axis in range(3):
    diff = np.diff(labels, axis=axis) != 0
    index = [slice(None)] * 3
    index[axis] = slice(1, None)
    edge[tuple(index)] |= diff
  labels[edge] = 0
  return labels


def _config(tmp_path, boundaries_val, boundaries_test):
  labels = _cells((16, 24, 24), 0)
  image = np.where(labels > 0, 200, 40).astype(np.uint8)
  with h5py.File(tmp_path / "v.h5", "w") as f:
    f["image"], f["labels"] = image, labels
    f["good"] = (labels == 0).astype(np.float32)
    # Another tool's less certain map of the same membranes.
    f["unsure"] = (labels == 0).astype(np.float32) * 0.9
    f["wrong"] = (labels == 0).astype(np.float32) * 3
  config = fibsem.get_config()
  config.data.root = str(tmp_path)
  entry = {"image": "v.h5:image", "labels": "v.h5:labels"}
  config.data.volumes.val = (
    {**entry, "name": "val", "z_range": (0, 8), "boundaries": boundaries_val},
  )
  config.data.volumes.test = (
    {**entry, "name": "test", "z_range": (8, 16), "boundaries": boundaries_test},
  )
  config.eval.metrics = ("adapted_rand", "voi")
  config.tune.waterz.merge_functions = ("aff50_his256", "aff85_his256")
  config.tune.waterz.aff_threshold_low = (0.0, 0.2, 0.1)
  config.tune.waterz.aff_threshold_high = (0.9, 1.0, 0.1)
  return config


def test_a_good_map_is_tuned_on_val_and_scores_well_on_test(tmp_path):
  config = _config(tmp_path, "v.h5:good", "v.h5:unsure")
  (val,) = [v.windowed() for v in dataset_volumes(config.data, "val")]
  (test,) = [v.windowed() for v in dataset_volumes(config.data, "test")]
  rows = boundary_baseline.score_boundary_map(test, [val], config, ("cc", "waterz", "mws"))
  assert set(rows) == {"boundaries + cc (tuned)", "boundaries + waterz (tuned)"}
  for row in rows.values():
    assert row["tuned_on"] == ["val"] and row["tuned_value"] < 0.05
    assert row["adapted_rand"] < 0.05 and row["segments"] >= 5
  cc = rows["boundaries + cc (tuned)"]["params"]["threshold"]
  assert cc in boundary_baseline.search.search_space(config, "cc").choices["threshold"]
  # The report shows the rows with their tuned parameters, apart from the trivial baselines.
  results = {"baselines": {"test": rows}, "test": {}, "tuned": {}}
  table = report.metrics_table(report.metric_rows(results))
  assert "baseline: boundaries + waterz (tuned)" in table and "merge_function=" in table


def test_a_map_outside_zero_one_is_one_line_naming_it(tmp_path):
  config = _config(tmp_path, "v.h5:wrong", "v.h5:good")
  (val,) = [v.windowed() for v in dataset_volumes(config.data, "val")]
  with pytest.raises(InputError, match=r"v\.h5.*probabilities in \[0, 1\]") as caught:
    boundary_baseline.read_boundaries(val)
  assert "\n" not in str(caught.value)


def test_margins_over_the_trivial_baselines_leave_the_reference_out():
  rows = {
    "baseline: one_segment": {"adapted_rand": 0.8},
    "baseline: boundaries + waterz (tuned)": {"adapted_rand": 0.1},
  }
  assert baselines.margin({"adapted_rand": 0.3}, rows, "adapted_rand") == pytest.approx(0.5)


def test_a_boundary_map_does_not_change_what_the_model_is_trained_with():
  from jaxseg.training import paths

  config = fibsem.get_config()
  without = config.copy_and_resolve_references()
  without.data.volumes.val = tuple(
    {k: v for k, v in e.items() if k != "boundaries"} for e in config.data.volumes.val
  )
  assert "boundaries" in config.data.volumes.val[0]
  assert paths.training_fingerprint(config) == paths.training_fingerprint(without)
