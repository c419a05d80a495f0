"""Pre-tokenised cache: `dhara data prepare` writes it, training reads it instead of raw text.

Layout under `data.cache_dir`, one shard per unit (input file) of each source, in document
order, so document i of the cache is document i of the raw source (empty documents are kept
as zero-length entries and skipped by the pipeline, as on the raw path):

  <source>/<k>.tokens        token ids, uint16 (vocab <= 65,536) or uint32, memory-mapped
  <source>/<k>.offsets.npy   int64, document k starts at offsets[k], ends at offsets[k + 1]
  <source>/<k>.json          the shard's input fingerprint, tokenizer, counts (written last)
  manifest.json              every source and shard (written after all shards)

Every file is written to a temporary name and renamed, so a failure loses nothing written
before it; running `prepare` again keeps every shard whose input and tokenizer are unchanged.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from data_pipeline.config import DataConfig
from data_pipeline.sources import ReadStats, Unit, open_source
from data_pipeline.tokenizer import Tokenizer
from dhara_jax.errors import ConfigError, DharaError
from dhara_jax.files import atomic_write, temp_beside

VERSION = 1
ENCODE_DOCS = 64  # documents per batched tokenizer call


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _cache_root(cfg: DataConfig) -> Path:
  if not cfg.cache_dir:
    raise ConfigError("data.cache_dir: set a folder for the token cache, e.g. "
                      "data.cache_dir=runs/cache/mix")
  return Path(cfg.cache_dir).expanduser()


def _write_shard(folder: Path, k: int, unit: Unit, docs, tokenizer: Tokenizer, dtype: np.dtype,
                 bar: tqdm) -> dict:
  stats, lengths, batch = ReadStats(), [], []
  fd, tmp = temp_beside(folder / f"{k:05d}.tokens")
  try:
    with os.fdopen(fd, "wb") as out:
      def flush() -> None:
        for ids in tokenizer.encode_batch(batch):
          out.write(ids.astype(dtype).tobytes())
          lengths.append(len(ids))
        bar.update(len(batch))
        batch.clear()

      for text, replaced in docs:
        stats.count(text, replaced)
        batch.append(text)
        if len(batch) == ENCODE_DOCS:
          flush()
      flush()
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    atomic_write(folder / f"{k:05d}.offsets.npy", _npy_bytes(offsets))
    os.replace(tmp, folder / f"{k:05d}.tokens")
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  meta = {"unit": unit.name, "fingerprint": unit.fingerprint, "tokenizer_sha256": tokenizer.sha256,
          "dtype": dtype.name, "tokens": int(offsets[-1]), **dataclasses.asdict(stats)}
  atomic_write(folder / f"{k:05d}.json", json.dumps(meta, indent=2) + "\n")
  return meta


def _npy_bytes(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  np.save(buf, array)
  return buf.getvalue()


def _reusable(folder: Path, k: int, unit: Unit, tokenizer: Tokenizer,
              dtype: np.dtype) -> dict | None:
  try:
    meta = json.loads((folder / f"{k:05d}.json").read_text())
    size = (folder / f"{k:05d}.tokens").stat().st_size
  except (OSError, ValueError):
    return None
  same = (meta.get("fingerprint"), meta.get("tokenizer_sha256"), meta.get("dtype")) == (
      unit.fingerprint, tokenizer.sha256, dtype.name)
  return meta if same and size == meta["tokens"] * dtype.itemsize else None


def prepare(cfg: DataConfig, tokenizer: Tokenizer, progress: bool = True,
            log: Callable[[str], None] = print) -> dict:
  """Tokenizes every configured source into the cache; returns the manifest."""
  root = _cache_root(cfg)
  dtype = token_dtype(tokenizer.vocab_size)
  manifest = {"version": VERSION, "tokenizer_sha256": tokenizer.sha256,
              "vocab_size": tokenizer.vocab_size, "dtype": dtype.name, "sources": {}}
  for i, s in enumerate(cfg.sources):
    src = open_source(cfg, i)
    folder = root / s.name
    try:
      folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise DharaError(f"data.cache_dir: cannot create {folder} ({e.strerror or e})") from None
    shards, reused = [], 0
    with tqdm(total=len(src), desc=f"{s.name:12s}", unit="doc", disable=not progress) as bar:
      for k, unit in enumerate(src.units):
        meta = _reusable(folder, k, unit, tokenizer, dtype)
        if meta is not None:
          reused += 1
          bar.update(unit.stop - unit.start)
        else:
          meta = _write_shard(folder, k, unit, src.read_unit(k), tokenizer, dtype, bar)
        shards.append({"file": f"{k:05d}", **meta})
    totals = {key: sum(m[key] for m in shards) for key in
              ("docs", "tokens", "empty", "invalid_utf8", "chars")}
    if not totals["tokens"]:  # training on it would wait forever for a token
      raise DharaError(f"data.sources[{i}] ({s.name}): all {totals['docs']} of its documents "
                       "are empty (no tokens); no cache manifest written — fix its path or "
                       "remove it")
    manifest["sources"][s.name] = {**totals, "shards": shards}
    log(f"{s.name:12s} {totals['docs']:8,d} docs {totals['tokens']:12,d} tokens  "
        f"empty skipped {totals['empty']}  invalid UTF-8 replaced {totals['invalid_utf8']}  "
        f"shards {len(shards)} ({reused} unchanged)")
  atomic_write(root / "manifest.json", json.dumps(manifest, indent=2) + "\n")
  log(f"manifest: {root / 'manifest.json'}")
  return manifest


class CachedDocuments:
  """Token ids of one source's documents, memory-mapped; random access like a raw source."""

  def __init__(self, folder: Path, entry: dict, dtype: np.dtype):
    self._tokens, self._offsets = [], []
    for shard in entry["shards"]:
      offsets = np.load(folder / f"{shard['file']}.offsets.npy")
      tokens = folder / f"{shard['file']}.tokens"
      self._offsets.append(offsets)
      self._tokens.append(np.memmap(tokens, dtype=dtype, mode="r") if offsets[-1] else
                          np.zeros(0, dtype))
    self._starts = np.concatenate([[0], np.cumsum([len(o) - 1 for o in self._offsets])]).tolist()

  def __len__(self) -> int:
    return self._starts[-1]

  def __getitem__(self, index: int) -> np.ndarray:
    k = bisect.bisect_right(self._starts, index) - 1
    i = index - self._starts[k]
    a, b = self._offsets[k][i], self._offsets[k][i + 1]
    return np.asarray(self._tokens[k][a:b], dtype=np.int32)


