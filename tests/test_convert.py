"""`dhara convert`: the WSD plan, bad inputs, top-k averaging, resume across a stage."""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from dhara_jax import config
from dhara_jax.cli import main
from dhara_jax.convert import conversion_plan, convert
from dhara_jax.errors import ConfigError
from dhara_jax.loop import run
from dhara_jax.metrics import read_metrics
from dhara_jax.phases import Phase
from dhara_jax.runs import load_run, open_run

AR = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
      "model.mlp_dim=64", "model.max_seq_len=32", "data.seq_len=32", "data.batch_size=8",
      "data.read_threads=1", "train.eval_every=0", "train.steps=4",
      "train.checkpoint_every=2"]
RECIPE = "configs/runs/wsd.yaml"
# 16 steps of 8 × 32 tokens: warmup 1 and 4 (one step each at 0.1), stable, decay 16 and 8.
SMALL = ["convert.warmup_blocks=[1, 4]", "convert.decay_blocks=[16, 8]", "convert.tokens=4096",
         "convert.average_top_k=2", "train.eval_every=2", "train.eval_batches=1",
         "train.checkpoint_every=4", "train.keep_checkpoints=2", "train.lr=1e-3",
         "train.min_lr=1e-4"]


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("ar")
  run(config.load("configs/runs/quickstart.yaml", AR), run_dir, progress=False)
  return run_dir


def plan_of(*overrides, steps=100):
  cfg = config.load("configs/runs/quickstart.yaml",
                    ["model.attention=bidirectional", f"train.steps={steps}", *overrides])
  return conversion_plan(cfg)


def test_the_plan_climbs_the_ladder_then_stays_then_decays():
  plan = plan_of("convert.warmup_blocks=[1, 4, 32, 64]", "convert.decay_blocks=[64, 32]")
  assert [(s.name, s.phase.objective, s.phase.block_size, s.last_step) for s in plan.stages] == [
      ("warmup", "block", 1, 2), ("warmup", "block", 4, 4), ("warmup", "block", 32, 6),
      ("warmup", "block", 64, 8), ("stable", "mdm", 0, 80), ("decay", "block", 64, 90),
      ("decay", "block", 32, 100)]
  assert plan.stage_at(1).phase == Phase("block", 1) and plan.stage_at(9).name == "stable"
  assert plan.average_top_k == 3 and plan.diffusion
  noisy = plan_of("convert.decay_blocks=[64]", "convert.mask_noise=0.01")
  assert noisy.stages[0].phase.mask_noise == 0.01 and not noisy.stages[1].phase.mask_noise


@pytest.mark.parametrize("overrides,message", [
    (["convert.warmup_blocks=[1, 48]"], r"convert\.warmup_blocks: block size 48 does not "
                                        r"divide data\.seq_len=128"),
    (["convert.warmup_blocks=[]"], r"convert\.warmup_blocks: is empty"),
    (["convert.decay_blocks=[64, 32]", "train.steps=20"],
     r"convert: the warmup stage at block size 1 gets 0 of the 20 conversion steps"),
    (["convert.stable_share=0.5"], r"convert\.stable_share: .* must be 1, got 0\.8"),
])
def test_bad_ladders_are_one_line(overrides, message):
  with pytest.raises(ConfigError, match=message):
    plan_of("convert.decay_blocks=[64, 32]", *overrides, steps=100 if not any(
        o.startswith("train.steps") for o in overrides) else 20)


def _convert(capsys, ar_run, run_dir, *overrides):
  code = main(["convert", str(ar_run), "--config", RECIPE, "--run-dir", str(run_dir),
               "--no-progress", *SMALL, *overrides])
  return code, capsys.readouterr().err


