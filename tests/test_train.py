"""Training: objective, schedules, sharded step, loop, checkpoints, resume, failures."""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhara_jax import config
from dhara_jax.config import MeshConfig
from dhara_jax.errors import ConfigError, DharaError
from dhara_jax.kernels import attention
from dhara_jax.kernels.canon import api as canon_api
from dhara_jax.loop import run
from dhara_jax.metrics import read_metrics
from dhara_jax.model import Head, init_params
from dhara_jax.losses import ar_loss, next_token_targets
from dhara_jax.optim import decay_mask, learning_rate
from dhara_jax.sharding import make_mesh
from dhara_jax.train import build, init_state, loss_sum, make_train_step

TINY_RUN = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
            "model.mlp_dim=64", "model.max_seq_len=32", "data.seq_len=32", "data.batch_size=8",
            "train.steps=6", "train.eval_every=2", "train.eval_batches=1",
            "train.checkpoint_every=2", "train.warmup_fraction=0.2", "data.read_threads=1"]


def tiny_run(*overrides):
  return config.load("configs/runs/quickstart.yaml", TINY_RUN + list(overrides))


def losses(run_dir):
  return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def test_next_token_targets_respect_documents_and_padding():
  tokens = jnp.array([[5, 6, 7, 8, 9, 3]])
  seg = jnp.array([[1, 1, 1, 2, 2, 0]])
  targets, weights = next_token_targets(tokens, seg)
  np.testing.assert_array_equal(targets[0, :5], [6, 7, 8, 9, 3])
  # 7→8 crosses a document boundary, 9→pad and pad→end are not predictions.
  np.testing.assert_array_equal(weights[0], [1, 1, 0, 1, 0, 0])
  hidden = jnp.ones((1, 6, 4))
  total, count = ar_loss(hidden, Head(jnp.zeros((4, 11)), False, 0.0), tokens, seg)
  assert float(count) == 3 and np.isclose(float(total), 3 * np.log(11))


def test_learning_rate_schedules():
  cosine = learning_rate(config.TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_fraction=0.1))
  assert float(cosine(0)) == 0 and np.isclose(float(cosine(10)), 1.0)
  assert np.isclose(float(cosine(100)), 0.1) and float(cosine(50)) < 1.0
  wsd = learning_rate(config.TrainConfig(steps=100, lr=1.0, min_lr=0.1, schedule="wsd",
                                         warmup_fraction=0.1, decay_fraction=0.2))
  assert np.isclose(float(wsd(10)), 1.0) and np.isclose(float(wsd(79)), 1.0)
  assert np.isclose(float(wsd(90)), 0.55) and np.isclose(float(wsd(100)), 0.1)


def test_weight_decay_mask():
  cfg = tiny_run("model.canon_set=ABCD").model
  from dhara_jax.model import init_params
  mask = decay_mask(init_params(cfg, jax.random.key(0)))
  assert mask["layers_0"]["attn"]["q"]["kernel"] and mask["layers_0"]["mlp"]["down"]["kernel"]
  assert not mask["embed"]["embedding"] and not mask["final_norm"]["scale"]
  assert not mask["layers_0"]["canon_a"]["kernel"]


def _step_losses(cfg, mesh_cfg, batches):
  mesh = make_mesh(mesh_cfg, jax.devices()[:mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor])
  tx, shardings = build(cfg, mesh)
  state = init_state(cfg, mesh, tx, shardings)
  step = make_train_step(cfg, mesh, tx, shardings)
  out = []
  for batch in batches:
    state, metrics = step(state, batch)
    out.append(float(metrics["loss"]))
  return np.array(out)


def test_a_state_from_given_weights_is_a_fresh_one_with_those_weights():
  """A conversion or an import starts from weights: its optimizer state, step and rng are what a
  random init's would be (no random init is made for them)."""
  cfg = tiny_run()
  mesh = make_mesh(MeshConfig(2, 2, 2), jax.devices())
  tx, shardings = build(cfg, mesh)
  fresh = init_state(cfg, mesh, tx, shardings)
  weights = jax.tree.map(lambda x: x + 1, fresh["params"])
  given = init_state(cfg, mesh, tx, shardings, weights)
  assert given["params"] is weights
  expected = {**fresh, "opt_state": tx.init(weights)}
  for name in ("opt_state", "step", "rng"):
    jax.tree.map(np.testing.assert_array_equal, given[name], expected[name])
    assert (jax.tree.map(lambda x: x.sharding, given[name])
            == jax.tree.map(lambda x: x.sharding, fresh[name]))


