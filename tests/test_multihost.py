"""Every command as a job of 2 processes × 4 CPU devices (tests/multihost.py), against the same
command in this one process × 8 devices: training (default kernels), stops, resumes, a lost
process, conversion, evaluation, generation, export, and the one-line errors of a bad launch.

`data.host_split=rows` makes every process read the whole stream and keep its rows, so both
sides are fed the same global batches; the default split (documents) is exercised where the
two sides need not agree."""

import json
import signal
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from dhara_jax import config, loop
from dhara_jax.cli import main
from dhara_jax.convert import convert
from dhara_jax.generate import generate_from_run
from dhara_jax.metrics import read_metrics
from dhara_jax.sampling import Sampling
from eval import report
from multihost import Job, run_job, wait_for

pytestmark = pytest.mark.slow

CONFIG = "configs/runs/quickstart.yaml"  # LLaMA3-Canon: auto attention and Canon kernels
TINY = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.mlp_dim=64", "model.max_seq_len=32", "data.seq_len=32", "data.batch_size=8",
        "data.read_threads=1", "mesh.data=8", "train.warmup_fraction=0.2",
        "train.eval_batches=1"]
SHARED_ROWS = [*TINY, "data.host_split=rows", "train.steps=24", "train.eval_every=8",
               "train.checkpoint_every=4"]
# Two stages (warmup at block 1, stable mdm), 2 steps each.
CONVERSION = ["--config", "configs/runs/wsd.yaml", "convert.warmup_blocks=[1]",
              "convert.decay_blocks=[]", "convert.warmup_share=0.5", "convert.stable_share=0.5",
              "convert.decay_share=0", "convert.tokens=1024", "convert.average_top_k=0",
              "train.eval_every=0", "train.checkpoint_every=2"]


def train_args(run_dir: Path, overrides: list[str]) -> list[str]:
  return ["train", CONFIG, *overrides, "--run-dir", str(run_dir), "--no-progress"]


def rows(run_dir: Path) -> list[dict]:
  return [r for r in read_metrics(run_dir) if "loss" in r or "eval_loss" in r]


def losses(run_dir: Path) -> dict[int, tuple]:
  return {r["step"]: (r.get("loss"), r.get("eval_loss")) for r in rows(run_dir)}


def assert_close(ours: dict, theirs: dict, tol: float) -> None:
  assert ours.keys() == theirs.keys()
  for step in ours:
    for a, b in zip(ours[step], theirs[step]):
      assert (a is None) == (b is None) and (a is None or abs(a - b) <= tol), (step, a, b)


def ok(ends) -> None:
  for i, end in enumerate(ends):
    assert end.returncode == 0, f"process {i} exited {end.returncode}:\n{end.stderr[-3000:]}"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
  """The reference: this process, 8 devices."""
  run_dir = tmp_path_factory.mktemp("one") / "run"
  loop.run(config.load(CONFIG, SHARED_ROWS), run_dir, progress=False)
  return run_dir


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
  run_dir = tmp_path_factory.mktemp("two") / "run"
  ok(run_job(train_args(run_dir, SHARED_ROWS)))
  return run_dir


def test_training_on_two_processes_equals_one_process(one_process, two_processes):
  assert_close(losses(two_processes), losses(one_process), 1e-5)
  assert len(rows(two_processes)) == 1 + 24  # one writer: each row once (step 0's eval)
  # One coherent checkpoint per saved step: both processes' data positions and the state.
  step_dir = two_processes / "checkpoints" / "24"
  assert sorted(p.name for p in (step_dir / "data").glob("process_*")) == [
      "process_0-of-2.json", "process_1-of-2.json"]
  assert (step_dir / "state").is_dir()


