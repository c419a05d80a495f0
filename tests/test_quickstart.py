import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quickstart_cli_end_to_end(tmp_path):
  """The README's main command: every family runs, exports, matches PyTorch, imports back."""
  proc = subprocess.run([sys.executable, "-m", "dhara_jax.cli", "quickstart", "--out",
                         str(tmp_path)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["ok"]
  assert set(summary["families"]) == {"gpt2", "llama3", "qwen3", "gemma3", "moe", "lfm2",
                                      "llama3_canon"}
  for family, result in summary["families"].items():
    assert result["max_abs_logit_diff"] <= 1e-4 and result["import_exact"], family
    assert (tmp_path / family / "model.safetensors").is_file()


def test_quickstart_unwritable_out_is_one_line(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  proc = subprocess.run([sys.executable, "-m", "dhara_jax.cli", "quickstart", "--out",
                         str(blocker / "out")], capture_output=True, text=True)
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("error: quickstart: cannot create")
  assert len(proc.stderr.strip().splitlines()) == 1
