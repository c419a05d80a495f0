"""`generate`: prompts in, new tokens out, with the sampler the model was trained for."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dhara_jax.config import ModelConfig
from dhara_jax.errors import DharaError
from dhara_jax.phases import Phase, run_phase
from dhara_jax.sampling import ar, diffusion
from dhara_jax.sampling.settings import Generation, Sampling, check_sampling

log = logging.getLogger(__name__)

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


def left_padded(prompts: Sequence[Sequence[int]], bucket: int) -> tuple[jax.Array, jax.Array]:
  """(prompts B×P left-padded with 0 to a multiple of `bucket`, each row's first real slot)."""
  width = -(-max(len(p) for p in prompts) // bucket) * bucket
  rows = np.zeros((len(prompts), width), np.int32)
  for row, prompt in zip(rows, prompts):
    row[width - len(prompt):] = prompt
  first = np.array([width - len(p) for p in prompts], np.int32)
  return jnp.asarray(rows), jnp.asarray(first)


def left_aligned(tokens_BxP: np.ndarray, mask_BxP: np.ndarray) -> list[list[int]]:
  """The prompts of a padded batch (left- or right-padded: mask 1 on real tokens)."""
  return [[int(t) for t, m in zip(row, keep) if m] for row, keep in zip(tokens_BxP, mask_BxP)]


def finished_rows(tokens_BxG: np.ndarray, forwards: int, eos_id: int | None,
                  stop: Sequence[Sequence[int]] = ()) -> Generation:
  """Each row cut before its first EOS or stop sequence."""
  rows, finished = [], []
  for row in tokens_BxG.tolist():
    ends = [row.index(eos_id)] if eos_id is not None and eos_id in row else []
    ends += [i for seq in stop for i in range(len(row) - len(seq) + 1)
             if row[i:i + len(seq)] == list(seq)]
    end = min(ends, default=len(row))
    rows.append(row[:end])
    finished.append(end < len(row))
  return Generation(rows, forwards, finished)


def trained_phase(run_dir: Path) -> Phase:
  """The objective (and block size) a run's final parameters were trained with: a conversion's
  last stage, else the run's own `train.objective`."""
  from dhara_jax import convert, runs  # runs imports the training stack: only when asked

  cfg = runs.load_run_config(Path(run_dir))
  if (Path(run_dir) / convert.RECORD).is_file():
    return convert.conversion_plan(cfg).stages[-1].phase
  return run_phase(cfg)
