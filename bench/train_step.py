"""Training-step tokens/s of a LLaMA-style model: dhara-jax vs transformers/PyTorch, same CPU.

Both sides start from the same weights (exported from JAX) and run the same step on the same
batch: next-token loss, backward, global-norm clipping at 1.0, AdamW (lr 5e-4, betas 0.9/0.95,
weight decay 0.1). Each is warmed up, then timed over --steps steps. Prints tokens/s for each
and the ratio. --dtype bfloat16 runs bf16 compute on both sides (torch: CPU autocast).

  python bench/train_step.py [--layers 8 --batch 8 --seq 512 --steps 3 --dtype float32]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import numpy as np

from dhara_jax import config
from dhara_jax.benchmarking import train_step_seconds
from dhara_jax.export import export_hf
from dhara_jax.export.parity import load_torch_model
from dhara_jax.model import init_params


def torch_step_seconds(model, tokens: np.ndarray, steps: int, dtype: str) -> float:
  import time

  import torch

  ids = torch.tensor(tokens, dtype=torch.long)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.95), weight_decay=0.1)

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  step()  # warm up
  start = time.perf_counter()
  for _ in range(steps):
    step()
  return (time.perf_counter() - start) / steps


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="llama3")
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  args = parser.parse_args()

  cfg = config.load(args.config, [f"model.num_layers={args.layers}",
                                  f"model.max_seq_len={max(args.seq, 1024)}",
                                  f"model.dtype={args.dtype}", "train.lr=5e-4",
                                  "train.warmup_fraction=0", "train.clip_norm=1.0"])
  tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (args.batch, args.seq))
  print(f"{cfg.model.family}: {args.layers} layers, d {cfg.model.d_model}, "
        f"B·T {args.batch}·{args.seq}, {args.dtype}, {jax.default_backend()}, "
        f"{os.cpu_count()} CPUs, {os.environ.get('XLA_FLAGS', '')}")
  jax_s = train_step_seconds(cfg, tokens, args.steps)
  with tempfile.TemporaryDirectory() as tmp:
    params = init_params(cfg.model, jax.random.key(cfg.train.seed))
    model = load_torch_model(export_hf(cfg.model, params, tmp))
    torch_s = torch_step_seconds(model, tokens, args.steps, args.dtype)
  jax_tps, torch_tps = tokens.size / jax_s, tokens.size / torch_s
  print(f"dhara-jax       {jax_tps:9.1f} tok/s  ({jax_s:.2f} s/step)")
  print(f"torch/hf        {torch_tps:9.1f} tok/s  ({torch_s:.2f} s/step)")
  print(f"ratio jax/torch {jax_tps / torch_tps:.2f}x")


if __name__ == "__main__":
  main()
