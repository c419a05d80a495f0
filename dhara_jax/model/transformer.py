"""The one decoder. Every family is a preset of `ModelConfig` switches over these modules."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from dhara_jax.config import ModelConfig
from dhara_jax.errors import ConfigError
from dhara_jax.model.attention import Attention
from dhara_jax.model.cache import Decode, cached_conv, decode_mask
from dhara_jax.model.conv import block_diffusion_conv, causal_depthwise_conv
from dhara_jax.model.canon import maybe_canon, torch_conv_init
from dhara_jax.model.layers import Dense, Embed, Norm, RopeTable, rope_table, soft_cap
from dhara_jax.model.mlp import Mlp
from dhara_jax.masks import (attention_mask, block_diffusion_mask, both_halves,
                                   check_block_size, segment_positions)
from dhara_jax.model.moe import MoeMlp

RESIDUAL_AXES = ("batch", "length", "act_embed")


class ShortConv(nn.Module):
  """LFM2's gated short convolution: (B, C, x) = in(h); out(C · conv(B · x))."""

  cfg: ModelConfig
  out_std: float
  block_size: int = 0  # > 0: x is the block-diffusion row [x_t ; x_0], segment ids x_0's

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, segment_ids_BxL: jax.Array,
               decode: Decode | None = None) -> jax.Array:
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    d_model = x_BxLxD.shape[-1]
    bcx_BxLx3D = Dense(3 * d_model, ("embed", "mlp"), cfg.use_bias, cfg.init_std, dtype,
                       name="in_proj")(x_BxLxD)
    bcx_BxLx3D = maybe_canon(cfg, "B", bcx_BxLx3D, segment_ids_BxL, "canon_b", self.block_size,
                             decode)
    b_BxLxD, c_BxLxD, h_BxLxD = jnp.split(bcx_BxLx3D, 3, axis=-1)
    w_KxD = self.param("conv", nn.with_logical_partitioning(torch_conv_init(cfg.conv_kernel),
                                                            ("conv_kernel", "mlp")),
                       (cfg.conv_kernel, d_model), jnp.float32)
    # The same causal conv as Canon's, so the same rule over [x_t ; x_0] in block mode.
    if decode is None:
      conv_BxLxD = block_diffusion_conv(causal_depthwise_conv, b_BxLxD * h_BxLxD, w_KxD,
                                        segment_ids_BxL, self.block_size)
    else:
      conv_BxLxD = cached_conv(self, causal_depthwise_conv, b_BxLxD * h_BxLxD, w_KxD, decode)
    y_BxLxD = c_BxLxD * conv_BxLxD
    return Dense(d_model, ("mlp", "embed"), cfg.use_bias, self.out_std, dtype,
                 name="out_proj")(y_BxLxD)


class Block(nn.Module):
  """Pre-norm residual block: mixer (attention or short conv), then MLP or MoE.

  With `sandwich_norm` each sub-layer output is normalised again before the residual add (Gemma).
  """

  cfg: ModelConfig
  kind: str  # a letter of ModelConfig.layer_pattern
  block_size: int = 0  # > 0: x is the block-diffusion row [x_t ; x_0], segment ids x_0's

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, rope: RopeTable | None, segment_ids_BxL: jax.Array,
               mask_Bx1xLxL: jax.Array | None, decode: Decode | None = None) -> jax.Array:
    cfg, block_size = self.cfg, self.block_size
    dtype = jnp.dtype(cfg.dtype)
    norm = lambda name: Norm(cfg.norm, cfg.norm_eps, cfg.norm_unit_offset, name=name)
    # GPT-2's scaled init of the projections that write into the residual stream.
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)

    h_BxLxD = norm("pre_mixer_norm")(x_BxLxD)
    h_BxLxD = maybe_canon(cfg, "A", h_BxLxD, segment_ids_BxL, "canon_a", block_size, decode)
    if self.kind == "C":
      h_BxLxD = ShortConv(cfg, out_std, block_size, name="conv")(h_BxLxD, segment_ids_BxL,
                                                                 decode)
    else:
      attention = Attention(cfg, out_std, local=self.kind == "L", block_size=block_size,
                            name="attn")
      h_BxLxD = attention(h_BxLxD, rope, mask_Bx1xLxL, segment_ids_BxL, decode)
    if cfg.sandwich_norm:
      h_BxLxD = norm("post_mixer_norm")(h_BxLxD)
    x_BxLxD = x_BxLxD + h_BxLxD

    h_BxLxD = norm("pre_mlp_norm")(x_BxLxD)
    h_BxLxD = maybe_canon(cfg, "C", h_BxLxD, segment_ids_BxL, "canon_c", block_size, decode)
    if cfg.num_experts:
      real_BxL = segment_ids_BxL > 0
      h_BxLxD = MoeMlp(cfg.num_experts, cfg.experts_per_token, cfg.moe_mlp_dim, cfg.mlp,
                       cfg.moe_norm_topk, cfg.init_std, out_std, dtype,
                       name="moe")(h_BxLxD, both_halves(real_BxL) if block_size else real_BxL)
    else:
      h_BxLxD = Mlp(cfg, out_std, block_size, name="mlp")(h_BxLxD, segment_ids_BxL, decode)
    if cfg.sandwich_norm:
      h_BxLxD = norm("post_mlp_norm")(h_BxLxD)
    return nn.with_logical_constraint(x_BxLxD + h_BxLxD, RESIDUAL_AXES)


