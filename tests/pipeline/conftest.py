"""Data-pipeline fixtures: one small tokenizer and one token cache per test session."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.cache import prepare
from data_pipeline.config import DataConfig, REPO_ROOT, SourceConfig
from data_pipeline.tokenizer_training import train_tokenizer

SAMPLE = REPO_ROOT / "data" / "sample"
SLOTS = ("finepdfs", "dclm", "fineweb_edu")


def sample_texts(slot: str) -> list[str]:
  return pq.read_table(sorted((SAMPLE / slot).glob("*.parquet")), columns=["text"]).column(
      "text").to_pylist()


def write_parquet(path: Path, texts: list, column: str = "text", binary: bool = False) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  typ = pa.binary() if binary else pa.string()
  pq.write_table(pa.table({column: pa.array(texts, typ), "id": list(range(len(texts)))}), path,
                 row_group_size=7)
  return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def with_sources(cfg: DataConfig, *sources: SourceConfig, **changes) -> DataConfig:
  return dataclasses.replace(cfg, sources=tuple(sources) or cfg.sources, **changes)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
  """A 1,024-token BPE trained on the shipped sample (about a second)."""
  out = tmp_path_factory.mktemp("tokenizer") / "tok1k.model"
  cfg = DataConfig(tokenizer=str(out), tokenizer_vocab_size=1024)
  return train_tokenizer(cfg, log=lambda _: None)


@pytest.fixture(scope="session")
def data_cfg(tokenizer) -> DataConfig:
  """The shipped 50/30/20 mix with the session tokenizer; raw text."""
  return DataConfig(tokenizer=str(tokenizer.path), seq_len=256, batch_size=8, read_threads=2)


@pytest.fixture(scope="session")
def cached_cfg(data_cfg, tokenizer, tmp_path_factory) -> DataConfig:
  cfg = dataclasses.replace(data_cfg, cache_dir=str(tmp_path_factory.mktemp("cache")))
  prepare(cfg, tokenizer, progress=False, log=lambda _: None)
  return cfg