def test_bad_inputs_are_one_line_and_write_nothing(ar_run, tmp_path, capsys):
  out = tmp_path / "conv"
  for overrides, message in [
      (["model.d_model=64"], "error: convert: the config's model.d_model=64 differs from the AR "
                             "run's 32; a conversion keeps the AR architecture"),
      (["convert.decay_blocks=[12]"], "error: convert.decay_blocks: block size 12 does not "
                                      "divide data.seq_len=32"),
      (["model.mask_token_id=9999"], "error: model.mask_token_id: 9999 is outside the "
                                     "vocabulary [0, 4096)"),
      (["convert.tokens=256"], "error: convert: the warmup stage at block size 1 gets 0 of "
                               "the 1 conversion steps"),
  ]:
    code, err = _convert(capsys, ar_run, out, *overrides)
    assert code == 2 and err.splitlines()[-1].startswith(message), err
    assert not out.exists()
  # Not an AR run, no checkpoint, no run at all.
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "config.yaml").write_text((ar_run / "config.yaml").read_text())
  code, err = _convert(capsys, tmp_path / "empty", out)
  assert code == 2 and err.endswith(f"error: convert: {tmp_path / 'empty'} has no checkpoint "
                                    "yet\n")
  code, err = _convert(capsys, tmp_path / "nowhere", out)
  assert code == 2 and "a dhara run directory?)" in err
  diffusion = tmp_path / "mdm"
  run(config.load("configs/runs/quickstart.yaml", [*AR, "train.steps=1", "train.objective=mdm",
                                                    "model.attention=bidirectional"]),
      diffusion, progress=False)
  code, err = _convert(capsys, diffusion, out)
  assert code == 2 and err.endswith(f"error: convert: {diffusion} is not an AR run "
                                    "(train.objective: mdm); convert an AR run\n")
  assert not out.exists()


def _files(directory):
  """Every file and folder under `directory` with its size and mtime: what a refused command
  must leave as it was (a folder's mtime changes when an entry is added or removed)."""
  return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


def test_another_run_as_the_output_is_refused_untouched(ar_run, tmp_path, capsys):
  before = _files(ar_run)
  code, err = _convert(capsys, ar_run, ar_run)
  assert code == 2 and err.splitlines() == [
      f"error: convert: --run-dir {ar_run} is the AR run itself; use a new --run-dir"]
  assert _files(ar_run) == before and load_run(ar_run).phase == Phase("ar")
  other = tmp_path / "other"
  other.mkdir()
  (other / "config.yaml").write_text((ar_run / "config.yaml").read_text())
  code, err = _convert(capsys, ar_run, other)
  assert code == 2 and err.splitlines() == [
      f"error: convert: --run-dir {other} holds a run that is not a conversion (no "
      "conversion.json); use a new --run-dir"]
  assert [p.name for p in other.iterdir()] == ["config.yaml"]


def test_a_damaged_ar_checkpoint_is_one_line_and_leaves_no_run_dir(ar_run, tmp_path, capsys):
  damaged = tmp_path / "ar"
  shutil.copytree(ar_run, damaged)
  for f in (damaged / "checkpoints" / "4" / "state").rglob("d/*"):  # truncate the array data
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
  before = _files(damaged)
  code, err = _convert(capsys, damaged, tmp_path / "conv")
  lines = [line for line in err.splitlines() if not line.startswith("WARNING:")]
  assert code == 2 and len(lines) == 1, err
  assert lines[0].startswith(f"error: checkpoint: {damaged / 'checkpoints' / '4'} is unreadable "
                             "(") and "move it aside" in lines[0]
  assert not (tmp_path / "conv").exists() and _files(damaged) == before


