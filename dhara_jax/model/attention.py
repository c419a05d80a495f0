"""Multi-head / grouped-query attention with optional QK-norm, RoPE and a boolean mask."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dhara_jax.config import ModelConfig
from dhara_jax.kernels.attention import flash_applies, flash_attention
from dhara_jax.model.cache import Decode, write_slots
from dhara_jax.model.canon import maybe_canon
from dhara_jax.model.layers import (Dense, Norm, RopeTable, apply_rope, matmul_at_b,
                                    transpose_copy)
from dhara_jax.sharding import per_batch_shard


class Attention(nn.Module):
  cfg: ModelConfig
  out_std: float
  local: bool = False  # a sliding-window layer
  block_size: int = 0  # > 0: x is the block-diffusion row [x_t ; x_0] (mask B×1×2L×2L)

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, rope: RopeTable | None, mask_Bx1xLxL: jax.Array,
               segment_ids_BxL: jax.Array, decode: Decode | None = None) -> jax.Array:
    """`rope`: this layer's rotary table (None without RoPE). With `decode` the mask is
    cache.decode_mask's, B×1×L×T: this chunk's keys and values are written into the cache at
    their slots and the queries attend over all T slots."""
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    batch, length, d_model = x_BxLxD.shape

    def project(features, axes, name):
      return Dense(features, axes, cfg.use_bias, cfg.init_std, dtype, name=name)(x_BxLxD)

    q_BxLxHxK = project(heads * head_dim, ("embed", "q_heads"), "q").reshape(
        batch, length, heads, head_dim)
    k_BxLxGxK = project(kv_heads * head_dim, ("embed", "kv_heads"), "k").reshape(
        batch, length, kv_heads, head_dim)
    v_BxLxGxK = project(kv_heads * head_dim, ("embed", "kv_heads"), "v").reshape(
        batch, length, kv_heads, head_dim)
    if cfg.qk_norm:
      norm = lambda name: Norm(cfg.norm, cfg.norm_eps, cfg.norm_unit_offset, axis_name="head_dim",
                               name=name)
      q_BxLxHxK = norm("q_norm")(q_BxLxHxK)
      k_BxLxGxK = norm("k_norm")(k_BxLxGxK)
    if "B" in cfg.canon_set:  # one depthwise conv over the concatenated q, k, v channels
      qkv_BxLxC = jnp.concatenate([t.reshape(batch, length, -1)
                                   for t in (q_BxLxHxK, k_BxLxGxK, v_BxLxGxK)], axis=-1)
      qkv_BxLxC = maybe_canon(cfg, "B", qkv_BxLxC, segment_ids_BxL, "canon_b",
                              self.block_size, decode)
      q, k, v = jnp.split(qkv_BxLxC, [heads * head_dim, (heads + kv_heads) * head_dim], axis=-1)
      q_BxLxHxK = q.reshape(batch, length, heads, head_dim)
      k_BxLxGxK = k.reshape(batch, length, kv_heads, head_dim)
      v_BxLxGxK = v.reshape(batch, length, kv_heads, head_dim)
    if rope is not None:
      q_BxLxHxK = apply_rope(q_BxLxHxK, rope)
      k_BxLxGxK = apply_rope(k_BxLxGxK, rope)

    scale = (cfg.query_scale_dim or head_dim) ** -0.5
    if decode is not None:
      shape = (batch, decode.cache_length, kv_heads, head_dim)
      k_cache = self.variable("cache", "keys", jnp.zeros, shape, k_BxLxGxK.dtype)
      v_cache = self.variable("cache", "values", jnp.zeros, shape, v_BxLxGxK.dtype)
      k_cache.value = write_slots(k_cache.value, k_BxLxGxK, decode.start)
      v_cache.value = write_slots(v_cache.value, v_BxLxGxK, decode.start)
      out_BxLxHxK = dot_product_attention(q_BxLxHxK, k_cache.value, v_cache.value,
                                          mask_Bx1xLxL, scale)
    else:
      out_BxLxHxK = attend(cfg.attention_impl, q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask_Bx1xLxL,
                           segment_ids_BxL, scale=scale, causal=cfg.attention == "causal",
                           window=cfg.sliding_window if self.local else 0,
                           block_size=self.block_size)
    out_BxLxHK = out_BxLxHxK.reshape(batch, length, heads * head_dim)
    return Dense(d_model, ("q_heads", "embed"), cfg.use_bias, self.out_std, dtype,
                 name="o")(out_BxLxHK)


def attend(impl: str, q_BxLxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array,
           mask_Bx1xLxL: jax.Array, segment_ids_BxL: jax.Array, *, scale: float, causal: bool,
           window: int, block_size: int = 0) -> jax.Array:
  """Attention with the kernel `impl` chooses (kernels/attention.py): FlashAttention where it
  applies and lowers, else `blocked_attention` over the mask.

  The mask must be the one masks.attention_mask builds from these segment ids (with
  `block_size` > 0: masks.block_diffusion_mask, q/k/v over [x_t ; x_0], segment ids x_0's and
  `causal` ignored): FlashAttention rebuilds it from the segment ids inside the kernel.
  """
  def masked(q, k, v, mask):
    return blocked_attention(q, k, v, mask, scale, causal, window, block_size)

  if not flash_applies(impl, q_BxLxHxK.shape[1], window, block_size):
    return masked(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask_Bx1xLxL)

  def flash_or_masked(q, k, v, mask, segment_ids):
    out = flash_attention(impl, q, k, v, segment_ids, scale=scale, causal=causal,
                          block_size=block_size)
    return masked(q, k, v, mask) if out is None else out

  return per_batch_shard(flash_or_masked, split=(True,) * 5)(
      q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask_Bx1xLxL, segment_ids_BxL)


QUERY_BLOCK = 128


def blocked_attention(q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array,
                      mask_Bx1xLxS: jax.Array, scale: float, causal: bool,
                      window: int = 0, block_size: int = 0) -> jax.Array:
  """Attention computed per block of queries over only the keys the block can see.

  Causal and sliding-window masks leave whole key ranges empty for a query block; skipping
  them cuts the work by up to half (causal) and makes the score tensors smaller. With
  `block_size` > 0 the rows are [x_t ; x_0] under masks.block_diffusion_mask (`causal` is
  ignored; see `_block_diffusion_attention`). The result equals `dot_product_attention` over
  the full mask.
  """
  if block_size:
    return _block_diffusion_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask_Bx1xLxS, scale,
                                      block_size, window)
  length = q_BxLxHxK.shape[1]
  if length <= QUERY_BLOCK or (not causal and not window):
    return dot_product_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask_Bx1xLxS, scale)
  outs = []
  for start in range(0, length, QUERY_BLOCK):
    end = min(start + QUERY_BLOCK, length)
    key_start = max(0, start - window + 1) if window else 0
    key_end = end if causal else min(length, end + window - 1)
    outs.append(dot_product_attention(
        q_BxLxHxK[:, start:end], k_BxSxGxK[:, key_start:key_end],
        v_BxSxGxK[:, key_start:key_end], mask_Bx1xLxS[:, :, start:end, key_start:key_end],
        scale))
  return jnp.concatenate(outs, axis=1)


def _block_diffusion_attention(q_Bx2LxHxK: jax.Array, k_Bx2LxGxK: jax.Array,
                               v_Bx2LxGxK: jax.Array, mask_Bx1x2Lx2L: jax.Array, scale: float,
                               block_size: int, window: int) -> jax.Array:
  """`blocked_attention` over [x_t ; x_0]: each chunk of queries (never across the seam) reads
  only the key ranges `_visible_keys` gives, concatenated: about L² scores at small block sizes
  and 2L² at block size L, of the (2L)² of the full mask."""
  length = q_Bx2LxHxK.shape[1] // 2
  outs = []
  for offset in (0, length):  # x_t's queries, then x_0's
    for start in range(offset, offset + length, QUERY_BLOCK):
      rows = slice(start, min(start + QUERY_BLOCK, offset + length))
      keys = _visible_keys(rows, length, block_size, window)
      outs.append(dot_product_attention(
          q_Bx2LxHxK[:, rows], _take(k_Bx2LxGxK, keys, 1), _take(v_Bx2LxGxK, keys, 1),
          _take(mask_Bx1x2Lx2L[:, :, rows], keys, 3), scale))
  return jnp.concatenate(outs, axis=1)


def _take(x: jax.Array, ranges: list[slice], axis: int) -> jax.Array:
  """The ranges of `axis`, concatenated."""
  parts = [jax.lax.slice_in_dim(x, r.start, r.stop, axis=axis) for r in ranges]
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def _visible_keys(rows: slice, length: int, block_size: int, window: int) -> list[slice]:
  """The key ranges (indices into [x_t ; x_0]) that query rows inside one half can see, from
  the block structure of masks.block_diffusion_mask.

  A query of block k in x_t sees x_t block k and x_0 blocks < k: for the rows, x_t from their
  first block's start to their last block's end and x_0 up to their last block's start. In
  x_0 it sees x_0 blocks ≤ k: up to the rows' last block's end. A window clips each range to
  the rows ± (window − 1).
  """
  noisy = rows.start < length
  first, last = (r - (0 if noisy else length) for r in (rows.start, rows.stop - 1))
  first_block_start = first // block_size * block_size
  last_block_start = last // block_size * block_size
  low, high = (first - window + 1, last + window) if window else (0, length)
  clip = lambda lo, hi, offset: slice(offset + max(lo, low), offset + min(hi, high))
  if noisy:
    ranges = [clip(0, last_block_start, length),
              clip(first_block_start, last_block_start + block_size, 0)]
  else:
    ranges = [clip(0, last_block_start + block_size, length)]
  return [r for r in ranges if r.stop > r.start]


def dot_product_attention(q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array,
                          mask_Bx1xLxS: jax.Array, scale: float) -> jax.Array:
  """Softmax attention (scores and softmax in float32); H query heads share G key/value heads
  (R = H/G each).

  Heads are moved in front of the sequence axes first: XLA:CPU runs the attention
  contractions about 3× faster with (batch, heads) as leading batch dims.
  """
  batch, length, heads, head_dim = q_BxLxHxK.shape
  kv_heads = k_BxSxGxK.shape[2]
  q_BxGxRxLxK = (q_BxLxHxK * scale).reshape(
      batch, length, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
  k_BxGxSxK, v_BxGxSxK = (transpose_copy(t, (0, 2, 1, 3)) for t in (k_BxSxGxK, v_BxSxGxK))
  out_BxGxRxLxK = softmax_attention(q_BxGxRxLxK, k_BxGxSxK, v_BxGxSxK, mask_Bx1xLxS[:, 0])
  return out_BxGxRxLxK.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim)


@jax.custom_vjp
def softmax_attention(q_BxGxRxLxK: jax.Array, k_BxGxSxK: jax.Array, v_BxGxSxK: jax.Array,
                      mask_BxLxS: jax.Array) -> jax.Array:
  """softmax(q·kᵀ masked)·v for pre-scaled queries, with FlashAttention's backward.

  The backward recomputes the probabilities from the saved row max and normaliser (XLA:CPU
  merges that with the forward's instead, see `_probabilities`) and needs one elementwise pass
  over the scores where autodiff of the softmax takes several: on CPU, most of the backward's
  time. Every contraction takes operands in the compute dtype and accumulates in float32. R
  query heads share each key/value head: they are folded into the query rows (M = R·L).
  """
  return _attention_fwd(q_BxGxRxLxK, k_BxGxSxK, v_BxGxSxK, mask_BxLxS)[0]


def _attention_fwd(q_BxGxRxLxK, k_BxGxSxK, v_BxGxSxK, mask_BxLxS):
  batch, groups, repeats, length, head_dim = q_BxGxRxLxK.shape
  q_BxGxMxK = q_BxGxRxLxK.reshape(batch, groups, repeats * length, head_dim)
  scores_BxGxMxS = _masked_scores(q_BxGxMxK, k_BxGxSxK, mask_BxLxS, repeats)
  max_BxGxMx1 = jnp.max(scores_BxGxMxS, axis=-1, keepdims=True)
  inv_sum_BxGxMx1 = 1.0 / jnp.sum(jnp.exp(scores_BxGxMxS - max_BxGxMx1), axis=-1,
                                  keepdims=True)
  probs_BxGxMxS = _probabilities(scores_BxGxMxS, max_BxGxMx1, inv_sum_BxGxMx1,
                                 v_BxGxSxK.dtype)
  out_BxGxRxLxK = _batched_dot(probs_BxGxMxS, v_BxGxSxK, 3, 2).astype(
      q_BxGxRxLxK.dtype).reshape(q_BxGxRxLxK.shape)
  residuals = (q_BxGxRxLxK, k_BxGxSxK, v_BxGxSxK, mask_BxLxS, out_BxGxRxLxK, max_BxGxMx1,
               inv_sum_BxGxMx1)
  return out_BxGxRxLxK, residuals


def _attention_bwd(residuals, dout_BxGxRxLxK):
  q_BxGxRxLxK, k_BxGxSxK, v_BxGxSxK, mask_BxLxS, out_BxGxRxLxK, max_BxGxMx1, inv_sum_BxGxMx1 = (
      residuals)
  batch, groups, repeats, length, head_dim = q_BxGxRxLxK.shape
  dtype = q_BxGxRxLxK.dtype
  rows = lambda x: x.astype(dtype).reshape(batch, groups, repeats * length, head_dim)
  q_BxGxMxK, out_BxGxMxK, dout_BxGxMxK = map(rows, (q_BxGxRxLxK, out_BxGxRxLxK, dout_BxGxRxLxK))

  scores_BxGxMxS = _masked_scores(q_BxGxMxK, k_BxGxSxK, mask_BxLxS, repeats)
  probs_BxGxMxS = _probabilities(scores_BxGxMxS, max_BxGxMx1, inv_sum_BxGxMx1, dtype)
  dv_BxGxSxK = matmul_at_b(dout_BxGxMxK, probs_BxGxMxS, transpose_result=True)
  dprobs_BxGxMxS = _batched_dot(dout_BxGxMxK, v_BxGxSxK, 3, 3)
  # softmax backward: dscores = p·(dp − Σ_s p·dp), and Σ_s p·dp = Σ_k dout·out.
  dout_dot_out_BxGxMx1 = jnp.sum(dout_BxGxMxK.astype(jnp.float32) * out_BxGxMxK, axis=-1,
                                 keepdims=True)
  dscores_BxGxMxS = (probs_BxGxMxS.astype(jnp.float32) *
                     (dprobs_BxGxMxS - dout_dot_out_BxGxMx1)).astype(dtype)
  dq_BxGxMxK = _batched_dot(dscores_BxGxMxS, k_BxGxSxK, 3, 2)
  dk_BxGxSxK = matmul_at_b(q_BxGxMxK, dscores_BxGxMxS, transpose_result=True)
  return (dq_BxGxMxK.astype(dtype).reshape(q_BxGxRxLxK.shape), dk_BxGxSxK.astype(k_BxGxSxK.dtype),
          dv_BxGxSxK.astype(v_BxGxSxK.dtype), None)


softmax_attention.defvjp(_attention_fwd, _attention_bwd)


def _probabilities(scores_BxGxMxS: jax.Array, max_BxGxMx1: jax.Array,
                   inv_sum_BxGxMx1: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """softmax(scores) in `dtype`, from the row max and 1/Σexp.

  The forward and the backward both call this. XLA:CPU merges the backward's recomputation
  with the forward's result and keeps that from forward to backward, so in bf16 each layer
  keeps one bf16 M×S array instead of f32 and bf16 ones (the 8-layer CPU benchmark's
  temporaries 1.84 → 1.50 GB); the backward's dscores is rounded to `dtype` anyway.
  """
  return (jnp.exp(scores_BxGxMxS - max_BxGxMx1) * inv_sum_BxGxMx1).astype(dtype)


def _batched_dot(a: jax.Array, b: jax.Array, a_contract: int, b_contract: int) -> jax.Array:
  """Contraction over one dim of two B×G×…×… arrays, (B, G) as batch dims, float32 result."""
  return jax.lax.dot_general(a, b, (((a_contract,), (b_contract,)), ((0, 1), (0, 1))),
                             preferred_element_type=jnp.float32)


def _masked_scores(q_BxGxMxK: jax.Array, k_BxGxSxK: jax.Array, mask_BxLxS: jax.Array,
                   repeats: int) -> jax.Array:
  scores_BxGxMxS = _batched_dot(q_BxGxMxK, k_BxGxSxK, 3, 3)
  batch, groups, rows, keys = scores_BxGxMxS.shape
  scores_BxGxRxLxS = scores_BxGxMxS.reshape(batch, groups, repeats, rows // repeats, keys)
  scores_BxGxRxLxS = jnp.where(mask_BxLxS[:, None, None], scores_BxGxRxLxS,
                               jnp.finfo(jnp.float32).min)
  return scores_BxGxRxLxS.reshape(scores_BxGxMxS.shape)
