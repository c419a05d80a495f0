"""The PyTorch twin of diffusion models is the trained model: on odd sizes (tests/twin.py), for
each family trained with `mdm` and with `block`, the export's logits are JAX's trained forward
(block mode over [x_t ; x_0] included) and its greedy `generate` gives `dhara generate`'s
tokens on a padded batch of mixed lengths, at two step counts and with a threshold."""

import json

import numpy as np
import pytest
import torch
from twin import (BLOCK, FAMILIES, MASK, PHASES, PROMPTS, left_padded, loud_params, odd_config,
                  one_torch_thread)

from dhara_jax.export import export_hf
from dhara_jax.export.parity import load_torch_model
from dhara_jax.model import forward
from dhara_jax.sampling.api import generate
from dhara_jax.sampling.settings import Sampling

TOL = 1e-4
CASES = [(f, o) for f in FAMILIES for o in ("mdm", "block")]
IDS = [f"{f}-{o}" for f, o in CASES]
NEW = 24


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = {}
  with one_torch_thread():
    for family, objective in CASES:
      cfg = odd_config(family, objective)
      params = loud_params(cfg, seed=len(out))
      hf_dir = export_hf(cfg, params, tmp_path_factory.mktemp(f"{family}_{objective}"),
                         phase=PHASES[objective])
      out[family, objective] = cfg, params, hf_dir, load_torch_model(hf_dir)
    yield out


def noisy_batch(cfg):
  """x_0 (2 rows of L: two documents then padding; one document then padding), its segment
  ids, and x_t: x_0 with about a third of its tokens (never a document's first) masked."""
  rng = np.random.default_rng(5)
  x_0 = rng.integers(0, cfg.vocab_size, (2, cfg.max_seq_len))
  seg = np.zeros_like(x_0)
  seg[0, :14], seg[0, 14:31], seg[1, :29] = 1, 2, 1
  masked = (rng.random(x_0.shape) < 0.35) & (seg > 0)
  masked[0, [0, 14]] = masked[1, 0] = False
  return x_0, seg, np.where(masked, MASK, x_0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_config_json_names_the_phase_and_the_class(runs, case):
  _, _, hf_dir, model = runs[case]
  written = json.loads((hf_dir / "config.json").read_text())
  want = PHASES[case[1]]
  assert (written["objective"], written["block_size"]) == (want.objective, want.block_size)
  assert written["architectures"] == ["DharaForMaskedDiffusion"]
  assert type(model).__name__ == "DharaForMaskedDiffusion"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_logits_are_the_trained_forward(runs, case):
  cfg, params, _, model = runs[case]
  x_0, seg, x_t = noisy_batch(cfg)
  block = BLOCK if case[1] == "block" else 0
  tokens = np.concatenate([x_t, x_0], axis=1) if block else x_t
  ours = np.asarray(forward(cfg, params, tokens, seg, block_size=block)[0])
  with torch.no_grad():  # the config selects the forward: block mode for `block`
    theirs = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(seg > 0).long(),
                   segment_ids=torch.tensor(seg)).logits.numpy()
  assert theirs.shape == ours.shape
  valid = np.concatenate([seg, seg], axis=1) > 0 if block else seg > 0
  np.testing.assert_allclose(theirs[valid], ours[valid], atol=TOL, rtol=0)
  if block:  # callable explicitly: block_size=0 is the one-stream forward
    with torch.no_grad():
      plain = model(input_ids=torch.tensor(x_t), segment_ids=torch.tensor(seg),
                    block_size=0).logits.numpy()
    one_stream = np.asarray(forward(cfg, params, x_t, seg)[0])
    np.testing.assert_allclose(plain[seg > 0], one_stream[seg > 0], atol=TOL, rtol=0)


def test_block_loss_reads_the_block_predictors(runs):
  """labels in block mode are scored from the noisy stream's previous position, or for a
  block's first token from the clean stream's last position before it."""
  cfg, _, _, model = runs["llama3_canon", "block"]
  x_0, seg, x_t = noisy_batch(cfg)
  labels = np.where(x_t == MASK, x_0, -100)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(np.concatenate([x_t, x_0], axis=1)),
                segment_ids=torch.tensor(seg), labels=torch.tensor(labels))
  logp = torch.log_softmax(out.logits, -1).numpy()
  b, j = np.nonzero(x_t == MASK)
  first = j % BLOCK == 0  # read from the clean stream (second half) at j - 1
  rows = np.where(first, cfg.max_seq_len + j - 1, j - 1)
  np.testing.assert_allclose(out.loss.item(), -logp[b, rows, x_0[b, j]].mean(), rtol=1e-5)


SETTINGS = {"steps24": {"steps": 24}, "steps12": {"steps": 12}, "threshold": {"threshold": 0.4}}
GENERATE = [(c, kw) for c in CASES for kw in SETTINGS]  # each a JAX program of its own


@pytest.mark.parametrize("case, kw", GENERATE, ids=[f"{f}-{o}-{kw}" for (f, o), kw in GENERATE])
def test_greedy_generate_is_dhara_generate(runs, case, kw):
  cfg, params, _, model = runs[case]
  settings = SETTINGS[kw]
  ours = generate(cfg, params, PROMPTS, Sampling(max_new_tokens=NEW, **settings),
                  phase=PHASES[case[1]]).tokens
  ids, mask = left_padded(PROMPTS)
  threshold = settings.get("threshold")
  theirs = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                          max_new_tokens=NEW, steps=settings.get("steps"), threshold=threshold)
  assert theirs[:, ids.shape[1]:].tolist() == ours
  assert len({t for row in ours for t in row}) > 3  # the rows say something, not one token
  if case[1] == "block":  # the block cache gives the [x_t ; x_0] forward's tokens
    uncached = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                              max_new_tokens=NEW, steps=settings.get("steps"),
                              threshold=threshold, use_cache=False)
    assert torch.equal(uncached, theirs)