def test_a_stop_on_one_process_stops_both_and_resumes_bit_for_bit(two_processes, tmp_path):
  run_dir = tmp_path / "run"
  args = train_args(run_dir, SHARED_ROWS)
  # SIGTERM to process 1 only: both agree on a step, save it and stop with one line.
  with Job(args) as job:
    wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(rows(run_dir)) >= 2, 180,
             "two trained steps")
    job.signal(1, signal.SIGTERM)
    ends = job.wait(120)
  lines = [end.error_lines() for end in ends]
  assert all(end.returncode == 2 for end in ends) and all(len(found) == 1 for found in lines)
  assert lines[0] == lines[1] and "train: stopped by SIGTERM or SIGINT on one of the " \
      "processes after step" in lines[0][0] and "checkpoint saved in" in lines[0][0], lines
  stopped = int(lines[0][0].split("after step ")[1].split(",")[0])
  assert (run_dir / "checkpoints" / str(stopped)).is_dir() and stopped < 24
  # The same command resumes; SIGKILL of both once it has saved a later step.
  with Job(args) as job:
    later = lambda: [s for s in _saved(run_dir) if s > stopped]  # noqa: E731
    wait_for(lambda: bool(later()), 180, "a checkpoint after the stop")
    job.kill()
    ends = job.wait(30)
  assert all(end.returncode == -signal.SIGKILL for end in ends), "finished before the kill"
  # And again to the end: every loss equals the uninterrupted job's, bit for bit.
  ok(run_job(args))
  assert losses(run_dir) == losses(two_processes)


