"""`dhara tokenizer train`: dhara's own SentencePiece BPE, trained on a sample of the mix.

Lossless means `decode(encode(text)) == text` for every string: identity normalisation, no
whitespace collapsing, no dummy prefix, byte fallback for characters outside the vocabulary.
Ids 0-4 are `<pad>` `<unk>` `<s>` `</s>` `<mask>` (control symbols: text never encodes to them).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import sentencepiece as spm

from data_pipeline.config import DataConfig
from data_pipeline.sentencepiece_backend import MASK_PIECE
from data_pipeline.sources import ReadStats, open_source
from data_pipeline.tokenizer import Tokenizer
from dhara_jax.errors import ConfigError, DharaError
from dhara_jax.files import atomic_write

if TYPE_CHECKING:
  from dhara_jax.config import ModelConfig

PAD, UNK, BOS, EOS, MASK = 0, 1, 2, 3, 4
SENTENCE_CHARS = 1 << 16  # long documents reach the trainer in pieces cut at line breaks
_TRAINER_SETTINGS = dict(
    model_type="bpe", normalization_rule_name="identity", remove_extra_whitespaces=False,
    add_dummy_prefix=False, byte_fallback=True, split_digits=True,
    allow_whitespace_only_pieces=True, character_coverage=0.9995,
    pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, control_symbols=[MASK_PIECE],
    max_sentence_length=4 * SENTENCE_CHARS, minloglevel=2)


@dataclasses.dataclass
class SampleReport:
  per_source: dict[str, ReadStats]
  budget_chars: dict[str, int]
  limited_by: str | None = None  # the source too small for a full-size sample at its weight


def draw_sample(cfg: DataConfig) -> tuple[list[str], SampleReport]:
  """Documents drawn from every weighted source in proportion to its weight.

  The total is `tokenizer_sample_chars`, or less when a source is too small for its share, so
  the sample keeps the mix's proportions. Each source is read sequentially (units in a seeded
  order), taking each document with the probability that spreads the budget over the source.
  """
  sources = {i: open_source(cfg, i) for i, s in enumerate(cfg.sources) if s.weight > 0}
  weights = cfg.weights
  sizes = {i: max(1, src.approx_chars()) for i, src in sources.items()}
  limits = {cfg.sources[i].name: sizes[i] / weights[cfg.sources[i].name] for i in sources}
  total = min(cfg.tokenizer_sample_chars, *limits.values())
  texts, report = [], SampleReport({}, {})
  if total < cfg.tokenizer_sample_chars:
    report.limited_by = min(limits, key=limits.get)
  for i, src in sources.items():
    name = cfg.sources[i].name
    budget = int(total * weights[name])
    rng = np.random.default_rng([cfg.seed, i])
    rate = min(1.0, budget / sizes[i])
    stats, used = ReadStats(), 0
    documents = (doc for k in rng.permutation(len(src.units)) for doc in src.read_unit(int(k)))
    for text, replaced in documents:
      if used >= budget:
        break
      if text and rng.random() < rate:
        stats.count(text, replaced)
        texts.append(text)
        used += len(text)
    report.per_source[name], report.budget_chars[name] = stats, budget
  return texts, report


def _sentences(texts: list[str]) -> Iterator[str]:
  for text in texts:
    while len(text) > SENTENCE_CHARS:
      cut = text.rfind("\n", 0, SENTENCE_CHARS) + 1 or SENTENCE_CHARS
      yield text[:cut]
      text = text[cut:]
    if text:
      yield text


def train_tokenizer(cfg: DataConfig, model_cfg: ModelConfig | None = None,
                    log: Callable[[str], None] = print) -> Tokenizer:
  """`dhara tokenizer train`: trains on a sample of the mix and writes `data.tokenizer`."""
  if model_cfg is not None and cfg.tokenizer_vocab_size > model_cfg.vocab_size:
    raise ConfigError(f"data.tokenizer_vocab_size: {cfg.tokenizer_vocab_size} is larger than "
                      f"model.vocab_size={model_cfg.vocab_size} (the embedding rows)")
  started = time.perf_counter()
  texts, report = draw_sample(cfg)
  for name, stats in report.per_source.items():
    log(f"sample {name:12s} {stats.docs:7,d} docs {stats.chars:13,d} chars "
        f"(budget {report.budget_chars[name]:,}; invalid UTF-8 replaced in {stats.invalid_utf8})")
  if report.limited_by:
    log(f"sample: source {report.limited_by} is too small for a "
        f"{cfg.tokenizer_sample_chars:,}-char sample at its weight; the sample keeps the mix")
  if not texts:
    raise DharaError("data.sources: the weighted sources hold no text to train a tokenizer on")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(sentence_iterator=_sentences(texts), model_writer=model,
                                   vocab_size=cfg.tokenizer_vocab_size,
                                   num_threads=os.cpu_count() or 1, **_TRAINER_SETTINGS)
  except RuntimeError as e:
    most = re.search(r"value <= (\d+)", str(e))
    if most:
      raise ConfigError(f"data.tokenizer_vocab_size: {cfg.tokenizer_vocab_size} is more than "
                        f"the sample supports (at most {most.group(1)} on "
                        f"{sum(len(t) for t in texts):,} chars); lower it or sample more text "
                        "(data.tokenizer_sample_chars, larger sources)") from None
    raise DharaError(f"tokenizer: SentencePiece failed ({str(e).splitlines()[0]})") from None
  out = Path(cfg.tokenizer).expanduser()
  try:
    atomic_write(out, model.getvalue())
  except OSError as e:
    raise DharaError(f"data.tokenizer: cannot write {out} ({e.strerror or e})") from None
  tok = Tokenizer({out.name: model.getvalue()}, out)
  card = {**tok.card(), "sample": {n: dataclasses.asdict(s) for n, s in report.per_source.items()},
          "weights": cfg.weights, "seed": cfg.seed, "trainer": _TRAINER_SETTINGS}
  atomic_write(out.with_suffix(".json"), json.dumps(card, indent=2) + "\n")
  log(f"tokenizer: {out} ({tok.vocab_size:,} tokens, sha256 {tok.sha256[:12]}, "
      f"{time.perf_counter() - started:.1f}s)")
  return tok