class Transformer(nn.Module):
  """tokens B×L → logits B×L×V.

  `segment_ids` (B×L, ≥1 per document, 0 for padding) keep packed documents apart in attention
  and convolutions; `positions` default to each token's index inside its document. With
  `head=False` it returns the final normalised hidden states B×L×D instead, for a loss that
  applies the head itself (see `dhara_jax.model.output_head`).

  Block-diffusion mode (`block_size` > 0, a static int dividing L): tokens are B×2L, the row
  [x_t ; x_0]; segment ids and positions are x_0's (B×L), shared by both halves; the output
  covers all 2L rows. Attention uses masks.block_diffusion_mask whatever `cfg.attention` says
  (sliding-window layers intersect it with their window); Canon and short convs follow
  model/conv.py `block_diffusion_conv`.

  Cached mode (`decode`, model/cache.py): tokens are a chunk B×C run against the generation
  cache (the mutable `cache` collection); segment ids and positions come from `decode`.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL: jax.Array, segment_ids_BxL: jax.Array | None = None,
               positions_BxL: jax.Array | None = None, head: bool = True,
               block_size: int = 0, decode: Decode | None = None) -> jax.Array:
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    length = _stream_length(tokens_BxL, segment_ids_BxL, positions_BxL, block_size)
    if decode is not None:
      segment_ids_BxL = decode.valid_BxC(length).astype(jnp.int32)
      positions_BxL = decode.positions_BxC(length)
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones_like(tokens_BxL[:, :length])
    if positions_BxL is None:
      positions_BxL = segment_positions(segment_ids_BxL)
    if block_size:  # the two halves share positions
      positions_BxL = both_halves(positions_BxL)

    embed = Embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), cfg.init_std, dtype,
                  name="embed")
    x_BxLxD = embed(tokens_BxL)
    if cfg.embed_scale:
      x_BxLxD = x_BxLxD * jnp.asarray(math.sqrt(cfg.d_model), dtype)
    if cfg.position == "learned":
      x_BxLxD = x_BxLxD + Embed(cfg.max_seq_len, cfg.d_model, ("positions", "embed"),
                                cfg.init_std, dtype, name="pos_embed")(positions_BxL)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, RESIDUAL_AXES)

    def mask(window):
      if decode is not None:
        return decode_mask(decode, length, window)
      if block_size:
        return block_diffusion_mask(segment_ids_BxL, block_size, window=window)
      return attention_mask(segment_ids_BxL, causal=cfg.attention == "causal", window=window)

    masks = {"A": mask(0) if "A" in cfg.layer_pattern else None,
             "L": mask(cfg.sliding_window) if "L" in cfg.layer_pattern else None,
             "C": None}
    ropes = {kind: None for kind in "ALC"}
    if cfg.position == "rope":  # one table per theta, shared by all layers using it
      tables = {theta: rope_table(positions_BxL, cfg.resolved_head_dim, theta, cfg.max_seq_len)
                for theta in {cfg.rope_theta, cfg.local_rope_theta}}
      ropes.update(A=tables[cfg.rope_theta], L=tables[cfg.local_rope_theta])
    for i, kind in enumerate(cfg.layer_kinds):
      x_BxLxD = Block(cfg, kind, block_size, name=f"layers_{i}")(
          x_BxLxD, ropes[kind], segment_ids_BxL, masks[kind], decode)

    x_BxLxD = Norm(cfg.norm, cfg.norm_eps, cfg.norm_unit_offset, name="final_norm")(x_BxLxD)
    if not head:
      return x_BxLxD
    if cfg.tie_embeddings:
      logits_BxLxV = embed.attend(x_BxLxD)
    else:
      logits_BxLxV = Dense(cfg.vocab_size, ("embed", "vocab"), False, cfg.init_std, dtype,
                           out_dtype=jnp.float32, name="lm_head")(x_BxLxD)
    logits_BxLxV = soft_cap(logits_BxLxV, cfg.final_logit_softcap)
    return nn.with_logical_constraint(logits_BxLxV, ("batch", "length", "vocab"))


def _stream_length(tokens: jax.Array, segment_ids: jax.Array | None,
                   positions: jax.Array | None, block_size: int) -> int:
  """L, the length of the segment ids and positions: the tokens' own length, or half of it in
  block-diffusion mode (checked: one line naming what does not fit)."""
  if not block_size:
    return tokens.shape[1]
  batch, length = tokens.shape[0], tokens.shape[1] // 2
  if tokens.shape[1] % 2:
    raise ConfigError(f"block diffusion: tokens must be the 2L row [x_t ; x_0], got odd "
                      f"length {tokens.shape[1]}")
  check_block_size(length, block_size)
  for name, array in (("segment_ids", segment_ids), ("positions", positions)):
    if array is not None and tuple(array.shape) != (batch, length):
      raise ConfigError(f"block diffusion: {name} must be x_0's, B×L = {(batch, length)}, got "
                        f"shape {tuple(array.shape)}")
  return length
