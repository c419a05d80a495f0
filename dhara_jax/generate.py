"""Autoregressive sampling (no KV cache yet: every step re-reads the fixed-size canvas, which is
one compiled program for the whole generation)."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from dhara_jax.config import ModelConfig
from dhara_jax.model import forward


@functools.partial(jax.jit, static_argnums=(0, 3))
def _generate(cfg: ModelConfig, params: Any, canvas_1xT: jax.Array, prompt_len: int,
              temperature: jax.Array, key: jax.Array) -> jax.Array:
  def step(t, state):
    canvas, key = state
    logits_1xTxV, _ = forward(cfg, params, canvas)
    logits_V = jax.lax.dynamic_index_in_dim(logits_1xTxV[0], t - 1, keepdims=False)
    key, sub = jax.random.split(key)
    sampled = jax.random.categorical(sub, logits_V / jnp.maximum(temperature, 1e-6))
    token = jnp.where(temperature > 0, sampled, jnp.argmax(logits_V)).astype(canvas.dtype)
    return canvas.at[0, t].set(token), key

  canvas, _ = jax.lax.fori_loop(prompt_len, canvas_1xT.shape[1], step, (canvas_1xT, key))
  return canvas


def generate(cfg: ModelConfig, params: Any, prompt: Sequence[int], max_new_tokens: int,
             temperature: float = 0.0, seed: int = 0) -> list[int]:
  """Prompt continuation: greedy at temperature 0, else sampled. Returns the new tokens."""
  length = len(prompt) + max_new_tokens
  if not prompt or length > cfg.max_seq_len:
    raise ValueError(f"generate: need 1 <= prompt, prompt + new <= {cfg.max_seq_len}")
  canvas = jnp.zeros((1, length), jnp.int32).at[0, :len(prompt)].set(jnp.asarray(prompt))
  out = _generate(cfg, params, canvas, len(prompt), jnp.float32(temperature),
                  jax.random.key(seed))
  return [int(t) for t in out[0, len(prompt):]]
