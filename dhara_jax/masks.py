"""The one attention-mask builder: causal or bidirectional, packed documents, sliding windows,
and the block-diffusion row [x_t ; x_0].

Masks are data (boolean arrays, True = may attend), so AR, diffusion and packed batches share one
attention implementation. Segment id 0 marks padding; real documents use ids >= 1.
"""

from __future__ import annotations

from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np

from dhara_jax.errors import ConfigError


def attention_mask(segment_ids_BxL: jax.Array, *, causal: bool,
                   window: int = 0) -> jax.Array:
  """Boolean mask B×1×L×L (query × key).

  A query attends to keys of its own segment; `causal` adds key ≤ query; `window` > 0 keeps keys
  with |query − key| < window (on the causal side that is the last `window` tokens, itself
  included, as in transformers' sliding-window layers).
  """
  length = segment_ids_BxL.shape[-1]
  mask_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  q_L1 = jnp.arange(length)[:, None]
  k_1L = jnp.arange(length)[None, :]
  if causal:
    mask_BxLxL &= k_1L <= q_L1
  if window > 0:
    mask_BxLxL &= jnp.abs(q_L1 - k_1L) < window
  return mask_BxLxL[:, None]


def segment_positions(segment_ids_BxL: jax.Array) -> jax.Array:
  """Position of each token inside its segment (0 at every document start)."""
  length = segment_ids_BxL.shape[-1]
  index_BxL = jnp.broadcast_to(jnp.arange(length), segment_ids_BxL.shape)
  starts_BxL = jnp.concatenate(
      [jnp.ones_like(segment_ids_BxL[:, :1], dtype=bool),
       segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]], axis=1)
  start_index_BxL = jax.lax.cummax(jnp.where(starts_BxL, index_BxL, 0), axis=1)
  return index_BxL - start_index_BxL


def block_diffusion_mask(segment_ids_BxL: jax.Array, block_size: int, *,
                         window: int = 0) -> jax.Array:
  """Boolean mask B×1×2L×2L (query × key) over the block-diffusion row [x_t ; x_0].

  Both halves share the segment ids (and positions) of x_0. With blocks of `block_size` rows:
  x_t block k sees x_t block k and x_0 blocks < k; x_0 block k sees x_0 blocks ≤ k; x_0 never
  sees x_t. All of it within the query's own segment (padding sees padding). `window` > 0 also
  keeps |query − key| < window, distances taken inside a half: at block size 1 the x_0 half is
  then the causal sliding window, at block size L the x_t half the bidirectional one.
  """
  length = segment_ids_BxL.shape[-1]
  seg_Bx2L = both_halves(segment_ids_BxL)
  same_doc_Bx2Lx2L = seg_Bx2L[:, :, None] == seg_Bx2L[:, None, :]
  pattern_2Lx2L = block_diffusion_pattern(length, block_size, window=window, xp=jnp)
  return (same_doc_Bx2Lx2L & pattern_2Lx2L)[:, None]


def block_diffusion_pattern(length: int, block_size: int, *, window: int = 0,
                            xp: ModuleType = np) -> np.ndarray | jax.Array:
  """The part of `block_diffusion_mask` that documents do not change: 2L×2L bool.

  `xp=np` gives a static array (for kernels that take the mask at trace time), `xp=jnp` one
  XLA builds from iotas instead of embedding a 4·L² constant.
  """
  check_block_size(length, block_size)
  index_2L = xp.arange(2 * length)
  clean_2L, row_2L = index_2L >= length, index_2L % length
  block_2L = row_2L // block_size
  q_clean, k_clean = clean_2L[:, None], clean_2L[None, :]
  q_block, k_block = block_2L[:, None], block_2L[None, :]
  noisy_query = ~q_clean & xp.where(k_clean, k_block < q_block, k_block == q_block)
  clean_query = q_clean & k_clean & (k_block <= q_block)
  pattern_2Lx2L = noisy_query | clean_query
  if window > 0:
    pattern_2Lx2L &= xp.abs(row_2L[:, None] - row_2L[None, :]) < window
  return pattern_2Lx2L


def check_block_size(length: int, block_size: int) -> None:
  """One line naming `block_size` unless it is ≥ 1 and divides the length L of x_0."""
  if block_size < 1 or length % block_size:
    raise ConfigError(f"block diffusion: block_size={block_size} must be ≥ 1 and divide the "
                      f"sequence length {length}")


def both_halves(x_BxL: jax.Array) -> jax.Array:
  """x repeated for both halves of [x_t ; x_0] (B×2L): shared segment ids, positions, flags."""
  return jnp.concatenate([x_BxL, x_BxL], axis=1)
