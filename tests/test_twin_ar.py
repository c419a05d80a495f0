"""The custom-code AR twin's KV cache (keys and values, and the last K−1 inputs of every Canon
layer and short conv): stock `generate()` runs one new token a step, and its greedy tokens are
the uncached ones and `dhara generate`'s, on odd sizes (tests/twin.py) and a left-padded batch
of mixed lengths."""

import sys

import numpy as np
import pytest
import torch
from twin import FAMILIES, PROMPTS, left_padded, loud_params, odd_config, one_torch_thread

from dhara_jax.export import export_hf
from dhara_jax.export.parity import load_torch_model
from dhara_jax.phases import Phase
from dhara_jax.sampling.api import generate
from dhara_jax.sampling.settings import Sampling

TOL = 1e-4
NEW = 20


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  out = {}
  with one_torch_thread():
    for family in FAMILIES:
      cfg = odd_config(family, "ar")
      params = loud_params(cfg, seed=len(out))
      hf_dir = export_hf(cfg, params, tmp_path_factory.mktemp(family), code="custom")
      out[family] = cfg, params, load_torch_model(hf_dir)
    yield out


def hf_generate(model, ids, mask, use_cache):
  with torch.no_grad():
    return model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW,
                          eos_token_id=None, pad_token_id=0, use_cache=use_cache)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_logits_are_the_uncached_ones(models, family):
  """A padded prompt, then single tokens and a chunk of three against the cache: each
  chunk's logits are those of the whole sequence run at once."""
  _, _, model = models[family]
  ids, mask = left_padded(PROMPTS)
  rng = np.random.default_rng(1)
  more = rng.integers(0, model.config.vocab_size, (len(PROMPTS), 6))
  full = torch.tensor(np.concatenate([ids, more], axis=1))
  full_mask = torch.ones_like(full)
  full_mask[:, :ids.shape[1]] = torch.tensor(mask)
  with torch.no_grad():
    want = model(full, attention_mask=full_mask, use_cache=False).logits
    cache = sys.modules[type(model).__module__].DharaCache()
    got = []
    for lo, hi in ((0, ids.shape[1]), (ids.shape[1], ids.shape[1] + 1),
                   (ids.shape[1] + 1, ids.shape[1] + 2), (ids.shape[1] + 2, full.shape[1] - 1),
                   (full.shape[1] - 1, full.shape[1])):
      out = model(full[:, lo:hi], attention_mask=full_mask[:, :hi], cache=cache)
      assert out.cache is cache and cache.get_seq_length() == hi
      got.append(out.logits)
  real = full_mask.bool()
  np.testing.assert_allclose(torch.cat(got, 1)[real].numpy(), want[real].numpy(), atol=TOL,
                             rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_is_cached_and_gives_the_uncached_and_dhara_tokens(models, family):
  cfg, params, model = models[family]
  ids, mask = left_padded(PROMPTS)
  widths = []
  hook = model.register_forward_pre_hook(
      lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
  try:
    cached = hf_generate(model, ids, mask, use_cache=True)
  finally:
    hook.remove()
  assert widths == [ids.shape[1]] + [1] * (NEW - 1)  # the prompt, then one token a step
  uncached = hf_generate(model, ids, mask, use_cache=False)
  assert torch.equal(cached, uncached)
  ours = generate(cfg, params, PROMPTS, Sampling(max_new_tokens=NEW), phase=Phase("ar")).tokens
  assert cached[:, ids.shape[1]:].tolist() == ours
  assert len({t for row in ours for t in row}) > 3  # the rows say something, not one token
