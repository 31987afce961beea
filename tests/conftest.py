"""Shared test setup: CPU-only JAX, and the staged real EM data in ``../shared/data``."""

import os
import shutil
import tempfile
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


def pytest_configure(config):
  """One XLA compilation cache for the whole run, new each run and shared by every worker and
  subprocess: tests that build the same small model (in process and through the CLIs) compile its
  steps once. Set here, in the controller, before the workers start and inherit the environment."""
  if hasattr(config, "workerinput") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxseg-tests-xla-")
  config.add_cleanup(lambda: shutil.rmtree(os.environ.pop("JAX_COMPILATION_CACHE_DIR"), True))


REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


# The test being set up or run, so ``require_shared`` can check that it carries its marker.
_current_test: pytest.Item | None = None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
  global _current_test
  _current_test = item


def require_shared(path: Path) -> Path:
  """Returns ``path`` (inside ``SHARED_DATA``), skipping the test when it is not staged here.

  A test that reads ``SHARED_DATA`` must be marked ``@pytest.mark.realdata`` (so ``-m realdata``
  selects it); one that is not fails here, on every machine, whether or not the data is staged.
  """
  if _current_test is not None and _current_test.get_closest_marker("realdata") is None:
    pytest.fail(
      f"{_current_test.nodeid} reads ../shared/data: mark it @pytest.mark.realdata", pytrace=False
    )
  if not path.exists():
    pytest.skip(f"real EM test data not found at {path} (see the README, 'Development')")
  return path


@pytest.fixture
def shared_data():
  """The folder of real EM volumes; skips the test when it is not staged on this machine.

  Tests that use it are marked ``@pytest.mark.realdata`` (``require_shared`` checks).
  """
  return require_shared(SHARED_DATA)


@pytest.fixture(autouse=True, scope="session")
def jaxseg_cache_dir(tmp_path_factory):
  """jaxseg's own cache folder (parsed skeletons, ...) for the session, never the real home.

  An environment variable, so the CLIs the tests start as subprocesses inherit it too.
  """
  with pytest.MonkeyPatch.context() as m:
    m.setenv("JAXSEG_CACHE_DIR", str(tmp_path_factory.mktemp("jaxseg_cache")))
    yield os.environ["JAXSEG_CACHE_DIR"]


def pytest_collection_modifyitems(config, items):
  """Slow tests first (stable otherwise): with several workers (``-n auto``), a minute-long test
  collected last would end the run alone while the other workers idle."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def optimised_xla():
  """XLA's full optimisations for one test that runs a compiled step many times (the chain's 100
  training steps): there, optimised code saves more than its longer compile costs."""
  import jax

  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update(
    "jax_disable_most_optimizations", os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] == "1"
  )
