"""Imported models train on: `dhara train` continues an imported run on the shipped mix (the
pipeline tokenizing with the run's own tokenizer) and `dhara convert` turns it into a masked
diffusion model, both stopping and resuming exactly. The resume checks use a tiny random LLaMA
imported through the same transformers path; SmolLM2 itself takes a step of each."""

import shutil

import jax

import pytest
from real import tiny_llama_dir

from dhara_jax import cli, config, loop
from dhara_jax.metrics import read_metrics
from dhara_jax.runs import load_run, open_run
from dhara_jax.sharding import make_mesh
from dhara_jax.train import loss_sum

DATA = ["--config", "data/mix", "data.seq_len=32", "data.batch_size=4", "data.read_threads=1"]
TRAIN = ["train.steps=4", "train.checkpoint_every=1", "train.eval_every=2",
         "train.eval_batches=1", "train.warmup_fraction=0.25"]
RECIPE = "configs/runs/wsd.yaml"
# Two stages of two steps (block size 1, then mdm over the row): 4 × 4 rows of 32 tokens.
CONVERT = ["model.mask_token_id=0", "convert.warmup_blocks=[1]", "convert.decay_blocks=[]",
           "convert.warmup_share=0.5", "convert.stable_share=0.5", "convert.decay_share=0",
           "convert.tokens=512", "convert.average_top_k=0", "train.eval_every=2",
           "train.eval_batches=1", "train.checkpoint_every=1"]


def _rows(run_dir):
  return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in read_metrics(run_dir)]


def _train(run_dir, *extra):
  return cli.main(["train", str(run_dir / "config.yaml"), "--run-dir", str(run_dir),
                   "--no-progress", *TRAIN, *extra])


def _convert(source, run_dir, *extra):
  return cli.main(["convert", str(source), "--config", RECIPE, "--run-dir", str(run_dir),
                   "--no-progress", *CONVERT, *extra])


@pytest.fixture(scope="module")
def imported(hf_tokenizer_dir, tmp_path_factory):
  """A tiny random LLaMA with the HF tokenizer, imported by `dhara import` onto the shipped
  mix (its data section from data/mix)."""
  root = tmp_path_factory.mktemp("imported")
  source = tiny_llama_dir(root / "hf", hf_tokenizer_dir)
  assert cli.main(["import", str(source), "--run-dir", str(root / "run"), *DATA]) == 0
  return root / "run"


@pytest.mark.slow
def test_continued_training_stops_and_resumes_exactly(imported, tmp_path):
  straight, stopped = tmp_path / "straight", tmp_path / "stopped"
  for copy in (straight, stopped):
    shutil.copytree(imported, copy)  # its data.tokenizer: the original's copy, the same file
  assert _train(straight) == 0
  assert _train(stopped, "--steps", "2") == 0 and _train(stopped) == 0
  rows = _rows(straight)
  assert rows == _rows(stopped) and [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
  cfg = config.load(straight / "config.yaml")
  with open_run(straight) as trained, open_run(imported) as start:
    assert trained.saved_tokenizer(4).sha256 == start.saved_tokenizer(0).sha256
  assert cfg.data.sources[0].name == "finepdfs"  # the shipped mix


@pytest.mark.slow
def test_a_conversion_of_an_imported_model_stops_and_resumes_exactly(imported, tmp_path):
  assert _convert(imported, tmp_path / "straight") == 0
  # Stopped at the end of the warmup stage (an evaluation step), resumed into the stable one.
  assert _convert(imported, tmp_path / "stopped", "--steps", "2") == 0
  assert _convert(imported, tmp_path / "stopped") == 0
  rows = _rows(tmp_path / "straight")
  assert rows == _rows(tmp_path / "stopped")
  assert [(r["phase"], r["block_size"]) for r in rows if "loss" in r] == (
      [("warmup", 1)] * 2 + [("stable", 32)] * 2)
  cfg = config.load(tmp_path / "straight" / "config.yaml")
  assert cfg.model.attention == "bidirectional" and cfg.model.mask_token_id == 0


@pytest.mark.slow
def test_smollm2_trains_a_step_and_converts_a_step(smollm2_run, tmp_path):
  run_dir = tmp_path / "smollm2"
  shutil.copytree(smollm2_run, run_dir, ignore=shutil.ignore_patterns("eval"))
  assert cli.main(["train", str(run_dir / "config.yaml"), "--run-dir", str(run_dir),
                   "--no-progress", "train.steps=1", "train.eval_every=0"]) == 0
  # Step 1's loss is the imported weights' loss on the first batch the pipeline made with the
  # run's tokenizer: training went on from the model, not from a fresh one.
  imported = load_run(smollm2_run, 0)
  cfg = imported.cfg
  batch = loop.model_inputs(next(loop.pipeline_data(cfg, make_mesh(cfg.mesh)).train))
  # The batch lives on the run's one-device mesh; the restored parameters on every device.
  _, (total, count) = loss_sum(cfg, jax.device_get(imported.params), batch)
  (step_1,) = [r for r in read_metrics(run_dir) if "loss" in r]
  assert step_1["step"] == 1
  assert step_1["loss"] == pytest.approx(float(total / count), rel=1e-4)
  eos = imported.tokenizer.eos_id  # SmolLM2 has no mask token
  assert cli.main(["convert", str(smollm2_run), "--config", RECIPE, "--run-dir",
                   str(tmp_path / "diffusion"), "--no-progress", f"model.mask_token_id={eos}",
                   "convert.warmup_blocks=[1]", "convert.decay_blocks=[]",
                   "convert.warmup_share=0.5", "convert.stable_share=0.5",
                   "convert.decay_share=0", "convert.tokens=32", "convert.average_top_k=0",
                   "train.eval_every=0"]) == 0
  trained = [r for r in read_metrics(tmp_path / "diffusion") if "loss" in r]
  assert [(r["phase"], r["block_size"]) for r in trained] == [("warmup", 1), ("stable", 16)]
  with open_run(tmp_path / "diffusion") as converted:
    assert converted.steps[-1] == 2
