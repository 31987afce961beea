"""Shared test setup: CPU-only JAX, and the staged real EM data in ``../shared/data``."""

import os
from pathlib import Path

import pytest

# Tests never need an accelerator; keep JAX off any GPU a developer machine may have.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Two simulated CPU devices, so sharded code paths (a ('data',) mesh over 2 devices) are tested
# on any machine; single-device tests build their mesh from ``jax.devices()[:1]``. Must be set
# before JAX initialises its backend, which no test module does at import time.
os.environ["XLA_FLAGS"] = " ".join(
  filter(None, [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=2"])
)

# No test times anything: XLA's slower-to-compile optimisations only cost the suite time (flax's
# own tests do the same). An environment variable, so the CLIs started as subprocesses compile
# alike and byte comparisons between a test and its subprocess hold.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def require_shared(path: Path) -> Path:
  """Returns ``path`` (inside ``SHARED_DATA``), skipping the test when it is not staged here."""
  if not path.exists():
    pytest.skip(f"real EM test data not found at {path} (see the README, 'Development')")
  return path


@pytest.fixture
def shared_data():
  """The folder of real EM volumes; skips the test when it is not staged on this machine."""
  return require_shared(SHARED_DATA)


@pytest.fixture(autouse=True, scope="session")
def jaxseg_cache_dir(tmp_path_factory):
  """jaxseg's own cache folder (parsed skeletons, ...) for the session, never the real home.

  An environment variable, so the CLIs the tests start as subprocesses inherit it too.
  """
  with pytest.MonkeyPatch.context() as m:
    m.setenv("JAXSEG_CACHE_DIR", str(tmp_path_factory.mktemp("jaxseg_cache")))
    yield os.environ["JAXSEG_CACHE_DIR"]
