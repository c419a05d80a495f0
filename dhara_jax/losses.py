"""The loss math behind the objectives (objectives.py holds their table): the fused head
cross-entropy, the AR loss, the diffusion masks and ELBO, block diffusion's predictors. Each loss
returns (sum of per-token losses, number of loss tokens), so gradient accumulation and
data-parallel reductions can normalise once over the whole batch."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dhara_jax.model import Head
from dhara_jax.model.layers import matmul, matmul_at_b, soft_cap, transpose_copy


def head_cross_entropy_sum(hidden_BxLxD: jax.Array, head: Head, targets_BxL: jax.Array,
                           weights_BxL: jax.Array, chunks: int = 1) -> jax.Array:
  """Σ weights · (logsumexp(logits) − logit[target]) for logits = head(hidden), in float32,
  without materialising the B×L×V logits.

  The sequence is cut into `chunks` pieces; each piece's logits exist only while its loss and
  gradients are computed (in the forward pass, as Liger's fused linear cross-entropy does), so
  the head needs B×L/chunks×V memory and, on CPU, its large temporaries stay in memory already
  touched instead of being page-faulted in every step. The contractions run in the hidden
  states' dtype with float32 accumulation.
  """
  return _head_xent(hidden_BxLxD, head.kernel, targets_BxL, weights_BxL, head.transposed,
                    head.softcap, chunks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _head_xent(hidden_BxLxD, kernel, targets_BxL, weights_BxL, transposed, softcap, chunks):
  compute_kernel = kernel.astype(hidden_BxLxD.dtype)  # once, not per chunk

  def loss_only(loss, chunk):
    return loss + _chunk_loss(compute_kernel, transposed, softcap, *chunk)[0], None

  loss, _ = jax.lax.scan(loss_only, jnp.zeros((), jnp.float32),
                         _chunked(hidden_BxLxD, targets_BxL, weights_BxL, chunks))
  return loss


def _head_xent_fwd(hidden_BxLxD, kernel, targets_BxL, weights_BxL, transposed, softcap, chunks):
  dtype = hidden_BxLxD.dtype
  compute_kernel = kernel.astype(dtype)  # once, not per chunk

  def loss_and_grads(carry, chunk):
    loss, dkernel = carry
    hidden_NxD, targets_N, weights_N = chunk
    chunk_loss, logits_NxV, unnormalised_NxV, sum_N = _chunk_loss(compute_kernel, transposed,
                                                                  softcap, *chunk)
    loss += chunk_loss
    dlogits_NxV = _nll_gradient(unnormalised_NxV, sum_N, targets_N, weights_N)
    if softcap:  # d cap·tanh(z/cap) / dz = 1 − tanh²
      dlogits_NxV = dlogits_NxV * (1.0 - jnp.square(logits_NxV / softcap))
    dlogits_NxV = dlogits_NxV.astype(dtype)
    dhidden_NxD = jax.lax.dot_general(dlogits_NxV, compute_kernel,
                                      (((1,), (0 if transposed else 1,)), ((), ())),
                                      preferred_element_type=jnp.float32)
    dkernel += matmul_at_b(hidden_NxD, dlogits_NxV, transpose_result=transpose_each_chunk)
    return (loss, dkernel), dhidden_NxD.astype(dtype)

  batch, length, d_model = hidden_BxLxD.shape
  # Accumulate D×V and transpose once at the end, unless D and V are both odd: then XLA:CPU
  # could fold that transpose into a bf16 dot it cannot run (see layers.transpose_copy).
  transpose_each_chunk = transposed and d_model * kernel.shape[0] % 2 == 1
  dkernel = jnp.zeros(kernel.shape if transpose_each_chunk else
                      (d_model, kernel.shape[0 if transposed else 1]), jnp.float32)
  (loss, dkernel), dhidden_CxNxD = jax.lax.scan(
      loss_and_grads, (jnp.zeros((), jnp.float32), dkernel),
      _chunked(hidden_BxLxD, targets_BxL, weights_BxL, chunks))
  dhidden_BxLxD = transpose_copy(dhidden_CxNxD.reshape(chunks, batch, length // chunks, d_model),
                                 (1, 0, 2, 3)).reshape(hidden_BxLxD.shape)
  if transposed and not transpose_each_chunk:
    dkernel = transpose_copy(dkernel, (1, 0))
  return loss, (dhidden_BxLxD, dkernel.astype(kernel.dtype))


def _head_xent_bwd(transposed, softcap, chunks, residuals, dloss):
  dhidden_BxLxD, dkernel = residuals
  dhidden_BxLxD = (dhidden_BxLxD.astype(jnp.float32) * dloss).astype(dhidden_BxLxD.dtype)
  return dhidden_BxLxD, dkernel * dloss, None, None


_head_xent.defvjp(_head_xent_fwd, _head_xent_bwd)


def _chunked(hidden_BxLxD, targets_BxL, weights_BxL, chunks):
  """C×(B·L/C)×… pieces along the sequence: every piece keeps all batch rows, so it stays
  spread over the batch shards."""
  def split(x):
    batch, length = x.shape[:2]
    x = x.reshape(batch, chunks, length // chunks, *x.shape[2:])
    x = transpose_copy(x, (1, 0, *range(2, x.ndim)))
    return x.reshape(chunks, batch * (length // chunks), *x.shape[3:])
  return split(hidden_BxLxD), split(targets_BxL), split(weights_BxL)


def _chunk_loss(kernel, transposed, softcap, hidden_NxD, targets_N, weights_N):
  """(Σ weights · nll, logits, exp(logits − max), Σ exp) for one chunk of tokens."""
  logits_NxV = soft_cap(matmul(hidden_NxD, kernel, jnp.float32, kernel_transposed=transposed),
                        softcap)
  max_N, unnormalised_NxV, sum_N = _softmax_parts(logits_NxV)
  loss = jnp.sum(_nll(logits_NxV, max_N, sum_N, targets_N) * weights_N)
  return loss, logits_NxV, unnormalised_NxV, sum_N


def logit_chunks(batch: int, length: int, batch_shards: int, max_tokens: int) -> int:
  """The fewest sequence chunks (a divisor of `length`) that keep each device's share of one
  chunk at most `max_tokens` tokens."""
  local_tokens = batch * length // batch_shards
  return next(c for c in range(1, length + 1)
              if length % c == 0 and (local_tokens // c <= max_tokens or c == length))


def _softmax_parts(logits_xV: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(row max, exp(logits − max), Σ exp) over the last dim of float32 logits."""
  max_x = jnp.max(logits_xV, axis=-1)
  unnormalised_xV = jnp.exp(logits_xV - max_x[..., None])
  return max_x, unnormalised_xV, jnp.sum(unnormalised_xV, axis=-1)


def _nll(logits_xV, max_x, sum_x, targets_x):
  target_logit_x = jnp.take_along_axis(logits_xV, targets_x[..., None], axis=-1)[..., 0]
  return max_x + jnp.log(sum_x) - target_logit_x


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


def ar_loss(hidden_BxLxD: jax.Array, head: Head, tokens_BxL: jax.Array,
            segment_ids_BxL: jax.Array, chunks: int = 1) -> tuple[jax.Array, jax.Array]:
  """Next-token cross-entropy over packed documents: (loss sum, token count)."""
  targets_BxL, weights_BxL = next_token_targets(tokens_BxL, segment_ids_BxL)
  total = head_cross_entropy_sum(hidden_BxLxD, head, targets_BxL, weights_BxL, chunks)
  return total, jnp.sum(weights_BxL)


# ---------------------------------------------------------------------------------------------
# Masked diffusion (LLaDA, MDLM) and block diffusion (BD3-LMs, LLaDA 2.0). One label alignment
# for the whole project: the AR shift. The hidden state at position i predicts the clean token at
# i + 1 (as Dream and Fast-dLLM v2 do), so a converted AR model keeps its head's meaning; a
# document's first token has no predictor inside its document and is never masked.


class MaskDraws(NamedTuple):
  """Which tokens a diffusion step masks, and with what probability."""

  masked_BxL: jax.Array  # bool: replaced by the mask token in x_t
  prob_BxL: jax.Array  # float32: each token's masking probability p (its block's)


def predictable(segment_ids_BxL: jax.Array) -> jax.Array:
  """Tokens that the previous position predicts: real, and in the same document as it."""
  previous_BxL = jnp.concatenate([jnp.zeros_like(segment_ids_BxL[:, :1]),
                                  segment_ids_BxL[:, :-1]], axis=1)
  return (segment_ids_BxL > 0) & (previous_BxL == segment_ids_BxL)


def draw_masks(rng: jax.Array, segment_ids_BxL: jax.Array, epsilon: float,
               block_size: int = 0) -> MaskDraws:
  """t ~ U(0, 1) per block of `block_size` tokens (0: per row), p = (1 − ε)·t + ε, and each
  predictable token masked with its block's p. Drawn for global shapes, so the draws do not
  depend on how the batch is sharded."""
  batch, length = segment_ids_BxL.shape
  blocks = length // (block_size or length)
  t_key, u_key = jax.random.split(rng)
  t_BxN = jax.random.uniform(t_key, (batch, blocks))
  prob_BxL = jnp.repeat((1.0 - epsilon) * t_BxN + epsilon, length // blocks, axis=1)
  masked_BxL = (jax.random.uniform(u_key, (batch, length)) < prob_BxL)
  return MaskDraws(masked_BxL & predictable(segment_ids_BxL), prob_BxL)


def noisy_tokens(tokens_BxL: jax.Array, draws: MaskDraws, mask_token_id: int) -> jax.Array:
  """x_t: the masked tokens replaced by the absorbing mask token."""
  return jnp.where(draws.masked_BxL, mask_token_id, tokens_BxL)


def diffusion_loss(hidden_BxLxD: jax.Array, head: Head, tokens_BxL: jax.Array,
                   segment_ids_BxL: jax.Array, draws: MaskDraws,
                   chunks: int = 1) -> tuple[jax.Array, jax.Array]:
  """The MDLM/LLaDA ELBO of x_0 given the predictor hidden states (position i → token i + 1):
  (Σ over masked tokens of CE / p, number of predictable tokens). Divided by that count it is
  in nats per token, like the AR loss."""
  targets_BxL, _ = next_token_targets(tokens_BxL, segment_ids_BxL)
  scored_BxL = draws.masked_BxL.astype(jnp.float32) / draws.prob_BxL
  weights_BxL = jnp.concatenate([scored_BxL[:, 1:], jnp.zeros_like(scored_BxL[:, :1])], axis=1)
  total = head_cross_entropy_sum(hidden_BxLxD, head, targets_BxL, weights_BxL, chunks)
  return total, jnp.sum(predictable(segment_ids_BxL)).astype(jnp.float32)


def block_predictors(hidden_Bx2LxD: jax.Array, block_size: int) -> jax.Array:
  """The predictor hidden states of block diffusion from its [x_t ; x_0] output: inside a
  block, the noisy stream's previous position; a block's first token is predicted from the
  clean stream's last position of the block before (what the sampler's commit forward over a
  finished block gives). With block size 1 that is AR on x_0; with L, mdm on x_t."""
  length = hidden_Bx2LxD.shape[1] // 2
  noisy_BxLxD, clean_BxLxD = hidden_Bx2LxD[:, :length], hidden_Bx2LxD[:, length:]
  ends_block_L = jnp.arange(length) % block_size == block_size - 1
  return jnp.where(ends_block_L[None, :, None], clean_BxLxD, noisy_BxLxD)
