"""`dhara generate`: continuations of prompts with a run's model, by the sampler the run was
trained for (KV-cached AR, or the diffusion samplers for mdm / block runs)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Sequence

from dhara_jax.errors import DharaError
from dhara_jax.runs import load_run
from dhara_jax.sampling import Sampling, check_sampling, generate, tokens_per_forward


def read_prompts(prompt: str | None, prompt_file: str | None) -> list[str]:
  """The prompt texts: --prompt, or one per line of --prompt-file (one batch)."""
  if (prompt is None) == (prompt_file is None):
    raise DharaError("generate: give either --prompt TEXT or --prompt-file FILE"
                     + (", not both" if prompt is not None else ""))
  if prompt is not None:
    return _without_nul([prompt], lambda _: "--prompt")
  path = Path(prompt_file)
  if not path.is_file():
    raise DharaError(f"generate: no prompt file {path}")
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except UnicodeDecodeError as e:
    raise DharaError(f"generate: {path} is not UTF-8 text ({e.reason} at byte {e.start})") \
        from None
  if not lines:
    raise DharaError(f"generate: {path} holds no prompts (one per line)")
  empty = [i for i, line in enumerate(lines, 1) if not line.strip()]
  if empty:
    raise DharaError(f"generate: {path} line {empty[0]} is empty (one prompt per line)")
  return _without_nul(lines, lambda line: f"{path} line {line}")


def _without_nul(texts: list[str], where: Callable[[int], str]) -> list[str]:
  """`texts`, none holding a NUL character (a binary file, a stray byte): the tokenizer would
  take it as a byte token, and the continuation of such a prompt is nothing a user asked for."""
  for line, text in enumerate(texts, 1):
    if "\0" in text:
      raise DharaError(f"generate: {where(line)} holds a NUL character; prompts are text")
  return texts


def generate_from_run(run_dir: str | Path, texts: Sequence[str], sampling: Sampling,
                      step: int | None = None, stats: bool = False) -> dict:
  """Continuations of `texts` (one batch) with the sampler the run was trained for.

  `stats`: time a second call with the same shapes (the first compiles): tokens/s counts the
  new tokens of all rows, each up to its first EOS."""
  check_sampling(sampling)  # before the checkpoint is read
  run = load_run(run_dir, step)
  # What transformers' tokenizer(prompt) gives: a BOS where the tokenizer adds one.
  prompts = [run.tokenizer.encode(t, add_special_tokens=True).tolist() for t in texts]

  def call():
    return generate(run.cfg.model, run.params, prompts, sampling, phase=run.phase,
                    eos_id=run.tokenizer.eos_id)

  started = time.perf_counter()
  out = call()
  first_seconds = time.perf_counter() - started
  new_tokens = sum(len(t) for t in out.tokens)
  report = {
      "run": str(run.run_dir), "step": run.step, "objective": run.phase.objective,
      "block_size": run.phase.block_size, "sampling": dataclasses.asdict(sampling),
      "samples": [{"prompt": text, "prompt_ids": ids, "token_ids": new,
                   "continuation": run.tokenizer.decode(new),
                   "text": text + run.tokenizer.decode(new), "finished": done}
                  for text, ids, new, done in zip(texts, prompts, out.tokens, out.finished)],
      "stats": {"batch": len(prompts), "new_tokens": new_tokens, "forwards": out.forwards,
                "tokens_per_forward": tokens_per_forward(new_tokens, len(prompts),
                                                         out.forwards)},
  }
  if stats:
    started = time.perf_counter()
    call()
    seconds = time.perf_counter() - started
    report["stats"].update(seconds=seconds, tokens_per_second=new_tokens / seconds,
                           first_call_seconds=first_seconds)
  return report


def format_generation(report: dict) -> str:
  samples = report["samples"]
  lines = []
  for i, sample in enumerate(samples):
    if len(samples) > 1:
      lines.append(f"--- {i} ---")
    lines.append(sample["text"])
  s = report["stats"]
  if "seconds" in s:
    lines.append(f"stats: {s['new_tokens']} new tokens over {s['batch']} prompt(s) in "
                 f"{s['seconds']:.3f} s = {s['tokens_per_second']:.1f} tok/s (after a "
                 f"warm-up call of {s['first_call_seconds']:.2f} s); {s['forwards']} forward "
                 f"passes, {s['tokens_per_forward']:.2f} tokens per forward per row")
  return "\n".join(lines)
