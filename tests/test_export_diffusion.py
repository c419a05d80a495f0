"""Masked-diffusion (bidirectional) models through custom-code export: DharaForMaskedDiffusion
in config.json, both Auto classes, logits and hidden states on a packed, padded batch, the
shifted-label loss, no silent AR `generate`, and a bit-exact import."""

import json
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from tiny import random_params, tiny_config

from dhara_jax.config import FAMILIES
from dhara_jax.errors import DharaError
from dhara_jax.export import export_hf, import_hf, uses_custom_code
from dhara_jax.export.parity import load_torch_model
from dhara_jax.model import forward, forward_hidden

TOL = 1e-4
MASK = 5
DIFFUSION = ("model.attention=bidirectional", f"model.mask_token_id={MASK}",
             "model.mask_epsilon=0.002")
VARIANTS = {"plain": (), "canon": ("model.canon_set=AC",)}


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory):
  cfg = tiny_config("llama3", *DIFFUSION, *VARIANTS[request.param])
  params = random_params(cfg, seed=11)
  out = export_hf(cfg, params, tmp_path_factory.mktemp(f"diffusion_{request.param}"))
  return cfg, params, out, load_torch_model(out)


def packed_batch(cfg):
  """Row 0: two documents in a row (6 + 7 tokens) then 3 padding; row 1: one document of 11
  then 5 padding. Some non-first tokens are the mask token, as a diffusion input has them."""
  rng = np.random.default_rng(12)
  tokens = rng.integers(0, cfg.vocab_size, (2, 16))
  seg = np.zeros((2, 16), np.int32)
  seg[0, :6], seg[0, 6:13], seg[1, :11] = 1, 2, 1
  tokens[0, [2, 3, 9, 12]] = MASK
  tokens[1, [1, 5, 6, 10]] = MASK
  return tokens, seg


def torch_call(model, tokens, seg):
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(seg > 0).long(),
                 segment_ids=torch.tensor(seg, dtype=torch.long))


def test_config_json_names_the_diffusion_class_and_its_keys(exported):
  cfg, _, out, model = exported
  written = json.loads((out / "config.json").read_text())
  assert written["architectures"] == ["DharaForMaskedDiffusion"]
  assert written["auto_map"] == {"AutoConfig": "configuration_dhara.DharaConfig",
                                 "AutoModel": "modeling_dhara.DharaModel",
                                 "AutoModelForCausalLM": "modeling_dhara.DharaForMaskedDiffusion"}
  assert written["attention"] == "bidirectional"
  assert (written["mask_token_id"], written["mask_epsilon"]) == (MASK, 0.002)
  assert written["label_alignment"] == "next_token"
  assert type(model).__name__ == "DharaForMaskedDiffusion"
  assert (model.config.mask_token_id, model.config.label_alignment) == (MASK, "next_token")


def test_logits_match_on_packed_padded_batch(exported):
  cfg, params, _, model = exported
  tokens, seg = packed_batch(cfg)
  ours = np.asarray(forward(cfg, params, tokens, seg)[0])
  theirs = torch_call(model, tokens, seg).logits.numpy()
  valid = seg > 0
  np.testing.assert_allclose(ours[valid], theirs[valid], atol=TOL, rtol=0)
  # The second document alone gives the same logits: nothing leaks across the boundary.
  with torch.no_grad():
    alone = model(input_ids=torch.tensor(tokens[:1, 6:13])).logits.numpy()[0]
  np.testing.assert_allclose(theirs[0, 6:13], alone, atol=TOL, rtol=0)


def test_attention_is_bidirectional_in_pytorch(exported):
  """A later token moves an earlier position's logits (it would not in a causal model)."""
  cfg, _, _, model = exported
  tokens, seg = packed_batch(cfg)
  changed = tokens.copy()
  changed[1, 8] = (changed[1, 8] + 1) % cfg.vocab_size
  before = torch_call(model, tokens, seg).logits.numpy()
  after = torch_call(model, changed, seg).logits.numpy()
  assert np.abs(before[1, :8] - after[1, :8]).max() > 1e-3
  np.testing.assert_array_equal(before[0], after[0])


