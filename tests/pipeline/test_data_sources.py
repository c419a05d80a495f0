import gzip
import json

import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE, sample_texts, with_sources, write_jsonl, write_parquet

from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.sources import ReadStats, open_source
from dhara_jax.errors import DharaError

DOCS = ["first doc\nwith lines", "", "second  doc\twith tabs", "émoji 😀 ﬁne", "last"]


def _read_all(src):
  stats, texts = ReadStats(), []
  for k in range(len(src.units)):
    for text, replaced in src.read_unit(k):
      stats.count(text, replaced)
      texts.append(text)
  return texts, stats


def _open(tmp_path, **source):
  cfg = with_sources(DataConfig(), SourceConfig(name="s", **source))
  return open_source(cfg, 0)


def test_shipped_parquet_random_access_matches_sequential_reads():
  cfg = DataConfig(parquet_cache_row_groups=2)  # evictions happen between the row groups
  for i, slot in enumerate(("finepdfs", "dclm", "fineweb_edu")):
    src = open_source(cfg, i)
    expected = sample_texts(slot)
    assert len(src) == len(expected)
    assert _read_all(src)[0] == expected
    order = list(range(len(src)))[::-1]
    assert [src[j] for j in order] == [expected[j] for j in order]
    assert len(src.units) == len(list((SAMPLE / slot).glob("*.parquet")))


@pytest.mark.parametrize("layout", ["jsonl", "jsonl.gz", "text", "parquet-glob"])
def test_formats_read_the_same_documents(tmp_path, layout):
  if layout == "jsonl":
    write_jsonl(tmp_path / "a.jsonl", [{"text": t, "n": i} for i, t in enumerate(DOCS[:3])])
    write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in DOCS[3:]])
    path = tmp_path
  elif layout == "jsonl.gz":
    path = tmp_path / "docs.jsonl.gz"
    text = "".join(json.dumps({"text": t}) + "\n\n" for t in DOCS)
    path.write_bytes(gzip.compress(text.encode()))
  elif layout == "text":
    for i, t in enumerate(DOCS):
      (tmp_path / f"{i:02d}.txt").write_text(t)
    path = tmp_path
  else:
    write_parquet(tmp_path / "p" / "train-00000-of-00002.parquet", DOCS[:2])
    write_parquet(tmp_path / "p" / "train-00001-of-00002.parquet", DOCS[2:])
    path = tmp_path / "p" / "train-*.parquet"
  src = _open(tmp_path, path=str(path))
  texts, stats = _read_all(src)
  assert texts == DOCS and [src[i] for i in range(len(DOCS))] == DOCS
  assert (stats.docs, stats.empty, stats.invalid_utf8) == (5, 1, 0)


def test_tfds_array_record_builder_round_trip(tmp_path):
  from data_pipeline.tfds_text import build_tfds

  write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in DOCS])
  cfg = with_sources(DataConfig(), SourceConfig(name="docs", path=str(tmp_path / "in.jsonl")))
  version_dir = build_tfds(cfg, 0, tmp_path / "tfds")
  assert list(version_dir.glob("*.array_record*"))
  for path in (version_dir, tmp_path / "tfds" / "docs"):  # the version folder or one above it
    src = _open(tmp_path, path=str(path), format="auto")
    assert sorted(_read_all(src)[0]) == sorted(DOCS)  # TFDS orders records by key hash
  (tmp_path / "file").write_text("")
  with pytest.raises(DharaError, match=r"^data tfds: cannot create .*file/docs"):
    build_tfds(cfg, 0, tmp_path / "file")


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
  raw = [b"fine", b"bad \xff\xfe bytes", b"", b"ok \xc3\xa9"]
  write_parquet(tmp_path / "b.parquet", raw, binary=True)
  (tmp_path / "t").mkdir()
  for i, r in enumerate(raw):
    (tmp_path / "t" / f"{i}.txt").write_bytes(r)
  (tmp_path / "j.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "bad \xff bytes"}\n')
  for path, invalid in (("b.parquet", 1), ("t", 1), ("j.jsonl", 1)):
    texts, stats = _read_all(_open(tmp_path, path=str(tmp_path / path)))
    assert stats.invalid_utf8 == invalid, path
    assert sum("\ufffd" in t for t in texts) == invalid


@pytest.mark.parametrize("make,message", [
    (lambda d: d / "missing", r"data\.sources\[0\]\.path: no such file or folder"),
    (lambda d: (d / "x.parquet").write_text("not parquet") and d / "x.parquet",
     r"data\.sources\[0\]: .*x\.parquet is not a readable Parquet file"),
    (lambda d: (d / "x.parquet").write_bytes(
        (write_parquet(d / "ok.parquet", DOCS)).read_bytes()[:-100]) and d / "x.parquet",
     r"is not a readable Parquet file"),
    (lambda d: write_parquet(d / "y.parquet", DOCS, column="body"),
     r"data\.sources\[0\]\.text_column: no column 'text' in .*y\.parquet \(columns: body, id\)"),
    (lambda d: write_jsonl(d / "z.jsonl", [{"body": "x"}]),
     r"data\.sources\[0\]\.text_column: no key 'text' in .*z\.jsonl line 1"),
    (lambda d: (d / "w.jsonl").write_text('{"text": "a"}\n{broken\n') and d / "w.jsonl", None),
    (lambda d: (d / "v.csv").write_text("a,b") and d, r"data\.sources\[0\]\.format: cannot tell"),
    (lambda d: (d / "empty").mkdir() or d / "empty", r"data\.sources\[0\]\.path: no data files"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, make, message):
  path = make(tmp_path)
  if message is None:  # a bad line deep in a file surfaces when it is read
    src = _open(tmp_path, path=str(path))
    with pytest.raises(DharaError, match=r"w\.jsonl line 2 is not valid JSON"):
      _read_all(src)
    return
  with pytest.raises(DharaError, match=message) as e:
    _open(tmp_path, path=str(path))
  assert "\n" not in str(e.value)


def test_non_text_column_is_rejected(tmp_path):
  path = tmp_path / "n.parquet"
  pq.write_table(__import__("pyarrow").table({"text": [1, 2]}), path)
  with pytest.raises(DharaError, match=r"text_column: column 'text' of .* holds int64, not text"):
    _open(tmp_path, path=str(path))
