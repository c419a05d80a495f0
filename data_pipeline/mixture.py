"""Mixing packed rows of several sources so each source's share of the tokens is its weight.

Every row holds `row_len` tokens (the packer pads only the very end of a finite stream), so a
share of rows is a share of tokens. grain's `IterDataset.mix` interleaves its parents
deterministically by integer proportions (weights scaled so the smallest is 100), with no
sampling noise: over n rows each share is within a few rows of its weight.
"""

from __future__ import annotations

import functools
from typing import Mapping

import grain
import numpy as np


def _tag(row: dict[str, np.ndarray], source: int) -> dict[str, np.ndarray]:
  return {**row, "source": np.int32(source)}


def mix(streams: Mapping[int, grain.IterDataset],
        weights: Mapping[int, float]) -> grain.IterDataset:
  """Rows of `streams` (source index -> packed rows), tagged with `source`, mixed by weight."""
  tagged = [ds.map(functools.partial(_tag, source=k)) for k, ds in streams.items()]
  return grain.IterDataset.mix(tagged, [weights[k] for k in streams])


def tokens_per_source(batch: Mapping[str, np.ndarray], num_sources: int) -> np.ndarray:
  """Non-padding tokens of a batch per source index (what the mixture weights control)."""
  real_B = np.count_nonzero(np.asarray(batch["segment_ids"]) > 0, axis=1)
  return np.bincount(np.asarray(batch["source"]), weights=real_B, minlength=num_sources)
