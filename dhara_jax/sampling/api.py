"""`generate`: prompts in, new tokens out, with the sampler the model was trained for."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from dhara_jax.config import ModelConfig
from dhara_jax.errors import DharaError
from dhara_jax.phases import Phase
from dhara_jax.sampling import ar, diffusion
from dhara_jax.sampling.rows import finished_rows, left_padded
from dhara_jax.sampling.settings import Generation, Sampling, check_sampling

PROMPT_BUCKET = 16  # prompts are left-padded to a multiple of this: fewer compiled programs


def generate(model: ModelConfig, params: Any, prompts: Sequence[Sequence[int]],
             sampling: Sampling, *, phase: Phase = Phase("ar"),
             eos_id: int | None = None) -> Generation:
  """New tokens for each prompt (one batch): KV-cached AR decoding for AR models, the diffusion
  samplers (sampling/diffusion.py) for models trained with `mdm` or `block`."""
  check_sampling(sampling)
  if not prompts:
    raise DharaError("generate: no prompt given")
  lengths = [len(p) for p in prompts]
  if min(lengths) == 0:
    raise DharaError(f"generate: prompt {lengths.index(0)} is empty; give at least one token")
  longest, new = max(lengths), sampling.max_new_tokens
  if longest > model.max_seq_len:
    raise DharaError(f"generate: a prompt of {longest} tokens is longer than the model's "
                     f"context ({model.max_seq_len})")
  if longest + new > model.max_seq_len:
    raise DharaError(f"generate: prompt ({longest} tokens) + max_new_tokens ({new}) exceed the "
                     f"model's context ({model.max_seq_len})")
  if phase.diffusion:
    return diffusion.generate(model, params, prompts, sampling, phase, eos_id)
  prompt_BxP, first_B = left_padded(prompts, PROMPT_BUCKET)
  tokens_BxG, forwards = ar.decode(model, params, prompt_BxP, first_B,
                                   jax.random.key(sampling.seed), s=sampling, eos_id=eos_id)
  return finished_rows(np.asarray(tokens_BxG), int(forwards), eos_id, sampling.stop)
