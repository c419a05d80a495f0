"""Canon conv kernels on the current backend: time, GB/s and fraction of the memory roofline.

Times each implementation's forward and forward+backward at Dhara shapes (B·T = 8·1024 and
64·1024; C ∈ {384, 768, 1024}; bf16 and f32). Bytes are the minimal traffic: forward reads x and
writes y (2 passes over B×T×C); forward+backward adds reading g and x and writing dx (5 passes;
w, dw and segment ids are small and not counted). The roofline is the device's peak memory
bandwidth from a small table; on CPU it is a copy bandwidth measured in the same run. Pallas runs
only in interpret mode on CPU, so its timing is skipped there.

  python bench/canon_kernel.py [--batch 8 64] [--channels 384 768 1024]
      [--dtype bfloat16 float32] [--impl reference xla pallas_tpu pallas_gpu] [--kernel 4]
      [--segments] [--iters 5]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from dhara_jax.kernels.canon import api, canon_conv

SEQ = 1024
# Peak HBM bandwidth in bytes/s, matched against jax's device_kind.
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "TPU v5 lite": 819e9, "TPU v5e": 819e9,
                  "TPU v5p": 2765e9, "TPU v5": 2765e9, "TPU v6 lite": 1640e9, "TPU v6e": 1640e9}


def time_fn(fn, *args, iters: int) -> float:
  """Median seconds per call, after one compile-and-warm-up call (the median shrugs off noise
  from other processes on a shared CPU)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def table_peak() -> float | None:
  """The default device's peak memory bandwidth (bytes/s) from the table, None if not listed."""
  kind = jax.devices()[0].device_kind.lower()
  return next((peak for name, peak in PEAK_BANDWIDTH.items() if name.lower() in kind), None)


def copy_bandwidth(x: jax.Array, iters: int) -> float:
  """Bytes/s of x + 1 (one read, one write of x): the CPU roofline at x's size and cache regime."""
  return 2 * x.nbytes / time_fn(jax.jit(lambda a: a + 1), x, iters=iters)


def make_step(impl: str, backward: bool):
  conv = lambda x, w, seg: canon_conv(x, w, seg, impl=impl)
  if not backward:
    return jax.jit(conv)
  loss = lambda x, w, seg, g: jnp.sum((conv(x, w, seg) * g).astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, nargs="+", default=[8, 64], help="B (T = 1024)")
  parser.add_argument("--channels", type=int, nargs="+", default=[384, 768, 1024])
  parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
  parser.add_argument("--impl", nargs="+", default=list(api.IMPLS))
  parser.add_argument("--kernel", type=int, default=4)
  parser.add_argument("--segments", action="store_true", help="packed documents of 100 tokens")
  parser.add_argument("--iters", type=int, default=5)
  args = parser.parse_args()

  backend = jax.default_backend()
  peak = table_peak()
  roofline = (f"{peak / 1e9:.0f} GB/s peak" if peak else
              "measured copy bandwidth of x (x + 1) per shape" if backend == "cpu" else "unknown")
  print(f"backend {backend} ({jax.devices()[0].device_kind}); roofline: {roofline}; "
        f"auto impl: {api.resolve_impl('auto')}; K={args.kernel}, "
        f"segments={'packed, 100 tokens each' if args.segments else 'none'}")
  impls = list(args.impl)
  if backend == "cpu" and any(i.startswith("pallas") for i in impls):
    print("note: Pallas runs only in interpret mode on CPU (a correctness tool); not timed here")
    impls = [i for i in impls if not i.startswith("pallas")]
  print(f"{'impl':<11} {'pass':<8} {'B×T':>8} {'C':>5} {'dtype':<9} {'ms':>9} {'GB/s':>8} "
        f"{'roofline':>8}")
  rng = np.random.default_rng(0)
  for batch in args.batch:
    seg = (jnp.asarray(1 + np.arange(SEQ)[None].repeat(batch, 0) // 100, jnp.int32)
           if args.segments else None)
    for channels in args.channels:
      for dtype in args.dtype:
        x = jnp.asarray(rng.standard_normal((batch, SEQ, channels)), dtype)
        w = jnp.asarray(rng.uniform(-0.5, 0.5, (args.kernel, channels)), jnp.float32)
        bound = peak or (copy_bandwidth(x, args.iters) if backend == "cpu" else float("nan"))
        for impl in impls:
          for backward, passes in ((False, 2), (True, 5)):
            step = make_step(impl, backward)
            step_args = (x, w, seg, x) if backward else (x, w, seg)
            seconds = time_fn(step, *step_args, iters=args.iters)
            rate = passes * x.nbytes / seconds
            print(f"{impl:<11} {'fwd+bwd' if backward else 'fwd':<8} {batch}×{SEQ:<6} "
                  f"{channels:>5} {dtype:<9} {seconds * 1e3:>9.2f} {rate / 1e9:>8.2f} "
                  f"{rate / bound:>8.1%}")


if __name__ == "__main__":
  main()
