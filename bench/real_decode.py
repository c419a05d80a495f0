"""AR decoding of a real model: greedy tokens/s of SmolLM2-135M-Instruct by dhara (KV cache,
float32, jitted) against transformers' generate() and llama.cpp on the same float32 weights, and
the weight-read bandwidth each reaches against this machine's memory bandwidth.

The model: `dhara import --smollm2` into a temporary run dir (about a minute), or RUN_DIR, a run
imported from --gguf (default: the packaged SmolLM2 Q4_1 file). Peers, each in its own process:
transformers' stock LlamaForCausalLM loaded from that GGUF (de-quantized to float32, as dhara's
import is), greedy with its KV cache; llama.cpp (llama-cpp-python, if installed) on a float32
GGUF written from it, the batch as B sequences of one context. Every decoder makes exactly G
tokens per row from B prompts of 16 tokens (the shipped held-out text; transformers and llama.cpp
suppress EOS until G, dhara is given no EOS) and is timed the same way: a first call (dhara
compiles), a warm-up, then the median of --runs calls, prefill included.

A decode step reads every weight once (the tied embedding once, as the head; the KV cache, ~1%
here, is not counted): weight GB/s = weight bytes × G / call seconds, the same at every B.
Memory bandwidth is measured in the same run (a 1 GiB vector-matrix product, and a copy).

  python bench/real_decode.py [RUN_DIR] [--gguf FILE] [--new-tokens 128] [--batches 1,8]
      [--runs 3] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import tempfile
from pathlib import Path

import jax
import numpy as np

from dhara_jax import cli
from dhara_jax.arg_types import positive_int, positive_ints
from dhara_jax.benchmarks.decode_peers import (LLAMA_CPP_HINT, llama_cpp_greedy, memory_bandwidth,
                                               transformers_greedy)
from dhara_jax.benchmarks.generate import LOG
from dhara_jax.benchmarks.prompts import PROMPT_TOKENS, bench_prompts
from dhara_jax.benchmarks.timing import OtherCpu, in_own_process, timed_calls
from dhara_jax.export.gguf import smollm2_gguf, write_f32_gguf
from dhara_jax.runs import load_run
from dhara_jax.sampling import Sampling, generate

AGREE_AT_LEAST = 32  # the sanity line: greedy tokens of dhara and transformers agree this far


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("run_dir", nargs="?", help="a run imported from --gguf (default: import "
                      "the packaged SmolLM2 into a temporary run dir)")
  parser.add_argument("--gguf", type=Path, help="the GGUF file the run holds (default: the "
                      "packaged SmolLM2-135M-Instruct Q4_1)")
  parser.add_argument("--new-tokens", type=positive_int, default=128)
  parser.add_argument("--batches", type=positive_ints, default=(1, 8))
  parser.add_argument("--runs", type=positive_int, default=3)
  parser.add_argument("--threads", type=positive_int, default=len(os.sched_getaffinity(0)),
                      help="the peers' CPU threads (default: this process's CPUs, as XLA uses)")
  parser.add_argument("--quick", action="store_true", help="G 16, B 1, one timed run (CI)")
  args = parser.parse_args()
  # transformers' GGUF loader draws a bar per load; tqdm reads this when first imported (here
  # and in the peers' processes, which inherit it)
  os.environ.setdefault("TQDM_DISABLE", "1")
  if args.quick:
    args.new_tokens, args.batches, args.runs = 16, (1,), 1
  gguf = args.gguf or smollm2_gguf()
  others, load_before = OtherCpu(), os.getloadavg()
  print(f"machine: {cpu_model()}, {len(os.sched_getaffinity(0))} cores, "
        f"{datetime.date.today()}; JAX {jax.__version__} on {jax.devices()[0].device_kind}; "
        f"load average before {_load(load_before)}")
  bandwidth = measured_bandwidth(args.threads, "before")
  with tempfile.TemporaryDirectory(prefix="real-decode-") as tmp:
    run_dir = args.run_dir or imported(gguf, Path(tmp) / "run", default=args.gguf is None)
    run = load_run(run_dir)
    prompts = bench_prompts(run.tokenizer, max(args.batches), PROMPT_TOKENS)
    batches = [prompts[:b] for b in args.batches]
    G = args.new_tokens
    print(f"model: {run_dir} ({run.cfg.model.family}, {run.cfg.model.num_layers} layers, "
          f"d {run.cfg.model.d_model}, float32); GGUF {gguf.name}; prompts of "
          f"{PROMPT_TOKENS} tokens, G {G} greedy, median of {args.runs} runs")
    LOG("bench: dhara")
    decoders = {"dhara": dhara_greedy(run, batches, G, args.runs)}
    LOG("bench: transformers, in its own process")
    decoders["transformers"] = in_own_process(transformers_greedy, gguf, batches, G, args.runs,
                                              args.threads)
    try:
      import llama_cpp  # noqa: F401
    except ImportError:
      print(f"llama.cpp: skipped (llama_cpp is not importable: {LLAMA_CPP_HINT})")
    else:
      LOG("bench: llama.cpp (a float32 GGUF first), in its own process")
      f32 = write_f32_gguf(gguf, Path(tmp) / f"{gguf.stem}.F32.gguf")
      decoders["llama.cpp"] = in_own_process(llama_cpp_greedy, f32, batches, G, args.runs,
                                             args.threads)
  after = measured_bandwidth(args.threads, "after")
  bandwidth = {k: max(v, after[k]) for k, v in bandwidth.items()}
  print_table(decoders, args.batches, G, bandwidth["read_GBps"])
  print_agreement(decoders, args.batches, run.tokenizer.eos_id)
  share = others.share()
  print(f"load average after {_load(os.getloadavg())}; other processes took "
        f"{'?' if share is None else f'{share:.0%}'} of the CPUs during the run")


def measured_bandwidth(threads: int, when: str) -> dict[str, float]:
  bandwidth = memory_bandwidth(threads=threads)
  print(f"memory bandwidth {when}: read {bandwidth['read_GBps']:.1f} GB/s (1 GiB float32 "
        f"vector-matrix product), copy {bandwidth['copy_GBps']:.1f} GB/s (read + write)")
  return bandwidth


def imported(gguf: Path, run_dir: Path, default: bool) -> Path:
  """A run dir of `gguf` imported the documented way (`dhara import`), in a process of its own:
  the import runs torch, whose idle threads would slow the timings here."""
  source = ["--smollm2"] if default else [str(gguf)]
  LOG(f"bench: dhara import {' '.join(source)} (about a minute)")
  if in_own_process(cli.main, ["import", *source, "--run-dir", str(run_dir)]) != 0:
    raise SystemExit(f"bench: dhara import of {gguf} failed")
  return run_dir


def dhara_greedy(run, batches: list[list[list[int]]], new_tokens: int, runs: int) -> dict:
  """dhara's KV-cached greedy decoding (sampling.generate, jitted) of each batch, timed."""
  # float32 compute (the peers'), on one device: a test session's fake CPU devices would each
  # run the replicated program.
  cfg = dataclasses.replace(run.cfg.model, dtype="float32")
  params = jax.device_put(run.params, jax.devices()[0])
  sampling = Sampling(max_new_tokens=new_tokens)  # temperature 0: greedy
  results = []
  for prompts in batches:
    out, first, times, _ = timed_calls(lambda: generate(cfg, params, prompts, sampling),
                                       runs, slow_seconds=float("inf"))
    results.append({"tokens": out.tokens, "first_seconds": first, "times": times})
  weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  return {"results": results, "weight_bytes": weights, "threads": None,
          "label": f"dhara (JAX {jax.__version__}, KV cache)"}


