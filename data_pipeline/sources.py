"""Documents on disk: Parquet shards (the Hub layout), jsonl / jsonl.gz, plain text, TFDS.

Every source is a random-access sequence of documents (`len`, `[i] -> str`), which is what
grain's `MapDataset.source` shuffles and shards, plus `units`: the files in document order, each
read sequentially by `read_unit` (for the cache and the tokenizer sample). Document i is the same
text in every reader, so the raw and the cached path see the same stream.

Text is decoded as UTF-8 with invalid bytes replaced (U+FFFD); `read_unit` says which documents
needed it so callers can count them. Files are checked when a source opens: a missing path, a
file that is not what its format says, or a missing text column is a one-line `DharaError`.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import glob
import gzip
import hashlib
import json
import logging
import mmap
import os
import threading
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.config import DataConfig, SourceConfig, resolve_input
from dhara_jax.errors import DharaError

_EXTENSIONS = {"parquet": (".parquet",), "jsonl": (".jsonl", ".jsonl.gz", ".json.gz"),
               "text": (".txt",)}


@dataclasses.dataclass(frozen=True)
class Unit:
  """A file (or group of files) holding documents [start, stop) of a source."""

  name: str
  files: tuple[Path, ...]
  start: int
  stop: int

  @functools.cached_property
  def fingerprint(self) -> str:
    """Name, size and the first and last MiB of each file: stable when files move, changed by
    any rewrite that matters in practice, and cheap even for large shards."""
    h = hashlib.sha256()
    for f in self.files:
      size = f.stat().st_size
      h.update(f"{f.name}\0{size}\n".encode())
      with open(f, "rb") as fh:
        h.update(fh.read(1 << 20))
        if size > 2 << 20:
          fh.seek(-(1 << 20), os.SEEK_END)
          h.update(fh.read())
    return h.hexdigest()[:16]


@dataclasses.dataclass
class ReadStats:
  docs: int = 0
  empty: int = 0  # no text (after decoding); skipped by the pipeline
  invalid_utf8: int = 0  # documents with bytes that were replaced by U+FFFD
  chars: int = 0

  def count(self, text: str, replaced: bool) -> None:
    self.docs += 1
    self.empty += not text
    self.invalid_utf8 += replaced
    self.chars += len(text)

  def add(self, other: "ReadStats") -> None:
    for f in dataclasses.fields(self):
      setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def decode(value: bytes | str | None) -> tuple[str, bool]:
  """(text, whether invalid UTF-8 was replaced); None is an empty document."""
  if value is None:
    return "", False
  if isinstance(value, str):
    return value, False
  try:
    return value.decode("utf-8"), False
  except UnicodeDecodeError:
    return value.decode("utf-8", errors="replace"), True


class DocumentSource:
  """Base: a reader implements `_doc(k, i)`, document i of unit k, and `approx_chars`."""

  units: list[Unit]

  def __len__(self) -> int:
    return self.units[-1].stop if self.units else 0

  def __getitem__(self, index: int) -> str:
    k = bisect.bisect_right(self._unit_starts, index) - 1
    return self._doc(k, index - self.units[k].start)[0]

  @functools.cached_property
  def _unit_starts(self) -> list[int]:
    return [u.start for u in self.units]

  def read_unit(self, k: int) -> Iterator[tuple[str, bool]]:
    """The documents of unit k in order, each with its invalid-UTF-8 flag."""
    for i in range(self.units[k].stop - self.units[k].start):
      yield self._doc(k, i)

  def approx_chars(self) -> int:
    """A cheap estimate of the source's text size (for drawing tokenizer samples)."""
    raise NotImplementedError

  def _doc(self, k: int, i: int) -> tuple[str, bool]:
    raise NotImplementedError


def _units(files: list[Path], counts: list[int]) -> list[Unit]:
  starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).tolist()
  return [Unit(f.name, (f,), a, b) for f, a, b in zip(files, starts, starts[1:])]


