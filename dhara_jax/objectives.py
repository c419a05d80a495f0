"""Training objectives. Each returns (sum of per-token losses, number of loss tokens), so
gradient accumulation and data-parallel reductions can normalise once over the whole batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_sum(logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                      weights_BxL: jax.Array) -> jax.Array:
  """Σ weights · (logsumexp(logits) − logit[target]), in float32.

  logsumexp minus the target logit avoids materialising a second B×L×V array (log_softmax).
  """
  logits = logits_BxLxV.astype(jnp.float32)
  target_logit_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  nll_BxL = jax.nn.logsumexp(logits, axis=-1) - target_logit_BxL
  return jnp.sum(nll_BxL * weights_BxL)


def next_token_targets(tokens_BxL: jax.Array,
                       segment_ids_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Targets tokens[t+1] and a 0/1 weight that is 1 only where t and t+1 are in the same real
  document: no loss across document boundaries, on padding, or past the end."""
  targets_BxL = jnp.concatenate([tokens_BxL[:, 1:], jnp.zeros_like(tokens_BxL[:, :1])], axis=1)
  next_seg_BxL = jnp.concatenate([segment_ids_BxL[:, 1:], jnp.zeros_like(segment_ids_BxL[:, :1])],
                                 axis=1)
  weights_BxL = (segment_ids_BxL > 0) & (next_seg_BxL == segment_ids_BxL)
  return targets_BxL, weights_BxL.astype(jnp.float32)


def ar_loss(logits_BxLxV: jax.Array, tokens_BxL: jax.Array,
            segment_ids_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Next-token cross-entropy over packed documents: (loss sum, token count)."""
  targets_BxL, weights_BxL = next_token_targets(tokens_BxL, segment_ids_BxL)
  return cross_entropy_sum(logits_BxLxV, targets_BxL, weights_BxL), jnp.sum(weights_BxL)
