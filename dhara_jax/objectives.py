"""Training objectives. Each returns (sum of per-token losses, number of loss tokens), so
gradient accumulation and data-parallel reductions can normalise once over the whole batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def cross_entropy_sum(logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                      weights_BxL: jax.Array) -> jax.Array:
  """Σ weights · (logsumexp(logits) − logit[target]), in float32.

  The gradient, weights · (softmax − onehot(target)), is written by hand: one elementwise
  pass over the B×L×V logits, where autodiff of logsumexp and of the target gather keeps the
  exponentials and scatters into a zero B×L×V array (the head's cross-entropy is a large part
  of a small model's step).
  """
  return _cross_entropy_fwd(logits_BxLxV, targets_BxL, weights_BxL)[0]


def _cross_entropy_fwd(logits_BxLxV, targets_BxL, weights_BxL):
  max_BxL, unnormalised_BxLxV, sum_BxL = _softmax_parts(logits_BxLxV)
  loss = jnp.sum(_nll(logits_BxLxV, max_BxL, sum_BxL, targets_BxL) * weights_BxL)
  dtype_witness = jnp.zeros((), logits_BxLxV.dtype)  # residuals must be arrays
  return loss, (unnormalised_BxLxV, sum_BxL, targets_BxL, weights_BxL, dtype_witness)


def _cross_entropy_bwd(residuals, dloss):
  unnormalised_BxLxV, sum_BxL, targets_BxL, weights_BxL, dtype_witness = residuals
  dlogits_BxLxV = _nll_gradient(unnormalised_BxLxV, sum_BxL, targets_BxL, weights_BxL * dloss)
  return dlogits_BxLxV.astype(dtype_witness.dtype), None, None


cross_entropy_sum.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def _softmax_parts(logits_xV: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(row max, exp(logits − max), Σ exp) over the last dim, in float32."""
  logits = logits_xV.astype(jnp.float32)
  max_x = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
  unnormalised_xV = jnp.exp(logits - max_x[..., None])
  return max_x, unnormalised_xV, jnp.sum(unnormalised_xV, axis=-1)


def _nll(logits_xV, max_x, sum_x, targets_x):
  target_logit_x = jnp.take_along_axis(logits_xV, targets_x[..., None], axis=-1)[..., 0]
  return max_x + jnp.log(sum_x) - target_logit_x.astype(jnp.float32)


def _nll_gradient(unnormalised_xV, sum_x, targets_x, scale_x):
  """d Σ scale·nll / d logits = scale · (softmax − onehot(target))."""
  vocab_xV = jax.lax.broadcasted_iota(targets_x.dtype, unnormalised_xV.shape,
                                      unnormalised_xV.ndim - 1)
  onehot_xV = (vocab_xV == targets_x[..., None]).astype(jnp.float32)
  return unnormalised_xV * (scale_x / sum_x)[..., None] - onehot_xV * scale_x[..., None]


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
