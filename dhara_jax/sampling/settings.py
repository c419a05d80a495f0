"""What a sampler is asked to do (`Sampling`) and what it gives back (`Generation`, and its
tokens per forward pass)."""

from __future__ import annotations

import dataclasses
import math

from dhara_jax.errors import DharaError

REMASKING = ("low_confidence", "random")
CACHES = ("auto", "none", "block", "approx")
SEED_LIMIT = 2**32


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Settings of one generation call. AR models read the first group, diffusion models all but
  top_k / top_p.

  Diffusion (LLaDA's semi-autoregressive sampler over the canvas [prompt, MASK × G]): the G new
  tokens are cut into blocks of `block_length`, decoded left to right; each block gets
  steps / (G / block_length) denoising steps, each committing the most confident masked tokens
  of the block (`remasking` low_confidence; `random`: random ones), or, with `threshold` τ > 0,
  every masked token of the block whose confidence is ≥ τ and at least the best one (Fast-dLLM),
  until the block has no masks.

  `cache`: "block" (exact block KV cache; for models trained with the `block` objective),
  "approx" (Fast-dLLM's prefix/suffix cache of a full-sequence model, refreshed at each block
  start: approximate), "none" (every step recomputes the canvas), "auto" (block for block-trained
  models, none otherwise).
  """

  max_new_tokens: int = 64
  temperature: float = 0.0  # 0: greedy
  top_k: int = 0  # AR: keep the k most likely tokens (0: all)
  top_p: float = 1.0  # AR: nucleus sampling (1: all)
  steps: int = 0  # diffusion: denoising steps in all (0: max_new_tokens, one token per step)
  block_length: int = 0  # diffusion: tokens per block (0: the model's block size, else G)
  remasking: str = "low_confidence"
  threshold: float = 0.0  # diffusion: τ of threshold decoding (0: off, fixed steps)
  cache: str = "auto"
  seed: int = 0
  # Token sequences that end a row like EOS (evaluation's stop strings, encoded); the row's
  # tokens are cut before the first one. AR decoding stops on them; diffusion rows are cut.
  stop: tuple[tuple[int, ...], ...] = ()


@dataclasses.dataclass
class Generation:
  tokens: list[list[int]]  # per prompt: the new tokens, up to (not including) the first EOS
  forwards: int  # model forward passes over the batch (prefill, steps and block commits)
  finished: list[bool]  # per prompt: whether it reached EOS


def tokens_per_forward(new_tokens: int, batch: int, forwards: int) -> float:
  """New tokens per row (mean over the batch) per forward pass over the batch: 1 for AR."""
  return new_tokens / batch / forwards if forwards else 0.0


def check_sampling(s: Sampling) -> None:
  """One line naming the first setting out of range (the ones that need no model)."""
  if s.max_new_tokens < 1:
    raise DharaError(f"generate: max_new_tokens must be ≥ 1, got {s.max_new_tokens}")
  if not (math.isfinite(s.temperature) and s.temperature >= 0):  # nan passes a plain < 0
    raise DharaError(f"generate: temperature must be a finite number ≥ 0, got {s.temperature}")
  if s.top_k < 0:
    raise DharaError(f"generate: top_k must be ≥ 0, got {s.top_k}")
  if not 0 < s.top_p <= 1:
    raise DharaError(f"generate: top_p must be in (0, 1], got {s.top_p}")
  if s.steps < 0 or s.block_length < 0:
    raise DharaError(f"generate: steps and block_length must be ≥ 0, got {s.steps} and "
                     f"{s.block_length}")
  if s.threshold and not 0 < s.threshold <= 1:
    raise DharaError(f"generate: threshold τ must be in (0, 1], got {s.threshold}")
  if s.remasking not in REMASKING:
    raise DharaError(f"generate: remasking must be one of {', '.join(REMASKING)}, got "
                     f"{s.remasking!r}")
  if any(not seq for seq in s.stop):
    raise DharaError("generate: a stop sequence is empty")
  if s.cache not in CACHES:
    raise DharaError(f"generate: cache must be one of {', '.join(CACHES)}, got {s.cache!r}")
  if not 0 <= s.seed < SEED_LIMIT:  # jax.random.key wraps other seeds onto these, or overflows
    raise DharaError(f"generate: seed must be in [0, 2³²), got {s.seed}")