def _saved(run_dir: Path) -> list[int]:
  folder = run_dir / "checkpoints"
  return [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.exists() else []


def test_a_lost_process_stops_the_other_in_bounded_time_and_resume_needs_the_same_count(
    tmp_path):
  run_dir = tmp_path / "run"
  # The default split: each process reads its own documents.
  args = train_args(run_dir, [*TINY, "train.steps=200", "train.eval_every=0",
                              "train.checkpoint_every=2"])
  with Job(args, host_timeout_s=10) as job:
    wait_for(lambda: 2 in _saved(run_dir), 180, "the checkpoint of step 2")
    job.procs[1].kill()
    killed = time.monotonic()
    ends = job.wait(120)
    took = time.monotonic() - killed
  assert ends[0].returncode != 0 and took < 10 + 20, took
  assert ends[0].error_lines() == [
      "error: lost process 1 (no heartbeat for 10 s: its host died, hung or was preempted); "
      "the job stops. Then run the same command on every host to resume from the last "
      "checkpoint"], ends[0].stderr[-2000:]
  # Its checkpoints hold each process's own position in its share of the documents.
  [alone] = run_job(args, processes=1, devices=8, launch=False, timeout_s=120)
  step = max(_saved(run_dir))
  assert alone.returncode == 2 and alone.error_lines() == [
      f"error: checkpoint: step {step} in {run_dir / 'checkpoints'} was written by a job of 2 "
      "processes and this one has 1: each process's position in its share of the data is its "
      "own, so resume it with 2; runs with data.host_split=rows resume on any process count"]


def test_a_shared_stream_resumes_on_another_process_count(two_processes, tmp_path):
  run_dir = tmp_path / "run"
  shutil.copytree(two_processes, run_dir)
  summary = loop.run(config.load(CONFIG, [*SHARED_ROWS, "train.steps=26"]), run_dir,
                     progress=False)
  assert summary["start_step"] == 24 and summary["steps"] == 26


def test_conversion_on_two_processes_equals_one_process(two_processes, tmp_path):
  ours = tmp_path / "two"
  ok(run_job(["convert", str(two_processes), *CONVERSION, "--run-dir", str(ours),
              "--no-progress"]))
  theirs = tmp_path / "one"
  summary = convert(two_processes, CONVERSION[1], CONVERSION[2:], theirs, progress=False)
  assert summary["steps"] == 4
  assert {r["phase"] for r in rows(ours)} == {"warmup", "stable"}
  assert_close(losses(ours), losses(theirs), 1e-5)


def test_evaluation_on_two_processes_equals_one_process(two_processes, tmp_path):
  run_dir = tmp_path / "run"
  shutil.copytree(two_processes, run_dir)
  ends = run_job(["eval", str(run_dir), "--tasks", "arc_challenge,piqa", "--limit", "10",
                  "--no-progress"])
  ok(ends)
  assert "stored:" in ends[0].stdout and "stored:" not in ends[1].stdout  # written once
  ours = _log_likelihoods(run_dir / report.EVAL_DIR)
  shutil.rmtree(run_dir / report.EVAL_DIR)
  report.evaluate(run_dir, "arc_challenge,piqa", limit=10)
  theirs = _log_likelihoods(run_dir / report.EVAL_DIR)
  assert ours.keys() == theirs.keys() and len(ours) >= 2 * 10 * 2  # ≥ 2 choices a document
  np.testing.assert_allclose([ours[k] for k in theirs], list(theirs.values()), atol=1e-5)


def _log_likelihoods(eval_dir: Path) -> dict[tuple, float]:
  out = {}
  for path in sorted((eval_dir / "samples").glob("*.jsonl")):
    for line in path.read_text().splitlines():
      sample = json.loads(line)
      for choice, (logp, _) in enumerate(sample["filtered_resps"]):
        out[path.stem, sample["doc_id"], choice] = float(logp)
  return out


def test_generation_and_export_on_two_processes(two_processes, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("The history of science\nA small model\n")
  ends = run_job(["generate", str(two_processes), "--prompt-file", str(prompts),
                  "--max-new-tokens", "12", "--temperature", "0.8", "--top-k", "40", "--json"])
  ok(ends)
  assert "{" not in ends[1].stdout  # one output, printed once
  ours = json.loads(ends[0].stdout[ends[0].stdout.index("{"):])
  theirs = generate_from_run(two_processes, prompts.read_text().splitlines(),
                             Sampling(max_new_tokens=12, temperature=0.8, top_k=40))
  assert [s["token_ids"] for s in ours["samples"]] == [s["token_ids"]
                                                       for s in theirs["samples"]]
  ok(run_job(["export", str(two_processes), "--out", str(tmp_path / "hf")]))
  assert main(["export", str(two_processes), "--out", str(tmp_path / "hf1")]) == 0
  for name in ("model.safetensors", "config.json"):
    assert (tmp_path / "hf" / name).read_bytes() == (tmp_path / "hf1" / name).read_bytes()


def test_bad_launches_are_one_line_and_write_nothing(tmp_path, capsys, monkeypatch):
  run_dir = tmp_path / "run"
  # A tensor axis across the two processes: a batch shard would have two owners.
  ends = run_job(train_args(run_dir, [*TINY, "mesh.data=1", "mesh.tensor=8"]), timeout_s=120)
  for end in ends:
    assert end.returncode == 2 and end.error_lines() == [
        "error: mesh: data=1 × fsdp=1 × tensor=8 puts a batch shard on devices of several of "
        "the 2 processes (each process feeds its own rows); keep tensor within one process's "
        "4 devices and make data × fsdp a multiple of 2, e.g. mesh.data=2 mesh.tensor=4"]
  assert not run_dir.exists()
  # A coordinator without the process count and index (JAX has no variables for them).
  [end] = run_job(train_args(run_dir, [*TINY, "train.multihost=true"]), processes=1,
                  launch=False, timeout_s=120,
                  env={"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"})
  assert end.returncode == 2 and end.error_lines()[0].startswith(
      "error: distributed: no TPU pod slice, SLURM or Open MPI job found to take the process "
      "count and index from"), end.stderr[-2000:]
  assert not run_dir.exists()
  for argv, message in [
      (["--coordinator", "127.0.0.1:9"], "error: distributed: --num-processes / "
       "DHARA_NUM_PROCESSES, --process-id / DHARA_PROCESS_ID not set; give all three on every "
       "host (or --multihost on a TPU pod slice, under SLURM or Open MPI, where JAX finds "
       "them)"),
      (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"],
       "error: distributed: coordinator 'nohost' is not HOST:PORT"),
      (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
       "error: distributed: process id 2 is not in [0, 2)")]:
    assert main(train_args(run_dir, TINY) + argv) == 2
    assert capsys.readouterr().err.startswith(message)
  monkeypatch.setenv("DHARA_NUM_PROCESSES", "two")
  assert main(["eval", str(run_dir)]) == 2
  assert capsys.readouterr().err == ("error: distributed: DHARA_NUM_PROCESSES='two' is not a "
                                     "whole number\n")
  assert not run_dir.exists()
