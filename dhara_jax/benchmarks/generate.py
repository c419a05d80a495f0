"""`dhara bench generate` (bench/generate_throughput.py): generation throughput of a diffusion
run against its AR run. It times, in one invocation on the same CPUs:
  - KV-cached AR decoding of the AR run (greedy), the baseline every speed-up is measured
    against;
  - the diffusion run's samplers over a grid of settings (fixed step counts G, G/2, G/4, G/10,
    threshold decoding τ 0.9 / 0.7, and a cache reference row);
  - peers: transformers' `generate()` on the exported AR model and the exported diffusion
    model's PyTorch `generate` (when it has one), in a process of their own so that neither
    runtime's thread pools and heap slow the other (torch_peers.py, timing.py).
Every setting runs once to compile, once to warm up, then `runs` times; the median is reported.
Beside every speed-up it prints a quality proxy (quality.py): the AR model's ("the judge's")
perplexity of the generated tokens (prompt as context) and the distinct-2-gram rate of the
outputs; report.py compares the rows and prints them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

from dhara_jax import convert
from dhara_jax.benchmarks.prompts import PROMPT_TOKENS, bench_prompts
from dhara_jax.benchmarks.quality import JUDGE, distinct_2, judge_perplexity
from dhara_jax.benchmarks.report import ar_overtakes, compare, headline
from dhara_jax.benchmarks.timing import OtherCpu, in_own_process, timed_calls
from dhara_jax.benchmarks.torch_peers import torch_peers
from dhara_jax.errors import DharaError
from dhara_jax.phases import Phase
from dhara_jax.runs import export_run, load_run
from dhara_jax.sampling import Sampling, generate, tokens_per_forward
from dhara_jax.sampling.diffusion import default_block, resolve_cache

BATCHES = (1, 8, 64)
NEW_TOKENS = (100, 256)
STEP_DIVISORS = (1, 2, 4, 10)  # diffusion steps G / d
THRESHOLDS = (0.9, 0.7)
QUICK_NEW_TOKENS = 32  # --quick: at most this G (less when the context is shorter)
LOG = functools.partial(print, file=sys.stderr, flush=True)


def ar_run_of(run_dir: Path, ar_run: str | Path | None) -> Path:
  """--ar-run, else the AR run the diffusion run's conversion record names."""
  if ar_run is not None:
    return Path(ar_run)
  record = Path(run_dir) / convert.RECORD
  if record.is_file():
    try:
      return Path(json.loads(record.read_text())["ar_run"])
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise DharaError(f"bench: {record} is unreadable ({e}); pass --ar-run") from None
  raise DharaError(f"bench: {run_dir} is not a conversion (no {convert.RECORD}); pass --ar-run "
                   "AR_RUN_DIR")


