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

from dhara_jax.benchmarks.train_step import (compare_with_torch, jax_train_step,
                                             load_benchmark, model_arguments)


def main() -> None:
  args = model_arguments(__doc__.splitlines()[0]).parse_args()
  cfg, tokens = load_benchmark(args)
  compare_with_torch(cfg, tokens, functools.partial(jax_train_step, cfg, tokens), args,
                     optimizer=True)


if __name__ == "__main__":
  main()
