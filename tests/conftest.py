"""Test session setup: 8 fake CPU devices (set before JAX initialises its backend)."""

import os
import tempfile

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the session and every `dhara` process it starts (they compile the
# same tiny programs again and again); a folder of the machine's temp dir, never ~/.cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"dhara-tests-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 * 2**30))


@pytest.fixture
def interpret_pallas(monkeypatch):
  """Pallas kernels run in interpret mode on CPU (the only way they run here). Afterwards, wait
  for every interpreter callback: one still pending would deadlock the next test's eager ops."""
  import jax  # here, not at the top: XLA_FLAGS above must be set before jax is imported

  from dhara_jax.kernels.lowering import INTERPRET_ENV_VAR

  monkeypatch.setenv(INTERPRET_ENV_VAR, "1")
  yield
  jax.effects_barrier()
