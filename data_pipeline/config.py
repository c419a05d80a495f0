"""The `data:` config section: sources of the mixture, packing, batching, tokenizer, cache.

`DataConfig.from_raw` is the parsing hook `dhara_jax.config` calls for this section (sources are
a list of mappings, which the generic scalar builder does not handle). Paths are kept as
written; `resolve_input` finds input files relative to the working directory first and the
repository second, so the shipped defaults work from anywhere.
"""

from __future__ import annotations

import dataclasses
import glob
import math
from pathlib import Path
from typing import Any, Mapping

from dhara_jax.errors import ConfigError
from dhara_jax.sections import build_section

REPO_ROOT = Path(__file__).resolve().parent.parent
FORMATS = ("auto", "parquet", "jsonl", "text", "tfds")
HOST_SPLITS = ("documents", "rows")  # data.host_split


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  """One corpus of the mixture."""

  name: str
  path: str = ""  # file, folder or glob; empty with `hub`: <data.hub_cache>/<hub id>
  hub: str = ""  # Hugging Face dataset id, downloaded once when `path` holds no files
  format: str = "auto"  # auto (by extension) | parquet | jsonl | text | tfds
  text_column: str = "text"
  weight: float = 1.0  # share of the mixture's tokens (normalised over all sources)


def _sample_source(name: str, weight: float) -> SourceConfig:
  return SourceConfig(name=name, path=f"data/sample/{name}", format="parquet", weight=weight)


