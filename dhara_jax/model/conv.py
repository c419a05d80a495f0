"""Causal depthwise 1-D convolution (LFM2 short conv, Canon layers): see dhara_jax.kernels.canon.

`block_diffusion_conv` runs any of those kernels over the block-diffusion row [x_t ; x_0].
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dhara_jax.kernels.canon import canon_conv as causal_depthwise_conv  # noqa: F401
from dhara_jax.masks import check_block_size

# (x B×T×C, w K×C, segment ids B×T) → B×T×C: a causal conv, taps kept inside their segment.
Conv = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def block_diffusion_conv(conv: Conv, x_Bx2LxC: jax.Array, w_KxC: jax.Array,
                         segment_ids_BxL: jax.Array, block_size: int) -> jax.Array:
  """The causal conv over [x_t ; x_0] (B×2L×C), with `conv` any kernel, unchanged; with
  `block_size` 0, x is one stream and this is conv(x, w, segment_ids).

  x_0 gets the ordinary conv within its documents. In x_t a tap that stays in the output's
  block reads x_t, one that falls into an earlier block reads x_0 at that position (never across
  the seam between the halves or across documents).

  Blocks are coloured k mod M, M = the number of blocks a row's K taps can reach, so the
  blocks one row reaches all have different colours. Input c is x_t in the blocks of colour c
  and x_0 elsewhere: its ordinary conv is exact for every x_t row of colour c. One kernel call
  over the M + 1 inputs [input_0 ; … ; input_M-1 ; x_0] (segment ids kept distinct between
  them) gives every row, each from the same taps as a direct computation: no cancellation, so
  an x_t row is bitwise independent of what it must not see. (The linear form conv_blk(x_t) +
  conv_doc(x_0) − conv_blk(x_0) would cost 3L too but leak x_0's same-block values at rounding
  level.) Cost (M + 1)·L: 3L for block sizes ≥ K − 1, 5L at block size 1 with K = 4.
  """
  if not block_size:
    return conv(x_Bx2LxC, w_KxC, segment_ids_BxL)
  x_t_BxLxC, x_0_BxLxC = jnp.split(x_Bx2LxC, 2, axis=1)
  length = x_t_BxLxC.shape[1]
  check_block_size(length, block_size)
  colors = _colors(w_KxC.shape[0], block_size, length)
  color_1xLx1 = (jnp.arange(length) // block_size % colors)[None, :, None]
  inputs = [jnp.where(color_1xLx1 == c, x_t_BxLxC, x_0_BxLxC) for c in range(colors)]
  streams = len(inputs) + 1
  seg_BxL = segment_ids_BxL.astype(jnp.int32) * streams
  ids_BxSL = jnp.concatenate([seg_BxL + i for i in range(streams)], axis=1)
  y_BxSLxC = conv(jnp.concatenate([*inputs, x_0_BxLxC], axis=1), w_KxC, ids_BxSL)
  *ys, clean_BxLxC = jnp.split(y_BxSLxC, streams, axis=1)
  noisy_BxLxC = ys[0]
  for c in range(1, colors):
    noisy_BxLxC = jnp.where(color_1xLx1 == c, ys[c], noisy_BxLxC)
  return jnp.concatenate([noisy_BxLxC, clean_BxLxC], axis=1)


def _colors(kernel: int, block_size: int, length: int) -> int:
  """How many blocks the taps of one row reach (its own and earlier ones), at most all."""
  return min(-(-(kernel - 1) // block_size) + 1, length // block_size)
