"""Training tokens/s and MFU of a run config on this machine's devices.

The device check for issue 5's GPU target (the Dhara-70M AR config, ≥ 40% MFU on one H100).
Runs the real sharded train step of the config (its mesh, compute dtype, optimizer, logit
chunking) on random tokens of the config's batch shape, so it needs no dataset or tokenizer.
MFU = model FLOPs/token (as `dhara params` counts them, at data.seq_len) × tokens/s over the
devices' dense bf16 peak (table in dhara_jax/metrics.py; none for CPUs).

  python bench/train_mfu.py [--config configs/runs/dhara_70m_ar.yaml --steps 10] [key=value ...]
  python bench/train_mfu.py train.objective=mdm model.attention=bidirectional \
      model.mask_token_id=50256                       # masked diffusion (Dhara-70M's keys)
  python bench/train_mfu.py train.objective=block train.block_size=32 model.mask_token_id=50256
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from dhara_jax import config
from dhara_jax.arg_types import positive_int
from dhara_jax.benchmarks.timing import seconds_per_call
from dhara_jax.benchmarks.train_step import jax_train_step
from dhara_jax.kernels import attention
from dhara_jax.metrics import mfu, peak_flops
from dhara_jax.params import count_params


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/runs/dhara_70m_ar.yaml")
  parser.add_argument("--steps", type=positive_int, default=10, help="timed steps")
  parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.batch_size=64")
  args = parser.parse_args()
  cfg = config.load(args.config, args.overrides)
  batch, length = cfg.data.batch_size, cfg.data.seq_len
  tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (batch, length))
  device = jax.devices()[0]
  print(f"{args.config}: {cfg.model.family}, {cfg.model.num_layers} layers, d "
        f"{cfg.model.d_model}, {cfg.model.dtype}, B·T {batch}·{length}, "
        f"{jax.device_count()} × {device.device_kind}, attention "
        f"{attention.resolve_impl(cfg.model.attention_impl)}")
  seconds = seconds_per_call(jax_train_step(cfg, tokens, cfg.mesh), args.steps)
  # Block diffusion runs the model over [x_t ; x_0]: it computes two tokens per data token
  # (its attention over 2L keys is masked to about the same work per token).
  computed = 2 if cfg.train.objective == "block" else 1
  tokens_per_second = computed * batch * length / seconds
  flops_per_token = count_params(cfg.model, length)["flops_per_token"]
  utilisation = mfu(flops_per_token, tokens_per_second)
  print(f"objective {cfg.train.objective}"
        + (f" (block {cfg.train.block_size}: tok/s and MFU count the {computed}× tokens it "
           "computes)" if computed > 1 else ""))
  print(f"{tokens_per_second:,.0f} tok/s ({seconds:.3f} s/step), "
        f"{flops_per_token / 1e6:,.0f} MFLOP/token, "
        f"{flops_per_token * tokens_per_second / 1e12 / jax.device_count():.1f} TFLOP/s per device")
  print(f"MFU {utilisation:.1%} of {peak_flops(device) / 1e12:.0f} TFLOP/s per device"
        if utilisation is not None else f"MFU n/a (no peak for {device.device_kind!r})")


if __name__ == "__main__":
  main()