def test_auto_model_gives_final_normed_hidden_states(exported):
  cfg, params, out, _ = exported
  base, info = transformers.AutoModel.from_pretrained(
      str(out), dtype=torch.float32, trust_remote_code=True, output_loading_info=True)
  assert type(base).__name__ == "DharaModel"
  assert not any(info.values()), info
  tokens, seg = packed_batch(cfg)
  ours = np.asarray(forward_hidden(cfg, params, tokens, seg)[0])
  theirs = torch_call(base.eval(), tokens, seg).last_hidden_state.numpy()
  valid = seg > 0
  np.testing.assert_allclose(ours[valid], theirs[valid], atol=TOL, rtol=0)


def test_loss_reads_a_masked_token_from_the_previous_position(exported):
  cfg, _, _, model = exported
  tokens, seg = packed_batch(cfg)
  clean = np.random.default_rng(13).integers(0, cfg.vocab_size, tokens.shape)
  masked = tokens == MASK
  labels = np.where(masked, clean, -100)
  labels[0, 6] = clean[0, 6]  # a document's first token: no predictor in its document
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(seg > 0).long(),
                segment_ids=torch.tensor(seg, dtype=torch.long), labels=torch.tensor(labels))
  logp = torch.log_softmax(out.logits, -1).numpy()
  b, j = np.nonzero(masked)
  want = -logp[b, j - 1, clean[b, j]].mean()
  np.testing.assert_allclose(out.loss.item(), want, rtol=1e-5)


def test_generate_is_the_diffusion_sampler_not_left_to_right(exported):
  """generate unmasks a canvas (test_export_generate has the sampler); the causal class on a
  bidirectional config still refuses GenerationMixin's left-to-right decoding."""
  _, _, _, model = exported
  ids, stats = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, return_stats=True)
  assert ids.shape == (1, 5) and not (ids == MASK).any() and stats == {"forwards": 2}
  causal_class = sys.modules[type(model).__module__].DharaForCausalLM
  with pytest.raises(NotImplementedError, match="load it as DharaForMaskedDiffusion"):
    causal_class(model.config).generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)


def test_import_is_bit_identical_with_the_mask_fields(exported):
  cfg, params, out, _ = exported
  cfg_back, params_back = import_hf(out)
  assert cfg_back == cfg
  assert (cfg_back.mask_token_id, cfg_back.mask_epsilon) == (MASK, 0.002)
  assert jax.tree.structure(params_back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_back), strict=True):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), b)


def test_import_refuses_another_label_alignment(exported):
  _, _, out, _ = exported
  written = json.loads((out / "config.json").read_text())
  other = out.parent / f"{out.name}_same_position"
  other.mkdir()
  (other / "model.safetensors").symlink_to(out / "model.safetensors")
  (other / "config.json").write_text(json.dumps({**written, "label_alignment": "same_position"}))
  with pytest.raises(DharaError, match="label_alignment 'same_position'"):
    import_hf(other)


@pytest.mark.parametrize("family", FAMILIES)
def test_bidirectional_routes_to_custom_code_and_stock_class_refuses(tmp_path, family):
  cfg = tiny_config(family, *DIFFUSION)
  assert uses_custom_code(cfg)
  with pytest.raises(DharaError, match=r"needs model\.attention='causal'") as why:
    export_hf(cfg, random_params(cfg), tmp_path, code="transformers")
  assert "\n" not in str(why.value)
  assert not (tmp_path / "config.json").exists()


def test_causal_custom_export_stays_causal_lm_and_generates(tmp_path):
  # A diffusion export of the same code loaded first, from a folder of the same name: transformers
  # then keeps its class registered for DharaConfig, which must not decide the next load.
  diffusion = tiny_config("llama3", *DIFFUSION, "model.canon_set=AC")
  earlier = export_hf(diffusion, random_params(diffusion), tmp_path / "earlier" / "hf")
  assert type(load_torch_model(earlier)).__name__ == "DharaForMaskedDiffusion"
  cfg = tiny_config("llama3", "model.canon_set=AC", f"model.mask_token_id={MASK}")
  out = export_hf(cfg, random_params(cfg), tmp_path / "hf")
  written = json.loads((out / "config.json").read_text())
  assert written["architectures"] == ["DharaForCausalLM"]
  assert written["auto_map"]["AutoModelForCausalLM"] == "modeling_dhara.DharaForCausalLM"
  assert written["auto_map"]["AutoModel"] == "modeling_dhara.DharaModel"
  model = load_torch_model(out)
  assert type(model).__name__ == "DharaForCausalLM"
  ids = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
  assert ids.shape == (1, 5)
  assert import_hf(out)[0] == cfg
