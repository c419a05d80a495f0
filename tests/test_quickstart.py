import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quickstart_cli_end_to_end(tmp_path):
  """The README's main command (shortened to 80 steps): tokenizer, training with falling
  held-out loss, a sample, export with PyTorch parity and a bit-exact import."""
  proc = subprocess.run([sys.executable, "-m", "dhara_jax.cli", "quickstart", "--out",
                         str(tmp_path), "train.steps=80", "train.eval_every=40"],
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["ok"] and summary["steps"] == 80
  assert summary["held_out_loss"]["after"] < summary["held_out_loss"]["before"] - 0.5
  assert summary["export"]["max_abs_logit_diff"] <= 1e-4 and summary["export"]["import_exact"]
  assert summary["sample"].startswith("The history of science")
  assert (tmp_path / "loss_curve.png").is_file() and (tmp_path / "hf" / "modeling_dhara.py").is_file()
  assert summary["tokenizer"]["vocab_size"] == 4096


def test_quickstart_unwritable_out_is_one_line(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  proc = subprocess.run([sys.executable, "-m", "dhara_jax.cli", "quickstart", "--out",
                         str(blocker / "out")], capture_output=True, text=True)
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("error: train: run dir")
  assert len(proc.stderr.strip().splitlines()) == 1
