"""Rows in and out of a sampler: prompts left-padded to one width, new tokens cut at their end."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dhara_jax.sampling.settings import Generation


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
