"""The one attention-mask builder: causal or bidirectional, packed documents, sliding windows.

Masks are data (boolean arrays, True = may attend), so AR, diffusion and packed batches share one
attention implementation. Segment id 0 marks padding; real documents use ids >= 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