DEFAULT_SOURCES = (_sample_source("finepdfs", 0.5), _sample_source("dclm", 0.3),
                   _sample_source("fineweb_edu", 0.2))


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Everything between text on disk and a global batch on the mesh."""

  sources: tuple[SourceConfig, ...] = DEFAULT_SOURCES
  seq_len: int = 1024  # tokens per packed row
  batch_size: int = 8  # global rows per step, over all processes
  seed: int = 0
  num_epochs: int = 0  # passes over each source; 0: repeat forever
  # Held-out split: this fraction of each source's documents (its last ones) is never trained
  # on; `make_eval_iterator` reads only them.
  eval_fraction: float = 0.05
  targets: bool = False  # add next-token `targets` and `target_mask` (packs seq_len + 1)
  # Tokenizer the pipeline reads (data_pipeline/tokenizer.py): a SentencePiece model, which
  # `dhara tokenizer train` writes, or a Hugging Face tokenizer.json (or a folder holding either).
  tokenizer: str = "runs/tokenizer/mix_50k.model"
  tokenizer_vocab_size: int = 50304  # Dhara's embedding size
  tokenizer_sample_chars: int = 20_000_000  # training sample drawn from the mix by weight
  # Pre-tokenised cache written by `dhara data prepare`; empty: tokenize raw text on the fly.
  cache_dir: str = ""
  hub_cache: str = "~/.cache/dhara/hub"
  read_threads: int = 4  # grain threads reading + tokenizing documents
  prefetch: int = 64  # documents read ahead per source
  parquet_cache_row_groups: int = 16  # decoded row groups kept per Parquet source
  # Longest the training loop waits for one batch before calling the pipeline stuck.
  wait_timeout_s: float = 600.0
  # How the processes of a multi-host job share the data. documents: each reads its own 1/P
  # of every source (each host touches 1/P of the files; a checkpoint resumes only with the
  # same process count). rows: each reads the whole stream and keeps its rows of every global
  # batch (P× the reading, which the token cache makes cheap; the batches equal a
  # one-process run's, and a checkpoint resumes with any process count).
  host_split: str = "documents"

  def __post_init__(self) -> None:
    _validate(self)

  @classmethod
  def from_raw(cls, raw: Mapping[str, Any]) -> "DataConfig":
    if not isinstance(raw, Mapping):
      raise ConfigError(f"data: expected a mapping, got {raw!r}")
    raw = dict(raw)
    sources = raw.pop("sources", None)
    weights = raw.pop("weights", None)
    scalars = build_section(cls, raw, "data")
    if sources is None:
      sources = [dataclasses.asdict(s) for s in cls.sources]
    if not isinstance(sources, (list, tuple)) or not sources:
      raise ConfigError("data.sources: expected a non-empty list of sources")
    parsed = tuple(build_section(SourceConfig, _named(s, i), f"data.sources[{i}]")
                   for i, s in enumerate(sources))
    if weights is not None:
      parsed = _apply_weights(parsed, weights)
    return dataclasses.replace(scalars, sources=parsed)

  @property
  def weights(self) -> dict[str, float]:
    """Normalised token shares of the sources with a positive weight, in config order."""
    total = sum(s.weight for s in self.sources)
    return {s.name: s.weight / total for s in self.sources if s.weight > 0}


def _named(raw: Any, i: int) -> Mapping[str, Any]:
  if not isinstance(raw, Mapping):
    raise ConfigError(f"data.sources[{i}]: expected a mapping with name, path, weight, ...")
  if not isinstance(raw.get("name"), str) or not raw.get("name"):
    raise ConfigError(f"data.sources[{i}].name: required (a non-empty string)")
  return raw


def _apply_weights(sources: tuple[SourceConfig, ...], weights: Any) -> tuple[SourceConfig, ...]:
  """`data.weights` as a list (one per source, in order) or a mapping name -> weight."""
  names = [s.name for s in sources]
  if isinstance(weights, list):
    if len(weights) != len(sources):
      raise ConfigError(f"data.weights: {len(weights)} weights for {len(sources)} sources "
                        f"({', '.join(names)})")
    weights = dict(zip(names, weights))
  if not isinstance(weights, Mapping):
    raise ConfigError(f"data.weights: expected a list or a mapping name: weight, got {weights!r}")
  for name in weights:
    if name not in names:
      raise ConfigError(f"data.weights.{name}: no source of that name ({', '.join(names)})")
  for name in names:
    if name not in weights:
      raise ConfigError(f"data.weights: no weight for source {name}")
  out = []
  for i, s in enumerate(sources):
    w = weights[s.name]
    if isinstance(w, bool) or not isinstance(w, (int, float)):
      raise ConfigError(f"data.weights.{s.name}: expected a number, got {w!r}")
    out.append(dataclasses.replace(s, weight=float(w)))
  return tuple(out)


def _validate(c: DataConfig) -> None:
  def fail(field: str, why: str) -> None:
    raise ConfigError(f"data.{field}: {why}")

  seen = set()
  for i, s in enumerate(c.sources):
    where = f"sources[{i}]"
    if s.name in seen:
      fail(f"{where}.name", f"duplicate source name {s.name!r}")
    seen.add(s.name)
    if not s.name.replace("_", "").replace("-", "").isalnum():
      fail(f"{where}.name", f"{s.name!r}: use letters, digits, - and _ (it names cache folders)")
    if not s.path and not s.hub:
      fail(f"{where}.path", "set a path (file, folder or glob) or a hub dataset id")
    if s.format not in FORMATS:
      fail(f"{where}.format", f"{s.format!r} is not one of {', '.join(FORMATS)}")
    if not s.text_column:
      fail(f"{where}.text_column", "must name a column")
    if not (math.isfinite(s.weight) and s.weight >= 0):
      fail(f"{where}.weight", f"must be >= 0, got {s.weight}")
  if not c.sources:
    fail("sources", "needs at least one source")
  if sum(s.weight for s in c.sources) <= 0:
    fail("sources", "all weights are zero; at least one source needs a positive weight")
  for field in ("seq_len", "batch_size", "tokenizer_vocab_size", "tokenizer_sample_chars",
                "read_threads", "prefetch", "parquet_cache_row_groups", "wait_timeout_s"):
    if getattr(c, field) <= 0:
      fail(field, f"must be positive, got {getattr(c, field)}")
  for field in ("seed", "num_epochs"):
    if getattr(c, field) < 0:
      fail(field, f"must be >= 0, got {getattr(c, field)}")
  if not math.isfinite(c.wait_timeout_s):  # every wait is bounded
    fail("wait_timeout_s", f"must be a finite number of seconds, got {c.wait_timeout_s}")
  if not 0 <= c.eval_fraction < 0.5:
    fail("eval_fraction", f"must be in [0, 0.5), got {c.eval_fraction}")
  if c.seed >= 2**32:
    fail("seed", f"must be below 2**32, got {c.seed}")
  if c.tokenizer_vocab_size < 261:  # 5 specials + 256 byte-fallback pieces
    fail("tokenizer_vocab_size", f"must be at least 261 (specials + 256 bytes), got "
         f"{c.tokenizer_vocab_size}")
  if not c.tokenizer:
    fail("tokenizer", "must name a tokenizer (a SentencePiece model or a tokenizer.json)")
  if c.host_split not in HOST_SPLITS:
    fail("host_split", f"{c.host_split!r} is not one of {', '.join(HOST_SPLITS)}")


def resolve_input(path: str) -> Path:
  """An input path as written: absolute, else relative to the working directory if it exists
  there, else relative to the repository (where the shipped sample and tokenizer live)."""
  p = Path(path).expanduser()
  if p.is_absolute() or p.exists() or glob.has_magic(path) and glob.glob(path):
    return p
  shipped = REPO_ROOT / p
  if shipped.exists() or glob.has_magic(path) and glob.glob(str(shipped)):
    return shipped
  return p
