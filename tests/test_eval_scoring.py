"""The JAX scorers behind `dhara eval`: AR log-likelihood and the diffusion Monte-Carlo ELBO."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhara_jax.errors import DharaError
from dhara_jax.model import forward
from dhara_jax.phases import Phase
from eval.elbo import ELBOScorer, mask_counts, predictor_log_probs
from eval.scoring import (HEAD_FLOATS, ARScorer, Batcher, bucket_of, buckets, eval_mesh,
                          rows_per_batch)
from tiny import random_params, tiny_config


def _pairs(seed=0, count=24):
  rng = np.random.default_rng(seed)
  pairs = [(rng.integers(1, 128, rng.integers(1, 40)).tolist(),
            rng.integers(1, 128, rng.integers(1, 6)).tolist()) for _ in range(count)]
  shared = rng.integers(1, 128, 10).tolist()
  pairs += [(shared, [t]) for t in (5, 6, 7, 8)]  # one row for the four
  pairs.append((rng.integers(1, 128, 80).tolist(), [3, 4]))  # longer than the context
  return pairs


def _reference(cfg, params, context, continuation):
  """HFLM's recipe, one request at a time: keep the last max_len + 1 tokens, score the
  continuation's positions of one forward."""
  whole = (context + continuation)[-(cfg.max_seq_len + 1):]
  row = whole[:-1] + [0] * (cfg.max_seq_len + 1 - len(whole))  # causal: the tail changes nothing
  logp = np.asarray(_log_softmax(cfg, params, jnp.asarray([row])))[0]
  n, end = len(continuation), len(whole) - 1
  rows = range(end - n, end)
  return (sum(float(logp[t, whole[t + 1]]) for t in rows),
          all(int(np.argmax(logp[t])) == whole[t + 1] for t in rows))


@functools.partial(jax.jit, static_argnums=0)
def _log_softmax(cfg, params, tokens):
  return jax.nn.log_softmax(forward(cfg, params, tokens)[0], -1)


def test_buckets_and_batch_shapes():
  assert buckets(128) == [16, 32, 64, 128] and buckets(100) == [16, 32, 64, 100]
  assert bucket_of(17, 128) == 32 and bucket_of(128, 128) == 128
  assert rows_per_batch(64, 1024, 1) == 16 and rows_per_batch(64, 1024, 8) == 16
  assert rows_per_batch(128, 64, 8) == 8  # at least one row per batch shard


def test_a_large_vocabulary_bounds_the_rows_by_the_heads_logits():
  small, large = tiny_config("llama3"), tiny_config("llama3", "model.vocab_size=49152")
  mesh = eval_mesh(jax.devices()[:1])
  assert Batcher(small, 8192, mesh).rows_for((16, 8)) == 512  # the token budget's
  rows = Batcher(large, 8192, mesh).rows_for((16, 8))
  assert rows * 8 * 49152 <= HEAD_FLOATS < 2 * rows * 8 * 49152  # halved just enough
  assert Batcher(large, 8192, eval_mesh()).rows_for((16, 8192)) == 8  # one row per shard


def test_ar_scores_equal_one_request_at_a_time_and_share_rows():
  cfg = tiny_config("llama3")
  params = random_params(cfg)
  pairs = _pairs()
  scorer = ARScorer(cfg, params, batch_tokens=512)
  assert len(scorer.rows(pairs)) == len(pairs) - 3  # the four one-token choices share a row
  for pair, (logp, greedy) in zip(pairs, scorer.score(pairs)):
    ref_logp, ref_greedy = _reference(cfg, params, *pair)
    assert logp == pytest.approx(ref_logp, abs=1e-4) and greedy == ref_greedy


def test_ar_scores_are_greedy_exactly_when_the_continuation_is_the_argmax():
  cfg = tiny_config("llama3")
  params = random_params(cfg)
  context = [5, 9, 17, 3]
  logp = np.asarray(_log_softmax(cfg, params, jnp.asarray([context])))[0, -1]
  best, other = int(np.argmax(logp)), int(np.argmin(logp))
  scores = ARScorer(cfg, params).score([(context, [best]), (context, [other])])
  assert [g for _, g in scores] == [True, False]
  assert scores[0][0] == pytest.approx(float(logp[best]), abs=1e-5)


def test_ar_scores_do_not_depend_on_the_mesh():
  cfg = tiny_config("gpt2")
  params = random_params(cfg)
  pairs = _pairs(1, 12)
  eight = ARScorer(cfg, params, batch_tokens=256).score(pairs)
  assert jax.device_count() == 8 and eval_mesh().shape["data"] == 8
  one = ARScorer(cfg, params, mesh=eval_mesh(jax.devices()[:1]), batch_tokens=256).score(pairs)
  np.testing.assert_allclose([s for s, _ in eight], [s for s, _ in one], atol=1e-5)
  assert [g for _, g in eight] == [g for _, g in one]


def test_mask_counts_are_stratified_and_cover_every_count():
  counts = mask_counts(8, 8, 0.3)
  assert sorted(counts) == list(range(1, 9))
  assert set(mask_counts(128, 3, 0.9)) == {1, 2, 3}
  assert all(1 <= c <= 5 for c in mask_counts(3, 5, 0.999))