def print_table(decoders: dict, batch_sizes: tuple[int, ...], new_tokens: int,
                read_GBps: float) -> None:
  print(f"\n{'decoder':<40} {'B':>3} {'tok/s':>8} {'vs dhara':>8} {'weight GB/s':>11} "
        f"{'% of read bw':>12} {'s/call':>7} {'first s':>7}   (read bw: the best measured, "
        f"{read_GBps:.1f} GB/s)")
  for i, B in enumerate(batch_sizes):
    base = None
    for decoder in decoders.values():
      r = decoder["results"][i]
      seconds = statistics.median(r["times"])
      made = sum(len(row) for row in r["tokens"])
      assert made == B * new_tokens, f"{decoder['label']} made {made} tokens, not {B}×G"
      tps = made / seconds
      base = base or tps
      weight_GBps = decoder["weight_bytes"] * new_tokens / seconds / 1e9
      print(f"{decoder['label']:<40} {B:>3} {tps:>8.1f} {tps / base:>7.2f}× {weight_GBps:>11.2f} "
            f"{weight_GBps / read_GBps:>11.0%} {seconds:>7.2f} {r['first_seconds']:>7.1f}")
  weights = {d["weight_bytes"] for d in decoders.values()}
  print(f"weights read per step: {', '.join(f'{w / 1e6:.0f} MB' for w in sorted(weights))} "
        f"(float32); weight GB/s = that × G / (median seconds per call)")


def print_agreement(decoders: dict, batch_sizes: tuple[int, ...], eos_id: int | None) -> None:
  """Whether each peer's greedy tokens equal dhara's, row by row; where not, the first position
  that differs (float32 near-ties may flip late; dhara is given no EOS, the peers suppress it)."""
  for name, decoder in decoders.items():
    if name == "dhara":
      continue
    for i, B in enumerate(batch_sizes):
      ours, theirs = decoders["dhara"]["results"][i]["tokens"], decoder["results"][i]["tokens"]
      firsts = [first_difference(a, b) for a, b in zip(ours, theirs)]
      same = sum(f is None for f in firsts)
      line = f"greedy tokens, dhara vs {name}, B={B}: {same}/{B} rows equal over all G"
      if same < B:
        row = min(range(B), key=lambda r: np.inf if firsts[r] is None else firsts[r])
        at = firsts[row]
        eos = " (dhara's token is EOS)" if ours[row][at] == eos_id else ""
        line += (f"; first difference at position {at} of row {row}: dhara {ours[row][at]}, "
                 f"{name} {theirs[row][at]}{eos}")
        if B == 1 and at < AGREE_AT_LEAST:
          line += f" — WARNING: they should agree on at least the first {AGREE_AT_LEAST}"
      print(line)


def first_difference(a: list[int], b: list[int]) -> int | None:
  return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
              None if len(a) == len(b) else min(len(a), len(b)))


def cpu_model() -> str:
  """lscpu's model name (from /proc/cpuinfo)."""
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or "unknown CPU"


def _load(load: tuple[float, float, float]) -> str:
  return " / ".join(f"{x:.2f}" for x in load) + " (1 / 5 / 15 min)"


if __name__ == "__main__":
  main()
