"""Data that is empty, broken, exhausted or stuck: one line, nothing lost, never a hang."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dhara_jax import config
from dhara_jax.cli import main
from dhara_jax.errors import DharaError
from dhara_jax.loop import pipeline_data, run
from dhara_jax.metrics import read_metrics
from dhara_jax.stopping import DataStop

TINY = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.mlp_dim=64", "model.max_seq_len=32", "data.seq_len=32", "data.batch_size=8",
        "data.read_threads=1", "train.warmup_fraction=0.2", "train.eval_every=0"]
SHIPPED = "{name: pdf, path: data/sample/finepdfs, format: parquet, weight: 0.8}"


def cfg_of(*overrides):
  return config.load("configs/runs/quickstart.yaml", TINY + list(overrides))


def source(name, path, weight=1.0):
  return f"{{name: {name}, path: '{path}', weight: {weight}}}"


def write_jsonl(path, texts, broken_line=None):
  lines = [json.dumps({"text": t}) for t in texts]
  if broken_line is not None:
    lines[broken_line - 1] = '{"text": "cut off'
  path.write_text("\n".join(lines) + "\n")
  return path


def sample_texts(count, chars=300):
  texts = pq.read_table("data/sample/dclm", columns=["text"]).column("text").to_pylist()
  return [t[:chars] for t in texts[:count]]


def losses(run_dir):
  return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


def steps_saved(directory):
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _dhara(*args):
  return subprocess.run([sys.executable, "-m", "dhara_jax.cli", *args], capture_output=True,
                        text=True, timeout=600)


def error_lines(stderr):
  # The test's 8 fake devices add a logged mesh warning; anything else is a failure.
  return [line for line in stderr.strip().splitlines() if not line.startswith("WARNING:")]


@pytest.mark.parametrize("layout", ["jsonl alone", "parquet beside a real source", "cache"])
def test_an_all_empty_source_is_refused_before_training(tmp_path, layout):
  empty = tmp_path / "empty.jsonl"
  write_jsonl(empty, ["", None, ""] * 10)
  if layout == "parquet beside a real source":
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": [""] * 30}), empty)
  sources = f"data.sources=[{SHIPPED}, {source('blank', empty, 0.2)}]"
  if layout == "jsonl alone":
    sources = f"data.sources=[{source('blank', empty)}]"
  overrides = [sources, "train.steps=2"]
  if layout == "cache":
    overrides.append(f"data.cache_dir={tmp_path / 'cache'}")
    prepare = ["data", "prepare", "--no-progress", "--config", "configs/runs/quickstart.yaml",
               *overrides]
    assert main(prepare) == 2 and not (tmp_path / "cache" / "manifest.json").exists()
    empty_a_prepared_source(prepare, empty, tmp_path / "cache")  # as an older version wrote
  with pytest.raises(DharaError, match=r"^data\.sources\[\d\] \(blank\): all \d+ of its "
                                       r"training documents are empty \(no tokens\)"):
    run(cfg_of(*overrides), tmp_path / "run", progress=False)
  assert not (tmp_path / "run").exists()


def empty_a_prepared_source(prepare, path, cache):
  """A cache whose `blank` source holds only empty documents (`prepare` now refuses to write
  one; earlier versions did): prepared with text, then its shard emptied."""
  write_jsonl(path, ["text"] * 30)
  assert main(prepare) == 0
  write_jsonl(path, [""] * 30)
  manifest = json.loads((cache / "manifest.json").read_text())
  [shard] = manifest["sources"]["blank"]["shards"]
  shard["tokens"] = manifest["sources"]["blank"]["tokens"] = 0
  (cache / "manifest.json").write_text(json.dumps(manifest))
  (cache / "blank" / f"{shard['file']}.tokens").write_bytes(b"")
  np.save(cache / "blank" / f"{shard['file']}.offsets.npy", np.zeros(31, np.int64))


def test_prepare_refuses_an_empty_source_and_names_a_bad_record(tmp_path, capsys):
  args = ["data", "prepare", "--no-progress", f"data.cache_dir={tmp_path / 'cache'}"]
  write_jsonl(tmp_path / "empty.jsonl", [""] * 5)
  assert main([*args, f"data.sources=[{source('blank', tmp_path / 'empty.jsonl')}]"]) == 2
  assert capsys.readouterr().err == (
      "error: data.sources[0] (blank): all 5 of its documents are empty (no tokens); no cache "
      "manifest written — fix its path or remove it\n")
  write_jsonl(tmp_path / "bad.jsonl", sample_texts(30), broken_line=17)
  assert main([*args, f"data.sources=[{source('bad', tmp_path / 'bad.jsonl')}]"]) == 2
  assert capsys.readouterr().err.startswith(
      f"error: data.sources[0]: {tmp_path / 'bad.jsonl'} line 17 is not valid JSON")
  assert not (tmp_path / "cache" / "manifest.json").exists()


def test_a_bad_record_mid_run_checkpoints_then_resumes_exactly(tmp_path):
  """The run stops at the bad line with the last step saved; mended, it resumes to the same
  losses as a run that never met it."""
  texts = sample_texts(40)
  data = write_jsonl(tmp_path / "docs.jsonl", texts, broken_line=21)
  args = ["train", "configs/runs/quickstart.yaml", *TINY, "data.eval_fraction=0",
          f"data.sources=[{source('docs', data)}]", "train.steps=12",
          "train.checkpoint_every=100", "--run-dir", str(tmp_path / "run"), "--no-progress"]
  proc = _dhara(*args)
  assert proc.returncode == 2
  [line] = error_lines(proc.stderr)
  done = max(step for step, _ in losses(tmp_path / "run"))
  assert 0 < done < 12
  assert line == (f"error: data.sources[0]: {data} line 21 is not valid JSON (Unterminated "
                  f"string starting at); stopped after step {done}, checkpoint saved in "
                  f"{tmp_path / 'run' / 'checkpoints'}; mend that and run the same command to "
                  "resume")
  assert steps_saved(tmp_path / "run" / "checkpoints") == [done]
  write_jsonl(data, texts)  # mended
  assert _dhara(*args).returncode == 0
  straight = run(cfg_of(*args[2:-4], "train.checkpoint_every=100"), tmp_path / "straight",
                 progress=False)
  assert straight["steps"] == 12
  assert losses(tmp_path / "run") == losses(tmp_path / "straight")


class Stalling(grain.DatasetIterator):
  """The pipeline's iterator, stuck after `after` batches the way a hung reader is: the main
  thread waits on a worker thread that never finishes (grain's are not daemons either)."""

  def __init__(self, inner, after, daemon=False):
    super().__init__(inner)
    self._left, self._daemon = after, daemon

  def __next__(self):
    if self._left == 0:
      worker = threading.Thread(target=threading.Event().wait, daemon=self._daemon)
      worker.start()
      worker.join()
    self._left -= 1
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


def stalling_data(after):
  def data(cfg, mesh):
    out = pipeline_data(cfg, mesh)
    out.train = Stalling(out.train, after, daemon=True)  # pytest's own exit must not wait
    return out
  return data


def test_a_stuck_pipeline_times_out_with_the_last_step_saved(tmp_path):
  # 8 s, not less: on a loaded CI machine the pipeline's first batch once took over 2 s, and
  # the run stopped after step 0 instead of at the stall.
  cfg = cfg_of("train.steps=10", "train.checkpoint_every=2", "data.wait_timeout_s=8")
  with pytest.raises(DataStop, match=r"^data: no training batch came within "
                                     r"data\.wait_timeout_s=8 s; the data pipeline is stuck .*; "
                                     r"stopped after step 3, checkpoint saved in "):
    run(cfg, tmp_path, stalling_data(after=3), progress=False)
  assert steps_saved(tmp_path / "checkpoints") == [2, 3]
  assert run(cfg, tmp_path, progress=False)["start_step"] == 3  # resumes from it


def test_the_training_data_running_out_is_a_clean_stop(tmp_path):
  data = write_jsonl(tmp_path / "few.jsonl", sample_texts(6))
  cfg = cfg_of(f"data.sources=[{source('few', data)}]", "data.num_epochs=1",
               "data.eval_fraction=0", "train.steps=1000", "train.checkpoint_every=1000")
  with pytest.raises(DataStop, match=r"^data: the training data ran out before "
                                     r"train\.steps=1000 \(data\.num_epochs=1\); stopped after "
                                     r"step \d+, checkpoint saved in "):
    run(cfg, tmp_path / "run", progress=False)


STUCK_RUN = textwrap.dedent("""
    import sys, threading
    import data_pipeline
    sys.path.insert(0, {tests!r})
    from test_data_stops import Stalling
    real = data_pipeline.make_train_iterator
    data_pipeline.make_train_iterator = lambda *a, **k: Stalling(real(*a, **k), after=2)
    from dhara_jax.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_ends_a_run_stuck_waiting_for_data(tmp_path, signum):
  """The worker thread never ends (not a daemon's in grain): the process must still exit."""
  script = tmp_path / "stuck.py"
  script.write_text(STUCK_RUN.format(tests=os.path.dirname(__file__)))
  run_dir = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, str(script), "train", "configs/runs/quickstart.yaml",
                           *TINY, "train.steps=50", "train.checkpoint_every=1",
                           "--run-dir", str(run_dir), "--no-progress"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if (run_dir / "metrics.jsonl").exists() and any(
        r.get("step") == 2 for r in read_metrics(run_dir)):
      break
    time.sleep(0.05)
  time.sleep(1)  # now inside the stuck wait for step 3's batch
  proc.send_signal(signum)
  stderr = proc.communicate(timeout=60)[1]
  assert proc.returncode == 2, stderr
  assert error_lines(stderr) == [
      f"error: train: stopped by {signal.Signals(signum).name} after step 2, checkpoint saved in "
      f"{run_dir / 'checkpoints'}; run the same command to resume"]
  assert steps_saved(run_dir / "checkpoints") == [1, 2]