class ParquetSource(DocumentSource):
  """Rows of Parquet files, read a row group at a time through a small LRU cache."""

  def __init__(self, files: list[Path], column: str, where: str, cache_groups: int):
    self._files, self._column, self._cache_groups = files, column, cache_groups
    self._group_starts = []  # per file: first row of each row group, then the row count
    for f in files:
      meta = _open_parquet(f, column, where).metadata
      sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
      self._group_starts.append(np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist())
    self.units = _units(files, [s[-1] for s in self._group_starts])
    groups = sum(len(s) - 1 for s in self._group_starts)
    if groups > cache_groups:
      logging.getLogger(__name__).warning(
          "%s: %d row groups but data.parquet_cache_row_groups=%d: shuffled reads of raw "
          "Parquet will decode a row group for most documents; for large corpora run "
          "`dhara data prepare` and train from the cache", where, groups, cache_groups)
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()

  def _read_group(self, k: int, g: int) -> list:
    col = pq.ParquetFile(self._files[k]).read_row_group(g, columns=[self._column]).column(0)
    return col.cast(pa.large_binary()).to_pylist()  # bytes: decoding is ours, and counted

  def _group(self, k: int, g: int) -> list:
    with self._lock:  # one reader decodes a group while others wait for it
      rows = self._cache.get((k, g))
      if rows is None:
        rows = self._cache[(k, g)] = self._read_group(k, g)
        if len(self._cache) > self._cache_groups:
          self._cache.popitem(last=False)
      self._cache.move_to_end((k, g))
      return rows

  def _doc(self, k: int, i: int) -> tuple[str, bool]:
    starts = self._group_starts[k]
    g = bisect.bisect_right(starts, i) - 1
    return decode(self._group(k, g)[i - starts[g]])

  def read_unit(self, k: int) -> Iterator[tuple[str, bool]]:
    for g in range(len(self._group_starts[k]) - 1):
      for value in self._read_group(k, g):  # sequential: no need for the cache
        yield decode(value)

  def approx_chars(self) -> int:
    total = 0
    for f in self._files:
      meta = pq.ParquetFile(f).metadata
      col = meta.schema.to_arrow_schema().get_field_index(self._column)
      total += sum(meta.row_group(g).column(col).total_uncompressed_size
                   for g in range(meta.num_row_groups))
    return total


def _open_parquet(f: Path, column: str, where: str) -> pq.ParquetFile:
  try:
    pf = pq.ParquetFile(f)
  except (pa.ArrowException, OSError) as e:
    raise DharaError(f"{where}: {f} is not a readable Parquet file "
                     f"({str(e).splitlines()[0]})") from None
  schema = pf.schema_arrow
  if column not in schema.names:
    raise DharaError(f"{where}.text_column: no column {column!r} in {f} "
                     f"(columns: {', '.join(schema.names)})")
  typ = schema.field(column).type
  if not any(is_text(typ) for is_text in (pa.types.is_string, pa.types.is_large_string,
                                           pa.types.is_binary, pa.types.is_large_binary)):
    raise DharaError(f"{where}.text_column: column {column!r} of {f} holds {typ}, not text")
  return pf


