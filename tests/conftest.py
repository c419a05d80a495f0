"""Test session setup: 8 fake CPU devices (set before JAX initialises its backend)."""

import ctypes
import gc
import os
import subprocess
import sys
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


# --- real models (tests/real.py): built once per session, shared by the modules that use them.


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory):
  """A 1,024-token byte-level BPE (tokenizer.json + tokenizer_config.json: EOS and pad, no BOS,
  no mask) trained on the shipped sample with the `tokenizers` library."""
  from real import train_hf_tokenizer

  out = tmp_path_factory.mktemp("hf_tokenizer")
  train_hf_tokenizer(out)
  return out


@pytest.fixture(scope="session")
def smollm2_gguf():
  from dhara_jax.export.gguf import smollm2_gguf as packaged

  return packaged()


@pytest.fixture(scope="session")
def smollm2_peer(smollm2_gguf):
  """transformers' own de-quantized SmolLM2 (float32) and tokenizer, from the same GGUF file."""
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  where = dict(gguf_file=smollm2_gguf.name, local_files_only=True)
  model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **where)
  return model.eval(), AutoTokenizer.from_pretrained(smollm2_gguf.parent, **where)


@pytest.fixture(scope="session")
def smollm2_run(tmp_path_factory):
  """SmolLM2 imported the documented way, `dhara import --smollm2`, with the shipped mix's data
  section (tiny rows: a CPU training step of a 135M model)."""
  run_dir = tmp_path_factory.mktemp("smollm2") / "run"
  # A process of its own: transformers' de-quantization leaves GBs this worker would keep.
  subprocess.run([sys.executable, "-m", "dhara_jax.cli", "import", "--smollm2", "--run-dir",
                  str(run_dir), "--config", "data/mix", "data.seq_len=16", "data.batch_size=1",
                  "data.read_threads=1"], check=True, timeout=900)
  return run_dir


# --- parallel runs (pytest-xdist, `-n 2`): a test file runs whole on one worker, so its module
# fixtures (a trained run, an export) are built once; every test of the imported SmolLM2 (its
# files, and tests elsewhere named for it) runs on one worker, which builds it once.
def pytest_xdist_make_scheduler(config, log):
  from xdist.scheduler import LoadScopeScheduling

  class ByFile(LoadScopeScheduling):
    def _split_scope(self, nodeid: str) -> str:
      return "smollm2" if "smollm2" in nodeid else nodeid.split("::", 1)[0]

  return ByFile(config, log) if config.getvalue("dist") != "each" else None


@pytest.fixture(autouse=True, scope="module")
def _release_memory_after_each_file():
  """A worker runs file after file: hand freed memory back after each, and where the worker
  still holds GBs (a 30-layer SmolLM2 program) drop the programs JAX compiled, so two workers
  fit in memory. Toy programs stay: the next file reuses many of them (-12% compile time)."""
  yield
  import jax  # here: XLA_FLAGS above must be set before jax is imported

  _trim()
  if _resident_bytes() > 2 * 2**30:
    jax.clear_caches()
    _trim()


def _trim() -> None:
  gc.collect()
  ctypes.CDLL("libc.so.6").malloc_trim(0)


def _resident_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
