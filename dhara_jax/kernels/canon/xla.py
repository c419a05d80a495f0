"""XLA path: the conv as one grouped `lax.conv_general_dilated` (feature_group_count = C).

Without segment ids this is a plain depthwise conv. With them, the conv emits every tap
separately (K output features per channel, the kernel is diag(w)) and each tap is masked before
the taps are summed: exact, at the cost of a K× wider intermediate. The weight gradient is XLA's
own transpose of the same conv. Everything is computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dhara_jax.kernels.canon.common import same_segment

_DIMS = ("NWC", "WIO", "NWC")


def _grouped_conv(x_BxLxC: jax.Array, kernel_KxO: jax.Array,
                  padding: tuple[int, int]) -> jax.Array:
  """Depthwise conv with O/C outputs per channel (output o reads channel o // (O/C))."""
  return jax.lax.conv_general_dilated(x_BxLxC, kernel_KxO[:, None, :], (1,), [padding],
                                      dimension_numbers=_DIMS,
                                      feature_group_count=x_BxLxC.shape[-1])


def _conv_f32(x_BxLxC: jax.Array, w_KxC: jax.Array, seg_BxL: jax.Array | None,
              reverse: bool) -> jax.Array:
  kernel, channels = w_KxC.shape
  # conv_general_dilated correlates: window slot p reads t + p - (K-1) (causal padding) or t + p
  # (anti-causal padding); the anti-causal conv uses the taps in reverse order.
  padding = (0, kernel - 1) if reverse else (kernel - 1, 0)
  w_KxC = w_KxC.astype(jnp.float32)[::-1] if reverse else w_KxC.astype(jnp.float32)
  x_BxLxC = x_BxLxC.astype(jnp.float32)
  if seg_BxL is None:
    return _grouped_conv(x_BxLxC, w_KxC, padding)
  # Output feature c·K + p holds slot p of channel c: kernel[p, 0, c·K + q] = w[p, c]·[p == q].
  w_KxCxK = w_KxC[:, :, None] * jnp.eye(kernel, dtype=jnp.float32)[:, None, :]
  taps_BxLxCK = _grouped_conv(x_BxLxC, w_KxCxK.reshape(kernel, channels * kernel), padding)
  taps_BxLxCxK = taps_BxLxCK.reshape(*x_BxLxC.shape, kernel)
  backs = [-p for p in range(kernel)] if reverse else [kernel - 1 - p for p in range(kernel)]
  same_BxLxK = jnp.stack([same_segment(seg_BxL, back) for back in backs], axis=-1)
  return jnp.sum(jnp.where(same_BxLxK[:, :, None, :], taps_BxLxCxK, 0.0), axis=-1)


def conv(x_BxLxC: jax.Array, w_KxC: jax.Array, seg_BxL: jax.Array | None = None, *,
         reverse: bool = False) -> jax.Array:
  """out[t] = Σ_j w[K-1-j] · x[t-j] (reverse: x[t+j]), j over taps in the same segment."""
  return _conv_f32(x_BxLxC, w_KxC, seg_BxL, reverse).astype(x_BxLxC.dtype)


def weight_grad(x_BxLxC: jax.Array, g_BxLxC: jax.Array, seg_BxL: jax.Array | None,
                kernel: int) -> jax.Array:
  """dw (float32 K×C): the transpose of the (linear in w) conv, applied to g."""
  w0_KxC = jnp.zeros((kernel, x_BxLxC.shape[-1]), jnp.float32)
  _, pullback = jax.vjp(lambda w_KxC: _conv_f32(x_BxLxC, w_KxC, seg_BxL, False), w0_KxC)
  return pullback(g_BxLxC.astype(jnp.float32))[0]
