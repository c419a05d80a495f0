"""Forward+backward tokens/s of a LLaMA-style model: dhara-jax vs transformers/PyTorch, same CPU.

Both sides run the same weights (exported from JAX), the same batch and the same next-token
loss, without an optimizer step; each is warmed up, then timed over --steps steps. Prints
tokens/s for each and the ratio (bench/train_step.py adds clipping and AdamW).

  python bench/forward_backward_vs_torch.py [--layers 8 --batch 8 --seq 512 --steps 3]
"""

from __future__ import annotations

import tempfile

import jax
import numpy as np

from dhara_jax.benchmarking import (load_benchmark, model_arguments, print_ratio,
                                    seconds_per_call, torch_step_seconds)
from dhara_jax.export import export_hf
from dhara_jax.export.parity import load_torch_model
from dhara_jax.model import init_params
from dhara_jax.train import loss_sum


def main() -> None:
  args = model_arguments(__doc__.splitlines()[0]).parse_args()
  cfg, tokens = load_benchmark(args)
  params = init_params(cfg.model, jax.random.key(0))
  batch = {"tokens": np.asarray(tokens, np.int32),
           "segment_ids": np.ones(tokens.shape, np.int32)}
  step = jax.jit(jax.grad(lambda p, b: loss_sum(cfg, p, b), has_aux=True))
  jax_s = seconds_per_call(lambda: step(params, batch), args.steps)
  with tempfile.TemporaryDirectory() as tmp:
    model = load_torch_model(export_hf(cfg.model, params, tmp))
    torch_s = torch_step_seconds(model, tokens, args.steps, args.dtype, optimizer=False)
  print_ratio(tokens.size, jax_s, torch_s)


if __name__ == "__main__":
  main()
