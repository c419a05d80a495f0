"""Dense MLP: GELU (GPT-2) or gated GLU (SwiGLU / GeGLU), with the optional Canon D layer."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dhara_jax.config import ModelConfig
from dhara_jax.model.cache import Decode
from dhara_jax.model.canon import maybe_canon
from dhara_jax.model.layers import Dense, activation


class Mlp(nn.Module):
  """GELU MLP (up → act → down) or gated GLU (act(gate) · up → down); Canon D on the
  activation."""

  cfg: ModelConfig
  out_std: float
  block_size: int = 0  # > 0: x is the block-diffusion row [x_t ; x_0] (for Canon D)

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, segment_ids_BxL: jax.Array,
               decode: Decode | None = None) -> jax.Array:
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    dense = lambda features, axes, std, name: Dense(features, axes, cfg.use_bias, std, dtype,
                                                     name=name)
    act = activation(cfg.mlp)
    up_BxLxF = dense(cfg.mlp_dim, ("embed", "mlp"), cfg.init_std, "up")(x_BxLxD)
    if cfg.mlp == "gelu":
      h_BxLxF = act(up_BxLxF)
    else:
      gate_BxLxF = dense(cfg.mlp_dim, ("embed", "mlp"), cfg.init_std, "gate")(x_BxLxD)
      h_BxLxF = act(gate_BxLxF) * up_BxLxF
    h_BxLxF = maybe_canon(cfg, "D", h_BxLxF, segment_ids_BxL, "canon_d", self.block_size,
                          decode)
    return dense(x_BxLxD.shape[-1], ("mlp", "embed"), self.out_std, "down")(h_BxLxF)
