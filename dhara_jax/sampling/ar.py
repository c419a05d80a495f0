"""Autoregressive decoding with a KV cache: one compiled program per (batch, prompt bucket, new
tokens, settings) — the prompt's prefill, then a `while_loop` of single-token steps over a
static cache that stops once every row has met EOS.

Rows are left-padded to a common prompt length (sampling/rows.py); model/cache.py keeps the
padding out of attention and convolutions, so a row decodes as it would alone. `cached=False`
recomputes the whole canvas at every step instead: the reference the cache must equal.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from dhara_jax.config import ModelConfig
from dhara_jax.model import apply_head, forward, forward_cached, init_cache
from dhara_jax.model.cache import Decode
from dhara_jax.sampling.settings import Sampling


def best(logits_xV: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(max, argmax) over the last axis, the first index on ties. On CPU through top_k: XLA:CPU's
  argmax reduction is 3–10× slower than top_k over a 4k vocabulary, a fifth of a decode step."""
  def top_1(x):
    values, indices = jax.lax.top_k(x, 1)
    return values[..., 0], indices[..., 0].astype(jnp.int32)

  def arg_max(x):
    return jnp.max(x, axis=-1), jnp.argmax(x, axis=-1).astype(jnp.int32)

  return jax.lax.platform_dependent(logits_xV, cpu=top_1, default=arg_max)


def sample_tokens(logits_BxV: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
  """Greedy at temperature 0, else a draw from softmax(logits / T) cut to the `top_k` most
  likely tokens and to the smallest set whose probability reaches `top_p`."""
  if s.temperature == 0:
    return best(logits_BxV)[1]
  logits_BxV = logits_BxV.astype(jnp.float32) / s.temperature
  floor = jnp.finfo(jnp.float32).min
  if s.top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, min(s.top_k, logits_BxV.shape[-1]))[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, floor, logits_BxV)
  if s.top_p < 1:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep every token up to the first whose cumulative probability reaches top_p.
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    cutoff_Bx1 = jnp.min(jnp.where(before_BxV < s.top_p, sorted_BxV, jnp.inf), axis=-1,
                         keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, floor, logits_BxV)
  return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "s", "eos_id", "cached"))
def decode(cfg: ModelConfig, params: Any, prompt_BxP: jax.Array, first_B: jax.Array,
           key: jax.Array, *, s: Sampling, eos_id: int | None, cached: bool = True
           ) -> tuple[jax.Array, jax.Array]:
  """(new tokens B×G, forward passes) for left-padded prompts whose real tokens start at slot
  `first_B`. After a row's EOS its tokens are EOS."""
  batch, prompt_len = prompt_BxP.shape
  new_tokens = s.max_new_tokens
  length = prompt_len + new_tokens
  eos = -1 if eos_id is None else eos_id  # -1: no token is EOS
  fill = max(eos, 0)
  canvas_BxT = jnp.concatenate([prompt_BxP, jnp.full((batch, new_tokens), fill, jnp.int32)], 1)
  at = lambda slot: Decode(jnp.asarray(slot, jnp.int32), first_B, length)

  if cached:
    hidden_BxPxD, carry = forward_cached(cfg, params, prompt_BxP, init_cache(cfg, batch, length),
                                         at(0), head=False)
    last_BxV = apply_head(cfg, params, hidden_BxPxD[:, -1:])[:, 0]  # the prompt's last row only
  else:
    carry = None
    last_BxV = _uncached_logits(cfg, params, canvas_BxT, first_B, prompt_len - 1)

  def step(carry, canvas_BxT, t):
    """The logits after the token at slot P + t − 1."""
    slot = prompt_len + t - 1
    if not cached:
      return _uncached_logits(cfg, params, canvas_BxT, first_B, slot), carry
    token_Bx1 = jax.lax.dynamic_slice_in_dim(canvas_BxT, slot, 1, axis=1)
    logits_Bx1xV, carry = forward_cached(cfg, params, token_Bx1, carry, at(slot))
    return logits_Bx1xV[:, 0], carry

  def sample(logits_BxV, key, done_B):
    token_B = sample_tokens(logits_BxV, key, s)
    return jnp.where(done_B, fill, token_B)

  def cond(state):
    t, _, _, done_B, _ = state
    return (t < new_tokens) & ~jnp.all(done_B)

  def body(state):
    t, canvas_BxT, carry, done_B, key = state
    logits_BxV, carry = step(carry, canvas_BxT, t)
    key, sub = jax.random.split(key)
    token_B = sample(logits_BxV, sub, done_B)
    canvas_BxT = jax.lax.dynamic_update_slice(canvas_BxT, token_B[:, None], (0, prompt_len + t))
    return t + 1, canvas_BxT, carry, done_B | ended(canvas_BxT, prompt_len + t), key

  def ended(canvas_BxT, slot):
    """Whether the token at `slot` is EOS or ends one of the stop sequences."""
    end_B = canvas_BxT[:, slot] == eos
    for stop in s.stop:
      if len(stop) <= new_tokens:
        start = jnp.maximum(slot - len(stop) + 1, prompt_len)  # inside the new tokens
        tail_BxN = jax.lax.dynamic_slice_in_dim(canvas_BxT, start, len(stop), axis=1)
        end_B |= (slot - len(stop) + 1 >= prompt_len) & jnp.all(
            tail_BxN == jnp.asarray(stop, jnp.int32), axis=1)
    return end_B

  key, sub = jax.random.split(key)
  first_token_B = sample(last_BxV, sub, jnp.zeros((batch,), bool))
  canvas_BxT = canvas_BxT.at[:, prompt_len].set(first_token_B)
  done_B = ended(canvas_BxT, prompt_len)
  t, canvas_BxT, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), canvas_BxT, carry,
                                                           done_B, key))
  return canvas_BxT[:, prompt_len:], t  # the prefill and t − 1 steps


def _uncached_logits(cfg, params, canvas_BxT, first_B, slot):
  """The logits at `slot` of the full causal forward over the canvas (padding as segment 0)."""
  segment_ids_BxT = (jnp.arange(canvas_BxT.shape[1])[None, :] >= first_B[:, None]).astype(
      jnp.int32)
  logits_BxTxV, _ = forward(cfg, params, canvas_BxT, segment_ids_BxT)
  return jax.lax.dynamic_index_in_dim(logits_BxTxV, slot, axis=1, keepdims=False)
