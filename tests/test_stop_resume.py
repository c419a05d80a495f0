"""A stop signal inside what a step owes (its held-out evaluation, a conversion's final top-k
averaging): the run and its resume end with the metrics rows and final parameters of a run never
stopped, bit for bit. A conversion resumed under another plan is refused in one line.

The signal is a real SIGTERM, sent by this process to itself from inside the loop's own
`evaluate` or `_average_best` (patched to send it first), so it lands there every time.
"""

import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from dhara_jax import config, loop
from dhara_jax.cli import main
from dhara_jax.convert import convert
from dhara_jax.errors import DharaError
from dhara_jax.metrics import read_metrics
from dhara_jax.runs import open_run
from dhara_jax.stopping import DataStop
from test_convert import AR, RECIPE
from test_train import TINY_RUN

# 8 conversion steps: warmup (2) and decay (4) at block 16 around stable mdm (2), two phases to
# compile; held-out losses every 2 steps, so the decay steps 6 and 8 are scored and the final
# model is their mean.
CONVERT = ["convert.warmup_blocks=[16]", "convert.decay_blocks=[16]", "convert.mask_noise=0",
           "convert.tokens=2048", "convert.warmup_share=0.25", "convert.stable_share=0.25",
           "convert.decay_share=0.5", "convert.average_top_k=2", "train.eval_every=2",
           "train.eval_batches=1", "train.checkpoint_every=4", "train.keep_checkpoints=2"]


def train(run_dir, data=loop.pipeline_data):
  return loop.run(config.load("configs/runs/quickstart.yaml", TINY_RUN), run_dir, data,
                  progress=False)


def conversion(ar_run, run_dir, *overrides):
  return convert(ar_run, RECIPE, [*CONVERT, *overrides], run_dir, progress=False)


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("ar")
  loop.run(config.load("configs/runs/quickstart.yaml", AR), run_dir, progress=False)
  return run_dir