def _diffusion_model():
  cfg = tiny_config("llama3", "model.attention=bidirectional", "model.mask_token_id=1")
  return cfg, random_params(cfg)


_predictor = jax.jit(predictor_log_probs, static_argnums=(0, 1))


def _exact_elbo(cfg, params, context, continuation, block=0):
  """The expectation of the estimator, by enumeration: l ~ U{1..T}, then every l-subset of
  the continuation equally likely, weight T / l. Rows padded to 16 (a block multiple), the
  padding its own segment."""
  whole, n = context + continuation, len(continuation)
  tokens = jnp.asarray([whole + [0] * (16 - len(whole))])
  segments = jnp.asarray([[1] * len(whole) + [0] * (16 - len(whole))])
  total = 0.0
  for count in range(1, n + 1):
    subsets = list(itertools.combinations(range(n), count))
    for subset in subsets:
      masked = np.zeros(16, bool)
      masked[[len(context) + s for s in subset]] = True
      logp = np.asarray(_predictor(cfg, block, params, tokens, segments,
                                   jnp.asarray([masked])))[0]
      nll = -sum(float(logp[j - 1, whole[j]]) for j in np.flatnonzero(masked))
      total += nll * n / count / len(subsets) / n
  return -total


def test_elbo_matches_the_enumerated_expectation_and_its_spread_shrinks():
  cfg, params = _diffusion_model()
  requests = [([5, 6, 7, 8], [9]), ([5, 6, 7], [9, 10]), ([3, 4], [11, 12, 13])]
  exact = [_exact_elbo(cfg, params, *r) for r in requests]
  one = ELBOScorer(cfg, params, Phase("mdm"), mc_samples=1).score(requests[:1])
  assert one[0][0] == pytest.approx(exact[0], abs=1e-4)  # one token: a single possible mask
  spreads = []
  for samples in (2, 32):
    estimates = np.array([[s for s, _ in ELBOScorer(cfg, params, Phase("mdm"),
                                                    mc_samples=samples, seed=seed)
                           .score(requests[2:])] for seed in range(8)])[:, 0]
    spreads.append(estimates.std())
    assert abs(estimates.mean() - exact[2]) < 4 * estimates.std() / np.sqrt(8) + 1e-3
  assert spreads[1] < spreads[0] / 2
  many = ELBOScorer(cfg, params, Phase("mdm"), mc_samples=512).score(requests)
  np.testing.assert_allclose([s for s, _ in many], exact, atol=0.15)


def test_elbo_of_a_block_model_and_its_seeding():
  cfg = tiny_config("llama3", "model.mask_token_id=1")
  params = random_params(cfg)
  phase = Phase("block", block_size=4)
  requests = [([5, 6, 7, 8, 9], [10, 11]), ([3, 4], [12, 13, 14])]
  exact = [_exact_elbo(cfg, params, *r, block=4) for r in requests]
  scorer = ELBOScorer(cfg, params, phase, mc_samples=256)
  first = scorer.score(requests)
  np.testing.assert_allclose([s for s, _ in first], exact, atol=0.15)
  # A request's draws depend on its tokens only: alone or in another batch, the same score.
  assert scorer.score(requests[1:])[0] == first[1]


@pytest.mark.parametrize("phase", [Phase("mdm"), Phase("block", block_size=4)],
                         ids=["mdm", "block"])
def test_elbo_is_greedy_exactly_when_the_masked_continuation_is_the_argmax(phase):
  """With the whole continuation masked, the argmax tokens make a continuation that is
  greedy, and changing one of them makes it not. (A block's first token is predicted from the
  clean stream, which holds the continuation: a second pass fills it in.)"""
  cfg, params = _diffusion_model()
  context, best = [5, 9, 17, 3, 22, 8], [0, 0, 0]
  masked = jnp.asarray([[False] * len(context) + [True] * 3 + [False] * 7])
  for _ in range(2):
    logp = np.asarray(_predictor(cfg, phase.draw_block(), params,
                                 jnp.asarray([context + best + [0] * 7]),
                                 jnp.asarray([[1] * 9 + [0] * 7]), masked))[0]
    best = [int(np.argmax(logp[j - 1])) for j in range(len(context), len(context) + 3)]
  worse = best[:1] + [int(np.argmin(logp[len(context)]))] + best[2:]
  scores = ELBOScorer(cfg, params, phase, mc_samples=4).score([(context, best),
                                                               (context, worse)])
  assert [g for _, g in scores] == [True, False]


def test_elbo_refuses_what_it_cannot_score():
  cfg, params = _diffusion_model()
  with pytest.raises(DharaError, match="diffusion"):
    ELBOScorer(cfg, params, Phase("ar"))
  with pytest.raises(DharaError, match="mc_samples"):
    ELBOScorer(cfg, params, Phase("mdm"), mc_samples=0)
  with pytest.raises(DharaError, match="empty continuation"):
    ELBOScorer(cfg, params, Phase("mdm")).score([([1, 2], [])])
