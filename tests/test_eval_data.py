"""eval.data: local benchmark data in the shape of the HF Hub datasets lm-eval names."""

from __future__ import annotations

import collections
import json
import os
import shutil
from pathlib import Path

import pytest

from data_pipeline.config import REPO_ROOT
from dhara_jax.errors import DharaError
from eval import data as eval_data
from eval.data import HUB_DATASETS, check_data_dir, load_local, shipped_data_dir

FULL = REPO_ROOT.parent / "shared" / "data"  # the project's full copy (CI has it)
needs_full = pytest.mark.skipif(not FULL.is_dir(), reason=f"full eval data {FULL} not present")

# (dataset_path, dataset_name) -> {split: rows} in the shipped slice.
SLICE_ROWS = {
    ("Rowan/hellaswag", None): {"validation": 100},
    ("baber/piqa", None): {"train": 100, "validation": 100},
    ("allenai/winogrande", "winogrande_xl"): {"train": 100, "validation": 100},
    ("allenai/ai2_arc", "ARC-Challenge"): {"train": 100, "validation": 100, "test": 100},
    ("allenai/ai2_arc", "ARC-Easy"): {"train": 100, "validation": 100, "test": 100},
    ("cais/mmlu", "anatomy"): {"test": 2, "validation": 1, "dev": 5},
    ("cais/mmlu", "all"): {"test": 114, "validation": 57, "dev": 285},
    ("truthfulqa/truthful_qa", "multiple_choice"): {"validation": 100},
    ("openai/gsm8k", "main"): {"train": 100, "test": 100},
}
SLICE_FILES = {
    "hellaswag/hellaswag_val.jsonl", "piqa/piqa_validation.jsonl", "piqa/piqa_train.jsonl",
    "winogrande/winogrande_xl_validation.jsonl", "winogrande/winogrande_xl_train.jsonl",
    *(f"arc/{n}_{s}.jsonl" for n in ("ARC-Challenge", "ARC-Easy")
      for s in ("test", "train", "validation")),
    "mmlu/mmlu_dev.jsonl", "mmlu/mmlu_test.jsonl", "mmlu/mmlu_validation.jsonl",
    "truthfulqa/truthfulqa_mc_validation.jsonl", "gsm8k/test.jsonl", "gsm8k/train.jsonl",
}
MMLU_PER_SUBJECT = {"mmlu/mmlu_test.jsonl": 2, "mmlu/mmlu_validation.jsonl": 1}


def same(a, b) -> bool:
  """Equal values with equal Python types, recursively (dict keys in the same order)."""
  if type(a) is not type(b):
    return False
  if isinstance(a, dict):
    return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
  if isinstance(a, list):
    return len(a) == len(b) and all(map(same, a, b))
  return a == b


def test_shipped_dir_is_in_the_repo():
  assert shipped_data_dir() == REPO_ROOT / "data" / "eval"
  assert check_data_dir(shipped_data_dir()) == shipped_data_dir().resolve()
  assert set(HUB_DATASETS) == {path for path, _ in SLICE_ROWS}


@pytest.mark.parametrize("path,name", list(SLICE_ROWS))
def test_slice_loads(path, name):
  dd = load_local(path, name, shipped_data_dir())
  assert {split: len(ds) for split, ds in dd.items()} == SLICE_ROWS[(path, name)]


def test_slice_files():
  root = shipped_data_dir()
  files = {str(p.relative_to(root)) for p in root.rglob("*")
           if p.is_file() and "__pycache__" not in p.parts}
  assert files - {"make_slice.py", "SOURCE.md", "LICENSES.md"} == SLICE_FILES
  assert sum((root / f).stat().st_size for f in files) < 1_000_000


