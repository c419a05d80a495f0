"""Forward+backward tokens/s of a LLaMA-style model: dhara-jax vs transformers/PyTorch, same CPU.

Both sides run the same weights (exported from JAX), the same batch and the same next-token
loss, without an optimizer step. Each runs in its own process and is warmed up; then they take
turns for --rounds rounds of --steps steps. Prints the median tokens/s of each and the ratio
(bench/train_step.py adds clipping and AdamW).

  python bench/forward_backward_vs_torch.py [--layers 8 --batch 8 --seq 512 --steps 3 --rounds 3]
"""

from __future__ import annotations

import functools
import tempfile

import jax
import numpy as np

from dhara_jax.benchmarking import (interleaved_seconds, load_benchmark, model_arguments,
                                    print_ratio, torch_side)
from dhara_jax.config import Config
from dhara_jax.export import export_hf
from dhara_jax.model import init_params
from dhara_jax.train import loss_sum


def jax_forward_backward(cfg: Config, tokens_BxL: np.ndarray):
  """Gradients of the loss on one batch, as a zero-argument call (params from cfg's seed)."""
  params = init_params(cfg.model, jax.random.key(cfg.train.seed))
  batch = {"tokens": np.asarray(tokens_BxL, np.int32),
           "segment_ids": np.ones(tokens_BxL.shape, np.int32)}
  grad = jax.jit(jax.grad(lambda p, b: loss_sum(cfg, p, b), has_aux=True))
  return lambda: grad(params, batch)


def main() -> None:
  args = model_arguments(__doc__.splitlines()[0]).parse_args()
  cfg, tokens = load_benchmark(args)
  with tempfile.TemporaryDirectory() as tmp:
    export_hf(cfg.model, init_params(cfg.model, jax.random.key(cfg.train.seed)), tmp)
    seconds = interleaved_seconds(
        {"jax": functools.partial(jax_forward_backward, cfg, tokens),
         "torch": torch_side(tmp, tokens, args.dtype, optimizer=False)},
        args.steps, args.rounds)
  print_ratio(tokens.size, seconds["jax"], seconds["torch"])


if __name__ == "__main__":
  main()
