"""Causal depthwise 1-D convolution (LFM2 short conv; Canon layers build on the same op).

Tap K-1 multiplies the current token and tap 0 the token K-1 back, as PyTorch's Conv1d with
padding K-1 truncated to the input length does. Taps that would read another document of a packed
sequence read zero instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def shift_right(x_BxLx: jax.Array, shift: int) -> jax.Array:
  """x[:, t - shift] with zeros where t < shift."""
  pad = [(0, 0)] * x_BxLx.ndim
  pad[1] = (shift, 0)
  return jnp.pad(x_BxLx, pad)[:, :x_BxLx.shape[1]]


def causal_depthwise_conv(x_BxLxC: jax.Array, w_KxC: jax.Array,
                          segment_ids_BxL: jax.Array | None = None) -> jax.Array:
  """Shift-and-add reference: out[t] = Σ_j w[K-1-j] · x[t-j], j over taps in the same segment."""
  kernel = w_KxC.shape[0]
  w_KxC = w_KxC.astype(x_BxLxC.dtype)
  out_BxLxC = x_BxLxC * w_KxC[kernel - 1]
  for back in range(1, kernel):
    tap_BxLxC = shift_right(x_BxLxC, back)
    if segment_ids_BxL is not None:
      same_doc_BxL = shift_right(segment_ids_BxL, back) == segment_ids_BxL
      tap_BxLxC = tap_BxLxC * same_doc_BxL[..., None].astype(x_BxLxC.dtype)
    out_BxLxC = out_BxLxC + tap_BxLxC * w_KxC[kernel - 1 - back]
  return out_BxLxC