@needs_full
def test_slice_is_first_lines_of_full_data():
  root = shipped_data_dir()
  for rel in sorted(SLICE_FILES):
    part = (root / rel).read_bytes().splitlines(keepends=True)
    full = (FULL / rel).read_bytes().splitlines(keepends=True)
    if rel in MMLU_PER_SUBJECT:  # the first k rows of each subject, in file order
      seen = collections.Counter()
      want = []
      for line in full:
        subject = json.loads(line)["subject"]
        if seen[subject] < MMLU_PER_SUBJECT[rel]:
          want.append(line)
        seen[subject] += 1
      assert part == want, rel
    elif rel == "mmlu/mmlu_dev.jsonl":  # all of dev: the 5-shot exemplars
      assert part == full, rel
    else:
      assert part == full[:100], rel


ARROWS = [
    ("Rowan/hellaswag", None, "validation", "hellaswag/hf_arrow_validation"),
    ("baber/piqa", None, "validation", "piqa/hf_arrow_validation"),
    ("allenai/winogrande", "winogrande_xl", "validation",
     "winogrande/hf_arrow_winogrande_xl_validation"),
    ("allenai/ai2_arc", "ARC-Challenge", "validation", "arc/hf_arrow_ARC-Challenge_validation"),
    ("allenai/ai2_arc", "ARC-Easy", "validation", "arc/hf_arrow_ARC-Easy_validation"),
    *(("cais/mmlu", "anatomy", split, f"mmlu/hf_arrow_mmlu_no_train/anatomy/{split}")
      for split in ("test", "dev", "validation")),
]


@needs_full
@pytest.mark.parametrize("path,name,split,arrow", ARROWS)
def test_records_equal_hf_arrow(path, name, split, arrow):
  import datasets

  ref = datasets.load_from_disk(str(FULL / arrow))
  for data_dir in (FULL, shipped_data_dir()):
    ours = load_local(path, name, data_dir)[split]
    assert ours.features == ref.features
    rows = ours.to_list()
    if data_dir == FULL:
      assert len(rows) == len(ref)
    want = ref.select(range(len(rows))).to_list()  # the slice: the first rows
    assert all(same(a, b) for a, b in zip(rows, want, strict=True))


@pytest.mark.parametrize("full", [False, True])
def test_arc_derived_rows_give_gold(full):
  if full and not FULL.is_dir():
    pytest.skip(f"full eval data {FULL} not present")
  root = FULL if full else shipped_data_dir()
  for name in ("ARC-Challenge", "ARC-Easy"):
    dd = load_local("allenai/ai2_arc", name, root)
    for split in ("test", "train"):
      raw = [json.loads(line) for line in open(root / "arc" / f"{name}_{split}.jsonl")]
      docs = dd[split].to_list()
      assert len(docs) == len(raw)
      for doc, rec in zip(docs, raw):
        assert doc["choices"]["text"] == rec["choices"]
        assert doc["choices"]["label"].index(doc["answerKey"]) == rec["gold"]


def test_hellaswag_train_when_present(tmp_path):
  src = shipped_data_dir() / "hellaswag" / "hellaswag_val.jsonl"
  (tmp_path / "hellaswag").mkdir()
  lines = src.read_text().splitlines(keepends=True)[:3]
  (tmp_path / "hellaswag" / "hellaswag_train.jsonl").write_text("".join(lines))
  dd = load_local("Rowan/hellaswag", None, tmp_path)
  assert list(dd) == ["train"] and len(dd["train"]) == 3  # validation absent: left out
  assert isinstance(dd["train"][0]["label"], str)


