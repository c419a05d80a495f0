"""The Monte-Carlo ELBO of a masked-diffusion model, LLaDA's estimator of log p(continuation |
context) for multiple choice.

For a continuation of T tokens after a clean context (the context is never masked): draw
l ∈ {1..T}, mask l continuation tokens chosen uniformly, and score
  −(T / l) · Σ_masked CE(token | x_t)
averaged over `mc_samples` draws. The l are stratified: sample k takes
l = ⌊(k + u) / n · T⌋ + 1 with one u ~ U(0, 1) per request, so the n draws cover {1..T} evenly and
each is marginally uniform (the average stays unbiased). A one-token continuation has a single
possible mask and is exact with one sample. Draws are seeded by the request's tokens: a request
scores the same in any batch. Labels are aligned as the model was trained (losses.py):
position j − 1 predicts token j; a block-diffusion model reads the predictor of each block's
first token from the clean stream (losses.block_predictors).
"""

from __future__ import annotations

import functools
import zlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dhara_jax.config import ModelConfig
from dhara_jax.errors import DharaError
from dhara_jax.phases import Phase
from eval.scoring import (DEFAULT_BATCH_TOKENS, DEFAULT_MC_SAMPLES, Batcher, Pair, Row, Score,
                          eval_mesh, gathered, read_log_probs, replicated, warn_cut)


def mask_counts(samples: int, length: int, u: float) -> np.ndarray:
  """Stratified l ∈ {1..length} for `samples` draws."""
  return np.floor((np.arange(samples) + u) / samples * length).astype(np.int64) + 1


def draws(whole: Sequence[int], length: int, samples: int, seed: int
          ) -> list[tuple[np.ndarray, float]]:
  """(which of the last `length` tokens are masked, weight T/l) for each draw."""
  rng = np.random.default_rng([seed, zlib.crc32(np.asarray(whole, np.int32).tobytes()), length])
  counts = mask_counts(samples, length, rng.random())
  out = []
  for count in counts:
    order = rng.permutation(length)
    out.append((order < count, length / count))
  return out


