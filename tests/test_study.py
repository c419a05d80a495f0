"""`dhara study`: a 3-cell toy grid end to end (train, convert, eval, throughput, report), a cell
stopped midway resuming, a second invocation doing nothing but the report; `dhara params` of the
full-scale grid; the bad inputs."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dhara_jax import cli
from dhara_jax.errors import DharaError
from dhara_jax.study import command, runner, spec

REPO = Path(__file__).resolve().parents[1]
MODEL = {"num_layers": 2, "d_model": 32, "num_heads": 4, "mlp_dim": 64}
TOY = {
    "study": "toy",
    "description": "three toy cells",
    "step_timeout_minutes": 10,
    "shared": {
        "model": {"vocab_size": 4096, "max_seq_len": 64},
        "data": {"sources": [
            {"name": n, "path": f"data/sample/{n}", "format": "parquet", "weight": w}
            for n, w in (("finepdfs", 0.5), ("dclm", 0.3), ("fineweb_edu", 0.2))],
            "seq_len": 64, "batch_size": 4, "tokenizer": "data/tokenizer/sample_4k.model",
            "tokenizer_vocab_size": 4096},
        "train": {"steps": 20, "lr": 3.0e-3, "min_lr": 3.0e-4, "eval_every": 10,
                  "eval_batches": 1, "checkpoint_every": 10, "keep_checkpoints": 2},
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
    },
    # All 7 tasks on 2 documents each: every column and plot of the report gets a number.
    "eval": {"tasks": "codelion", "limit": 2, "mc_samples": 2, "gen_kwargs": "max_gen_toks=8"},
    "throughput": {"new_tokens": 8, "batch": 1, "runs": 1, "prompt_tokens": 8,
                   "diffusion": {"steps": 4}},
    "cells": [
        # Long enough to be stopped midway: 200 steps, a checkpoint every 10.
        {"name": "gpt2_4l", "label": "GPT-2 toy", "tables": ["shapes"], "preset": "shapes/gpt2_4l",
         "set": {"model": {**MODEL, "num_kv_heads": 4},
                 "train": {"steps": 200, "checkpoint_every": 10}}},
        {"name": "llama3_canon", "label": "LLaMA3-Canon toy", "preset": "families/llama3_canon",
         "set": {"model": {**MODEL, "num_kv_heads": 2}}},
        {"name": "dhara_70m", "label": "Dhara toy", "convert": "llama3_canon",
         "recipe": "runs/quickstart_convert",
         "set": {"convert": {"tokens": 5120, "warmup_blocks": [1, 8], "decay_blocks": [16]},
                 "train": {"eval_every": 5, "checkpoint_every": 5}}},
    ],
}


def write_study(path: Path, study: dict) -> Path:
  path.write_text(yaml.safe_dump(study, sort_keys=False))
  return path


def dhara(*args: str) -> tuple[int, str, str]:
  out = subprocess.run([sys.executable, "-m", "dhara_jax.cli", *args], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
  return out.returncode, out.stdout, out.stderr


def checkpoints(run: Path) -> list[int]:
  root = run / "checkpoints"
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def pct(x: float | None) -> str:
  return f"{100 * x:.2f}"


@pytest.mark.slow
def test_toy_grid_end_to_end_resumes_and_reports(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)  # the shared data paths are the repo's
  config = write_study(tmp_path / "toy.yaml", TOY)
  out = tmp_path / "out"

  # Stopped midway: SIGTERM once the first cell has a checkpoint; the step checkpoints, exits.
  child = subprocess.Popen([sys.executable, "-m", "dhara_jax.cli", "study", str(config),
                            "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  first_run = out / "cells" / "gpt2_4l" / "run"
  deadline = time.monotonic() + 300
  while not checkpoints(first_run) and child.poll() is None and time.monotonic() < deadline:
    time.sleep(0.2)
  child.send_signal(signal.SIGTERM)
  _, stderr = child.communicate(timeout=300)
  assert child.returncode == 2, stderr
  assert "stopped by SIGTERM in gpt2_4l's train step" in stderr.strip().splitlines()[-1]
  stopped_at = max(checkpoints(first_run))
  assert 0 < stopped_at < 200
  assert runner.read_status(out, spec.load(config).cell("gpt2_4l"))["state"] == "stopped"

  # Again: the stopped cell resumes from its checkpoint, the rest of the grid runs.
  lines = []
  result = command.study(config, out, log=lines.append)
  log_text = (out / "cells" / "gpt2_4l" / "log.txt").read_text()
  assert f"steps {stopped_at}→200" in log_text
  rows = {r["name"]: r for r in result["rows"]}
  assert all(r["state"] == "done" for r in rows.values()), rows
  assert rows["dhara_70m"]["kind"] == "diffusion" and rows["dhara_70m"]["converted_from"]

  # The report holds each cell's own numbers, read back from its eval and throughput files.
  report = (out / "report.md").read_text()
  table_rows = {line.split("|")[1].strip(): line for line in report.splitlines()
                if line.startswith("| ")}
  for name, row in rows.items():
    summary = json.loads((out / "cells" / name / "run" / "eval" / "summary.json").read_text())
    speed = json.loads((out / "cells" / name / "throughput.json").read_text())
    line = table_rows[row["label"]]
    for task in summary["tasks"]:
      assert pct(task["value"]) in line, (name, task["task"], line)
    assert pct(summary["average_7"]) in line
    assert row["tokens_per_second"] == speed["tokens_per_second"]
  assert "## Shapes" in report and "## Families" in report
  with open(out / "results.csv") as f:
    csv_rows = {r["name"]: r for r in csv.DictReader(f)}
  assert set(csv_rows) == set(rows)
  for name, row in rows.items():
    assert float(csv_rows[name]["average_7"]) == pytest.approx(row["average_7"])
    assert float(csv_rows[name]["tokens_per_second"]) == pytest.approx(row["tokens_per_second"])
    assert int(csv_rows[name]["params"]) == row["params"]
  plots = result["paths"]["plots"]
  assert set(plots) >= {"curves", "families", "truthfulqa", "throughput", "depth"}
  for path in plots.values():
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"({Path(path).name})" in report

  # A third invocation does nothing but the report: every cell skipped, no step run.
  logs = {p: p.read_text() for p in out.glob("cells/*/log.txt")}
  lines.clear()
  command.study(config, out, log=lines.append)
  assert sum("finished earlier, skipped" in line for line in lines) == 3
  assert {p: p.read_text() for p in out.glob("cells/*/log.txt")} == logs

  # --print-commands: the grid as a scheduler's script; --report: gather only.
  code, stdout, _ = dhara("study", str(config), "--out", str(out), "--print-commands")
  assert code == 0
  assert f"dhara convert {out}/cells/llama3_canon/run --config" in stdout
  assert "--cell dhara_70m" in stdout and "dhara bench throughput" in stdout
  code, stdout, stderr = dhara("study", str(config), "--out", str(out), "--report")
  assert code == 0, stderr
  assert "3 of 3 cells finished" in stdout


def test_params_of_the_full_grid_match_the_study(tmp_path, capsys):
  """`dhara params` over codelion.yaml, and the report's params column of an unstarted grid
  (in this process: the report reuses the model shapes `dhara params` traced)."""
  assert cli.main(["params", str(REPO / "configs/studies/codelion.yaml")]) == 0
  stdout = capsys.readouterr().out
  lines = {line.split()[0]: line for line in stdout.splitlines()[1:]}
  assert "64.09M" in lines["gpt2_12l"] and "71.34M" in lines["dhara_70m"]
  # The shapes' block matrices, 12·d²·L, as codelion's shape table states them.
  for name, stated in (("gpt2_4l", "28.3M"), ("gpt2_12l", "37.7M"), ("gpt2_16l", "38.5M"),
                       ("gpt2_24l", "42.5M"), ("gpt2_32l", "56.6M"), ("gpt2_48l", "59.0M"),
                       ("gpt2_64l", "50.3M")):
    assert stated in lines[name].split(), (name, lines[name])
  out = tmp_path / "codelion"
  command.study(REPO / "configs/studies/codelion.yaml", out, print_only=True, log=lambda _: None)
  result = command.study(REPO / "configs/studies/codelion.yaml", out, report_only=True,
                         log=lambda _: None)
  report = (out / "report.md").read_text()
  assert "| GPT-2 12L (gpt-2-70m) | 12 | 512 | 64.09M |" in report
  assert "| Dhara-70M | " in report and "71.34M" in report
  assert all(r["state"] == "pending" for r in result["rows"])


def test_tiny_grid_is_the_full_grid_scaled_down():
  full, tiny = spec.load(REPO / "configs/studies/codelion.yaml"), \
      spec.load(REPO / "configs/studies/tiny.yaml")
  assert [c.name for c in tiny.cells] == [c.name for c in full.cells]
  for small, big in zip(tiny.cells, full.cells):
    assert (small.tables, small.parent, small.diffusion) == (big.tables, big.parent, big.diffusion)
    assert spec.run_config(tiny, small).model.family == spec.run_config(full, big).model.family


def error_of(capsys, *argv: str) -> str:
  assert cli.main(list(argv)) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  return err


def cells_with(**change) -> dict:
  study = json.loads(json.dumps(TOY))
  study["cells"] = change.pop("cells", study["cells"])
  return {**study, **change}


def test_bad_grids_fail_in_one_line(tmp_path, capsys):
  bad = {
      "no such file or preset: families/llama9": cells_with(cells=[
          {"name": "x", "preset": "families/llama9"}]),
      "two cells are named 'a'": cells_with(cells=[
          {"name": "a", "preset": "families/llama3"}, {"name": "a", "preset": "families/qwen3"}]),
      "converts 'llama3', which is not a cell of the grid": cells_with(cells=[
          {"name": "d", "convert": "llama3", "recipe": "runs/wsd"}]),
      "converts 'dllm', which is not an AR cell": cells_with(cells=[
          {"name": "dllm", "preset": "families/dllm"},
          {"name": "d", "convert": "dllm", "recipe": "runs/wsd"}]),
      "model.d_model": cells_with(cells=[
          {"name": "x", "preset": "families/llama3", "set": {"model": {"d_model": -1}}}]),
  }
  for i, (message, study) in enumerate(bad.items()):
    config = write_study(tmp_path / f"bad{i}.yaml", study)
    err = error_of(capsys, "study", str(config), "--out", str(tmp_path / f"out{i}"))
    assert message in err, err
    assert not (tmp_path / f"out{i}").exists()  # refused before anything is written


def test_an_output_dir_of_another_study_is_refused(tmp_path, capsys):
  out = tmp_path / "out"
  first = write_study(tmp_path / "a.yaml", TOY)
  command.study(first, out, print_only=True, log=lambda _: None)
  second = write_study(tmp_path / "b.yaml", {**TOY, "study": "other"})
  err = error_of(capsys, "study", str(second), "--out", str(out))
  assert "holds the results of study 'toy', not 'other'" in err
  assert json.loads((out / "study.json").read_text())["name"] == "toy"
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "notes.txt").write_text("mine")
  err = error_of(capsys, "study", str(first), "--out", str(tmp_path / "busy"))
  assert "is not empty and holds no study.json" in err
  err = error_of(capsys, "study", str(first), "--out", str(tmp_path / "none"), "--report")
  assert "holds no study results" in err
  err = error_of(capsys, "study", str(first), "--out", str(out), "--cell", "nope")
  assert "no cell named 'nope'" in err


def test_a_failed_cell_is_recorded_and_the_grid_goes_on(tmp_path, monkeypatch):
  """A step that exits non-zero: its error line in status.json, the next cell still runs, its
  conversion child is not started; the study fails naming it, after writing the report."""
  monkeypatch.chdir(REPO)
  calls = []

  def fake_step(argv, log_path, timeout, stopper):
    calls.append(argv[:2])
    return (2, "train: the data ran out") if "gpt2_4l" in " ".join(argv) else (1, "boom")

  monkeypatch.setattr(runner, "_run_step", fake_step)
  config = write_study(tmp_path / "toy.yaml", TOY)
  out = tmp_path / "out"
  with pytest.raises(DharaError, match=r"3 of 3 cells failed: gpt2_4l \(train: the data ran out"):
    command.study(config, out, log=lambda _: None)
  study = spec.load(config)
  assert runner.read_status(out, study.cell("gpt2_4l"))["failed_step"] == "train"
  assert ["dhara", "train"] in calls and ["dhara", "convert"] not in calls
  status = runner.read_status(out, study.cell("dhara_70m"))
  assert "its AR cell llama3_canon has not finished training" in status["error"]
  assert (out / "report.md").is_file()


def test_a_conversion_starts_from_a_parent_trained_by_a_printed_command(tmp_path, monkeypatch):
  """A parent cell trained outside `dhara study` (no status.json) counts as trained once its
  last step's checkpoint exists; before that its conversion is not started."""
  monkeypatch.chdir(REPO)
  calls = []
  monkeypatch.setattr(runner, "_run_step", lambda argv, *_: (calls.append(argv[1]), (0, ""))[1])
  study = spec.load(write_study(tmp_path / "toy.yaml", TOY))
  out = tmp_path / "out"
  runner.prepare(study, out)
  with runner._Stopper() as stopper:
    runner._run_cell(study, out, study.cell("dhara_70m"), stopper, lambda _: None)
    assert calls == []
    assert "has not finished training" in runner.read_status(out, study.cell("dhara_70m"))["error"]
    (out / "cells" / "llama3_canon" / "run" / "checkpoints" / "20").mkdir(parents=True)
    runner._run_cell(study, out, study.cell("dhara_70m"), stopper, lambda _: None)
  assert calls == ["convert", "eval", "bench"]
  assert runner.read_status(out, study.cell("dhara_70m"))["state"] == "done"