def test_gradient_accumulation_equals_one_big_batch():
  rng = np.random.default_rng(0)
  batches = [{"tokens": rng.integers(0, 4096, (8, 32)).astype(np.int32),
              "segment_ids": np.repeat([[1] * 20 + [2] * 12], 8, 0).astype(np.int32)}
             for _ in range(3)]
  one = _step_losses(tiny_run(), MeshConfig(1, 1, 1), batches)
  for accum, mesh in ((4, MeshConfig(1, 1, 1)), (2, MeshConfig(2, 2, 2))):
    got = _step_losses(tiny_run(f"train.grad_accum={accum}"), mesh, batches)
    np.testing.assert_allclose(got, one, rtol=1e-5)


def test_one_device_and_eight_devices_agree(tmp_path):
  """The same run on 1 device and on 2×2×2 fake devices: losses within 1e-5 relative."""
  single = run(tiny_run("train.steps=5", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"),
               tmp_path / "one", progress=False)
  for name, mesh in (("dft", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]),
                     ("fsdp", ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"])):
    sharded = run(tiny_run("train.steps=5", *mesh), tmp_path / name, progress=False)
    np.testing.assert_allclose(losses(tmp_path / name), losses(tmp_path / "one"), rtol=1e-5)
    assert np.isclose(sharded["eval_loss"], single["eval_loss"], rtol=1e-5)


def test_restore_onto_a_different_mesh_continues_the_run(tmp_path):
  straight = tmp_path / "straight"
  end = run(tiny_run(), straight, progress=False)["state"]
  moved = tmp_path / "moved"
  half = run(tiny_run("mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"), moved, stop_at=2,
             progress=False)["state"]
  resumed = run(tiny_run("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"), moved,
                progress=False)["state"]
  np.testing.assert_allclose(losses(moved), losses(straight), rtol=1e-5)
  # The PRNG key is checkpointed and advances once per step: resumed = uninterrupted.
  assert not np.array_equal(half["rng"], end["rng"])
  np.testing.assert_array_equal(resumed["rng"], end["rng"])
  assert int(resumed["step"]) == int(end["step"]) == 6


def test_run_dir_contents_and_tokenizer_in_checkpoint(tmp_path):
  from dhara_jax.checkpoint import Checkpointer
  from dhara_jax.plot import plot_run

  summary = run(tiny_run(), tmp_path, progress=False)
  rows = read_metrics(tmp_path)
  assert [r["step"] for r in rows] == list(range(0, 7))  # step 0: held-out loss before training
  assert all({"loss", "lr", "grad_norm", "tokens_per_second"} <= set(r) for r in rows[1:])
  assert {"eval_loss"} <= set(rows[0]) and "eval_loss" in rows[2]
  assert (tmp_path / "config.yaml").is_file() and (tmp_path / "sample_4k.model").is_file()
  assert list((tmp_path / "tensorboard").iterdir())
  checkpoints = Checkpointer(tmp_path, keep=3)
  assert checkpoints.latest_step() == 6 == summary["steps"]
  assert checkpoints.restore_tokenizer(6) == {
      "sample_4k.model": (tmp_path / "sample_4k.model").read_bytes()}
  checkpoints.close()
  png = plot_run(tmp_path)
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(DharaError, match="plot: cannot write .*missing"):
    plot_run(tmp_path, tmp_path / "missing" / "curves.png")


def test_checkpoint_dir_elsewhere(tmp_path):
  """`train.checkpoint_dir` (a bucket on pods) holds the checkpoints; the run resumes from it."""
  from dhara_jax.checkpoint import Checkpointer

  elsewhere = tmp_path / "bucket" / "ckpt"
  run(tiny_run("train.steps=2", f"train.checkpoint_dir={elsewhere}"), tmp_path / "run",
      progress=False)
  assert not (tmp_path / "run" / "checkpoints").exists()
  checkpoints = Checkpointer(tmp_path / "unused", keep=3, directory=str(elsewhere))
  assert checkpoints.latest_step() == 2
  checkpoints.close()
  summary = run(tiny_run("train.steps=3", f"train.checkpoint_dir={elsewhere}"), tmp_path / "run",
                progress=False)
  assert summary["steps"] == 3 and [r["step"] for r in read_metrics(tmp_path / "run")][-1] == 3


def test_dtype_and_kernel_choices_may_change_on_resume():
  """A run may resume in another compute dtype or with other kernels; any other model field is
  another architecture."""
  from dhara_jax.loop import architecture_diff

  saved = config.to_dict(tiny_run())["model"]
  resumed = {**saved, "dtype": "bfloat16", "canon_impl": "xla", "attention_impl": "pallas_gpu"}
  assert architecture_diff(saved, resumed) == []
  assert architecture_diff(saved, {**resumed, "num_kv_heads": 4}) == [
      f"model.num_kv_heads: checkpoint {saved['num_kv_heads']!r}, config 4"]


def test_other_architecture_tokenizer_and_unwritable_dir_are_refused(tmp_path):
  from data_pipeline import commands

  run(tiny_run("train.steps=2"), tmp_path, progress=False)
  with pytest.raises(DharaError, match="another architecture.*model.d_model"):
    run(tiny_run("model.d_model=64"), tmp_path, progress=False)
  other = tmp_path / "other_4k.model"  # same size and special tokens, other pieces
  commands.tokenizer_train(tiny_run(f"data.tokenizer={other}",
                                    "data.tokenizer_sample_chars=500000"))
  with pytest.raises(DharaError, match="trained with another tokenizer than .*other_4k.model"):
    run(tiny_run(f"data.tokenizer={other}"), tmp_path, progress=False)
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(DharaError, match="run dir .* not writable"):
    run(tiny_run(), blocker / "run", progress=False)
  with pytest.raises(DharaError, match="checkpoint dir .* not writable"):
    run(tiny_run(f"train.checkpoint_dir={blocker / 'checkpoints'}"), tmp_path / "other",
        progress=False)
  assert not (tmp_path / "other").exists()  # refused before the run dir was made
  # Longer rows than the model's positions (GPT-2's learned ones would be NaN past them).
  with pytest.raises(ConfigError, match=r"data.seq_len: 64 is longer than model.max_seq_len=32"):
    run(tiny_run("data.seq_len=64"), tmp_path / "long", progress=False)
  assert not (tmp_path / "long").exists()


def test_a_failed_start_leaves_no_run_dir(tmp_path, monkeypatch):
  # A data source that cannot be read: refused after the run dir was made, which goes again.
  with pytest.raises(DharaError, match="missing.model"):
    run(tiny_run(f"data.tokenizer={tmp_path / 'missing.model'}"), tmp_path / "run",
        progress=False)
  assert not (tmp_path / "run").exists()
  # A bad kernel override is read before anything is made (not at the first trace).
  monkeypatch.setenv(attention.ENV_VAR, "cudnn")
  with pytest.raises(ConfigError, match="DHARA_ATTENTION_IMPL='cudnn'"):
    run(tiny_run(), tmp_path / "run", progress=False)
  monkeypatch.delenv(attention.ENV_VAR)
  monkeypatch.setenv(canon_api.ENV_VAR, "triton")
  with pytest.raises(ConfigError, match="DHARA_CANON_IMPL='triton'"):
    run(tiny_run("model.canon_set=AC"), tmp_path / "run", progress=False)
  assert not (tmp_path / "run").exists()
  monkeypatch.delenv(canon_api.ENV_VAR)
  # A run dir that existed before stays, and so does anything in it.
  (tmp_path / "kept").mkdir()
  with pytest.raises(DharaError, match="missing.model"):
    run(tiny_run(f"data.tokenizer={tmp_path / 'missing.model'}"), tmp_path / "kept",
        progress=False)
  assert (tmp_path / "kept").is_dir()


def test_a_run_dir_in_use_is_refused(tmp_path):
  from dhara_jax.loop import exclusive_use

  with exclusive_use(tmp_path):  # as a running `dhara train` holds it
    proc = _dhara("train", "configs/runs/quickstart.yaml", *TINY_RUN, "--run-dir", str(tmp_path),
                  "--no-progress")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: train: another dhara train is using {tmp_path}; wait for it to end or use "
      "another --run-dir")
  assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())
  run(tiny_run("train.steps=1"), tmp_path, progress=False)  # released: the run proceeds


