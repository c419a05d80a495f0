"""`dhara import` refuses checkpoints that do not describe one model exactly, in one line and
before writing anything; imported runs continue with the preset they came from."""

import json

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tiny import TINY, random_params, tiny_config

from dhara_jax import cli, config, loop
from dhara_jax.config import FAMILIES, architecture
from dhara_jax.errors import DharaError
from dhara_jax.export import export_hf, import_hf
from dhara_jax.export.parity import torch_logits
from dhara_jax.model import forward
from dhara_jax.runs import import_into_run

DOWN = "model.layers.1.mlp.down_proj.weight"


def exported(tmp_path, family="llama3", *overrides):
  cfg = tiny_config(family, *overrides)
  return cfg, export_hf(cfg, random_params(cfg), tmp_path / "hf")


def edit_weights(hf_dir, edit):
  """Rewrites hf_dir/model.safetensors with `edit(tensors)` applied, as a hand edit would."""
  path = hf_dir / "model.safetensors"
  tensors = load_file(str(path))
  edit(tensors)
  save_file(tensors, str(path), metadata={"format": "pt"})


def cli_import(hf_dir, run_dir, capsys):
  rc = cli.main(["import", str(hf_dir), "--run-dir", str(run_dir)])
  return rc, capsys.readouterr().err


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.update({DOWN: np.zeros((3, 5), np.float32)}),
     f"tensor {DOWN} has shape 3×5; config.json makes it 64×96"),
    (lambda t: t.update({DOWN: t[DOWN].astype(np.int64)}),
     f"tensor {DOWN} is I64, not a weight dtype (F32, BF16, F16)"),
    (lambda t: t.update({DOWN: t[DOWN].astype(np.float64)}),
     f"tensor {DOWN} is F64, not a weight dtype"),
    (lambda t: t.update({"model.layers.0.mlp.extra.weight": np.ones(4, np.float32)}),
     "holds tensor model.layers.0.mlp.extra.weight, which is no parameter of the model its "
     "config.json describes"),
    (lambda t: t.pop(DOWN), f"lacks tensor {DOWN}"),
], ids=["shape", "int64", "float64", "unclaimed", "missing"])
def test_cli_refuses_a_checkpoint_that_does_not_fit_in_one_line(tmp_path, capsys, edit, message):
  _, hf_dir = exported(tmp_path)
  edit_weights(hf_dir, edit)
  rc, err = cli_import(hf_dir, tmp_path / "run", capsys)
  assert rc == 2
  assert len(err.strip().splitlines()) == 1 and err.startswith("error: import: "), err
  assert message in err
  assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("family,overrides", [(f, ()) for f in FAMILIES]
                         + [("llama3", ("model.canon_set=AC",))])  # custom code (dhara)
def test_every_family_refuses_an_unclaimed_tensor(tmp_path, family, overrides):
  _, hf_dir = exported(tmp_path, family, *overrides)
  edit_weights(hf_dir, lambda t: t.update({"model.stray.weight": np.ones(2, np.float32)}))
  with pytest.raises(DharaError, match=r"holds tensor model\.stray\.weight, which is no"):
    import_hf(hf_dir)


def test_half_precision_weights_import_as_float32(tmp_path):
  cfg, hf_dir = exported(tmp_path)
  halves = {}

  def to_half(tensors):
    for i, name in enumerate(sorted(tensors)):
      halves[name] = tensors[name] = tensors[name].astype(
          ml_dtypes.bfloat16 if i % 2 else np.float16)

  edit_weights(hf_dir, to_half)
  _, params = import_hf(hf_dir)
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  embedding = halves["model.embed_tokens.weight"]
  np.testing.assert_array_equal(params["embed"]["embedding"], embedding.astype(np.float32))


def test_known_gpt2_buffers_are_skipped_by_name(tmp_path):
  """Older transformers versions saved GPT-2's causal-mask buffers with the weights."""
  cfg, hf_dir = exported(tmp_path, "gpt2")
  mask = np.tril(np.ones((1, 1, 64, 64), bool))
  edit_weights(hf_dir, lambda t: t.update({"transformer.h.0.attn.bias": mask,
                                           "transformer.h.0.attn.masked_bias":
                                           np.array(-1e4, np.float32)}))
  assert import_hf(hf_dir)[0] == cfg


