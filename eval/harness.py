"""`DharaLM`: a dhara-jax run as an lm-eval model.

lm-eval's `TemplateLM` does the text side exactly as for its HF models (context/continuation
split, empty contexts, trailing spaces); this class supplies tokens and scores:
  - loglikelihood: the AR scorer (eval/scoring.py) or the diffusion ELBO (eval/elbo.py);
  - loglikelihood_rolling: lm-eval's own rolling windows, each scored as above;
  - generate_until: dhara_jax.sampling.generate (KV-cached AR, or the diffusion samplers), stop
    strings honoured as lm-eval's HFLM does (the decoded text is cut at the first one).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from lm_eval.api.model import TemplateLM
from lm_eval.utils import simple_parse_args_string
from tqdm import tqdm

from dhara_jax.errors import DharaError
from dhara_jax.phases import Phase
from dhara_jax.sampling import Sampling
from eval.scoring import DEFAULT_BATCH_TOKENS, DEFAULT_MC_SAMPLES  # noqa: F401 (re-exported)

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generate_until
GENERATE_BATCH = 16  # prompts per generate call (padded to it: one program per prompt bucket)
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Options:
  """How a run is scored. Diffusion runs read `mc_samples` and the sampler settings in
  `sampling`; AR runs decode greedily (or as lm-eval's gen_kwargs ask)."""

  mc_samples: int = DEFAULT_MC_SAMPLES
  batch_tokens: int = DEFAULT_BATCH_TOKENS
  seed: int = 0
  sampling: Sampling = Sampling()
  progress: bool = True


class DharaLM(TemplateLM):
  """An lm-eval model over one run's parameters (`runs.LoadedRun`)."""

  def __init__(self, run: Any, options: Options = Options()):
    super().__init__()
    from eval.elbo import ELBOScorer
    from eval.scoring import ARScorer

    self.run, self.options = run, options
    self.cfg, self.tokenizer_ = run.cfg.model, run.tokenizer
    self.phase: Phase = run.phase
    self._bar: tqdm | None = None
    pad_id = run.tokenizer.pad_id
    common = dict(batch_tokens=options.batch_tokens, pad_id=0 if pad_id is None else pad_id,
                  progress=self._advance)
    if self.phase.diffusion:
      self.scorer = ELBOScorer(self.cfg, run.params, self.phase, mc_samples=options.mc_samples,
                               seed=options.seed, **common)
    else:
      self.scorer = ARScorer(self.cfg, run.params, **common)

  @classmethod
  def from_run(cls, run_dir: str | Path, step: int | None = None,
               options: Options = Options()) -> "DharaLM":
    from dhara_jax.runs import load_run

    return cls(load_run(run_dir, step), options)

  # --- tokens -----------------------------------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer_.eos_id

  @property
  def prefix_token_id(self) -> int:
    return prefix_token_id(self.tokenizer_)

  @property
  def max_length(self) -> int:
    return self.cfg.max_seq_len

  def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                 **kwargs: Any) -> list[int]:
    # HFLM's rule: the tokenizer's own special tokens (its post-processor's BOS, if any),
    # unless the text already starts with the prefix token. SentencePiece adds none.
    if add_special_tokens is None:
      add_special_tokens = not string.startswith(self.tokenizer_.token_text(self.prefix_token_id))
    return self.tokenizer_.encode(string, add_special_tokens).tolist()

  def tok_decode(self, tokens: Sequence[int]) -> str:
    return self.tokenizer_.decode(tokens)

  # --- scoring ----------------------------------------------------------------------------

  def _advance(self, done: int) -> None:
    if self._bar is not None:
      self._bar.update(done)

  def _scored(self, pairs: list[tuple[list[int], list[int]]], what: str,
              disable_tqdm: bool) -> list[tuple[float, bool]]:
    with tqdm(total=len(pairs), desc=what, disable=disable_tqdm or not self.options.progress,
              mininterval=2.0) as self._bar:
      try:
        return self.scorer.score(pairs)
      finally:
        self._bar = None

  def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                            **kwargs: Any) -> list[tuple[float, bool]]:
    pairs = [(list(context), list(continuation)) for _, context, continuation in requests]
    scores = self._scored(pairs, f"{self.phase.objective} loglikelihood", disable_tqdm)
    for request, score in zip(requests, scores):
      self.cache_hook.add_partial("loglikelihood", request[0], score)
    return scores

  def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
    from lm_eval import utils

    pairs, owners = [], []
    for i, (string,) in enumerate(req.args for req in requests):
      windows = utils.get_rolling_token_windows(
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1)
      for context, continuation in map(utils.make_disjoint_window, windows):
        pairs.append((list(context), list(continuation)))
        owners.append(i)
    totals = [0.0] * len(requests)
    for owner, (logp, _) in zip(owners, self._scored(pairs, "rolling loglikelihood",
                                                     disable_tqdm)):
      totals[owner] += logp
    return totals

  # --- generation -------------------------------------------------------------------------

  def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
    from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs,
                                      postprocess_generated_text)

    eos = self.tokenizer_.token_text(self.eot_token_id)
    out: list[str | None] = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
    bar = tqdm(total=len(requests), desc="generate_until",
               disable=disable_tqdm or not self.options.progress, mininterval=2.0)
    for indices in groups.values():
      kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), DEFAULT_MAX_GEN_TOKS)
      until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
      sampling = self._sampling(kwargs, until)
      room = self.max_length - sampling.max_new_tokens
      for start in range(0, len(indices), GENERATE_BATCH):
        chunk = indices[start:start + GENERATE_BATCH]
        prompts = [self.tok_encode(requests[i].args[0])[-room:] or [self.prefix_token_id]
                   for i in chunk]
        texts = self._generate(prompts, sampling)
        for i, text in zip(chunk, texts):
          out[i] = postprocess_generated_text(text, until, None)
          self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        bar.update(len(chunk))
    bar.close()
    return out  # type: ignore[return-value]

  def _sampling(self, kwargs: dict, until: list[str]) -> Sampling:
    """The request's gen_kwargs over the run's sampler settings; stop strings also become
    token sequences, so decoding ends early (the text is still cut at the first one)."""
    new = int(kwargs.pop("max_gen_toks"))
    if new >= self.max_length:
      log.warning("eval: max_gen_toks %d ≥ the model's context %d; generating %d tokens",
                  new, self.max_length, self.max_length // 2)
      new = self.max_length // 2
    sample, temperature = kwargs.pop("do_sample", False), kwargs.pop("temperature", 0.0)
    temperature = float(temperature or 0.0) if sample else 0.0
    top_k, top_p = int(kwargs.pop("top_k", 0) or 0), float(kwargs.pop("top_p", 1.0) or 1.0)
    if kwargs:
      log.warning("eval: gen_kwargs %s are not used by dhara-jax's samplers", sorted(kwargs))
    stops = tuple(tuple(self.tok_encode(s)) for s in until if s and self.tok_encode(s))
    return dataclasses.replace(self.options.sampling, max_new_tokens=new,
                               temperature=temperature, top_k=top_k, top_p=top_p, stop=stops)

  def _generate(self, prompts: list[list[int]], sampling: Sampling) -> list[str]:
    from dhara_jax.sampling import generate

    padded = prompts + [prompts[0]] * (GENERATE_BATCH - len(prompts))  # one batch shape
    result = generate(self.cfg, self.run.params, padded, sampling, phase=self.phase,
                      eos_id=self.eot_token_id)
    return [self.tok_decode(tokens) for tokens in result.tokens[:len(prompts)]]


def prefix_token_id(tokenizer: Any) -> int:
  """What precedes a text with no context. dhara's SentencePiece runs: EOS, which separates
  documents in training (the pipeline never writes BOS; HFLM defaults to BOS, so the peer is
  given prefix_token_id=EOS). Hugging Face tokenizers: HFLM's own rule, BOS, else EOS."""
  if tokenizer.kind == "sentencepiece" or tokenizer.bos_id is None:
    return tokenizer.eos_id
  return tokenizer.bos_id


def check_options(phase: Phase, diffusion_options: Sequence[str]) -> None:
  """A diffusion option given for an AR run is a mistake worth one line."""
  if diffusion_options and not phase.diffusion:
    raise DharaError(f"eval: {', '.join(diffusion_options)} is for diffusion runs; this run "
                     f"is AR")


AR_ONLY_GEN_KWARGS = ("top_k", "top_p")  # the diffusion samplers have no nucleus / top-k


def _is_integer(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)  # lm-eval parses "true" too


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


# The gen_kwargs that lm-eval (normalize_gen_kwargs) and the samplers convert, with what each
# must be once lm-eval has parsed it (ints, floats, true/false, else text): a value that does
# not convert would fail deep inside lm-eval, after the tasks are built.
GEN_KWARG_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    **dict.fromkeys(("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"),
                    (lambda v: _is_integer(v) and v >= 1, "an integer ≥ 1")),
    "temperature": (lambda v: _is_number(v) and math.isfinite(v) and v >= 0,
                    "a finite number ≥ 0"),
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
    "top_k": (lambda v: _is_integer(v) and v >= 0, "an integer ≥ 0"),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
}


def check_gen_kwargs(phase: Phase, gen_kwargs: str | None) -> None:
  """lm-eval's --gen_kwargs ("key=value,...", parsed as lm-eval parses it): a value of the
  wrong kind, or an AR-only setting on a diffusion run, is refused in one line."""
  kwargs = {k.strip(): v for k, v in simple_parse_args_string(gen_kwargs).items()}
  if bad := [k for k in kwargs if k in AR_ONLY_GEN_KWARGS and phase.diffusion]:
    raise DharaError(f"eval: gen_kwargs {', '.join(bad)} is for AR runs; this run is diffusion")
  for key, value in kwargs.items():
    fits, what = GEN_KWARG_KINDS.get(key, (lambda _: True, ""))
    if not fits(value):
      raise DharaError(f"eval: --gen-kwargs {key}={value}: expected {what}")
