"""The benchmark scripts run end to end at toy sizes and print their comparison line, and the
side-by-side timer runs each side every round (what they measure is not asserted: timings are
not test material)."""

import functools
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dhara_jax.benchmarks.timing import interleaved_seconds

ROOT = Path(__file__).resolve().parent.parent

SCRIPTS = {
    "train_step.py": (["--layers", "1", "--batch", "2", "--seq", "32", "--steps", "1"],
                      r"ratio jax/torch (\d+\.\d+)x"),
    "forward_backward_vs_torch.py": (["--layers", "1", "--batch", "2", "--seq", "32",
                                      "--steps", "1"], r"ratio jax/torch (\d+\.\d+)x"),
    "input_pipeline.py": (["--tokens", "20000", "--seq", "128", "--batch", "2",
                           "--train-steps", "1"], r"ratio data/training: raw (\d+)x"),
    "train_mfu.py": (["--steps", "1", "model.num_layers=1", "data.batch_size=8",
                      "data.seq_len=64"], r"tok/s \(([\d.]+) s/step\)"),
    "attention_kernel.py": (["--batch", "1", "--seq", "128", "--heads", "2", "--kv-heads", "1",
                             "--head-dim", "16", "--dtype", "float32", "--iters", "1",
                             "--interpret", "--impl", "xla", "pallas_gpu", "pallas_tpu"],
                            r"ratio pallas_tpu/xla (\d+\.\d+)x"),
    "canon_kernel.py": (["--batch", "1", "--channels", "128", "--dtype", "float32", "--impl",
                         "reference", "xla", "--iters", "1"],
                        r"^xla +fwd\+bwd +1×1024 +128 +float32 +[\d.]+ +([\d.]+)"),
    "generate_speed.py": (["--config", "configs/runs/quickstart.yaml", "--batches", "1",
                           "--new-tokens", "8", "--block", "4", "--prompt", "4", "--runs", "1",
                           "model.num_layers=1"],
                          r"block cache, 2 steps +[\d,]+ +2 +4\.0 +([\d.]+)$"),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_script_runs(script):
  args, pattern = SCRIPTS[script]
  proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  match = re.search(pattern, proc.stdout, re.MULTILINE)
  assert match and float(match.group(1)) > 0, proc.stdout


@pytest.mark.slow
def test_real_decode_quick_on_the_imported_smollm2(smollm2_run):
  """bench/real_decode.py --quick on the session's SmolLM2 import: dhara and transformers decode
  the same greedy tokens; llama.cpp runs where llama-cpp-python is installed (CI has none)."""
  proc = subprocess.run([sys.executable, str(ROOT / "bench" / "real_decode.py"), str(smollm2_run),
                         "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  match = re.search(r"^dhara \(JAX [\d.]+, KV cache\) +1 +([\d.]+) +1\.00×", out, re.MULTILINE)
  assert match and float(match.group(1)) > 0, out
  assert re.search(r"^transformers [\d.]+ generate\(\) +1 +[\d.]+ ", out, re.MULTILINE), out
  assert "greedy tokens, dhara vs transformers, B=1: 1/1 rows equal over all G" in out, out
  # llama.cpp's float32 sums may flip a near-tie late, not in the first tokens
  llama = re.search(r"^greedy tokens, dhara vs llama\.cpp, B=1: (1/1 rows equal|.* position "
                    r"(\d+) )|^llama\.cpp: skipped \(", out, re.MULTILINE)
  assert llama and (llama.group(2) is None or int(llama.group(2)) >= 8), out


def test_interleaved_seconds_times_every_side_every_round():
  quick = functools.partial(functools.partial, time.sleep, 0.01)  # maker of a 10 ms call
  times = interleaved_seconds({"a": quick, "b": quick}, steps=2, rounds=3)
  assert set(times) == {"a", "b"}
  assert all(len(t) == 3 and min(r.seconds for r in t) >= 0.01 for t in times.values()), times
  # sleeping takes wall time, not CPU time: the CPU accounting is per side and per call
  assert all(r.user + r.system < r.seconds for t in times.values() for r in t), times


def test_interleaved_seconds_reports_a_failing_side_in_one_line():
  quick = functools.partial(functools.partial, time.sleep, 0.01)
  broken = functools.partial(int, "not a number")  # the maker itself raises
  with pytest.raises(RuntimeError, match=r"^benchmark side 'broken' failed: ValueError: invalid"):
    interleaved_seconds({"ok": quick, "broken": broken}, steps=1, rounds=1)


def test_the_stock_llama_peer_counts_as_kv_cached():
  """transformers 5 names the forward's cache argument `cache` (4.x: `past_key_values`); a peer
  labelled "no-cache" for a stock class would misreport what it was compared with."""
  from transformers import LlamaConfig, LlamaForCausalLM

  from dhara_jax.benchmarks.torch_peers import _supports_kv_cache

  tiny = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1)
  assert _supports_kv_cache(LlamaForCausalLM(tiny))
