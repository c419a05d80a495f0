"""Forward+backward tokens/s of a LLaMA-style model: dhara-jax vs transformers/PyTorch, same CPU.

Both sides run the same weights (exported from JAX), the same batch and the same next-token
loss; each is warmed up, then timed over --steps steps. Prints tokens/s for each and the ratio.

  python bench/forward_backward_vs_torch.py [--layers 8 --batch 8 --seq 512 --steps 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import jax
import jax.numpy as jnp
import numpy as np

from dhara_jax import config
from dhara_jax.benchmarking import seconds_per_call
from dhara_jax.export import export_hf
from dhara_jax.export.parity import load_torch_model
from dhara_jax.model import forward, init_params


def next_token_loss(cfg, params, tokens_BxL):
  logits_BxLxV, aux = forward(cfg, params, tokens_BxL)
  logits_BxLxV = logits_BxLxV[:, :-1]
  # logsumexp − target logit: one pass fewer over B×L×V than log_softmax + gather.
  target_BxL = jnp.take_along_axis(logits_BxLxV, tokens_BxL[:, 1:, None], axis=-1)[..., 0]
  return jnp.mean(jax.nn.logsumexp(logits_BxLxV, axis=-1) - target_BxL) + aux


def time_jax(cfg, params, tokens, steps: int) -> tuple[float, float]:
  step = jax.jit(jax.value_and_grad(lambda p, t: next_token_loss(cfg, p, t)))
  seconds = seconds_per_call(lambda: step(params, tokens), steps)
  return seconds, float(step(params, tokens)[0])


def time_torch(model, tokens, steps: int, dtype: str) -> tuple[float, float]:
  import torch

  ids = torch.tensor(tokens, dtype=torch.long)
  model.train()

  def step():
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss

  step()  # warm up
  start = time.perf_counter()
  for _ in range(steps):
    loss = step()
  return (time.perf_counter() - start) / steps, float(loss.detach())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="llama3")
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="compute dtype on both sides (torch: CPU autocast); weights stay f32")
  args = parser.parse_args()

  cfg = config.load(args.config, [f"model.num_layers={args.layers}",
                                  f"model.max_seq_len={max(args.seq, 1024)}",
                                  f"model.dtype={args.dtype}"]).model
  params = init_params(cfg, jax.random.key(0))
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq))
  tokens_per_step = args.batch * args.seq
  print(f"{cfg.family}: {args.layers} layers, d {cfg.d_model}, B·T {args.batch}·{args.seq}, "
        f"{args.dtype}, "
        f"{jax.device_count()} {jax.default_backend()} device(s), {os.cpu_count()} CPUs")

  jax_s, jax_loss = time_jax(cfg, params, jnp.asarray(tokens, jnp.int32), args.steps)
  with tempfile.TemporaryDirectory() as tmp:
    model = load_torch_model(export_hf(cfg, params, tmp))
    torch_s, torch_loss = time_torch(model, tokens, args.steps, args.dtype)

  jax_tps, torch_tps = tokens_per_step / jax_s, tokens_per_step / torch_s
  print(f"dhara-jax      {jax_tps:9.1f} tok/s  ({jax_s:.2f} s/step, loss {jax_loss:.4f})")
  print(f"torch/hf       {torch_tps:9.1f} tok/s  ({torch_s:.2f} s/step, loss {torch_loss:.4f})")
  print(f"ratio jax/torch {jax_tps / torch_tps:.2f}x")


if __name__ == "__main__":
  main()
