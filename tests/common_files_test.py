"""jaxseg.common.files: outputs are replaced whole or not at all."""

import json

import numpy as np
import pytest

from jaxseg.common.files import atomic_output, write_json


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  target = tmp_path / "metrics.json"
  write_json(target, {"nerl": 0.5})
  with pytest.raises(RuntimeError), atomic_output(target) as tmp:
    with open(tmp, "w") as f:
      f.write('{"nerl": ')  # a run killed mid-write
    raise RuntimeError("killed")
  assert json.loads(target.read_text()) == {"nerl": 0.5}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_temporary_keeps_the_extension_for_format_sniffing_writers(tmp_path):
  target = tmp_path / "cache.npz"
  with atomic_output(target) as tmp:
    assert tmp.endswith(".npz")
    np.savez(tmp, a=np.arange(3))  # np.savez would append .npz to any other name
  np.testing.assert_array_equal(np.load(target)["a"], np.arange(3))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.npz"]
