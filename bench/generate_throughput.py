"""Generation throughput: a diffusion run's samplers vs KV-cached AR vs PyTorch, on this machine.

The same as `dhara bench generate` (dhara_jax/benchmarks/generate.py): for each batch size B and
number of new tokens G, KV-cached JAX AR decoding of the AR run (the baseline), the diffusion
samplers over a grid of step counts, thresholds and caches, transformers' generate() on the
exported AR model and the exported diffusion model's PyTorch generate, each compiled, warmed up
and timed; a judge perplexity and distinct-2 beside every speed-up; a headline at B=1, G=100.

  python bench/generate_throughput.py RUN_DIR [--ar-run AR_RUN] [--batches 1,8,64]
      [--new-tokens 100,256] [--runs 3] [--quick] [--json]
"""

from __future__ import annotations

import sys

from dhara_jax.cli import main

if __name__ == "__main__":
  sys.exit(main(["bench", "generate", *sys.argv[1:]]))
