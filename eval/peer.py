"""lm-eval's own `HFLM` on a run's export: the peer `dhara eval` is checked against
(tests/test_eval_agreement.py) and timed against (bench/eval_throughput.py).

Needs the `torch` extra (torch, transformers, accelerate)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lm_eval.api.model import LM

from dhara_jax.export.parity import load_torch_model


def hflm(export_dir: str | Path, batch_size: int = 16, eos_prefix: bool = True,
         dtype: str = "float32", head_dtype: str | None = None) -> Any:
  """HFLM over an exported run (on CPU, float32), with the export's own tokenizer. Documents
  follow EOS in our pipeline, so EOS (not HFLM's default BOS) prefixes an empty context, as
  in DharaLM for dhara's SentencePiece runs; `eos_prefix=False` leaves HFLM its own rule
  (BOS, else EOS), which DharaLM follows for Hugging Face tokenizers (eval.harness
  .prefix_token_id). `dtype="float64"`: a peer whose own rounding is negligible (HFLM's float32
  log-softmax over a 49k-token vocabulary moves a long continuation's score by ~1e-3);
  `head_dtype="float64"` keeps the body in `dtype` and computes only the output head, so the
  logits and HFLM's log-softmax, in float64 (that rounding gone at ~40% of a float64 peer's
  time on CPU)."""
  import torch
  from lm_eval.models.huggingface import HFLM
  from transformers import AutoTokenizer

  # trust_remote_code: our own export's code (the DharaTokenizer, which decodes
  # exactly where the stock backend strips spaces, and generate_until's text depends on it).
  torch_dtype = getattr(torch, dtype)
  model = load_torch_model(export_dir, dtype)
  if head_dtype is not None:
    _head_in(model, getattr(torch, head_dtype))
  tokenizer = AutoTokenizer.from_pretrained(export_dir, trust_remote_code=True)
  return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu",
              prefix_token_id=tokenizer.eos_token_id if eos_prefix else None,
              dtype=torch_dtype)


def _head_in(model: Any, dtype: Any) -> None:
  """The model's output head computing in `dtype` (its weights kept, and still tied, in theirs:
  HFLM moves the model to its own dtype, which would undo float64 weights)."""
  import torch

  class Head(torch.nn.Module):
    def __init__(self, head: torch.nn.Linear):
      super().__init__()
      self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
      bias = None if self.head.bias is None else self.head.bias.to(dtype)
      return torch.nn.functional.linear(x.to(dtype), self.head.weight.to(dtype), bias)

  model.set_output_embeddings(Head(model.get_output_embeddings()))


class Timed(LM):
  """An lm-eval model that times the calls of another: seconds and request counts per request
  type (what a requests-per-second comparison divides)."""

  def __init__(self, inner: LM):
    super().__init__()
    self.inner = inner
    self.seconds: dict[str, float] = {}
    self.requests: dict[str, int] = {}

  def __getattr__(self, name: str) -> Any:  # rank, world_size, tokenizer_name, ...
    return getattr(self.__dict__["inner"], name)

  def _timed(self, kind: str, requests: list, **kwargs: Any) -> list:
    started = time.perf_counter()
    out = getattr(self.inner, kind)(requests, **kwargs)
    self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - started
    self.requests[kind] = self.requests.get(kind, 0) + len(requests)
    return out

  def loglikelihood(self, requests: list, **kwargs: Any) -> list:
    return self._timed("loglikelihood", requests, **kwargs)

  def loglikelihood_rolling(self, requests: list, **kwargs: Any) -> list:
    return self._timed("loglikelihood_rolling", requests, **kwargs)

  def generate_until(self, requests: list, **kwargs: Any) -> list:
    return self._timed("generate_until", requests, **kwargs)