def open_cache(cfg: DataConfig, tokenizer: Tokenizer) -> dict[str, CachedDocuments]:
  """Every weighted source of the config from the cache, checked against the tokenizer."""
  root = _cache_root(cfg)
  try:
    manifest = json.loads((root / "manifest.json").read_text())
  except (OSError, ValueError):
    raise DharaError(f"data.cache_dir: no token cache at {root} (manifest.json); run "
                     "`dhara data prepare --config <your config>`") from None
  if manifest.get("tokenizer_sha256") != tokenizer.sha256:
    raise DharaError(f"data.cache_dir: {root} was tokenized with another tokenizer than "
                     f"{tokenizer.path}; rerun `dhara data prepare`")
  out = {}
  for s in cfg.sources:
    if s.weight <= 0:
      continue
    if s.name not in manifest["sources"]:
      raise DharaError(f"data.cache_dir: {root} has no source {s.name!r}; rerun "
                       "`dhara data prepare`")
    try:
      out[s.name] = CachedDocuments(root / s.name, manifest["sources"][s.name],
                                    np.dtype(manifest["dtype"]))
    except (OSError, ValueError) as e:
      raise DharaError(f"data.cache_dir: {root / s.name} is incomplete ({e}); rerun "
                       "`dhara data prepare`") from None
  return out
