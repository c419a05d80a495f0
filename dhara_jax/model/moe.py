"""Mixture-of-experts MLP: top-k softmax router, gated experts, load-balancing loss.

Tokens are sorted by expert and run through `jax.lax.ragged_dot`, so every expert computes only
the tokens routed to it and no token is dropped (no capacity factor).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dhara_jax.model.layers import activation, param_init


class MoeMlp(nn.Module):
  num_experts: int
  experts_per_token: int
  hidden: int
  kind: str = "swiglu"
  normalize_topk: bool = True
  init_std: float = 0.02
  out_std: float = 0.02
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, token_mask_BxL: jax.Array) -> jax.Array:
    d_model = x_BxLxD.shape[-1]
    experts, top_k, hidden = self.num_experts, self.experts_per_token, self.hidden
    router_DxE = self.param("router", param_init(self.init_std, ("embed", "expert")),
                            (d_model, experts), jnp.float32)
    gate_ExDxF = self.param("gate", param_init(self.init_std, ("expert", "embed", "mlp")),
                            (experts, d_model, hidden), jnp.float32)
    up_ExDxF = self.param("up", param_init(self.init_std, ("expert", "embed", "mlp")),
                          (experts, d_model, hidden), jnp.float32)
    down_ExFxD = self.param("down", param_init(self.out_std, ("expert", "mlp", "embed")),
                            (experts, hidden, d_model), jnp.float32)

    x_NxD = x_BxLxD.reshape(-1, d_model).astype(self.dtype)
    logits_NxE = jnp.dot(x_NxD.astype(jnp.float32), router_DxE)
    probs_NxE = jax.nn.softmax(logits_NxE, axis=-1)
    weights_NxK, expert_NxK = jax.lax.top_k(probs_NxE, top_k)
    if self.normalize_topk:
      weights_NxK = weights_NxK / jnp.sum(weights_NxK, axis=-1, keepdims=True)
    self.sow("intermediates", "moe_aux_loss",
             load_balancing_loss(probs_NxE, expert_NxK, token_mask_BxL.reshape(-1)))

    # Sort the N·K (token, expert) assignments by expert so each expert sees one contiguous run.
    expert_A = expert_NxK.reshape(-1)
    order_A = jnp.argsort(expert_A, stable=True)
    xs_AxD = x_NxD[order_A // top_k]
    group_sizes_E = jnp.bincount(expert_A, length=experts).astype(jnp.int32)
    ragged = lambda lhs, rhs: jax.lax.ragged_dot(lhs, rhs.astype(self.dtype), group_sizes_E)
    act = activation(self.kind)
    h_AxF = act(ragged(xs_AxD, gate_ExDxF)) * ragged(xs_AxD, up_ExDxF)
    ys_AxD = ragged(h_AxF, down_ExFxD)
    y_NxKxD = jnp.zeros_like(ys_AxD).at[order_A].set(ys_AxD).reshape(-1, top_k, d_model)
    y_NxD = jnp.einsum("nkd,nk->nd", y_NxKxD, weights_NxK.astype(self.dtype))
    return y_NxD.reshape(x_BxLxD.shape)


def load_balancing_loss(probs_NxE: jax.Array, expert_NxK: jax.Array,
                        token_mask_N: jax.Array) -> jax.Array:
  """Switch-style E · Σ_e f_e · P_e over real tokens (f_e: assignments per token, P_e: mean prob).

  Equals transformers' `load_balancing_loss_func` for one layer; 1·k when perfectly balanced.
  """
  experts = probs_NxE.shape[-1]
  mask_N1 = token_mask_N.astype(jnp.float32)[:, None]
  count = jnp.maximum(jnp.sum(mask_N1), 1.0)
  assigned_NxE = jax.nn.one_hot(expert_NxK, experts).sum(axis=1)
  fraction_E = jnp.sum(assigned_NxE * mask_N1, axis=0) / count
  mean_prob_E = jnp.sum(probs_NxE * mask_N1, axis=0) / count
  return experts * jnp.sum(fraction_E * mean_prob_E)
