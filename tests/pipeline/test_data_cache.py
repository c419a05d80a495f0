import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import with_sources, write_jsonl, write_parquet

from data_pipeline.cache import open_cache, prepare
from data_pipeline.config import SourceConfig
from data_pipeline.sources import open_source
from data_pipeline.tokenizer import load_tokenizer
from dhara_jax.errors import DharaError


def quiet(cfg, tokenizer):
  lines = []
  return prepare(cfg, tokenizer, progress=False, log=lines.append), lines


def test_cache_holds_the_raw_documents_tokenized(cached_cfg, tokenizer):
  manifest = json.loads((Path(cached_cfg.cache_dir) / "manifest.json").read_text())
  assert manifest["tokenizer_sha256"] == tokenizer.sha256 and manifest["dtype"] == "uint16"
  cached = open_cache(cached_cfg, tokenizer)
  for i, s in enumerate(cached_cfg.sources):
    raw = open_source(cached_cfg, i)
    entry = manifest["sources"][s.name]
    assert len(cached[s.name]) == len(raw) == entry["docs"]
    ids = tokenizer.encode_batch([raw[j] for j in range(len(raw))])
    assert entry["tokens"] == sum(map(len, ids))
    for j in (0, len(raw) // 2, len(raw) - 1):
      np.testing.assert_array_equal(cached[s.name][j], ids[j])


def test_counts_rerun_and_nothing_lost_on_failure(data_cfg, tokenizer, tmp_path):
  write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": t} for t in ["x y", "", "z"]])
  (tmp_path / "in" / "b.jsonl").write_bytes(b'{"text": "bad \xff byte"}\n{"text": "ok"}\n')
  src = SourceConfig(name="j", path=str(tmp_path / "in"))
  cfg = with_sources(data_cfg, src, cache_dir=str(tmp_path / "cache"))
  manifest, lines = quiet(cfg, tokenizer)
  entry = manifest["sources"]["j"]
  assert (entry["docs"], entry["empty"], entry["invalid_utf8"]) == (5, 1, 1)
  assert "empty skipped 1  invalid UTF-8 replaced 1" in lines[0]
  shard = tmp_path / "cache" / "j" / "00000.tokens"
  before = shard.stat().st_mtime_ns
  # A second source that fails: the first source's shards and the old manifest survive.
  write_parquet(tmp_path / "p" / "bad.parquet", ["a"], column="body")
  broken = with_sources(cfg, src, SourceConfig(name="p", path=str(tmp_path / "p")))
  with pytest.raises(DharaError, match=r"text_column"):
    quiet(broken, tokenizer)
  assert json.loads((tmp_path / "cache" / "manifest.json").read_text()) == manifest
  # Unchanged inputs are kept; a changed file is re-tokenized.
  (tmp_path / "in" / "b.jsonl").write_text('{"text": "changed"}\n')
  manifest, lines = quiet(cfg, tokenizer)
  assert shard.stat().st_mtime_ns == before and "(1 unchanged)" in lines[0]
  assert manifest["sources"]["j"]["docs"] == 4
  assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_cache_errors_are_one_line(data_cfg, cached_cfg, tokenizer, tmp_path):
  with pytest.raises(DharaError, match=r"data\.cache_dir: no token cache at .*dhara data prepare"):
    open_cache(dataclasses.replace(data_cfg, cache_dir=str(tmp_path / "none")), tokenizer)
  other = load_tokenizer("data/tokenizer/sample_4k.model")
  with pytest.raises(DharaError, match=r"tokenized with another tokenizer"):
    open_cache(cached_cfg, other)
  renamed = with_sources(cached_cfg, SourceConfig(name="web", path="data/sample/dclm"))
  with pytest.raises(DharaError, match=r"has no source 'web'"):
    open_cache(renamed, tokenizer)
