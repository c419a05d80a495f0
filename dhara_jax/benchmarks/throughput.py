"""`dhara bench throughput RUN_DIR`: one model's generation speed under Dhara's protocol
(REFERENCES §5): B prompts, exactly G new tokens each (no early end at EOS, so every model
generates the same count), compile once, warm up, the median of N timed calls. AR runs decode
with their KV cache; diffusion runs with the sampler settings given. `dhara bench generate`
compares a diffusion run with its AR run over a whole grid; this measures one run, the number
the study puts beside each cell's accuracy."""

from __future__ import annotations

import dataclasses
import functools
import json
import statistics
from pathlib import Path
from typing import Any

import jax

from dhara_jax.files import write_whole
from dhara_jax.benchmarks.prompts import bench_prompts
from dhara_jax.benchmarks.timing import timed_calls
from dhara_jax.errors import DharaError
from dhara_jax.runs import load_run
from dhara_jax.sampling import Sampling, check_sampling, generate, tokens_per_forward


def measure(run_dir: str | Path, new_tokens: int = 100, batch: int = 1, runs: int = 3,
            prompt_tokens: int = 16, step: int | None = None, **sampler: Any) -> dict:
  """tokens/s = B × G / median seconds of a call, with forwards and tokens per forward."""
  sampling = Sampling(max_new_tokens=new_tokens, **{k: v for k, v in sampler.items()
                                                    if v is not None})
  check_sampling(sampling)
  run = load_run(run_dir, step)
  if not run.phase.diffusion and any(v is not None for v in sampler.values()):
    raise DharaError(f"throughput: {run_dir} is an AR run; the diffusion sampler options "
                     f"({', '.join(k for k, v in sampler.items() if v is not None)}) do not "
                     "apply")
  if prompt_tokens + new_tokens > run.cfg.model.max_seq_len:
    raise DharaError(f"throughput: {prompt_tokens}-token prompts + {new_tokens} new tokens "
                     f"exceed the model's context ({run.cfg.model.max_seq_len})")
  prompts = bench_prompts(run.tokenizer, batch, prompt_tokens)
  call = functools.partial(generate, run.cfg.model, run.params, prompts, sampling,
                           phase=run.phase, eos_id=None)
  out, first, times, _ = timed_calls(call, runs)
  seconds = statistics.median(times)
  generated = sum(len(t) for t in out.tokens)
  return {"run": str(run.run_dir), "step": run.step, "objective": run.phase.objective,
          "kind": "diffusion" if run.phase.diffusion else "ar", "backend": jax.default_backend(),
          "batch": batch, "new_tokens": new_tokens, "prompt_tokens": prompt_tokens,
          "sampling": dataclasses.asdict(sampling) if run.phase.diffusion else None,
          "tokens_per_second": generated / seconds, "seconds": seconds, "seconds_all": times,
          "first_call_seconds": first, "forwards": out.forwards,
          "tokens_per_forward": tokens_per_forward(generated, batch, out.forwards)}


def write(report: dict, out: str | Path) -> None:
  write_whole(out, json.dumps(report, indent=2) + "\n", "throughput")


def format_report(report: dict) -> str:
  how = (f"{report['objective']}, steps {report['sampling']['steps'] or report['new_tokens']}"
         if report["sampling"] else "AR, KV cache")
  return (f"{report['run']} step {report['step']} ({how}): {report['tokens_per_second']:.1f} "
          f"tok/s at B={report['batch']}, G={report['new_tokens']} ({report['forwards']} "
          f"forwards, {report['tokens_per_forward']:.2f} tokens per forward; first call "
          f"{report['first_call_seconds']:.1f} s)")
