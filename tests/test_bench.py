"""The benchmark scripts run end to end at toy sizes and print their comparison line (what they
measure is not asserted: timings are not test material)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPTS = {
    "train_step.py": (["--layers", "1", "--batch", "2", "--seq", "32", "--steps", "1"],
                      r"ratio jax/torch (\d+\.\d+)x"),
    "forward_backward_vs_torch.py": (["--layers", "1", "--batch", "2", "--seq", "32",
                                      "--steps", "1"], r"ratio jax/torch (\d+\.\d+)x"),
    "input_pipeline.py": (["--tokens", "20000", "--seq", "128", "--batch", "2",
                           "--train-steps", "1"], r"ratio data/training: raw (\d+)x"),
    "canon_kernel.py": (["--batch", "1", "--channels", "128", "--dtype", "float32", "--impl",
                         "reference", "xla", "--iters", "1"],
                        r"^xla +fwd\+bwd +1×1024 +128 +float32 +[\d.]+ +([\d.]+)"),
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
