"""Decoding against a static cache: a chunk of C new tokens run over cache slots 0 … T−1.

One `Decode` describes every cached forward the samplers need: AR prefill (the prompt, causal:
`chunk_block` 1) and single-token steps, a block-diffusion block against the clean prefix or its
commit (`chunk_block` = C: bidirectional inside the block), the block-causal prefill of a clean
prompt, and Fast-dLLM's approximate cache of a full-sequence model (`see_after`: keys after the
chunk stay visible). Attention layers cache keys/values per slot; convolutions (Canon, LFM2's
short conv) keep their last K−1 inputs as `tail`, so the next chunk's taps read them exactly.
Rows are left-padded: row b's real tokens start at slot `first_B[b]`; positions count from it.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dhara_jax.model.conv import Conv


class Decode(NamedTuple):
  start: jax.Array  # scalar int32: the cache slot of the chunk's first token
  first_B: jax.Array  # int32: each row's first real slot (padding before it)
  cache_length: int  # T, static
  chunk_block: int = 1  # static: attention inside the chunk is block-causal over this size
  see_after: bool = False  # static: slots after the chunk are visible (approximate cache)
  tail_end: jax.Array | None = None  # the slot the conv tails end at (default: the chunk's end)

  def slots(self, chunk: int) -> jax.Array:
    return self.start + jnp.arange(chunk)

  def valid_BxC(self, chunk: int) -> jax.Array:
    """Which chunk tokens are real (not left padding)."""
    return self.slots(chunk)[None, :] >= self.first_B[:, None]

  def positions_BxC(self, chunk: int) -> jax.Array:
    return jnp.maximum(self.slots(chunk)[None, :] - self.first_B[:, None], 0)


def decode_mask(decode: Decode, chunk: int, window: int = 0) -> jax.Array:
  """B×1×C×T: chunk queries over cache slots. A query sees real slots before the chunk, chunk
  slots of its own or an earlier block of `chunk_block` tokens, with `see_after` every later
  slot, and with a window only slots closer than `window`."""
  q_C1 = decode.slots(chunk)[:, None]
  k_1T = jnp.arange(decode.cache_length)[None, :]
  in_chunk = (k_1T >= decode.start) & (k_1T < decode.start + chunk)
  same_or_earlier_block = ((k_1T - decode.start) // decode.chunk_block
                           <= (q_C1 - decode.start) // decode.chunk_block)
  visible_CxT = (k_1T < decode.start) | (in_chunk & same_or_earlier_block)
  if decode.see_after:
    visible_CxT |= k_1T >= decode.start + chunk
  if window:
    visible_CxT &= jnp.abs(q_C1 - k_1T) < window
  real_Bx1xT = (k_1T >= decode.first_B[:, None])[:, None]
  return (visible_CxT[None] & real_Bx1xT)[:, None]


def write_slots(cache: jax.Array, new_BxCx: jax.Array, start: jax.Array) -> jax.Array:
  """cache B×T×… with slots start … start+C−1 replaced by new."""
  index = (0, start) + (0,) * (cache.ndim - 2)
  return jax.lax.dynamic_update_slice(cache, new_BxCx.astype(cache.dtype), index)


def cached_conv(module: nn.Module, conv: Conv, x_BxCxD: jax.Array, w_KxD: jax.Array,
                decode: Decode) -> jax.Array:
  """The causal conv of a chunk whose taps before it read the cached tail (the K−1 inputs
  before the chunk); the tail then moves to the K−1 inputs before `decode.tail_end`. Padding
  enters as zeros, which is what a tap reset at a document start reads."""
  batch, chunk, channels = x_BxCxD.shape
  taps = w_KxD.shape[0] - 1
  tail = module.variable("cache", "tail", jnp.zeros, (batch, taps, channels), x_BxCxD.dtype)
  x_BxCxD = jnp.where(decode.valid_BxC(chunk)[:, :, None], x_BxCxD, 0)
  full_BxSxD = jnp.concatenate([tail.value.astype(x_BxCxD.dtype), x_BxCxD], axis=1)
  y_BxSxD = conv(full_BxSxD, w_KxD, jnp.ones(full_BxSxD.shape[:2], jnp.int32))
  end = decode.start + chunk if decode.tail_end is None else decode.tail_end
  tail.value = jax.lax.dynamic_slice_in_dim(full_BxSxD, end - decode.start, taps, axis=1)
  return y_BxSxD[:, taps:]
