"""Masked-diffusion samplers over a static canvas [prompt, MASK × G], each one jitted program.

LLaDA's semi-autoregressive sampler: the G new tokens are decoded in blocks, left to right; each
denoising step predicts every masked token of the block and commits some of them, by rank (no
dynamic shapes): the most confident ones on a fixed schedule (low-confidence remasking; random
remasking ranks random scores), or, with a threshold τ, every one whose confidence is ≥ τ and at
least the best one (Fast-dLLM). Label alignment is the AR shift: slot j is predicted by the
logits at j − 1, a block's first slot by the clean stream's last position before it.

Where the logits of a step come from (`Sampling.cache`):
- "none": a forward over the whole canvas at every step; for a model trained with the `block`
  objective, its training forward over [x_t ; x_0] (x_t block k sees itself and x_0 blocks < k).
- "block": the exact block KV cache (BD3LM / SDAR commit-on-finish). A step runs only the
  block's tokens against the cache of the clean prefix; a finished block's keys, values and conv
  tails are written by one forward over the clean block, whose last logits predict the next
  block's first token. That commit forward is the next block's first step too: one chunk of
  [clean block k ; masked block k + 1], block-causal, as the training forward's x_0 and x_t
  halves see each other (the prompt rides on block 0's first step the same way). So every
  forward is a denoising step, and the result equals "none" on a block-trained model.
- "approx": Fast-dLLM's cache of a full-sequence (`mdm`) model: each block's first step is a
  forward over the whole canvas that also caches every slot's keys and values; its later steps
  run the block (and the slot before it) against that cache, whose prefix and suffix are then
  stale: approximate.

Blocks are aligned to slot multiples of the block length (prompts are left-padded to one), so
the block structure is the training forward's.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dhara_jax.config import ModelConfig
from dhara_jax.errors import DharaError
from dhara_jax.model import apply_head, forward, forward_cached, init_cache
from dhara_jax.model.cache import Decode
from dhara_jax.phases import Phase
from dhara_jax.sampling.ar import best
from dhara_jax.sampling.rows import finished_rows, left_padded
from dhara_jax.sampling.settings import Generation, Sampling

log = logging.getLogger(__name__)


def generate(model: ModelConfig, params: Any, prompts: Sequence[Sequence[int]], s: Sampling,
             phase: Phase, eos_id: int | None) -> Generation:
  if model.mask_token_id < 0:
    raise DharaError("generate: the model's mask_token_id is unresolved (-1); set "
                     "model.mask_token_id to the tokenizer's <mask> id")
  block, steps = block_and_steps(s, phase)
  cache = resolve_cache(s.cache, phase)
  prompt_BxP, first_B = left_padded(prompts, block)
  tokens_BxG, forwards = sample(model, params, prompt_BxP, first_B, jax.random.key(s.seed),
                                s=s, block=block, steps=steps, cache=cache,
                                block_trained=phase.objective == "block", eos_id=eos_id)
  return finished_rows(np.asarray(tokens_BxG), int(forwards), eos_id, s.stop)


def block_and_steps(s: Sampling, phase: Phase) -> tuple[int, int]:
  """(block length, denoising steps per block), checked: one line for what does not divide."""
  new = s.max_new_tokens
  block = s.block_length or default_block(new, phase)
  if new % block:
    raise DharaError(f"generate: max_new_tokens ({new}) must be a multiple of block_length "
                     f"({block})")
  blocks = new // block
  steps = s.steps or new
  if steps % blocks or steps > new:
    raise DharaError(f"generate: steps ({steps}) must divide across the {blocks} blocks of "
                     f"{block} tokens and be at most max_new_tokens ({new})")
  return block, steps // blocks


def default_block(new_tokens: int, phase: Phase) -> int:
  """The trained block size, or its largest divisor of G below it; G for full-sequence models."""
  if phase.objective != "block":
    return new_tokens
  return max(b for b in range(1, min(phase.block_size, new_tokens) + 1) if new_tokens % b == 0)


def resolve_cache(cache: str, phase: Phase) -> str:
  if cache == "auto":
    return "block" if phase.objective == "block" else "none"
  if cache == "block" and phase.objective != "block":
    log.warning("generate: cache=block is exact for models trained with the block objective; "
                "this %s model fits cache=approx (Fast-dLLM's) or cache=none", phase.objective)
  if cache == "approx" and phase.objective == "block":
    log.warning("generate: cache=approx is the approximate cache of a full-sequence model; "
                "this block-trained model fits cache=block (exact)")
  return cache


@functools.partial(jax.jit, static_argnames=("cfg", "s", "block", "steps", "cache",
                                             "block_trained", "eos_id"))
def sample(cfg: ModelConfig, params: Any, prompt_BxP: jax.Array, first_B: jax.Array,
           key: jax.Array, *, s: Sampling, block: int, steps: int, cache: str,
           block_trained: bool, eos_id: int | None) -> tuple[jax.Array, jax.Array]:
  """(new tokens B×G, forward passes): the prompt is left-padded to a multiple of `block`;
  `steps` denoising steps per block (with a threshold: until the block has no masks). Every
  forward is a denoising step: the block cache's commit of block k rides on block k + 1's first
  step, the approximate cache's refresh is its block's first step."""
  batch, prompt_len = prompt_BxP.shape
  new_tokens, mask_id = s.max_new_tokens, cfg.mask_token_id
  length = prompt_len + new_tokens
  eos = -1 if eos_id is None else eos_id
  canvas_BxT = jnp.concatenate([prompt_BxP, jnp.full((batch, new_tokens), mask_id, jnp.int32)],
                               axis=1)
  segment_ids_BxT = (jnp.arange(length)[None, :] >= first_B[:, None]).astype(jnp.int32)
  at = lambda start, chunk_block, **kw: Decode(jnp.asarray(start, jnp.int32), first_B, length,
                                               chunk_block, **kw)
  window = lambda x, start, size: jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)
  head = lambda hidden: apply_head(cfg, params, hidden)

  # first(canvas, start, carry, chunk_start, chunk_len) and later(canvas, start, carry) give the
  # predictions B×b×V of the block at `start` (from the logits one slot before each) and the
  # carry; `first` is a block's first step, over the chunk [chunk_start, chunk_start + len).
  if cache == "none":
    def later(canvas, start, carry):
      if not block_trained:
        return window(forward(cfg, params, canvas, segment_ids_BxT)[0], start - 1, block)
      out_Bx2TxV = forward(cfg, params, jnp.concatenate([canvas, canvas], axis=1),
                           segment_ids_BxT, block_size=block)[0]
      noisy = window(out_Bx2TxV[:, :length], start - 1, block)
      return noisy.at[:, 0].set(out_Bx2TxV[:, length + start - 1])  # the clean stream's

    def first(canvas, start, carry, chunk_start, chunk_len):
      return later(canvas, start, carry), carry
  elif cache == "block":
    def first(canvas, start, carry, chunk_start, chunk_len):
      """The clean block before (or the prompt) and this block's masks in one chunk: the clean
      part is committed to the cache, its last row predicts this block's first slot."""
      hidden, kv = forward_cached(cfg, params, window(canvas, chunk_start, chunk_len), carry[0],
                                  at(chunk_start, block, tail_end=start), head=False)
      preds = head(window(hidden, start - 1 - chunk_start, block))
      return preds, (kv, preds[:, 0])

    def later(canvas, start, carry):
      kv, first_BxV = carry
      hidden, _ = forward_cached(cfg, params, window(canvas, start, block), kv, at(start, block),
                                 head=False)
      return jnp.concatenate([first_BxV[:, None], head(hidden[:, :-1])], axis=1)
  else:  # approx
    def first(canvas, start, carry, chunk_start, chunk_len):
      """The whole canvas: this step's predictions, and every slot's keys and values."""
      logits, kv = forward_cached(cfg, params, canvas, carry, at(0, length, tail_end=start - 1))
      return window(logits, start - 1, block), kv

    def later(canvas, start, carry):
      """The block and the slot before it against the block start's (stale) cache."""
      logits, _ = forward_cached(cfg, params, window(canvas, start - 1, block + 1), carry,
                                 at(start - 1, block + 1, see_after=True))
      return logits[:, :-1]

  def denoise(canvas, start, carry, key, forwards, chunk_start, chunk_len):
    """One block: its first step, then the rest. Returns (canvas, carry, key, forwards)."""
    def commit_step(preds_BxbxV, canvas, key, t):
      key, sub = jax.random.split(key)
      tokens_Bxb = commit(preds_BxbxV, window(canvas, start, block), sub, t, s, steps, block,
                          mask_id)
      return jax.lax.dynamic_update_slice_in_dim(canvas, tokens_Bxb, start, axis=1), key

    preds, carry = first(canvas, start, carry, chunk_start, chunk_len)
    canvas, key = commit_step(preds, canvas, key, 0)

    def cond(state):
      t, canvas, _ = state
      if s.threshold:  # each step commits ≥ 1 token of each row: at most `block` steps
        return (t < block) & jnp.any(window(canvas, start, block) == mask_id)
      return t < steps

    def body(state):
      t, canvas, key = state
      return (t + 1, *commit_step(later(canvas, start, carry), canvas, key, t))

    t, canvas, key = jax.lax.while_loop(cond, body, (jnp.int32(1), canvas, key))
    return canvas, carry, key, forwards + t

  carry = {"block": lambda: (init_cache(cfg, batch, length), None),
           "approx": lambda: init_cache(cfg, batch, length), "none": lambda: None}[cache]()
  # Block 0's first chunk is the prompt and the block; block k's, blocks k − 1 and k.
  canvas, carry, key, forwards = denoise(canvas_BxT, prompt_len, carry, key, jnp.int32(0), 0,
                                         prompt_len + block)

  def all_ended(canvas, end):
    seen = (jnp.arange(length) >= prompt_len) & (jnp.arange(length) < end)
    return jnp.all(jnp.any((canvas == eos) & seen[None], axis=1))

  def block_cond(state):
    k, canvas, *_ = state
    return (k < new_tokens // block) & ~all_ended(canvas, prompt_len + k * block)

  def block_body(state):
    k, canvas, carry, key, forwards = state
    start = prompt_len + k * block
    return (k + 1, *denoise(canvas, start, carry, key, forwards, start - block, 2 * block))

  _, canvas, _, _, forwards = jax.lax.while_loop(
      block_cond, block_body, (jnp.int32(1), canvas, carry, key, forwards))
  new_BxG = canvas[:, prompt_len:]
  after_eos_BxG = jnp.cumsum(new_BxG == eos, axis=1) - (new_BxG == eos) > 0
  return jnp.where(after_eos_BxG | (new_BxG == mask_id), max(eos, 0), new_BxG), forwards


def commit(preds_BxbxV: jax.Array, tokens_Bxb: jax.Array, key: jax.Array, t: jax.Array,
           s: Sampling, steps: int, block: int, mask_id: int) -> jax.Array:
  """The block's tokens after one denoising step at step `t` of `steps`."""
  preds_BxbxV = preds_BxbxV.astype(jnp.float32).at[..., mask_id].set(-jnp.inf)
  noise_key, rank_key = jax.random.split(key)
  top_Bxb, candidates_Bxb = best(preds_BxbxV)
  if s.temperature:
    gumbel = jax.random.gumbel(noise_key, preds_BxbxV.shape)
    candidates_Bxb = best(preds_BxbxV / s.temperature + gumbel)[1]
  if s.remasking == "random":
    confidence_Bxb = jax.random.uniform(rank_key, tokens_Bxb.shape)
  else:  # the softmax probability of the candidate
    chosen_Bxb = jnp.take_along_axis(preds_BxbxV, candidates_Bxb[..., None], -1)[..., 0]
    confidence_Bxb = jnp.exp(chosen_Bxb - top_Bxb) / jnp.sum(
        jnp.exp(preds_BxbxV - top_Bxb[..., None]), axis=-1)
  eligible_Bxb = tokens_Bxb == mask_id
  confidence_Bxb = jnp.where(eligible_Bxb, confidence_Bxb, -jnp.inf)
  order_Bxb = jnp.argsort(-confidence_Bxb, axis=-1, stable=True)
  rank_Bxb = jnp.argsort(order_Bxb, axis=-1, stable=True)
  if s.threshold:
    chosen_Bxb = (confidence_Bxb >= s.threshold) | (rank_Bxb == 0)
  else:  # LLaDA's schedule: the block's masks spread evenly, the remainder first
    chosen_Bxb = rank_Bxb < block // steps + (t < block % steps)
  return jnp.where(eligible_Bxb & chosen_Bxb, candidates_Bxb, tokens_Bxb).astype(jnp.int32)