def test_mmlu_file_parsed_once(tmp_path, monkeypatch):
  shutil.copytree(shipped_data_dir() / "mmlu", tmp_path / "mmlu")
  calls = collections.Counter()
  read = eval_data._read_jsonl

  def counting(path, *args):
    calls[Path(path).name] += 1
    return read(path, *args)

  monkeypatch.setattr(eval_data, "_read_jsonl", counting)
  for subject in ("anatomy", "astronomy", "virology", "all"):
    load_local("cais/mmlu", subject, tmp_path)
  assert calls == {"mmlu_test.jsonl": 1, "mmlu_dev.jsonl": 1, "mmlu_validation.jsonl": 1}
  test_file = tmp_path / "mmlu" / "mmlu_test.jsonl"
  test_file.write_text("".join(test_file.read_text().splitlines(keepends=True)[:1]))
  st = test_file.stat()
  os.utime(test_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # changed: parsed again
  assert "test" not in load_local("cais/mmlu", "anatomy", tmp_path)  # only abstract_algebra
  assert calls["mmlu_test.jsonl"] == 2


def raises_one_line(match: str, *args) -> str:
  with pytest.raises(DharaError, match=match) as e:
    load_local(*args)
  message = str(e.value)
  assert "\n" not in message and len(message) < 400, message
  return message


def test_unknown_dataset_path():
  message = raises_one_line("dataset_path 'foo/bar'", "foo/bar", None, shipped_data_dir())
  assert "cais/mmlu" in message and "Rowan/hellaswag" in message


def test_unknown_config_and_subject():
  raises_one_line("config 'ARC'", "allenai/ai2_arc", "ARC", shipped_data_dir())
  raises_one_line("unknown MMLU subject 'anatomyy'", "cais/mmlu", "anatomyy", shipped_data_dir())


def test_missing_data_dir(tmp_path):
  raises_one_line("does not exist", "openai/gsm8k", "main", tmp_path / "nope")
  (tmp_path / "file").write_text("x")
  raises_one_line("not a directory", "openai/gsm8k", "main", tmp_path / "file")


def test_dir_without_the_dataset(tmp_path):
  (tmp_path / "gsm8k").mkdir()
  message = raises_one_line("no openai/gsm8k", "openai/gsm8k", "main", tmp_path)
  assert "test.jsonl" in message and "train.jsonl" in message


@pytest.mark.parametrize("bad,match", [
    ("{not json", r"piqa_validation\.jsonl:3: bad JSON"),
    ('{"goal": "g", "sol1": "a", "sol2": "b"}', r":3: missing field 'label'"),
    ('{"goal": "g", "sol1": "a", "sol2": "b", "label": "0"}', r":3: field 'label'"),
    ('{"goal": "g", "sol1": "a", "sol2": "b", "label": 2}', r":3: field 'label'"),
    ('["a list"]', r":3: expected a JSON object"),
])
def test_corrupt_line(tmp_path, bad, match):
  (tmp_path / "piqa").mkdir()
  lines = (shipped_data_dir() / "piqa" / "piqa_validation.jsonl").read_text().splitlines()
  lines[2] = bad
  (tmp_path / "piqa" / "piqa_validation.jsonl").write_text("\n".join(lines[:5]) + "\n")
  raises_one_line(match, "baber/piqa", None, tmp_path)


def test_empty_file(tmp_path):
  (tmp_path / "gsm8k").mkdir()
  (tmp_path / "gsm8k" / "test.jsonl").write_text("\n")
  raises_one_line(r"test\.jsonl: no records", "openai/gsm8k", "main", tmp_path)


def test_corrupt_nested_field(tmp_path):
  (tmp_path / "arc").mkdir()
  rec = {"id": "x", "question": "q", "choices": ["a", "b"], "gold": 5}
  (tmp_path / "arc" / "ARC-Easy_test.jsonl").write_text(json.dumps(rec) + "\n")
  raises_one_line(r"ARC-Easy_test\.jsonl:1: field 'gold'", "allenai/ai2_arc", "ARC-Easy",
                  tmp_path)
  rec = {"question": "q", "mc1_targets": {"choices": ["a"], "labels": ["1"]},
         "mc2_targets": {"choices": ["a"], "labels": [1]}}
  (tmp_path / "truthfulqa").mkdir()
  (tmp_path / "truthfulqa" / "truthfulqa_mc_validation.jsonl").write_text(json.dumps(rec) + "\n")
  raises_one_line(r":1: field 'mc1_targets.labels\[0\]'", "truthfulqa/truthful_qa",
                  "multiple_choice", tmp_path)
