"""Real-model test helpers: a Hugging Face `tokenizers` tokenizer trained on the shipped sample,
tiny LLaMA transformers directories carrying it, the packaged SmolLM2 and its transformers peer.

The session fixtures built from these live in conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from data_pipeline.config import REPO_ROOT
from dhara_jax.export import export_hf
from tiny import random_params, tiny_config

SAMPLE = REPO_ROOT / "data" / "sample"
EOS, PAD = "<|endoftext|>", "<pad>"
HF_VOCAB = 1024
PROMPT = "The history of science is"


def sample_texts(limit: int = 400) -> list[str]:
  """The first `limit` documents of each shipped source."""
  texts = []
  for source in sorted(p for p in SAMPLE.iterdir() if p.is_dir()):
    files = sorted(source.glob("*.parquet"))
    texts += pq.read_table(files, columns=["text"]).column("text").to_pylist()[:limit]
  return texts


def train_hf_tokenizer(out_dir: Path, vocab: int = HF_VOCAB, bos_first: bool = False,
                       **config) -> Path:
  """A byte-level BPE (GPT-2's kind) trained on the shipped sample with the `tokenizers`
  library (a few seconds), written as tokenizer.json + tokenizer_config.json naming its EOS and
  pad tokens; `config` adds to or replaces tokenizer_config.json's entries. `bos_first`: its
  EOS doubles as a BOS that the post-processor puts before every text (LLaMA 3's way)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS, PAD],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tokenizer.train_from_iterator(sample_texts(), trainer)
  if bos_first:
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B", special_tokens=[(EOS, 0)])
    config = {"bos_token": EOS, **config}
  out_dir.mkdir(parents=True, exist_ok=True)
  tokenizer.save(str(out_dir / "tokenizer.json"))
  settings = {"tokenizer_class": "TokenizersBackend", "eos_token": EOS, "pad_token": PAD,
              "clean_up_tokenization_spaces": False, **config}
  (out_dir / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
  return out_dir / "tokenizer.json"


def tiny_llama_dir(out_dir: Path, tokenizer_dir: Path | None, vocab: int = HF_VOCAB,
                   seed: int = 0, *overrides: str) -> Path:
  """A random tiny LLaMA as a transformers directory, with the tokenizer files of
  `tokenizer_dir` copied in (none when None)."""
  cfg = tiny_config("llama3", f"model.vocab_size={vocab}", *overrides)
  export_hf(cfg, random_params(cfg, seed), out_dir)
  for path in (tokenizer_dir.iterdir() if tokenizer_dir else ()):
    (out_dir / path.name).write_bytes(path.read_bytes())
  return out_dir
