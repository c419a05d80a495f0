"""The benchmarks' quality proxies beside every speed-up: the AR model's ("the judge's")
perplexity of the generated tokens, prompt as context, and the distinct-2-gram rate."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dhara_jax.config import ModelConfig
from dhara_jax.model import forward

JUDGE = "exp(mean NLL over all generated tokens of all rows), prompt as context"


@functools.partial(jax.jit, static_argnums=0)
def _next_token_nll(cfg: ModelConfig, params: Any, tokens_BxT: jax.Array) -> jax.Array:
  """−log p(token t | tokens < t) for t ≥ 1: B×(T−1)."""
  logits_BxTxV, _ = forward(cfg, params, tokens_BxT)
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV[:, :-1].astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp_BxTxV, tokens_BxT[:, 1:, None], axis=-1)[..., 0]


def judge_perplexity(cfg: ModelConfig, params: Any, prompts: Sequence[Sequence[int]],
                     outputs: Sequence[Sequence[int]], width: int) -> float | None:
  """The AR model's perplexity of the generated tokens only, each row's prompt as context:
  exp of the mean NLL over all generated tokens of all rows (None when nothing was generated).
  Rows are right-padded to `width` tokens (one program per batch shape; the judge is causal,
  so the padding changes nothing before it)."""
  tokens_BxT = np.zeros((len(prompts), width), np.int32)
  scored_BxT = np.zeros((len(prompts), width - 1), bool)
  for row, (prompt, out) in enumerate(zip(prompts, outputs)):
    tokens_BxT[row, :len(prompt) + len(out)] = [*prompt, *out]
    scored_BxT[row, len(prompt) - 1:len(prompt) - 1 + len(out)] = True  # NLL[t-1] scores t
  if not scored_BxT.any():
    return None
  nll_BxT = np.asarray(_next_token_nll(cfg, params, jnp.asarray(tokens_BxT)))
  return float(np.exp(nll_BxT[scored_BxT].mean()))


def distinct_2(outputs: Sequence[Sequence[int]]) -> float | None:
  """Distinct 2-grams / all 2-grams of the outputs (pooled over rows; None without any)."""
  bigrams = [pair for out in outputs for pair in zip(out, out[1:])]
  return len(set(bigrams)) / len(bigrams) if bigrams else None
