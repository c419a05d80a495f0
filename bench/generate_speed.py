"""Decoding speed of a model shape, independent of its weights: KV-cached AR tokens/s against the
block-cached diffusion sampler at fixed tokens per forward (G / steps), batch by batch.

A fixed-schedule diffusion step costs the same whatever the weights say, so random weights give
the hardware side of the AR-vs-diffusion trade: the speed-up a model reaches if it keeps its
quality at k tokens per forward. (Whether it does is `dhara bench generate`'s question, on trained
models.) With `--torch`, transformers' generate() (greedy, KV-cached) on the same weights
exported: the family's stock class where one expresses the config (e.g. the quickstart's shape
without Canon: LlamaForCausalLM), else the custom-code twin (LLaMA3-Canon, the quickstart's and
Dhara-70M's family: DharaForCausalLM with its own cache, Canon tails included); and the exported
diffusion model's PyTorch block sampler (its exact block cache) at the block-cache rows'
schedules. No dataset, tokenizer or install needed; part of bench/gpu_check.sh.

  python bench/generate_speed.py [--config configs/runs/dhara_70m.yaml] [--batches 1,8,64]
      [--new-tokens 100] [--prompt 16] [--block 20] [--torch] [--torch-threads N] [key=value ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import jax
import numpy as np

from dhara_jax import config
from dhara_jax.benchmarks.timing import timed_calls
from dhara_jax.model import init_params
from dhara_jax.phases import Phase
from dhara_jax.sampling import Sampling, generate


def _seconds(call, runs: int) -> float:
  """Median wall time of `runs` calls after a compiling call and a warm-up."""
  times = timed_calls(call, runs, slow_seconds=math.inf)[2]
  return float(np.median(times))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/runs/dhara_70m.yaml")
  parser.add_argument("--batches", default="1,8,64")
  parser.add_argument("--new-tokens", type=int, default=100)
  parser.add_argument("--prompt", type=int, default=20, help="prompt tokens")
  parser.add_argument("--block", type=int, default=20, help="diffusion block length")
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--torch", action="store_true",
                      help="also time the exports' PyTorch generate(): AR (transformers', "
                      "KV-cached) and the block-diffusion sampler")
  parser.add_argument("--torch-threads", type=int, default=0,
                      help="torch's CPU threads (0: as many as JAX's CPU devices use)")
  parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
  args = parser.parse_args()
  cfg = config.load(args.config, args.overrides).model
  if cfg.mask_token_id < 0:
    cfg = dataclasses.replace(cfg, mask_token_id=cfg.vocab_size - 1)
  ar_cfg = dataclasses.replace(cfg, attention="causal")
  params = init_params(cfg, jax.random.key(0))
  new, block = args.new_tokens, args.block
  print(f"{args.config}: {cfg.family}, {cfg.num_layers} layers, d {cfg.d_model}, {cfg.dtype}, "
        f"{jax.devices()[0].device_kind}; prompt {args.prompt}, G {new}, block {block}")
  print(f"{'B':>4} {'sampler':<26} {'tok/s':>10} {'forwards':>9} {'tok/fwd':>8} {'vs AR':>7}")
  rng = np.random.default_rng(0)
  for batch in (int(b) for b in args.batches.split(",")):
    prompts = rng.integers(1, cfg.vocab_size - 1, (batch, args.prompt)).tolist()
    ar = Sampling(max_new_tokens=new)
    ar_s = _seconds(lambda: generate(ar_cfg, params, prompts, ar), args.runs)
    ar_tps = batch * new / ar_s
    print(f"{batch:>4} {'AR, KV cache':<26} {ar_tps:>10,.0f} {new:>9} {1:>8.1f} {1:>7.2f}")
    schedules = [new // k for k in (1, 2, 4, 10)
                 if new // k >= new // block and (new // k) % (new // block) == 0]
    for steps in schedules:  # at least one step per block, the same number in each
      s = Sampling(max_new_tokens=new, steps=steps, block_length=block, cache="block")
      seconds = _seconds(lambda: generate(cfg, params, prompts, s, phase=Phase("block", block)),
                         args.runs)
      tps = batch * new / seconds
      print(f"{batch:>4} {f'block cache, {steps} steps':<26} {tps:>10,.0f} {steps:>9} "
            f"{new / steps:>8.1f} {tps / ar_tps:>7.2f}")
    if args.torch:  # last: torch's idle threads spin for a while after a call
      call = torch_generate(ar_cfg, params, prompts, new, Phase("ar"), args.torch_threads)
      hf_tps = batch * new / _seconds(call, args.runs)
      print(f"{batch:>4} {'PyTorch generate(), AR':<26} {hf_tps:>10,.0f} {new:>9} {1:>8.1f} "
            f"{hf_tps / ar_tps:>7.2f}   ratio jax/transformers {ar_tps / hf_tps:.2f}x")
      for steps in schedules:
        call = torch_generate(cfg, params, prompts, new, Phase("block", block),
                              args.torch_threads, steps=steps, block_length=block)
        tps = batch * new / _seconds(call, args.runs)
        print(f"{batch:>4} {f'PyTorch block, {steps} steps':<26} {tps:>10,.0f} {steps:>9} "
              f"{new / steps:>8.1f} {tps / ar_tps:>7.2f}")


def torch_generate(cfg, params, prompts, new_tokens, phase, threads=0, **sampler):
  """A call of the export's greedy PyTorch generate(), exactly `new_tokens` tokens, on `params`
  exported as trained with `phase` (float32, on `threads` CPU threads, 0: as many as JAX's CPU
  devices use): AR,
  transformers' generate() with its KV cache; block diffusion, the twin's block sampler with
  its exact block cache (`sampler`: its steps and block length)."""
  import os
  import tempfile

  import torch

  from dhara_jax.export import export_hf
  from dhara_jax.export.parity import load_torch_model

  torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
  with tempfile.TemporaryDirectory() as tmp:
    model = load_torch_model(export_hf(cfg, jax.device_get(params), tmp, phase=phase))
  ids = torch.tensor(prompts)
  if phase.diffusion:
    return lambda: model.generate(ids, max_new_tokens=new_tokens, **sampler)
  print(f"     PyTorch AR peer: {type(model).__name__}, KV-cached")

  def call():
    with torch.no_grad():
      return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            use_cache=True, pad_token_id=0)
  return call


if __name__ == "__main__":
  main()
