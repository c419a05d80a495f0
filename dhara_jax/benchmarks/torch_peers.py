"""`dhara bench generate`'s PyTorch peers: transformers' generate() on the exported AR model and
the exported diffusion model's generate, timed like the JAX rows. They run in a spawned process
of their own, the only one that imports torch (timing.py says why)."""

from __future__ import annotations

import inspect
import statistics
import sys
from typing import Any

from dhara_jax.benchmarks.timing import timed_calls


def torch_peers(hf_dirs: dict[str, str], jobs: list[dict], runs: int,
                threads: int) -> list[dict]:
  """The peer jobs, timed like the JAX rows (first call, warm-up, `runs` calls). Runs in its
  own process: imports torch, uses `threads` CPU threads (as many as JAX)."""
  import torch

  from dhara_jax.export.parity import load_torch_model

  torch.set_num_threads(threads)
  models, results = {}, []
  for job in jobs:
    kind = job["kind"]
    if kind not in models:
      models[kind] = load_torch_model(hf_dirs[kind])
    model = models[kind]
    if kind == "diffusion" and "steps" not in inspect.signature(model.generate).parameters:
      results.append({"status": "unavailable", "reason": "the exported diffusion model has no "
                      "generate(steps=...) yet"})
      continue
    forwards = [0]
    hook = model.base_model.register_forward_hook(lambda *_: forwards.__setitem__(0,
                                                                                  forwards[0] + 1))
    ids = torch.tensor(job["prompts"], dtype=torch.long)
    mask = torch.ones_like(ids)
    G = job["G"]
    if kind == "hf":
      def call():
        with torch.no_grad():
          return model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                max_new_tokens=G, min_new_tokens=G, eos_token_id=None,
                                pad_token_id=0, use_cache=True)[:, ids.shape[1]:].tolist()
    else:
      def call():
        with torch.no_grad():
          out = model.generate(ids, attention_mask=mask, max_new_tokens=G, steps=job["steps"],
                               block_length=job["block_length"], remasking="low_confidence",
                               threshold=job["threshold"] or None, temperature=0.0,
                               eos_token_id=job["eos"])
        return _new_token_rows(out, ids.shape[1], job["eos"])
    try:
      tokens, first, times, warmed = timed_calls(lambda: (forwards.__setitem__(0, 0), call())[1],
                                            runs)
    except Exception as e:  # a peer that fails is a row that says why, not a failed bench
      hook.remove()
      results.append({"status": "failed", "reason": f"{type(e).__name__}: {e}".splitlines()[0]})
      continue
    hook.remove()
    # Forwards of the last call (every call decodes the same tokens).
    print(f"bench: B={job['B']} G={G} torch {kind}: {statistics.median(times):.2f} s per call",
          file=sys.stderr, flush=True)
    results.append({"status": "ok", "tokens": tokens, "first": first, "times": times,
                    "warmed": warmed, "forwards": forwards[0],
                    "kv_cache": kind == "hf" and _supports_kv_cache(model)})
  return results


def _new_token_rows(out: Any, prompt_len: int, eos: int) -> list[list[int]]:
  """New tokens per row of a diffusion generate's output, cut before the first EOS."""
  sequences = out[0] if isinstance(out, tuple) else getattr(out, "sequences", out)
  rows = []
  for row in sequences[:, prompt_len:].tolist():
    rows.append(row[:row.index(eos)] if eos in row else row)
  return rows


def _supports_kv_cache(model: Any) -> bool:
  """Whether transformers' generate() can keep a KV cache for this model (stock classes and
  our custom-code AR class, Canon and conv state included, take one: `cache` since
  transformers 5, `past_key_values` before)."""
  taken = inspect.signature(model.forward).parameters
  return "cache" in taken or "past_key_values" in taken
