"""The benchmarks' prompts: rows of equal length from held-out text of the shipped sample."""

from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq

from data_pipeline.config import resolve_input
from dhara_jax.errors import DharaError

PROMPT_TOKENS = 16  # every benchmark prompt is cut to this many tokens: rows of equal length
PROMPT_SOURCE = "data/sample/dclm"  # the shipped sample whose held-out lines are the prompts
PROMPT_HELD_OUT = 0.05  # its last 5% of documents: the pipeline's default held-out split


def bench_prompts(tokenizer: Any, count: int, length: int) -> list[list[int]]:
  """`count` prompts of exactly `length` tokens: the first lines of at least that many tokens
  of the held-out documents (the last 5%) of the shipped dclm sample, each cut to `length`."""
  files = sorted(resolve_input(PROMPT_SOURCE).glob("*.parquet"))
  texts = [t for f in files for t in pq.read_table(f, columns=["text"]).column("text")
           .to_pylist()]
  held_out = texts[len(texts) - max(1, round(len(texts) * PROMPT_HELD_OUT)):]
  prompts = []
  for line in (line.strip() for doc in held_out for line in doc.splitlines()):
    ids = tokenizer.encode(line)
    if len(ids) >= length:
      prompts.append(ids[:length].tolist())
      if len(prompts) == count:
        return prompts
  raise DharaError(f"bench: {PROMPT_SOURCE}'s held-out documents have {len(prompts)} lines of "
                   f"≥ {length} tokens, fewer than the {count} prompts asked for")
