"""Shift-and-add oracle for the Canon / LFM2 causal depthwise conv.

Tap K-1 multiplies the current token and tap 0 the token K-1 back, as PyTorch's Conv1d with
padding K-1 truncated to the input length does. Taps that would read another document of a packed
sequence (segment ids differ) read zero instead. Products and sums are float32; the output has
x's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dhara_jax.kernels.canon.common import same_segment, shift_time, tap_offsets


def _masked_tap(x_BxLxC: jax.Array, seg_BxL: jax.Array | None, back: int) -> jax.Array:
  """x[t - back] in float32, zero where it lies outside the sequence or in another document."""
  tap_BxLxC = shift_time(x_BxLxC, back).astype(jnp.float32)
  if seg_BxL is None or back == 0:
    return tap_BxLxC
  return jnp.where(same_segment(seg_BxL, back)[..., None], tap_BxLxC, 0.0)


def conv(x_BxLxC: jax.Array, w_KxC: jax.Array, seg_BxL: jax.Array | None = None, *,
         reverse: bool = False) -> jax.Array:
  """out[t] = Σ_j w[K-1-j] · x[t-j] (reverse: x[t+j]), j over taps in the same segment."""
  w_KxC = w_KxC.astype(jnp.float32)
  out_BxLxC = jnp.zeros(x_BxLxC.shape, jnp.float32)
  for k, back in tap_offsets(w_KxC.shape[0], reverse):
    out_BxLxC = out_BxLxC + _masked_tap(x_BxLxC, seg_BxL, back) * w_KxC[k]
  return out_BxLxC.astype(x_BxLxC.dtype)


def causal_depthwise_conv(x_BxLxC: jax.Array, w_KxC: jax.Array,
                          segment_ids_BxL: jax.Array | None = None) -> jax.Array:
  """The oracle: the causal conv, differentiable with plain `jax.grad`."""
  return conv(x_BxLxC, w_KxC, segment_ids_BxL)


def weight_grad(x_BxLxC: jax.Array, g_BxLxC: jax.Array, seg_BxL: jax.Array | None,
                kernel: int) -> jax.Array:
  """dw[k, c] = Σ_{b,t} g[b,t,c] · x[b, t-(K-1-k), c] over same-segment taps (float32 K×C)."""
  g_BxLxC = g_BxLxC.astype(jnp.float32)
  rows = {k: jnp.sum(g_BxLxC * _masked_tap(x_BxLxC, seg_BxL, back), axis=(0, 1))
          for k, back in tap_offsets(kernel, reverse=False)}
  return jnp.stack([rows[k] for k in range(kernel)])
