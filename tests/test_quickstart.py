import json
import subprocess
import sys

import pytest

from dhara_jax import cli
from dhara_jax.quickstart import PARITY_TOLERANCE, failed_checks


@pytest.mark.slow
def test_quickstart_cli_end_to_end(tmp_path):
  """The README's main command, shortened (80 steps, a conversion of 45, 5 documents per task):
  tokenizer, training with falling held-out loss, a sample, export with PyTorch parity and a
  bit-exact import, the conversion through all its stages, generation, evaluation of both."""
  proc = subprocess.run([sys.executable, "-m", "dhara_jax.cli", "quickstart", "--out",
                         str(tmp_path), "--eval-limit", "5", "train.steps=80",
                         "train.eval_every=40", "convert.tokens=92160"],
                        capture_output=True, text=True, timeout=1500)
  summary_path = tmp_path / "summary.json"
  written = summary_path.read_text() if summary_path.is_file() else "(no summary.json)"
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:] + written
  summary = json.loads(written)
  assert summary["ok"] and summary["failed"] == [] and summary["steps"] == 80
  assert summary["held_out_loss"]["after"] < summary["held_out_loss"]["before"] - 0.5
  assert summary["export"]["max_abs_logit_diff"] <= PARITY_TOLERANCE
  assert summary["export"]["import_exact"]
  assert summary["sample"].startswith("The history of science")
  assert (tmp_path / "loss_curve.png").is_file()
  assert (tmp_path / "hf" / "modeling_dhara.py").is_file()
  assert summary["tokenizer"]["vocab_size"] == 4096
  diffusion = summary["diffusion_loss"]  # the conversion (its own budget: 30% of AR's tokens)
  assert diffusion["converted"] < min(diffusion["ar_model"], diffusion["untrained"])
  assert diffusion["stages"] == ["warmup@1", "warmup@16", "stable@128", "decay@64", "decay@32"]
  assert summary["diffusion_export"]["parity_ok"] and summary["diffusion_export"]["import_exact"]
  config = json.loads((tmp_path / "hf_diffusion" / "config.json").read_text())
  assert config["architectures"] == ["DharaForMaskedDiffusion"] and config["mask_token_id"] == 4
  for name, kind in (("run", "ar"), ("diffusion", "diffusion")):  # step 7: `dhara eval`
    evaluation = summary["evaluation"][name]
    assert evaluation["kind"] == kind and evaluation["limit"] == 5
    assert [r["task"] for r in evaluation["tasks"]][-1] == "gsm8k"
    assert len(evaluation["tasks"]) == 7 and evaluation["average_7"] is not None
    assert (tmp_path / name / "eval" / "table.md").is_file()


def test_quickstart_unwritable_out_is_one_line(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  proc = subprocess.run([sys.executable, "-m", "dhara_jax.cli", "quickstart", "--out",
                         str(blocker / "out")], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("error: train: run dir")
  assert len(proc.stderr.strip().splitlines()) == 1


def test_a_bad_eval_limit_is_one_line_and_writes_nothing(tmp_path, capsys):
  with pytest.raises(SystemExit) as stop:  # argparse's usage error
    cli.main(["quickstart", "--out", str(tmp_path / "out"), "--eval-limit", "0"])
  assert stop.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "--eval-limit" in err and "positive integer" in err
  assert not (tmp_path / "out").exists()


def test_failed_checks_name_each_failure_with_its_numbers():
  good_export = {"max_abs_logit_diff": 3e-6, "parity_ok": True, "import_exact": True}
  passing = {"held_out_loss": {"before": 8.3, "after": 6.2}, "held_out_loss_fell": True,
             "export": good_export, "diffusion_export": good_export,
             "diffusion_loss": {"untrained": 8.4, "ar_model": 7.3, "converted": 6.6},
             "diffusion_loss_fell": True}
  assert failed_checks(passing) == []
  bad_export = {"max_abs_logit_diff": 0.25, "parity_ok": False, "import_exact": False}
  failing = {"held_out_loss": {"before": 8.3, "after": float("nan")}, "held_out_loss_fell": False,
             "export": bad_export, "diffusion_export": bad_export,
             "diffusion_loss": {"untrained": 8.4, "ar_model": 7.3, "converted": 7.5},
             "diffusion_loss_fell": False}
  held_out, parity, imported, diffusion, diffusion_parity, diffusion_import = (
      failed_checks(failing))
  assert "did not fall" in held_out and "8.3000" in held_out and "nan" in held_out
  assert "2.50e-01" in parity and f"{PARITY_TOLERANCE:.0e}" in parity
  assert "import" in imported
  assert "7.5000" in diffusion and "7.3000" in diffusion and "8.4000" in diffusion
  assert "diffusion model" in diffusion_parity and "diffusion export" in diffusion_import
  unscored = {"tasks": [{"task": "piqa", "value": 0.5}, {"task": "gsm8k", "value": None}],
              "average_7": None}
  (evaluation,) = failed_checks({**passing, "evaluation": {"run": unscored}})
  assert "run" in evaluation and "gsm8k" in evaluation