class ELBOScorer:
  """(ELBO, is_greedy) per (context, continuation); is_greedy: every continuation token is the
  argmax with the whole continuation masked (one extra row when T > 1)."""

  def __init__(self, cfg: ModelConfig, params: Any, phase: Phase, *,
               mc_samples: int = DEFAULT_MC_SAMPLES, seed: int = 0, mesh: Any = None,
               batch_tokens: int = DEFAULT_BATCH_TOKENS, pad_id: int = 0,
               progress: Callable[[int], None] | None = None):
    if not phase.diffusion:
      raise DharaError("eval: the ELBO scorer is for diffusion models (phase is ar)")
    if mc_samples < 1:
      raise DharaError(f"eval: mc_samples must be ≥ 1, got {mc_samples}")
    if cfg.mask_token_id < 0:
      raise DharaError("eval: the model's mask_token_id is unresolved (-1)")
    self.cfg, self.phase, self.pad_id, self.progress = cfg, phase, pad_id, progress
    self.mc_samples, self.seed = mc_samples, seed
    self.mesh = mesh if mesh is not None else eval_mesh()
    # A block model's forward runs over [x_t ; x_0]: twice the tokens, on rows of whole blocks.
    self.block = phase.draw_block()
    self.batcher = Batcher(cfg, batch_tokens // (2 if self.block else 1), self.mesh, self.block)
    self.params = replicated(cfg, params, self.mesh)
    self._step = jax.jit(functools.partial(_elbo_terms, cfg, self.block),
                         out_shardings=gathered(self.mesh))

  def rows(self, pairs: Sequence[Pair]) -> list[Row]:
    rows, cut = [], 0
    for i, (context, continuation) in enumerate(pairs):
      if not continuation:
        raise DharaError("eval: a request has an empty continuation")
      whole = [*context, *continuation][-self.batcher.max_len:]
      length = min(len(continuation), len(whole) - 1)  # token 0 has no predictor
      cut += length < len(continuation)
      if length < 1:
        raise DharaError("eval: a request has no context token to predict from")
      samples = 1 if length == 1 else self.mc_samples
      for masked, weight in draws(whole, length, samples, self.seed):
        rows.append(Row(whole, [i], (masked, weight, False)))
      if length > 1:  # weight 1: every token is checked for the argmax (its NLL is not summed)
        rows.append(Row(whole, [i], (np.ones(length, bool), 1.0, True)))
    warn_cut(cut, len(pairs), self.batcher.max_len)
    return rows

  def score(self, pairs: Sequence[Pair]) -> list[Score]:
    from dhara_jax.sharding import axis_rules

    totals = np.zeros(len(pairs))
    samples = np.zeros(len(pairs), np.int64)
    greedy = np.zeros(len(pairs), bool)
    done: set[int] = set()
    shape = lambda row: self.batcher.shape(len(row.tokens), len(row.payload[0]))  # noqa: E731
    for batch in self.batcher.batches(self.rows(pairs), shape):
      # Padding (and padding rows) is segment 0: no token of a row's segment 1 attends to it,
      # and block diffusion's row starts at position 0 in every bucket, so its blocks are the
      # same blocks in a longer row (masks.block_diffusion_mask).
      x0 = np.full((batch.count, batch.length), self.pad_id, np.int32)
      segments = np.zeros((batch.count, batch.length), np.int32)
      masked = np.zeros((batch.count, batch.length), bool)
      where = np.zeros((batch.count, batch.width), np.int32)  # the continuation's predictors
      weights = np.zeros((batch.count, batch.width), np.float32)  # T / l on its masked tokens
      for r, row in enumerate(batch.rows):
        end, (mask, weight, _) = len(row.tokens), row.payload
        n = len(mask)
        x0[r, :end], segments[r, :end] = row.tokens, 1
        masked[r, end - n:end] = mask
        where[r, :n] = np.arange(end - n - 1, end - 1)
        weights[r, :n] = np.where(mask, weight, 0.0)
      with jax.set_mesh(self.mesh), axis_rules():
        nll, all_best = map(np.asarray, self._step(
            self.params, *self.batcher.put(x0, segments, masked, where, weights)))
      for r, row in enumerate(batch.rows):
        owner, (mask, _, is_greedy_row) = row.owners[0], row.payload
        if is_greedy_row or len(mask) == 1:
          greedy[owner] = all_best[r]
        if not is_greedy_row:
          totals[owner] += nll[r]
          samples[owner] += 1
      if self.progress:
        finished = {row.owners[0] for row in batch.rows} - done
        done |= finished
        self.progress(len(finished))
    return [(float(-t / n), bool(g)) for t, n, g in zip(totals, samples, greedy)]


def _elbo_terms(cfg: ModelConfig, block: int, params: Any, x0_BxL: jax.Array,
                segments_BxL: jax.Array, masked_BxL: jax.Array, where_BxW: jax.Array,
                weights_BxW: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per row: Σ over the continuation of weight · −log p(x_0 token | x_t) (weight T/l on masked
  tokens, 0 elsewhere), and whether every masked token is the argmax. The head runs on the
  continuation's predictors only."""
  hidden_BxLxD = predictor_hidden(cfg, block, params, x0_BxL, segments_BxL, masked_BxL)
  targets_BxW = jnp.take_along_axis(x0_BxL, where_BxW + 1, axis=1)
  logp_BxW, best_BxW = read_log_probs(cfg, params, hidden_BxLxD, where_BxW, targets_BxW)
  scored_BxW = weights_BxW > 0
  return (-jnp.sum(jnp.where(scored_BxW, logp_BxW * weights_BxW, 0.0), axis=1),
          jnp.all(best_BxW | ~scored_BxW, axis=1))


def predictor_hidden(cfg: ModelConfig, block: int, params: Any, x0_BxL: jax.Array,
                     segments_BxL: jax.Array, masked_BxL: jax.Array) -> jax.Array:
  """The hidden state that predicts each next token (position j predicts token j + 1), B×L×D,
  with the masked tokens of x_0 replaced by the mask token."""
  from dhara_jax.model import forward_hidden
  from dhara_jax.losses import block_predictors

  xt_BxL = jnp.where(masked_BxL, cfg.mask_token_id, x0_BxL)
  if block:
    hidden_Bx2LxD, _ = forward_hidden(cfg, params, jnp.concatenate([xt_BxL, x0_BxL], axis=1),
                                      segments_BxL, block_size=block)
    return block_predictors(hidden_Bx2LxD, block)
  hidden_BxLxD, _ = forward_hidden(cfg, params, xt_BxL, segments_BxL)
  return hidden_BxLxD


def predictor_log_probs(cfg: ModelConfig, block: int, params: Any, x0_BxL: jax.Array,
                        segments_BxL: jax.Array, masked_BxL: jax.Array) -> jax.Array:
  """log-softmax of the predictor of each token 1..L−1 (B×(L−1)×V): the tests' reference."""
  from dhara_jax.model import apply_head

  hidden_BxLxD = predictor_hidden(cfg, block, params, x0_BxL, segments_BxL, masked_BxL)
  return jax.nn.log_softmax(apply_head(cfg, params, hidden_BxLxD[:, :-1]), axis=-1)