@pytest.fixture(scope="module")
def straight_train(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("train")
  train(run_dir)
  return run_dir


@pytest.fixture(scope="module")
def straight_conversion(ar_run, tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("conversion")
  conversion(ar_run, run_dir)
  return run_dir


def sigterm_in(monkeypatch, name, when=lambda: True):
  """Patches loop.<name> to send this process SIGTERM on its first call for which `when()`
  holds; returns the list it appends to when it does."""
  real, sent = getattr(loop, name), []

  def sending(*args, **kwargs):
    if not sent and when():
      sent.append(name)
      os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)

  monkeypatch.setattr(loop, name, sending)
  return sent


def evaluating_step(run_dir, step):
  """Whether the loop is evaluating `step` now: its row comes next."""
  return lambda: [r["step"] for r in read_metrics(run_dir)[-1:]] == [step - 1]


def rows(run_dir):
  """The metrics rows, less the timings (they differ run to run)."""
  return [{k: v for k, v in r.items() if k not in ("tokens_per_second", "mfu")}
          for r in read_metrics(run_dir)]


def assert_same_outcome(run_dir, straight):
  assert rows(run_dir) == rows(straight)
  with open_run(run_dir) as got, open_run(straight) as want:
    assert got.step() == want.step()
    for a, b in zip(*(jax.tree.leaves(r.params(r.step())) for r in (got, want)), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def stopped_line(run_dir, step, command="train"):
  return (f"{command}: stopped by SIGTERM after step {step}, checkpoint saved in "
          f"{run_dir / 'checkpoints'}; run the same command to resume")


def test_sigterm_in_a_training_evaluation_then_in_the_last(straight_train, tmp_path,
                                                           monkeypatch):
  """Mid-run, the stop waits for the evaluation and saves the step with its whole row; at the
  last step the run simply ends, evaluated."""
  with monkeypatch.context() as m:
    sent = sigterm_in(m, "evaluate", evaluating_step(tmp_path, 4))
    with pytest.raises(DharaError) as stop:
      train(tmp_path)
  assert sent and str(stop.value) == stopped_line(tmp_path, 4)
  assert "eval_loss" in read_metrics(tmp_path)[-1]
  with monkeypatch.context() as m:
    sent = sigterm_in(m, "evaluate", evaluating_step(tmp_path, 6))
    assert train(tmp_path)["start_step"] == 4
  assert sent
  assert_same_outcome(tmp_path, straight_train)


def test_a_failed_evaluation_leaves_its_step_unsaved_and_resumes_whole(straight_train,
                                                                      tmp_path):
  """The held-out data end early at step 4's evaluation: steps up to 3 keep their rows, step 4
  is not saved owing its row, and the mended run trains it again."""
  def data(cfg, mesh):
    out = loop.pipeline_data(cfg, mesh)
    held_out, failing = out.eval_batches, evaluating_step(tmp_path, 4)
    out.eval_batches = lambda: iter([]) if failing() else held_out()
    return out

  with pytest.raises(DataStop) as stop:
    train(tmp_path, data)
  assert str(stop.value).startswith("data: the held-out data ran out before ")
  assert str(stop.value).endswith(
      f"; stopped after step 3, latest checkpoint is step 2 in {tmp_path / 'checkpoints'}; mend "
      "that and run the same command to resume")
  assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]
  assert train(tmp_path)["start_step"] == 2
  assert_same_outcome(tmp_path, straight_train)


@pytest.fixture(scope="module")
def stopped_conversion(ar_run, tmp_path_factory):
  """A conversion stopped by SIGTERM during step 6's evaluation, and its stop line."""
  run_dir = tmp_path_factory.mktemp("stopped")
  with pytest.MonkeyPatch.context() as m:
    sent = sigterm_in(m, "evaluate", evaluating_step(run_dir, 6))
    with pytest.raises(DharaError) as stop:
      conversion(ar_run, run_dir)
  assert sent
  return run_dir, str(stop.value)


def test_sigterm_in_a_conversion_evaluation_saves_the_step_scored(stopped_conversion):
  """Step 6's held-out losses rank it among the decay checkpoints: the stop waits for them,
  then saves the step with its score and its whole row."""
  run_dir, line = stopped_conversion
  assert line == stopped_line(run_dir, 6, "convert")
  assert {"eval_loss", "diffusion_loss"} <= set(read_metrics(run_dir)[-1])
  with open_run(run_dir) as run:
    assert run.checkpoints.scores() == {6: read_metrics(run_dir)[-1]["diffusion_loss"]}


@pytest.mark.parametrize("where", ["evaluate", "_average_best"])
def test_sigterm_at_the_last_step_of_a_conversion(ar_run, stopped_conversion, straight_conversion,
                                                  tmp_path, monkeypatch, where):
  """During the last step's evaluation or the averaging after it, the run still ends whole:
  averaged, evaluated and saved; running it again has nothing left to do."""
  run_dir = tmp_path / "run"
  shutil.copytree(stopped_conversion[0], run_dir)
  with monkeypatch.context() as m:
    sent = sigterm_in(m, where, evaluating_step(run_dir, 8))
    assert conversion(ar_run, run_dir)["start_step"] == 6
  assert sent and len(read_metrics(run_dir)[-1]["averaged_steps"]) == 2
  assert conversion(ar_run, run_dir)["start_step"] == 8
  assert_same_outcome(run_dir, straight_conversion)


@pytest.mark.parametrize("override,message", [
    ("convert.tokens=4096", "was planned for 2048 tokens (8 steps), this config's budget is 4096 "
                            "tokens (16 steps; convert.tokens, convert.token_fraction)"),
    ("convert.decay_share=0.25", "was planned with stage 2 'stable mdm to step 4', this config "
                                 "plans 'stable mdm to step 6' (convert.*_blocks, "
                                 "convert.*_share)"),
])
def test_a_conversion_resumed_under_another_plan_is_refused(ar_run, straight_conversion, capsys,
                                                            override, message):
  record = (straight_conversion / "conversion.json").read_text()
  shares = ["convert.stable_share=0.5"] if override.startswith("convert.decay_share") else []
  code = main(["convert", str(ar_run), "--config", RECIPE, "--run-dir", str(straight_conversion),
               "--no-progress", *CONVERT, override, *shares])
  assert code == 2 and capsys.readouterr().err.splitlines() == [
      f"error: convert: {straight_conversion} {message}; resume with the settings it started "
      "with, or use a new --run-dir"]
  assert (straight_conversion / "conversion.json").read_text() == record
  assert json.loads(record)["stages"][-1] == "decay block 16 to step 8"
