"""The one decoder. Every family is a preset of `ModelConfig` switches over these modules."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from dhara_jax.config import ModelConfig
from dhara_jax.model.attention import Attention
from dhara_jax.model.conv import causal_depthwise_conv
from dhara_jax.model.canon import maybe_canon, torch_conv_init
from dhara_jax.model.layers import Dense, Embed, Norm, RopeTable, rope_table, soft_cap
from dhara_jax.model.mlp import Mlp
from dhara_jax.model.masks import attention_mask, segment_positions
from dhara_jax.model.moe import MoeMlp

RESIDUAL_AXES = ("batch", "length", "act_embed")


class ShortConv(nn.Module):
  """LFM2's gated short convolution: (B, C, x) = in(h); out(C · conv(B · x))."""

  cfg: ModelConfig
  out_std: float

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, segment_ids_BxL: jax.Array) -> jax.Array:
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    d_model = x_BxLxD.shape[-1]
    bcx_BxLx3D = Dense(3 * d_model, ("embed", "mlp"), cfg.use_bias, cfg.init_std, dtype,
                       name="in_proj")(x_BxLxD)
    bcx_BxLx3D = maybe_canon(cfg, "B", bcx_BxLx3D, segment_ids_BxL, "canon_b")
    b_BxLxD, c_BxLxD, h_BxLxD = jnp.split(bcx_BxLx3D, 3, axis=-1)
    w_KxD = self.param("conv", nn.with_logical_partitioning(torch_conv_init(cfg.conv_kernel),
                                                            ("conv_kernel", "mlp")),
                       (cfg.conv_kernel, d_model), jnp.float32)
    y_BxLxD = c_BxLxD * causal_depthwise_conv(b_BxLxD * h_BxLxD, w_KxD, segment_ids_BxL)
    return Dense(d_model, ("mlp", "embed"), cfg.use_bias, self.out_std, dtype,
                 name="out_proj")(y_BxLxD)


class Block(nn.Module):
  """Pre-norm residual block: mixer (attention or short conv), then MLP or MoE.

  With `sandwich_norm` each sub-layer output is normalised again before the residual add (Gemma).
  """

  cfg: ModelConfig
  kind: str  # a letter of ModelConfig.layer_pattern

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, rope: RopeTable | None, segment_ids_BxL: jax.Array,
               mask_Bx1xLxL: jax.Array | None) -> jax.Array:
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    norm = lambda name: Norm(cfg.norm, cfg.norm_eps, cfg.norm_unit_offset, name=name)
    # GPT-2's scaled init of the projections that write into the residual stream.
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)

    h_BxLxD = norm("pre_mixer_norm")(x_BxLxD)
    h_BxLxD = maybe_canon(cfg, "A", h_BxLxD, segment_ids_BxL, "canon_a")
    if self.kind == "C":
      h_BxLxD = ShortConv(cfg, out_std, name="conv")(h_BxLxD, segment_ids_BxL)
    else:
      attention = Attention(cfg, out_std, local=self.kind == "L", name="attn")
      h_BxLxD = attention(h_BxLxD, rope, mask_Bx1xLxL, segment_ids_BxL)
    if cfg.sandwich_norm:
      h_BxLxD = norm("post_mixer_norm")(h_BxLxD)
    x_BxLxD = x_BxLxD + h_BxLxD

    h_BxLxD = norm("pre_mlp_norm")(x_BxLxD)
    h_BxLxD = maybe_canon(cfg, "C", h_BxLxD, segment_ids_BxL, "canon_c")
    if cfg.num_experts:
      h_BxLxD = MoeMlp(cfg.num_experts, cfg.experts_per_token, cfg.moe_mlp_dim, cfg.mlp,
                       cfg.moe_norm_topk, cfg.init_std, out_std, dtype,
                       name="moe")(h_BxLxD, segment_ids_BxL > 0)
    else:
      h_BxLxD = Mlp(cfg, out_std, name="mlp")(h_BxLxD, segment_ids_BxL)
    if cfg.sandwich_norm:
      h_BxLxD = norm("post_mlp_norm")(h_BxLxD)
    return nn.with_logical_constraint(x_BxLxD + h_BxLxD, RESIDUAL_AXES)


class Transformer(nn.Module):
  """tokens B×L → logits B×L×V.

  `segment_ids` (B×L, ≥1 per document, 0 for padding) keep packed documents apart in attention
  and convolutions; `positions` default to each token's index inside its document. With
  `head=False` it returns the final normalised hidden states B×L×D instead, for a loss that
  applies the head itself (see `dhara_jax.model.output_head`).
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL: jax.Array, segment_ids_BxL: jax.Array | None = None,
               positions_BxL: jax.Array | None = None, head: bool = True) -> jax.Array:
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones_like(tokens_BxL)
    if positions_BxL is None:
      positions_BxL = segment_positions(segment_ids_BxL)

    embed = Embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), cfg.init_std, dtype,
                  name="embed")
    x_BxLxD = embed(tokens_BxL)
    if cfg.embed_scale:
      x_BxLxD = x_BxLxD * jnp.asarray(math.sqrt(cfg.d_model), dtype)
    if cfg.position == "learned":
      x_BxLxD = x_BxLxD + Embed(cfg.max_seq_len, cfg.d_model, ("positions", "embed"),
                                cfg.init_std, dtype, name="pos_embed")(positions_BxL)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, RESIDUAL_AXES)

    causal = cfg.attention == "causal"
    masks = {"A": attention_mask(segment_ids_BxL, causal=causal) if "A" in cfg.layer_pattern
                  else None,
             "L": attention_mask(segment_ids_BxL, causal=causal, window=cfg.sliding_window)
                  if "L" in cfg.layer_pattern else None,
             "C": None}
    ropes = {kind: None for kind in "ALC"}
    if cfg.position == "rope":  # one table per theta, shared by all layers using it
      tables = {theta: rope_table(positions_BxL, cfg.resolved_head_dim, theta, cfg.max_seq_len)
                for theta in {cfg.rope_theta, cfg.local_rope_theta}}
      ropes.update(A=tables[cfg.rope_theta], L=tables[cfg.local_rope_theta])
    for i, kind in enumerate(cfg.layer_kinds):
      x_BxLxD = Block(cfg, kind, name=f"layers_{i}")(x_BxLxD, ropes[kind], segment_ids_BxL,
                                                    masks[kind])

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
