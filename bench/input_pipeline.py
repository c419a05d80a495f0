"""Data pipeline tokens/s on this machine: raw text and token cache -> packed, mixed batches.

Both paths run the shipped 50/30/20 sample mix (configs/data/mix.yaml, shipped 4,096-token
tokenizer) through `make_train_iterator` (numpy batches, this process only) for --tokens
tokens after one warm-up batch. The reference is what a training step of the quickstart model
consumes: the full dhara-jax train step (forward, backward, AdamW) of configs/runs/quickstart.yaml
at --seq × --batch, same CPU. The target is a ratio of at least 10x.

  python bench/input_pipeline.py [--tokens 4000000 --seq 1024 --batch 8 --threads 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import numpy as np

from data_pipeline.cache import prepare
from data_pipeline.iterator import make_train_iterator
from data_pipeline.mixture import tokens_per_source
from data_pipeline.tokenizer import load_tokenizer
from dhara_jax import config
from dhara_jax.benchmarks.train_step import train_step_seconds


def time_pipeline(cfg, tokenizer, tokens: int) -> tuple[float, np.ndarray]:
  it = make_train_iterator(cfg, tokenizer=tokenizer)
  next(it)  # warm up: opens files, starts the read threads
  counts = np.zeros(len(cfg.sources))
  start = time.perf_counter()
  while counts.sum() < tokens:
    counts += tokens_per_source(next(it), len(cfg.sources))
  return counts.sum() / (time.perf_counter() - start), counts / counts.sum()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="data/mix")
  parser.add_argument("--tokens", type=int, default=4_000_000)
  parser.add_argument("--seq", type=int, default=1024)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--threads", type=int, default=4, help="data.read_threads")
  parser.add_argument("--train-steps", type=int, default=5)
  args = parser.parse_args()

  cfg = config.load(args.config)
  data = dataclasses.replace(cfg.data, seq_len=args.seq, batch_size=args.batch,
                             read_threads=args.threads)
  tokenizer = load_tokenizer(data.tokenizer)
  print(f"mix {data.weights}, seq_len {args.seq}, batch {args.batch}, "
        f"{args.threads} read threads, {os.cpu_count()} CPUs")

  raw_tps, shares = time_pipeline(data, tokenizer, args.tokens)
  print(f"raw text -> batches   {raw_tps:12,.0f} tok/s  (shares {np.round(shares, 4).tolist()})")
  with tempfile.TemporaryDirectory() as tmp:
    cached = dataclasses.replace(data, cache_dir=tmp)
    start = time.perf_counter()
    manifest = prepare(cached, tokenizer, progress=False, log=lambda _: None)
    total = sum(s["tokens"] for s in manifest["sources"].values())
    print(f"data prepare (cache)  {total / (time.perf_counter() - start):12,.0f} tok/s  "
          f"({total:,} tokens)")
    cache_tps, shares = time_pipeline(cached, tokenizer, args.tokens)
  print(f"cache -> batches      {cache_tps:12,.0f} tok/s  (shares {np.round(shares, 4).tolist()})")

  run = config.load("configs/runs/quickstart.yaml", [f"model.max_seq_len={args.seq}"])
  batch = np.random.default_rng(0).integers(0, run.model.vocab_size, (args.batch, args.seq))
  train_tps = batch.size / train_step_seconds(run, batch, args.train_steps)
  print(f"quickstart train step {train_tps:12,.0f} tok/s  ({run.model.family} d "
        f"{run.model.d_model}, {run.model.num_layers} layers, canon "
        f"{run.model.canon_set or '-'}, B·T {args.batch}·{args.seq})")
  print(f"ratio data/training: raw {raw_tps / train_tps:.0f}x, cache {cache_tps / train_tps:.0f}x "
        "(target >= 10x)")


if __name__ == "__main__":
  main()
