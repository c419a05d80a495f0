"""Forward+backward tokens/s of a LLaMA-style model: dhara-jax vs transformers/PyTorch, same CPU.

Both sides run the same weights (exported from JAX), the same batch and the same next-token
loss, without an optimizer step. Each runs in its own process and is warmed up; then they take
turns for --rounds rounds of --steps steps. Prints the median tokens/s of each and the ratio
(bench/train_step.py adds clipping and AdamW).

  python bench/forward_backward_vs_torch.py [--layers 8 --batch 8 --seq 512 --steps 3 --rounds 3]
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from dhara_jax.benchmarks.train_step import (compare_with_torch, load_benchmark,
                                             model_arguments, one_document_batch)
from dhara_jax.config import Config
from dhara_jax.model import init_params
from dhara_jax.train import loss_sum


def jax_forward_backward(cfg: Config, tokens_BxL: np.ndarray):
  """Gradients of the loss on one batch, as a zero-argument call (params from cfg's seed)."""
  params = init_params(cfg.model, jax.random.key(cfg.train.seed))
  batch = one_document_batch(tokens_BxL)
  grad = jax.jit(jax.grad(lambda p, b: loss_sum(cfg, p, b), has_aux=True))
  return lambda: grad(params, batch)


def main() -> None:
  args = model_arguments(__doc__.splitlines()[0]).parse_args()
  cfg, tokens = load_benchmark(args)
  compare_with_torch(cfg, tokens, functools.partial(jax_forward_backward, cfg, tokens), args,
                     optimizer=False)


if __name__ == "__main__":
  main()
