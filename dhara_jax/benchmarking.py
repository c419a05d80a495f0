"""Timing helpers shared by the scripts in bench/ (compile once, warm up, block, time), and the
PyTorch peer they are compared against (imported lazily: only the benchmarks need torch)."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from dhara_jax import config
from dhara_jax.config import Config, MeshConfig
from dhara_jax.sharding import make_mesh
from dhara_jax.train import build, init_state, make_train_step


def seconds_per_call(fn: Callable[[], Any], steps: int, warmup: int = 1) -> float:
  """Mean wall time of fn() over `steps` calls after `warmup` calls; waits for JAX outputs."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  start = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def train_step_seconds(cfg: Config, tokens_BxL: np.ndarray, steps: int,
                       mesh: MeshConfig = MeshConfig(1, 1, 1)) -> float:
  """Seconds per full dhara-jax train step (forward, backward, clipping, AdamW) on one batch."""
  mesh = make_mesh(mesh, jax.devices()[:mesh.data * mesh.fsdp * mesh.tensor])
  tx, shardings = build(cfg, mesh)
  step = make_train_step(cfg, mesh, tx, shardings)
  batch = {"tokens": np.asarray(tokens_BxL, np.int32),
           "segment_ids": np.ones(tokens_BxL.shape, np.int32)}
  box = {"state": init_state(cfg, mesh, tx, shardings)}

  def one_step():
    box["state"], metrics = step(box["state"], batch)  # the state is donated: keep the new one
    return metrics["loss"]

  return seconds_per_call(one_step, steps)


def model_arguments(description: str) -> argparse.ArgumentParser:
  """The flags every model benchmark takes: which config, how deep, batch shape, dtype."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--config", default="llama3")
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="compute dtype on both sides (torch: CPU autocast); weights stay f32")
  return parser


def load_benchmark(args: argparse.Namespace) -> tuple[Config, np.ndarray]:
  """The config the flags describe (codelion's optimizer settings) and a random token batch;
  prints one line saying what runs where."""
  cfg = config.load(args.config, [f"model.num_layers={args.layers}",
                                  f"model.max_seq_len={max(args.seq, 1024)}",
                                  f"model.dtype={args.dtype}", "train.lr=5e-4",
                                  "train.warmup_fraction=0", "train.clip_norm=1.0"])
  tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (args.batch, args.seq))
  print(f"{cfg.model.family}: {args.layers} layers, d {cfg.model.d_model}, "
        f"B·T {args.batch}·{args.seq}, {args.dtype}, {jax.default_backend()}, "
        f"{os.cpu_count()} CPUs, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  return cfg, tokens


def torch_step_seconds(model: Any, tokens_BxL: np.ndarray, steps: int, dtype: str,
                       optimizer: bool) -> float:
  """Seconds per transformers step on the same batch: next-token loss and backward, plus
  global-norm clipping at 1.0 and AdamW (lr 5e-4, betas 0.9/0.95, wd 0.1) when `optimizer`."""
  import torch

  ids = torch.tensor(tokens_BxL, dtype=torch.long)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.95), weight_decay=0.1)

  def step():
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if optimizer:
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      opt.step()
    return loss

  return seconds_per_call(step, steps)


def print_ratio(tokens_per_step: int, jax_seconds: float, torch_seconds: float) -> None:
  jax_tps, torch_tps = tokens_per_step / jax_seconds, tokens_per_step / torch_seconds
  print(f"dhara-jax       {jax_tps:9.1f} tok/s  ({jax_seconds:.2f} s/step)")
  print(f"torch/hf        {torch_tps:9.1f} tok/s  ({torch_seconds:.2f} s/step)")
  print(f"ratio jax/torch {jax_tps / torch_tps:.2f}x")