def _dhara(*args, **kwargs):
  return subprocess.run([sys.executable, "-m", "dhara_jax.cli", *args], capture_output=True,
                        text=True, **kwargs)


def test_nan_stops_with_one_line_and_keeps_last_good_checkpoint(tmp_path):
  proc = _dhara("train", "configs/runs/quickstart.yaml", *TINY_RUN, "train.lr=1e6",
                "train.min_lr=0", "train.clip_norm=0", "train.warmup_fraction=0",
                "train.checkpoint_every=1",
                "--run-dir", str(tmp_path), "--no-progress")
  assert proc.returncode == 2
  line = proc.stderr.strip().splitlines()[-1]
  assert line.startswith("error: train: non-finite values at step ")
  bad_step = int(line.split("at step ")[1].split()[0])
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and max(saved) == bad_step - 1 and f"step {bad_step - 1}" in line


def test_damaged_checkpoint_is_one_line_and_an_earlier_one_resumes(tmp_path):
  args = ["configs/runs/quickstart.yaml", *TINY_RUN, "train.steps=4", "--run-dir", str(tmp_path),
          "--no-progress"]
  assert _dhara("train", *args).returncode == 0
  for f in (tmp_path / "checkpoints" / "4" / "state").rglob("d/*"):  # truncate the array data
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
  for proc in (_dhara("train", *args[:-3], "train.steps=6", *args[-3:]),
               _dhara("export", str(tmp_path), "--out", str(tmp_path / "hf"))):
    assert proc.returncode == 2
    # One line, no tracebacks (the test's 8 fake devices add a logged mesh warning).
    lines = [line for line in proc.stderr.strip().splitlines()
             if not line.startswith("WARNING:")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: checkpoint: {tmp_path / 'checkpoints' / '4'} is "
                               "unreadable (") and "move it aside" in lines[0]
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4"]
  (tmp_path / "checkpoints" / "4").rename(tmp_path / "step4_damaged")
  proc = _dhara("train", *args[:-3], "train.steps=6", *args[-3:])
  assert proc.returncode == 0, proc.stderr
  assert "steps 2→6" in proc.stdout
  proc = _dhara("train", *args)  # to step 4, but the run is at 6
  assert proc.returncode == 0 and "already at step 6 (asked to train to 4)" in proc.stdout


