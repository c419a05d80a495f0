"""Attention kernels on the current backend: forward+backward time, TFLOP/s and agreement.

Runs `model.attention.attend` (the layer's own dispatch, fallback included) with xla and this
backend's flash kernel (or `--impl`) at the Dhara-70M attention shape (8 query heads, 4 KV
heads, head_dim 48, T = 1024, causal, packed documents of 100 tokens) and prints the mean time
per call, the attention FLOP rate (causal: half of 4·B·H·T²·K forward, 2.5× that backward)
and the largest difference from the xla path (output and gradients, relative to their largest
value); a difference above the dtype's tolerance exits 1. The Pallas kernels compile only on
their GPU/TPU; `--interpret` runs them in Pallas interpret mode (a correctness check on CPU).

  python bench/attention_kernel.py [--batch 8 64] [--seq 1024] [--dtype bfloat16]
      [--impl xla pallas_gpu pallas_tpu] [--iters 5] [--interpret]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from dhara_jax.benchmarks.timing import seconds_per_call
from dhara_jax.kernels import attention, lowering
from dhara_jax.model.attention import attend
from dhara_jax.masks import attention_mask


# Largest |Δ| from the xla path, relative to the largest |value|, over output and gradients.
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def make_inputs(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, dtype: str):
  rng = np.random.default_rng(0)
  shapes = [(batch, seq, heads, head_dim)] + [(batch, seq, kv_heads, head_dim)] * 2
  q, k, v, g = (jnp.asarray(rng.standard_normal(s), dtype) for s in shapes + shapes[:1])
  segment_ids = jnp.asarray(1 + np.arange(seq)[None, :] // 100 + np.zeros((batch, 1), int),
                            jnp.int32)
  return q, k, v, g, segment_ids


def make_step(impl: str, head_dim: int):
  """jit(q, k, v, g, segments) → (output, dq, dk, dv) of Σ output·g."""
  def layer(q, k, v, segment_ids):
    mask = attention_mask(segment_ids, causal=True)
    return attend(impl, q, k, v, mask, segment_ids, scale=head_dim ** -0.5, causal=True,
                  window=0)

  def step(q, k, v, g, segment_ids):
    out, vjp = jax.vjp(lambda q, k, v: layer(q, k, v, segment_ids), q, k, v)
    return (out, *vjp(g))

  return jax.jit(step)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, nargs="+", default=[8, 64])
  parser.add_argument("--seq", type=int, default=1024)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--kv-heads", type=int, default=4)
  parser.add_argument("--head-dim", type=int, default=48)
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--impl", nargs="+", choices=list(attention.IMPLS),
                      help="default: xla and this backend's flash kernel")
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode")
  args = parser.parse_args()
  if args.interpret:
    os.environ[lowering.INTERPRET_ENV_VAR] = "1"
  args.impl = args.impl or list(dict.fromkeys(["xla", attention.resolve_impl("auto")]))

  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}); auto impl: "
        f"{attention.resolve_impl('auto')}; T {args.seq}, heads {args.heads}/{args.kv_heads}, "
        f"head_dim {args.head_dim}, {args.dtype}, causal, documents of 100 tokens")
  print(f"{'impl':<11} {'B':>3} {'ms':>9} {'TFLOP/s':>8} {'rel |Δ| vs xla':>15}")
  disagrees = False
  for batch in args.batch:
    inputs = make_inputs(batch, args.seq, args.heads, args.kv_heads, args.head_dim, args.dtype)
    # Causal: half the 4·B·H·T²·K of full attention forward; the backward is 2.5× the forward.
    flops = 3.5 * 2 * batch * args.heads * args.seq ** 2 * args.head_dim
    results, seconds = {}, {}
    for impl in args.impl:
      step = make_step(impl, args.head_dim)
      results[impl] = jax.device_get(step(*inputs))  # also the compile and warm-up call
      seconds[impl] = seconds_per_call(functools.partial(step, *inputs), args.iters, warmup=0)
    for impl in args.impl:
      diff = (max(relative_difference(a, b) for a, b in zip(results[impl], results["xla"]))
              if "xla" in results else float("nan"))
      disagrees |= diff > TOLERANCE[args.dtype]
      print(f"{impl:<11} {batch:>3} {seconds[impl] * 1e3:>9.2f} "
            f"{flops / seconds[impl] / 1e12:>8.2f} {diff:>15.2e}")
    for impl in (i for i in seconds if i != "xla" and "xla" in seconds):
      print(f"B {batch}: ratio {impl}/xla {seconds['xla'] / seconds[impl]:.2f}x "
            "(speed-up of the flash kernel over the blocked XLA attention)")
  if disagrees:
    sys.exit(f"error: an implementation differs from xla by more than {TOLERANCE[args.dtype]} "
             "of the largest value (see the table)")


if __name__ == "__main__":
  main()
