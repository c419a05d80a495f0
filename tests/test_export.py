"""Export every family to its transformers class and compare logits in PyTorch (fp32, CPU)."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from tiny import random_params, tiny_config

from dhara_jax.config import FAMILIES
from dhara_jax.errors import DharaError
from dhara_jax.export import export_hf, hf_config, import_hf
from dhara_jax.export.parity import load_torch_model, torch_logits
from dhara_jax.model import forward


TOL = 1e-4
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama3": "LlamaForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM",
                 "moe": "Qwen3MoeForCausalLM", "lfm2": "Lfm2ForCausalLM"}


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
  family = request.param
  cfg = tiny_config(family)
  params = random_params(cfg, seed=3)
  out = export_hf(cfg, params, tmp_path_factory.mktemp(family))
  return family, cfg, params, out, load_torch_model(out)


def test_export_writes_loadable_transformers_checkpoint(exported):
  family, _, _, out, model = exported
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
  assert type(model).__name__ == ARCHITECTURES[family]
  assert json.loads((out / "config.json").read_text())["architectures"] == [ARCHITECTURES[family]]


def test_logits_match_pytorch(exported):
  _, cfg, params, _, model = exported
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (3, 17))
  ours, _ = forward(cfg, params, tokens)
  np.testing.assert_allclose(np.asarray(ours), torch_logits(model, tokens), atol=TOL, rtol=0)


def test_right_padding_matches_pytorch_attention_mask(exported):
  """Padding = segment id 0 here, attention_mask 0 in transformers; real tokens must agree."""
  _, cfg, params, _, model = exported
  tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 12))
  lengths = np.array([12, 7])
  valid = np.arange(12)[None] < lengths[:, None]
  ours, _ = forward(cfg, params, tokens, valid.astype(np.int32))
  theirs = torch_logits(model, tokens, valid.astype(np.int64))
  np.testing.assert_allclose(np.asarray(ours)[valid], theirs[valid], atol=TOL, rtol=0)


def test_packed_segments_match_separate_pytorch_runs(exported):
  _, cfg, params, _, model = exported
  rng = np.random.default_rng(4)
  docs = [rng.integers(0, cfg.vocab_size, n) for n in (6, 9, 4)]
  packed = np.concatenate(docs)[None]
  seg = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)])[None]
  ours = np.asarray(forward(cfg, params, packed, seg)[0])[0]
  start = 0
  for doc in docs:
    theirs = torch_logits(model, doc[None])[0]
    np.testing.assert_allclose(ours[start:start + len(doc)], theirs, atol=TOL, rtol=0)
    start += len(doc)


def test_import_of_export_is_bit_identical(exported):
  _, cfg, params, out, _ = exported
  cfg_back, params_back = import_hf(out)
  assert cfg_back == cfg
  assert jax.tree.structure(params_back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_back)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), b)


@pytest.mark.parametrize("family", ["llama3", "gpt2"])
def test_untied_head_exports_lm_head(tmp_path, family):
  """The stock class reads an untied lm_head.weight (GPT-2 once fell back to custom code)."""
  cfg = tiny_config(family, "model.tie_embeddings=false")
  params = random_params(cfg)
  out = export_hf(cfg, params, tmp_path)
  assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
  model = load_torch_model(out)
  assert type(model).__name__ == ARCHITECTURES[family]
  tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (1, 9))
  np.testing.assert_allclose(np.asarray(forward(cfg, params, tokens)[0]),
                             torch_logits(model, tokens), atol=TOL, rtol=0)
  cfg_back, params_back = import_hf(out)
  assert cfg_back == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_back), strict=True):
    assert np.array_equal(np.asarray(a), b)


def test_gemma_softcap_and_query_scale_export(tmp_path):
  cfg = tiny_config("gemma3", "model.final_logit_softcap=5.0", "model.query_scale_dim=20")
  params = random_params(cfg)
  model = load_torch_model(export_hf(cfg, params, tmp_path))
  tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 11))
  ours = np.asarray(forward(cfg, params, tokens)[0])
  assert np.max(np.abs(ours)) <= 5.0
  np.testing.assert_allclose(ours, torch_logits(model, tokens), atol=TOL, rtol=0)


@pytest.mark.parametrize("family,override,field", [
    ("llama3", "model.qk_norm=true", "qk_norm"),
    ("gpt2", "model.norm=rmsnorm", "norm"),
    ("qwen3", "model.attention=bidirectional", "attention"),
    ("lfm2", "model.layer_pattern=CLA", "layer_pattern"),
])
def test_export_refuses_what_the_class_cannot_express(tmp_path, family, override, field):
  extra = ["model.sliding_window=4"] if "L" in override else []
  cfg = tiny_config(family, override, *extra)
  with pytest.raises(DharaError, match=field):
    hf_config(cfg)


def test_import_errors_are_clear(tmp_path):
  with pytest.raises(DharaError, match="config.json not found"):
    import_hf(tmp_path)
  cfg = tiny_config("llama3")
  export_hf(cfg, random_params(cfg), tmp_path)
  (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(DharaError, match="not a readable safetensors"):
    import_hf(tmp_path)
  (tmp_path / "config.json").write_text('{"model_type": "bert"}')
  with pytest.raises(DharaError, match="model_type 'bert'"):
    import_hf(tmp_path)


def test_export_does_not_import_torch(tmp_path):
  """Export writes safetensors with numpy only; torch must not even be imported."""
  code = (
      "import sys; sys.path.insert(0, 'tests')\n"
      "from tiny import tiny_config, random_params\n"
      "from dhara_jax.export import export_hf\n"
      "cfg = tiny_config('gpt2')\n"
      f"export_hf(cfg, random_params(cfg), {str(tmp_path)!r})\n"
      "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n")
  subprocess.run([sys.executable, "-c", code], check=True)
  assert (tmp_path / "model.safetensors").is_file()


def test_export_to_unwritable_place_is_one_clear_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  cfg = tiny_config("llama3")
  with pytest.raises(DharaError, match="cannot write"):
    export_hf(cfg, random_params(cfg), blocker / "sub")