def test_checkpoint_of_another_state_layout_names_the_entries(tmp_path):
  from dhara_jax.checkpoint import Checkpointer

  checkpoints = Checkpointer(tmp_path, keep=1, async_save=False)
  checkpoints.save(1, {"step": jnp.ones((), jnp.int32)}, None, {})
  checkpoints.wait()
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  wanted = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=one),  # e.g. a newer state
            "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=one)}
  with pytest.raises(DharaError, match=r"^checkpoint: .*/1 holds a train state with other "
                                       r"entries \(rng\): it was written by another version"):
    checkpoints.restore(1, wanted, None)
  checkpoints.close()


def test_export_and_import_of_a_run(tmp_path):
  from dhara_jax.export.parity import load_torch_model, torch_logits
  from dhara_jax.model import forward
  from dhara_jax.runs import import_into_run, load_run

  run(tiny_run("train.steps=2"), tmp_path / "run", progress=False)
  proc = _dhara("export", str(tmp_path / "run"), "--out", str(tmp_path / "hf"))
  assert proc.returncode == 0, proc.stderr
  loaded = load_run(tmp_path / "run")
  cfg, params = loaded.cfg, loaded.params
  tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (1, 16))
  np.testing.assert_allclose(np.asarray(forward(cfg.model, params, tokens)[0]),
                             torch_logits(load_torch_model(tmp_path / "hf"), tokens), atol=1e-4)
  import_into_run(tmp_path / "hf", tmp_path / "imported")
  imported = load_run(tmp_path / "imported")
  cfg2 = imported.cfg
  assert imported.step == 0 and cfg2.model == cfg.model
  assert cfg2.data.seq_len == cfg.model.max_seq_len  # the default 1024-token rows, clamped
  # A base config whose rows the imported model cannot take is refused before writing.
  with pytest.raises(ConfigError, match=r"data.seq_len: 64 is longer than model.max_seq_len=32"):
    import_into_run(tmp_path / "hf", tmp_path / "too_long", tiny_run("data.seq_len=64"))
  assert not (tmp_path / "too_long").exists()
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(imported.params)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def _run_until_killed(args, run_dir, kill_after_step):
  """Starts `dhara train`, SIGKILLs it once metrics.jsonl shows `kill_after_step`."""
  proc = subprocess.Popen([sys.executable, "-m", "dhara_jax.cli", *args],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics = run_dir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and any(r["step"] >= kill_after_step for r in read_metrics(run_dir)):
      os.kill(proc.pid, signal.SIGKILL)
      break
    time.sleep(0.02)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def test_sigterm_checkpoints_the_current_step_and_stops(tmp_path):
  args = ["train", "configs/runs/quickstart.yaml", *TINY_RUN, "train.steps=500",
          "train.checkpoint_every=1000", "train.eval_every=0", "--run-dir", str(tmp_path),
          "--no-progress"]
  proc = subprocess.Popen([sys.executable, "-m", "dhara_jax.cli", *args],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.02)
  stderr = proc.communicate(timeout=120)[1]
  assert proc.returncode == 2, stderr
  last = max(r["step"] for r in read_metrics(tmp_path))
  assert stderr.strip().splitlines()[-1].startswith(
      f"error: train: stopped by SIGTERM after step {last}, checkpoint saved in ")
  assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [str(last)]
  resumed = _dhara(*args[:-3], f"train.steps={last + 2}", *args[-3:])
  assert resumed.returncode == 0 and f"steps {last}→{last + 2}" in resumed.stdout


@pytest.mark.slow
def test_kill_resume_is_exact(tmp_path):
  """SIGKILL at two different steps, resume each time: the losses equal an uninterrupted run's
  bit for bit."""
  overrides = [*TINY_RUN, "train.steps=14", "train.checkpoint_every=3", "train.eval_every=4"]
  straight = tmp_path / "straight"
  proc = _dhara("train", "configs/runs/quickstart.yaml", *overrides, "--run-dir", str(straight),
                "--no-progress")
  assert proc.returncode == 0, proc.stderr[-2000:]
  killed = tmp_path / "killed"
  args = ["train", "configs/runs/quickstart.yaml", *overrides, "--run-dir", str(killed),
          "--no-progress"]
  _run_until_killed(args, killed, kill_after_step=4)
  _run_until_killed(args, killed, kill_after_step=10)
  proc = _dhara(*args)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert losses(killed) == losses(straight)
  eval_of = lambda d: [(r["step"], r["eval_loss"]) for r in read_metrics(d) if "eval_loss" in r]
  assert eval_of(killed) == eval_of(straight)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_bf16_loss_gradient_lowers_for_accelerators(platform):
  """The CPU-only forms of the bf16 dots sit behind lax.platform_dependent; the accelerator
  branch (plain transposes, contractions in place) must lower too."""
  cfg = tiny_run("model.dtype=bfloat16", "train.logit_chunk_tokens=64")
  params = init_params(cfg.model, jax.random.key(0))
  batch = {"tokens": jnp.zeros((2, 32), jnp.int32), "segment_ids": jnp.ones((2, 32), jnp.int32)}
  grad = jax.jit(jax.grad(lambda p, b: loss_sum(cfg, p, b)[0]))
  lowered = jax.export.export(grad, platforms=[platform])(params, batch).mlir_module()
  cpu = jax.export.export(grad, platforms=["cpu"])(params, batch).mlir_module()
  assert lowered.count("stablehlo.transpose") < cpu.count("stablehlo.transpose")