def test_a_tied_checkpoint_may_carry_its_head_only_as_a_copy(tmp_path):
  cfg, hf_dir = exported(tmp_path)
  embed = "model.embed_tokens.weight"
  edit_weights(hf_dir, lambda t: t.update({"lm_head.weight": t[embed].copy()}))
  assert import_hf(hf_dir)[0] == cfg
  edit_weights(hf_dir, lambda t: t.update({"lm_head.weight": t[embed] + 1}))
  with pytest.raises(DharaError, match=f"lm_head.weight differs from {embed}, but config.json "
                     "ties them"):
    import_hf(hf_dir)


def test_config_without_a_key_the_mapping_reads_is_one_error(tmp_path):
  _, hf_dir = exported(tmp_path)
  path = hf_dir / "config.json"
  written = json.loads(path.read_text())
  del written["rope_parameters"]
  path.write_text(json.dumps(written))
  with pytest.raises(DharaError, match="config.json has no 'rope_parameters'"):
    import_hf(hf_dir)


def stock_gpt2(out, tie):
  """A GPT-2 as transformers builds and saves it (safetensors), not as dhara exports it."""
  import torch
  from transformers import GPT2Config, GPT2LMHeadModel
  from transformers.utils import logging

  logging.set_verbosity_error()  # the stock bos/eos ids lie outside the tiny vocabulary
  logging.disable_progress_bar()
  torch.manual_seed(0)
  model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                                     n_positions=64, tie_word_embeddings=tie))
  model.save_pretrained(out)
  return model.eval()


@pytest.mark.parametrize("tie", [False, True])
def test_stock_gpt2_imports_with_its_head(tmp_path, tie):
  """An untied GPT2LMHeadModel keeps its own lm_head.weight (it was dropped, and the logits
  were 3.6 off)."""
  model = stock_gpt2(tmp_path, tie)
  cfg, params = import_hf(tmp_path)
  assert cfg.tie_embeddings is tie and ("lm_head" in params) is not tie
  tokens = np.random.default_rng(7).integers(0, cfg.vocab_size, (2, 13))
  np.testing.assert_allclose(np.asarray(forward(cfg, params, tokens)[0]),
                             torch_logits(model, tokens), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# Item 6: an import and the preset it came from are one architecture.

SPELLED_OUT = ["model.family=lfm2", "model.canon_set=''", "model.qk_norm=true",
               "model.num_layers=3", "model.layer_pattern=CAC", "model.head_dim=16"]


def test_import_of_a_preset_is_its_architecture(tmp_path):
  cfg = tiny_config("lfm2", "model.layer_pattern=CAC", "model.head_dim=16")
  back, _ = import_hf(export_hf(cfg, random_params(cfg), tmp_path))
  assert (back.layer_pattern, back.head_dim) == ("CA", 0)  # spelled otherwise...
  assert architecture(back) == architecture(cfg)  # ...but the same model


def test_imported_run_continues_with_the_preset_it_came_from(tmp_path):
  cfg = config.load("configs/runs/quickstart.yaml", [
      *TINY, "model.vocab_size=4096", *SPELLED_OUT, "data.seq_len=32", "data.batch_size=8",
      "data.read_threads=1", "train.steps=1", "train.eval_every=0"])
  run_dir = import_into_run(export_hf(cfg.model, random_params(cfg.model), tmp_path / "hf"),
                            tmp_path / "run", cfg)
  saved = config.load(run_dir / "config.yaml").model
  assert (saved.layer_pattern, saved.head_dim) == ("CA", 0)
  summary = loop.run(cfg, run_dir, progress=False)
  assert (summary["start_step"], summary["steps"]) == (0, 1)
  assert np.isfinite(summary["final_loss"])


def test_architecture_diff_compares_resolved_values():
  saved = config.to_dict(config.load("lfm2", TINY + SPELLED_OUT[1:]))["model"]
  same = {**saved, "layer_pattern": "CA", "head_dim": 0, "sliding_window": 128}
  assert loop.architecture_diff(saved, same) == []
  assert loop.architecture_diff(saved, {**same, "layer_pattern": "AC"}) == [
      "model.layer_pattern: checkpoint 'CAC', config 'ACA'"]
  # A checkpoint older than a field takes its default; one with a field unknown here is
  # another architecture (one line, no crash).
  older = {k: v for k, v in saved.items() if k != "canon_bias"}
  assert loop.architecture_diff(older, saved) == []
  assert loop.architecture_diff({**saved, "colour": "red"}, saved) == [
      "model.colour: checkpoint 'red', config has no such field"]
