"""Training-step tokens/s of a LLaMA-style model: dhara-jax vs transformers/PyTorch, same CPU.

Both sides start from the same weights (exported from JAX) and run the same step on the same
batch: next-token loss, backward, global-norm clipping at 1.0, AdamW (lr 5e-4, betas 0.9/0.95,
weight decay 0.1). Each runs in its own process and is warmed up; then they take turns for
--rounds rounds of --steps steps. Prints the median tokens/s of each and the ratio. --dtype
bfloat16 runs bf16 compute on both sides (torch: CPU autocast).

  python bench/train_step.py [--layers 8 --batch 8 --seq 512 --steps 3 --rounds 3
                              --dtype float32]
"""

from __future__ import annotations

import functools
import tempfile

import jax

from dhara_jax.benchmarking import (interleaved_seconds, jax_train_step, load_benchmark,
                                    model_arguments, print_ratio, torch_side)
from dhara_jax.export import export_hf
from dhara_jax.model import init_params


def main() -> None:
  args = model_arguments(__doc__.splitlines()[0]).parse_args()
  cfg, tokens = load_benchmark(args)
  with tempfile.TemporaryDirectory() as tmp:
    export_hf(cfg.model, init_params(cfg.model, jax.random.key(cfg.train.seed)), tmp)
    seconds = interleaved_seconds(
        {"jax": functools.partial(jax_train_step, cfg, tokens),  # inits the same params
         "torch": torch_side(tmp, tokens, args.dtype, optimizer=True)},
        args.steps, args.rounds)
  print_ratio(tokens.size, seconds["jax"], seconds["torch"])


if __name__ == "__main__":
  main()
