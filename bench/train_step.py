"""Training-step tokens/s of a LLaMA-style model: dhara-jax vs transformers/PyTorch, same CPU.

Both sides start from the same weights (exported from JAX) and run the same step on the same
batch: next-token loss, backward, global-norm clipping at 1.0, AdamW (lr 5e-4, betas 0.9/0.95,
weight decay 0.1). Each is warmed up, then timed over --steps steps. Prints tokens/s for each
and the ratio. --dtype bfloat16 runs bf16 compute on both sides (torch: CPU autocast).

  python bench/train_step.py [--layers 8 --batch 8 --seq 512 --steps 3 --dtype float32]
"""

from __future__ import annotations

import tempfile

import jax

from dhara_jax.benchmarking import (load_benchmark, model_arguments, print_ratio,
                                    torch_step_seconds, train_step_seconds)
from dhara_jax.export import export_hf
from dhara_jax.export.parity import load_torch_model
from dhara_jax.model import init_params


def main() -> None:
  args = model_arguments(__doc__.splitlines()[0]).parse_args()
  cfg, tokens = load_benchmark(args)
  jax_s = train_step_seconds(cfg, tokens, args.steps)
  with tempfile.TemporaryDirectory() as tmp:
    params = init_params(cfg.model, jax.random.key(cfg.train.seed))
    model = load_torch_model(export_hf(cfg.model, params, tmp))
    torch_s = torch_step_seconds(model, tokens, args.steps, args.dtype, optimizer=True)
  print_ratio(tokens.size, jax_s, torch_s)


if __name__ == "__main__":
  main()