def test_a_conversion_runs_the_plan_and_averages_the_best_decay_checkpoints(ar_run, tmp_path):
  summary = convert(ar_run, RECIPE, SMALL, tmp_path / "conv", progress=False)
  assert summary["steps"] == 16
  rows = read_metrics(tmp_path / "conv")
  assert rows[0]["step"] == 0 and "diffusion_loss" in rows[0]  # the AR model's, before
  trained = [r for r in rows if "loss" in r]
  assert [(r["phase"], r["block_size"]) for r in trained] == (
      [("warmup", 1), ("warmup", 4)] + [("stable", 32)] * 10 + [("decay", 16)] * 2
      + [("decay", 8)] * 2)
  last = trained[-1]
  scored = {r["step"]: r["diffusion_loss"] for r in trained
            if r["phase"] == "decay" and "diffusion_loss" in r}
  assert sorted(scored) == [14, 16]
  assert last["averaged_steps"] == sorted(scored, key=scored.get)
  with open_run(tmp_path / "conv") as conv:
    assert conv.step() == 16
  cfg = config.load(tmp_path / "conv" / "config.yaml")
  assert cfg.train.objective == "block" and cfg.train.block_size == 8
  assert cfg.model.attention == "bidirectional" and cfg.model.mask_token_id == 4
  record = json.loads((tmp_path / "conv" / "conversion.json").read_text())
  assert record["ar_step"] == 4 and record["steps"] == 16
  # Run again: nothing left to do; another AR run into the same dir is refused.
  assert convert(ar_run, RECIPE, SMALL, tmp_path / "conv", progress=False)["start_step"] == 16


def test_top_k_averaging_averages_exactly_the_checkpoints_it_names(tmp_path):
  from dhara_jax.checkpoint import Checkpointer
  from dhara_jax.loop import _average_best
  from dhara_jax.sharding import make_mesh
  from dhara_jax.train import build, init_state

  cfg = config.load("configs/runs/quickstart.yaml", AR)
  mesh = make_mesh(config.MeshConfig(1, 1, 1), jax.devices()[:1])
  tx, shardings = build(cfg, mesh)
  checkpoints = Checkpointer(tmp_path, keep=1, async_save=False, best=2)
  states = {}
  for step, score in [(1, 3.0), (2, 1.0), (3, 5.0), (4, None)]:  # 4: saved unscored
    state = init_state(cfg, mesh, tx, shardings)
    states[step] = jax.tree.map(lambda x, s=step: x + s, state["params"])
    checkpoints.save(step, {**state, "params": states[step]}, None, {}, score=score)
  checkpoints.wait()
  assert checkpoints.scores() == {2: 1.0, 1: 3.0}  # best 2 kept; 3 deleted, 4 has no score
  current = {**init_state(cfg, mesh, tx, shardings)}
  current["params"] = jax.tree.map(lambda x: x + 10, current["params"])
  averaged, named = _average_best(cfg, tx, shardings, checkpoints, current, 5, 2.0, k=2)
  assert named == [2, 5]
  for got, a, b in zip(*(jax.tree.leaves(p) for p in (averaged["params"], states[2],
                                                       current["params"]))):
    np.testing.assert_array_equal(np.asarray(got), (np.asarray(a) + np.asarray(b)) / 2)
  checkpoints.close()


@pytest.mark.slow
def test_a_killed_conversion_resumes_across_stages_bit_for_bit(ar_run, tmp_path):
  """SIGKILL in warmup (resuming into stable) and in decay (resuming into the next block size):
  the losses and held-out losses equal an uninterrupted conversion's exactly."""
  from test_train import _run_until_killed

  every = [*SMALL, "train.checkpoint_every=1", "train.keep_checkpoints=3"]
  args = lambda out: ["convert", str(ar_run), "--config", RECIPE, "--run-dir", str(out),
                      "--no-progress", *every]
  straight = subprocess.run([sys.executable, "-m", "dhara_jax.cli", *args(tmp_path / "s")],
                            capture_output=True, text=True, timeout=900)
  assert straight.returncode == 0, straight.stderr[-2000:]
  killed = tmp_path / "k"
  _run_until_killed(args(killed), killed, kill_after_step=2)
  _run_until_killed(args(killed), killed, kill_after_step=13)
  resumed = subprocess.run([sys.executable, "-m", "dhara_jax.cli", *args(killed)],
                           capture_output=True, text=True, timeout=900)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  rows = lambda d: [{k: v for k, v in r.items() if k != "tokens_per_second"}
                    for r in read_metrics(d)]
  assert rows(killed) == rows(tmp_path / "s")
