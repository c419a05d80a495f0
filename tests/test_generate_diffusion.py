"""The diffusion samplers: the exact block KV cache equals the same sampler without a cache on a
block-trained model, token for token (Canon taps, short convs and sliding windows crossing
block boundaries); seeds, thresholds, EOS and refusals; JAX and PyTorch agree on greedy settings.
"""

from __future__ import annotations

import functools
import logging

import jax
import numpy as np
import pytest
import torch
from tiny import random_params, tiny_config

from dhara_jax.errors import DharaError
from dhara_jax.export import export_hf
from dhara_jax.export.parity import load_torch_model
from dhara_jax.phases import Phase
from dhara_jax.sampling import Sampling, generate

MASK = 127
FAMILIES = {"llama3": ["model.canon_set=AC"], "lfm2": ["model.canon_set=ABCD"], "gemma3": []}
PROMPTS = [[5, 9, 3, 17, 2, 8, 11, 4, 6], [7, 1], [12, 30, 9]]
BLOCK = Phase("block", 4)


@functools.lru_cache(maxsize=None)
def _model(family):
  """A tiny bidirectional model with loud weights: its confidences spread over (0, 1)."""
  cfg = tiny_config(family, *FAMILIES[family], "model.attention=bidirectional",
                    f"model.mask_token_id={MASK}", "model.canon_impl=reference")
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda a: a + 0.3 * rng.standard_normal(a.shape).astype(np.float32),
                        random_params(cfg, seed=11))
  return cfg, params


def _run(family, phase=BLOCK, prompts=PROMPTS, **settings):
  cfg, params = _model(family)
  settings = {"max_new_tokens": 12, "block_length": 4, **settings}
  return generate(cfg, params, prompts, Sampling(**settings), phase=phase)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("settings", [{"steps": 6}, {"threshold": 0.3}], ids=["fixed", "tau"])
def test_block_cache_equals_the_uncached_block_sampler(family, settings):
  cached = _run(family, cache="block", **settings)
  uncached = _run(family, cache="none", **settings)
  assert cached.tokens == uncached.tokens
  # The prefill and each block's commit ride on the next block's first step.
  assert cached.forwards == uncached.forwards


def test_fixed_schedule_and_threshold_step_counts():
  fixed = _run("llama3", steps=6, cache="none")
  assert fixed.forwards == 6 and all(len(t) == 12 for t in fixed.tokens)
  one_per_step = _run("llama3", threshold=1.0, cache="none")  # only the top-1 fallback commits
  assert one_per_step.forwards == 12
  assert one_per_step.tokens == _run("llama3", steps=12, cache="none").tokens
  loose = _run("llama3", threshold=1e-9, cache="none")  # every masked token is confident enough
  assert loose.forwards == 12 // 4


@pytest.mark.parametrize("tau", [0.9, 0.3, 0.05])
def test_threshold_decoding_commits_at_least_one_token_per_step(tau):
  """At most block_length steps per block, so ≥ 1 commit per row and step; no mask left."""
  out = _run("llama3", threshold=tau, cache="none")
  assert 3 <= out.forwards <= 12
  assert all(len(t) == 12 and MASK not in t for t in out.tokens)


@pytest.mark.parametrize("settings", [{"remasking": "random", "steps": 6},
                                      {"temperature": 0.8, "steps": 6},
                                      {"temperature": 0.8, "threshold": 0.5}])
def test_samplers_are_deterministic_under_a_seed(settings):
  first = _run("llama3", seed=1, cache="block", **settings).tokens
  assert first == _run("llama3", seed=1, cache="block", **settings).tokens
  assert first != _run("llama3", seed=2, cache="block", **settings).tokens


def test_eos_ends_a_row():
  free = _run("llama3", steps=12, cache="block").tokens
  eos = free[0][5]
  out = generate(*_model("llama3"), PROMPTS, Sampling(max_new_tokens=12, block_length=4,
                                                     steps=12), phase=BLOCK, eos_id=eos)
  for row, cut, finished in zip(free, out.tokens, out.finished):
    end = row.index(eos) if eos in row else len(row)
    assert cut == row[:end] and finished == (end < len(row))


def test_approx_cache_refreshed_every_step_equals_no_cache():
  """With one step per block every step is a refresh: then it is exact."""
  mdm = Phase("mdm")
  approx = _run("lfm2", phase=mdm, steps=3, cache="approx")
  assert approx.tokens == _run("lfm2", phase=mdm, steps=3, cache="none").tokens
  assert approx.forwards == 3  # the refresh is each block's step


def test_block_cache_on_a_full_sequence_model_runs_with_one_warning(caplog):
  with caplog.at_level(logging.WARNING):
    out = _run("llama3", phase=Phase("mdm"), steps=6, cache="block")
  assert all(len(t) == 12 for t in out.tokens)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "cache=approx" in warnings[0]


@pytest.mark.parametrize("settings, message", [
    ({"steps": 5}, r"steps \(5\) must divide across the 3 blocks"),
    ({"block_length": 5}, r"multiple of block_length \(5\)"),
    ({"threshold": 1.5}, r"threshold τ must be in \(0, 1\]"),
    ({"threshold": -0.1}, r"threshold τ must be in \(0, 1\]"),
    ({"steps": 24}, r"at most max_new_tokens"),
])
def test_bad_settings_are_one_line(settings, message):
  with pytest.raises(DharaError, match=message):
    _run("llama3", **settings)


def test_jax_and_pytorch_generate_agree_on_greedy_settings(tmp_path):
  cfg, params = _model("llama3")
  torch_model = load_torch_model(export_hf(cfg, params, tmp_path / "hf"))
  prompt = PROMPTS[0]
  for settings in ({"steps": 6}, {"steps": 12}, {"threshold": 0.4}):
    ours = _run("llama3", phase=Phase("mdm"), prompts=[prompt], cache="none", **settings)
    x, stats = torch_model.generate(torch.tensor([prompt]), max_new_tokens=12, block_length=4,
                                    return_stats=True, **settings)
    assert x[0, len(prompt):].tolist() == ours.tokens[0], settings
    assert stats["forwards"] == ours.forwards