class JsonlSource(DocumentSource):
  """One JSON object per line; `.gz` files are decompressed into memory, others memory-mapped."""

  def __init__(self, files: list[Path], column: str, where: str):
    self._files, self._column, self._where = files, column, where
    self._buffers, self._lines = [], []
    for f in files:
      buf = self._load(f)
      ends = np.flatnonzero(np.frombuffer(buf, np.uint8) == ord("\n")) if len(buf) else []
      starts = np.concatenate([[0], np.asarray(ends, np.int64) + 1])
      ends = np.concatenate([ends, [len(buf)]]).astype(np.int64)
      keep = ends > starts  # blank lines hold no record
      self._buffers.append(buf)
      self._lines.append((starts[keep], ends[keep]))
    self.units = _units(files, [len(s) for s, _ in self._lines])
    if len(self):
      self[0]  # a wrong text column or a non-JSON file fails here, before any training

  def _load(self, f: Path) -> bytes | mmap.mmap:
    try:
      if f.name.endswith(".gz"):
        return gzip.decompress(f.read_bytes())
      if f.stat().st_size == 0:
        return b""
      with open(f, "rb") as fh:
        return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, EOFError, zlib.error) as e:
      raise DharaError(f"{self._where}: cannot read {f} ({e})") from None

  def _doc(self, k: int, i: int) -> tuple[str, bool]:
    starts, ends = self._lines[k]
    line, replaced = decode(bytes(self._buffers[k][starts[i]:ends[i]]))
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DharaError(f"{self._where}: {self._line(k, i)} is not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or self._column not in record:
      raise DharaError(f"{self._where}.text_column: no key {self._column!r} in {self._line(k, i)}")
    text = record[self._column]
    if text is not None and not isinstance(text, str):
      raise DharaError(f"{self._where}.text_column: {self._column!r} in {self._line(k, i)} is "
                       f"{type(text).__name__}, not text")
    return text or "", replaced

  def _line(self, k: int, i: int) -> str:
    offset = int(self._lines[k][0][i])
    number = np.count_nonzero(np.frombuffer(self._buffers[k], np.uint8, offset) == ord("\n"))
    return f"{self._files[k]} line {number + 1}"

  def approx_chars(self) -> int:
    return sum(len(b) for b in self._buffers)


class TextSource(DocumentSource):
  """Plain text files, one document per file, as one unit."""

  def __init__(self, files: list[Path]):
    self._files = files
    self.units = [Unit(f"{len(files)} text files", tuple(files), 0, len(files))]

  def _doc(self, k: int, i: int) -> tuple[str, bool]:
    return decode(self._files[i].read_bytes())

  def approx_chars(self) -> int:
    return sum(f.stat().st_size for f in self._files)


class TfdsSource(DocumentSource):
  """A TFDS dataset prepared with `file_format='array_record'`, read without TensorFlow."""

  def __init__(self, directory: Path, column: str, where: str, split: str = "train"):
    import tensorflow_datasets as tfds  # heavy; only sources of this format need it

    infos = [directory] if (directory / "dataset_info.json").is_file() else sorted(
        p.parent for p in directory.glob("**/dataset_info.json"))
    if len(infos) != 1:
      raise DharaError(f"{where}.path: {directory} holds {len(infos)} TFDS datasets "
                       "(dataset_info.json); point it at one version folder")
    try:
      builder = tfds.builder_from_directory(str(infos[0]))
      self._data = builder.as_data_source(split=split)
    except Exception as e:  # TFDS raises many types; all mean "not a usable dataset"
      raise DharaError(f"{where}: {infos[0]} is not a readable TFDS array_record dataset "
                       f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if column not in builder.info.features:
      raise DharaError(f"{where}.text_column: no feature {column!r} in {infos[0]} "
                       f"(features: {', '.join(builder.info.features)})")
    self._column = column
    self._files = sorted(infos[0].glob("*.array_record*"))
    self.units = [Unit(infos[0].name, tuple(self._files), 0, len(self._data))]

  def _doc(self, k: int, i: int) -> tuple[str, bool]:
    return decode(self._data[i][self._column])

  def approx_chars(self) -> int:
    return sum(f.stat().st_size for f in self._files)


def source_files(cfg: DataConfig, index: int) -> tuple[str, list[Path]]:
  """(format, files) of source `index`, downloading a Hub dataset once if needed."""
  src = cfg.sources[index]
  where = f"data.sources[{index}]"
  path = src.path or str(Path(cfg.hub_cache).expanduser() / src.hub)
  fmt, files = _find(src, resolve_input(path), where)
  if not files and src.hub:
    from data_pipeline import hub  # network: only when a Hub source has no local files

    fmt, files = _find(src, hub.download(src.hub, Path(path).expanduser()), where)
  if not files:
    if not resolve_input(path).exists() and not glob.has_magic(path):
      raise DharaError(f"{where}.path: no such file or folder: {path}")
    raise DharaError(f"{where}.path: no {'' if src.format == 'auto' else src.format + ' '}"
                     f"data files in {path}")
  return fmt, files


def _find(src: SourceConfig, path: Path, where: str) -> tuple[str, list[Path]]:
  """The format and the files of a source path (a file, a folder, or a glob)."""
  if glob.has_magic(str(path)):
    files = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]
  elif path.is_dir():  # hidden entries are download metadata (.cache/huggingface/...)
    files = sorted(p for p in path.rglob("*") if not any(
        part.startswith(".") for part in p.relative_to(path).parts))
  else:
    files = [path]
  files = [f for f in files if f.is_file()]
  fmt = src.format
  if fmt == "auto" and path.is_dir() and any(f.name == "dataset_info.json" for f in files):
    fmt = "tfds"
  if fmt == "tfds":
    return fmt, [path] if path.is_dir() else []
  if fmt == "auto":
    fmt = next((f for f, ext in _EXTENSIONS.items() if any(p.name.endswith(ext) for p in files)),
               None)
    if fmt is None:
      if files:
        raise DharaError(f"{where}.format: cannot tell the format of {path} from its file "
                         f"names; set one of parquet, jsonl, text, tfds")
      return src.format, []
  if path.is_file():  # a file named explicitly is read as the format says, and checked
    return fmt, files
  return fmt, [f for f in files if f.name.endswith(_EXTENSIONS[fmt])]


def open_source(cfg: DataConfig, index: int) -> DocumentSource:
  """Opens source `index` of the config, checking every file it names."""
  src = cfg.sources[index]
  where = f"data.sources[{index}]"
  fmt, files = source_files(cfg, index)
  if fmt == "parquet":
    return ParquetSource(files, src.text_column, where, cfg.parquet_cache_row_groups)
  if fmt == "jsonl":
    return JsonlSource(files, src.text_column, where)
  if fmt == "text":
    return TextSource(files)
  return TfdsSource(files[0], src.text_column, where)
