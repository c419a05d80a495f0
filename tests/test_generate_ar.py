"""KV-cached AR decoding: token for token the uncached decoder's, on every family (Canon and
LFM2's short convs keep their last K−1 inputs), in padded batches of mixed prompt lengths."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhara_jax.errors import DharaError
from dhara_jax.model import forward, forward_cached, init_cache
from dhara_jax.model.cache import Decode
from dhara_jax.sampling import Sampling, generate, left_aligned
from dhara_jax.sampling import ar
from dhara_jax.sampling.rows import left_padded
from tiny import random_params, tiny_config

# Canon on LLaMA3 (A, C) and on every position of LFM2 (B on its short convs too); GPT-2's
# learned positions; Gemma3's sliding windows (4) over prompts longer than them; Qwen3's QK-norm.
FAMILIES = {"llama3": ["model.canon_set=AC"], "gpt2": [], "lfm2": ["model.canon_set=ABCD"],
            "gemma3": [], "qwen3": [], "moe": ["model.canon_set=A"],
            "llama3_canon": ["model.canon_set=ABCD"]}
PROMPTS = [[5, 9, 3, 17, 2, 8, 11, 4, 6], [7, 1], [12, 30, 9, 9, 21]]


@functools.lru_cache(maxsize=None)
def _model(family):
  cfg = tiny_config(family, *FAMILIES[family], "model.canon_impl=reference")
  return cfg, random_params(cfg)


def _decode(cfg, params, prompts, s, cached, eos_id=None):
  prompt_BxP, first_B = left_padded(prompts, 12)  # one width: one compiled program
  tokens, forwards = ar.decode(cfg, params, prompt_BxP, first_B, jax.random.key(s.seed), s=s,
                               eos_id=eos_id, cached=cached)
  return np.asarray(tokens), int(forwards)


@pytest.mark.parametrize("family", ["llama3_canon", "lfm2", "gemma3"])
def test_cached_logits_equal_the_full_forward(family):
  """Prefill then one token at a time: each chunk's logits are the full forward's at its slots
  (convolution tails and sliding windows included)."""
  cfg, params = _model(family)
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 11)))
  full = np.asarray(forward(cfg, params, tokens)[0])
  step = jax.jit(lambda params, tokens, cache, start: forward_cached(
      cfg, params, tokens, cache, Decode(start, jnp.zeros(2, jnp.int32), 16)))
  chunks, cache = step(params, tokens[:, :7], init_cache(cfg, 2, 16), jnp.int32(0))
  chunks = [chunks]
  for slot in range(7, 11):
    logits, cache = step(params, tokens[:, slot:slot + 1], cache, jnp.int32(slot))
    chunks.append(logits)
  np.testing.assert_allclose(np.concatenate(chunks, axis=1), full, atol=2e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_equals_uncached_in_a_padded_batch(family):
  cfg, params = _model(family)
  s = Sampling(max_new_tokens=10)
  cached, forwards = _decode(cfg, params, PROMPTS, s, cached=True)
  uncached, _ = _decode(cfg, params, PROMPTS, s, cached=False)
  np.testing.assert_array_equal(cached, uncached)
  assert forwards == 10  # the prefill and 9 single-token steps
  for row, prompt in zip(cached, PROMPTS):  # each row as it decodes alone
    np.testing.assert_array_equal(row, _decode(cfg, params, [prompt], s, cached=True)[0][0])


def test_sampling_with_temperature_top_k_top_p_is_seeded_and_cache_exact():
  cfg, params = _model("llama3")
  s = Sampling(max_new_tokens=12, temperature=0.9, top_k=20, top_p=0.9, seed=3)
  first = _decode(cfg, params, PROMPTS, s, cached=True)[0]
  np.testing.assert_array_equal(first, _decode(cfg, params, PROMPTS, s, cached=True)[0])
  np.testing.assert_array_equal(first, _decode(cfg, params, PROMPTS, s, cached=False)[0])
  other = _decode(cfg, params, PROMPTS, Sampling(**{**s.__dict__, "seed": 4}), cached=True)[0]
  assert (first != other).any()


def test_top_k_1_is_greedy_and_top_p_keeps_the_nucleus():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 200)
  draw = lambda s: np.array([int(ar.sample_tokens(logits, k, s)[0]) for k in keys])
  assert set(draw(Sampling(temperature=1.0, top_k=1))) == {0}
  assert set(draw(Sampling(temperature=1.0, top_p=0.75))) == {0, 1}  # 0.5 + 0.3 reach 0.75
  assert set(draw(Sampling(temperature=1.0, top_p=0.5))) == {0}


def test_eos_ends_each_row_and_the_loop():
  cfg, params = _model("llama3")
  s = Sampling(max_new_tokens=10)
  free, _ = _decode(cfg, params, PROMPTS, s, cached=True)
  eos = int(free[1, 2])  # a token row 1 emits third: make it EOS
  tokens, forwards = _decode(cfg, params, PROMPTS, s, cached=True, eos_id=eos)
  out = generate(cfg, params, PROMPTS, s, eos_id=eos)
  for row, free_row, cut, finished in zip(tokens, free, out.tokens, out.finished):
    end = list(free_row).index(eos) if eos in free_row else len(free_row)
    assert cut == list(free_row[:end]) and finished == (end < len(free_row))
    assert (row[end:] == eos).all()
  if all(out.finished):
    assert forwards == max(len(t) for t in out.tokens) + 1


def test_stop_sequences_end_rows_like_eos():
  cfg, params = _model("llama3")
  free = generate(cfg, params, PROMPTS, Sampling(max_new_tokens=10)).tokens
  stop = tuple(free[0][3:5])  # two tokens row 0 emits at 3 and 4
  out = generate(cfg, params, PROMPTS, Sampling(max_new_tokens=10, stop=(stop,)))
  for row, cut, finished in zip(free, out.tokens, out.finished):
    hits = [i for i in range(len(row) - 1) if tuple(row[i:i + 2]) == stop]
    assert cut == row[:hits[0]] if hits else cut == row
    assert finished == bool(hits)
  assert out.finished[0]


def test_right_padded_batches_are_left_aligned():
  tokens = np.array([[5, 9, 3, 0, 0], [0, 0, 7, 1, 4]])
  mask = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
  assert left_aligned(tokens, mask) == [[5, 9, 3], [7, 1, 4]]


@pytest.mark.parametrize("prompts, new, message", [
    ([[]], 4, "prompt 0 is empty"),
    ([list(range(1, 66))], 1, "longer than the model's context (64)"),
    ([[1, 2, 3]], 62, "exceed the model's context (64)"),
    ([[1]], 0, "max_new_tokens must be ≥ 1"),
])
def test_bad_inputs_are_one_line(prompts, new, message):
  cfg, params = _model("gpt2")
  with pytest.raises(DharaError, match=message.replace("(", r"\(").replace(")", r"\)")):
    generate(cfg, params, prompts, Sampling(max_new_tokens=new))