def block_length_for(phase: Phase, new_tokens: int) -> int:
  """generate's own default (the trained block size, or its largest divisor of G below it; G
  for an mdm model), unless a smaller divisor of G lets every whole step count of the grid
  split evenly over the blocks (G = 100, trained 32: 20, not 25, so G/2, G/4, G/10 all run)."""
  default = default_block(new_tokens, phase)
  steps = [new_tokens // d for d in STEP_DIVISORS if new_tokens % d == 0]
  fits = [b for b in range(default, 0, -1)
          if new_tokens % b == 0 and all(n % (new_tokens // b) == 0 for n in steps)]
  return fits[0] if fits else default


@dataclasses.dataclass(frozen=True)
class Setting:
  """One row of the grid: who generates, with which sampler settings."""

  label: str
  engine: str  # jax | torch
  family: str  # ar | diffusion
  sampling: Any  # dhara_jax.sampling.Sampling
  skip: str = ""  # why this setting is not run (empty: it runs)


def grid_settings(phase: Phase, new_tokens: int) -> list[Setting]:
  """The JAX settings at G new tokens: the AR baseline, then the diffusion grid."""
  G = new_tokens
  block = block_length_for(phase, G)
  blocks = G // block
  base = Sampling(max_new_tokens=G, block_length=block, cache="auto")
  out = [Setting("jax-ar kv-cache", "jax", "ar", Sampling(max_new_tokens=G))]
  seen = set()
  for d in STEP_DIVISORS:
    label = f"jax-diffusion steps=G/{d}" if d > 1 else "jax-diffusion steps=G"
    if G % d:
      out.append(Setting(label, "jax", "diffusion", base, f"G/{d} = {G / d:g} is not a whole "
                         "number of steps"))
      continue
    steps = G // d
    if steps in seen:
      continue
    seen.add(steps)
    skip = "" if steps % blocks == 0 else (f"{steps} steps do not split evenly over {blocks} "
                                           f"blocks of {block}")
    out.append(Setting(f"{label} ({steps})", "jax", "diffusion",
                       dataclasses.replace(base, steps=steps), skip))
  for tau in THRESHOLDS:
    out.append(Setting(f"jax-diffusion τ={tau}", "jax", "diffusion",
                       dataclasses.replace(base, steps=G, threshold=tau)))
  # The cache's reference: block-trained models decode with the exact block cache under auto.
  reference = "none" if phase.objective == "block" else "approx"
  out.append(Setting(f"jax-diffusion steps=G ({G}) cache={reference}", "jax", "diffusion",
                     dataclasses.replace(base, steps=G, cache=reference)))
  return out


def _row(B: int, G: int, setting: Setting, phase: Phase, **fields: Any) -> dict:
  """A JAX row's settings; `cache_used` is what `cache` resolves to for this model."""
  s = setting.sampling
  row = {"B": B, "G": G, "setting": setting.label, "engine": setting.engine,
         "family": setting.family, "status": "ok", "reason": "", "cache_used": "kv"}
  if setting.family == "diffusion" and not setting.skip:
    row.update(steps=s.steps or G, block_length=s.block_length, threshold=s.threshold,
               cache=s.cache, cache_used=resolve_cache(s.cache, phase), remasking=s.remasking)
  row.update(fields)
  return row


def _measured(row: dict, outputs: list[list[int]], forwards: int, first: float,
              times: list[float], warmed: bool) -> dict:
  seconds = statistics.median(times)
  new = sum(len(t) for t in outputs)
  row.update(first_call_seconds=first, warmed_up=warmed, seconds=seconds, seconds_all=times,
             new_tokens=new,
             tokens_per_second=new / seconds, forwards=forwards,
             tokens_per_forward=tokens_per_forward(new, row["B"], forwards))
  return row


def run_bench(run_dir: str | Path, ar_run: str | Path | None = None,
              batches: Sequence[int] = BATCHES, new_tokens: Sequence[int] = NEW_TOKENS,
              runs: int = 3, quick: bool = False, prompt_tokens: int = PROMPT_TOKENS,
              log: Callable[[str], None] = LOG) -> dict:
  """Rows (one per B, G and setting), the batch size where AR overtakes diffusion, and the
  headline (see module docstring)."""
  started = time.perf_counter()
  run_dir = Path(run_dir)
  ar_dir = ar_run_of(run_dir, ar_run)
  diffusion, ar = load_run(run_dir), load_run(ar_dir)
  if not diffusion.phase.diffusion:
    raise DharaError(f"bench: {run_dir} is not a diffusion run (it was trained with "
                     f"{diffusion.phase.objective}); pass the diffusion run first")
  if ar.phase.diffusion:
    raise DharaError(f"bench: {ar_dir} is not an AR run (it was trained with "
                     f"{ar.phase.objective})")
  if ar.tokenizer.sha256 != diffusion.tokenizer.sha256:
    raise DharaError(f"bench: {run_dir} and {ar_dir} use different tokenizers")
  context = min(diffusion.cfg.model.max_seq_len, ar.cfg.model.max_seq_len)
  if prompt_tokens >= context:
    raise DharaError(f"bench: {prompt_tokens}-token prompts leave no room in the model's "
                     f"context ({context})")
  cut = []
  if quick:
    batches, new_tokens, runs = (1,), (min(QUICK_NEW_TOKENS, context - prompt_tokens),), 1
    cut.append(f"--quick: B=1, G={new_tokens[0]}, 1 timed run")
  threads = len(os.sched_getaffinity(0))
  others = OtherCpu()  # other processes on these CPUs would slow both sides unevenly
  all_prompts = bench_prompts(ar.tokenizer, max(batches), prompt_tokens)
  eos = ar.tokenizer.eos_id
  log(f"bench: diffusion {run_dir} ({diffusion.phase.objective}"
      f"{f' {diffusion.phase.block_size}' if diffusion.phase.block_size else ''}), AR {ar_dir}, "
      f"{jax.default_backend()}, {threads} CPUs")

  def judged(row: dict, prompts: list[list[int]], outputs: list[list[int]]) -> dict:
    row["judge_ppl"] = judge_perplexity(ar.cfg.model, ar.params, prompts, outputs,
                                        prompt_tokens + row["G"])
    row["distinct_2"] = distinct_2(outputs)
    return row

  rows, peer_jobs = [], []
  for G in new_tokens:
    for B in batches:
      prompts = all_prompts[:B]
      if prompt_tokens + G > context:
        rows.append({"B": B, "G": G, "setting": "all", "status": "skipped",
                     "reason": f"prompt {prompt_tokens} + G {G} = {prompt_tokens + G} tokens "
                               f"exceed the model's context ({context})"})
        continue
      for setting in grid_settings(diffusion.phase, G):
        if setting.skip:
          rows.append(_row(B, G, setting, diffusion.phase, status="skipped",
                           reason=setting.skip))
          continue
        model = ar if setting.family == "ar" else diffusion
        call = functools.partial(generate, model.cfg.model, model.params, prompts,
                                 setting.sampling, phase=model.phase, eos_id=eos)
        out, first, times, warmed = timed_calls(call, runs)
        row = _measured(_row(B, G, setting, model.phase), out.tokens, out.forwards, first,
                        times, warmed)
        rows.append(judged(row, prompts, out.tokens))
        log(f"bench: B={B} G={G} {setting.label}: {row['tokens_per_second']:.1f} tok/s "
            f"(first call {first:.1f} s)")
      peer_jobs += _peer_jobs(B, G, prompts, diffusion.phase, eos)
  if peer_jobs:
    for row, prompts, outputs in _peer_rows(ar_dir, run_dir, peer_jobs, runs, threads, log):
      rows.append(row if outputs is None else judged(row, prompts, outputs))
  compare(rows)
  cut += [f"B={r['B']} G={r['G']} {r['setting']}: 1 timed call, no warm-up (first call "
          f"{r['first_call_seconds']:.0f} s)" for r in rows if r.get("warmed_up") is False]
  return {"run": str(run_dir), "ar_run": str(ar_dir),
          "objective": diffusion.phase.objective, "block_size": diffusion.phase.block_size,
          "backend": jax.default_backend(), "threads": threads, "prompt_tokens": prompt_tokens,
          "runs": runs, "quick": quick, "other_cpu_share": others.share(), "judge": JUDGE,
          "distinct_2": "distinct 2-grams / all 2-grams of the B outputs, pooled",
          "tokens_per_forward": "new tokens per row per forward pass over the batch",
          "rows": rows, "ar_overtakes": ar_overtakes(rows), "headline": headline(rows),
          "cut": cut, "seconds": round(time.perf_counter() - started, 1)}


def _peer_jobs(B: int, G: int, prompts: list[list[int]], phase: Phase, eos: int) -> list[dict]:
  """The PyTorch peers at (B, G): transformers' generate() on the AR export, and the diffusion
  export's generate at one token per step and at τ 0.9 (its block KV cache for a block-trained
  export, the full-sequence sampler for an mdm one)."""
  block = block_length_for(phase, G)
  jobs = [{"B": B, "G": G, "kind": "hf", "prompts": prompts}]
  for tau in (0.0, THRESHOLDS[0]):
    jobs.append({"B": B, "G": G, "kind": "diffusion", "prompts": prompts, "steps": G,
                 "block_length": block, "threshold": tau, "eos": eos})
  return jobs


def _peer_rows(ar_dir: Path, run_dir: Path, jobs: list[dict], runs: int, threads: int,
               log: Callable[[str], None]) -> list[tuple[dict, list, list | None]]:
  """Runs the peer jobs in a spawned process (JAX idles meanwhile); (row, prompts, outputs or
  None) each."""
  with tempfile.TemporaryDirectory() as tmp:
    try:
      import torch  # noqa: F401  (only to say so here; the peers import it in their process)
      import transformers  # noqa: F401
    except ImportError as e:
      results = [{"status": "unavailable", "reason": f"{e.name} is not installed"}] * len(jobs)
    else:
      hf_dirs = {"hf": export_run(ar_dir, Path(tmp) / "ar"),
                 "diffusion": export_run(run_dir, Path(tmp) / "diffusion")}
      log(f"bench: {len(jobs)} PyTorch peer runs (exports in {tmp})")
      results = in_own_process(torch_peers, hf_dirs, jobs, runs, threads)
  out = []
  for job, result in zip(jobs, results):
    if job["kind"] == "hf":
      label = "hf-generate" + ("" if result["status"] != "ok" else
                               " kv-cache" if result["kv_cache"] else " no-cache")
      row = {"B": job["B"], "G": job["G"], "setting": label, "engine": "torch", "family": "ar",
             "status": "ok", "reason": "",
             "cache_used": "kv" if result.get("kv_cache") else "none"}
    else:
      label = (f"torch-diffusion τ={job['threshold']}" if job["threshold"] else
               f"torch-diffusion steps=G ({job['steps']})")
      row = {"B": job["B"], "G": job["G"], "setting": label, "engine": "torch",
             "family": "diffusion", "status": "ok", "reason": "", "steps": job["steps"],
             "block_length": job["block_length"], "threshold": job["threshold"],
             "cache": "none", "cache_used": "none", "remasking": "low_confidence"}
    if result["status"] != "ok":
      row.update(status=result["status"], reason=result["reason"])
      out.append((row, job["prompts"], None))
      continue
    row = _measured(row, result["tokens"], result["forwards"], result["first"], result["times"],
                    result["warmed"])
    out.append((row, job["prompts"], result["tokens"]))
  return out
