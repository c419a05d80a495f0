"""Local benchmark data for lm-evaluation-harness, in the shape of the HF Hub datasets it names.

lm-eval's task configs name Hub datasets (`dataset_path`, `dataset_name`, splits). Evaluation runs
offline, so `load_local` builds the `datasets.DatasetDict` lm-eval would have downloaded from
local jsonl files laid out like the shipped slice (`data/eval`), or a full copy in the same layout:

  <data_dir>/<folder>/<file>.jsonl      folder = HUB_DATASETS[dataset_path]

Records have the Hub's fields, field order and types (explicit `datasets.Features`), so lm-eval's
`process_docs` / `doc_to_text` / `doc_to_target` work unchanged. A split whose file is absent is
left out; a missing or corrupt dataset is a one-line `DharaError`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from data_pipeline.config import REPO_ROOT, resolve_input
from dhara_jax.errors import DharaError

if TYPE_CHECKING:
  import datasets

# lm-eval 0.4.13 dataset_path -> folder under the data dir.
HUB_DATASETS: dict[str, str] = {
    "Rowan/hellaswag": "hellaswag",
    "baber/piqa": "piqa",
    "allenai/winogrande": "winogrande",
    "allenai/ai2_arc": "arc",
    "cais/mmlu": "mmlu",
    "truthfulqa/truthful_qa": "truthfulqa",
    "openai/gsm8k": "gsm8k",
}

_NO_CONFIG = (None, "default")  # datasets without a config: lm-eval passes dataset_name None


class _BadRecord(Exception):
  """A record that does not fit the schema; the reader adds file and line."""


@dataclasses.dataclass(frozen=True)
class _Spec:
  names: tuple[str | None, ...] | None  # accepted dataset_name values; None: any (MMLU subjects)
  files: Callable[[str | None], dict[str, str]]  # dataset_name -> {split: file name}
  features: Callable[[], "datasets.Features"]
  convert: Callable[[dict], dict] = lambda rec: rec  # raw jsonl record -> Hub-shaped record


def shipped_data_dir() -> Path:
  """The slice shipped with the repository (100 examples per task; smoke runs only)."""
  return REPO_ROOT / "data" / "eval"


def check_data_dir(data_dir: str | Path) -> Path:
  """The eval data folder, resolved like other inputs (working directory, then repository)."""
  path = resolve_input(str(data_dir)).resolve()
  if not path.exists():
    raise DharaError(f"eval data dir {path} does not exist")
  if not path.is_dir():
    raise DharaError(f"eval data dir {path} is not a directory")
  return path


def load_local(dataset_path: str, dataset_name: str | None,
               data_dir: str | Path) -> "datasets.DatasetDict":
  """The DatasetDict lm-eval would load for (dataset_path, dataset_name), from local files."""
  import datasets

  spec = _spec(dataset_path, dataset_name)
  folder = check_data_dir(data_dir) / HUB_DATASETS[dataset_path]
  files = {split: folder / name for split, name in spec.files(dataset_name).items()}
  present = {split: path for split, path in files.items() if path.is_file()}
  if not present:
    raise DharaError(f"no {_label(dataset_path, dataset_name)} data in {folder}: expected "
                     f"{' or '.join(sorted({p.name for p in files.values()}))}")
  features = spec.features()
  subject = dataset_name if dataset_path == "cais/mmlu" and dataset_name != "all" else None
  splits = {}
  for split, path in present.items():
    records = _records(path, spec, features)
    if subject is not None:
      records = [r for r in records if r["subject"] == subject]
      if not records:
        continue  # this subject has no rows in this split: leave the split out
    try:
      splits[split] = datasets.Dataset.from_list(records, features=features)
    except (ValueError, TypeError) as e:  # pyarrow errors derive from these
      raise DharaError(f"{path}: records do not fit the {dataset_path} schema "
                       f"({_one_line(e)})") from e
  if not splits:
    raise DharaError(f"unknown MMLU subject {dataset_name!r}: no rows in "
                     f"{', '.join(str(p) for p in present.values())} (dataset_name is a subject "
                     f"such as 'anatomy', or 'all')")
  return datasets.DatasetDict(splits)


def _label(dataset_path: str, dataset_name: str | None) -> str:
  return dataset_path if dataset_name is None else f"{dataset_path} ({dataset_name})"


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return text if len(text) <= 200 else text[:197] + "..."


def _spec(dataset_path: str, dataset_name: str | None) -> _Spec:
  if dataset_path not in HUB_DATASETS:
    raise DharaError(f"no local eval data for dataset_path {dataset_path!r}; supported: "
                     f"{', '.join(sorted(HUB_DATASETS))}")
  spec = _specs()[dataset_path]
  if spec.names is not None and dataset_name not in spec.names:
    names = ", ".join(repr(n) for n in spec.names)
    raise DharaError(f"no local eval data for {dataset_path} config {dataset_name!r}; "
                     f"supported: {names}")
  if spec.names is None and not dataset_name:
    raise DharaError(f"{dataset_path} needs a dataset_name (an MMLU subject, or 'all')")
  return spec


# --- reading and checking records -------------------------------------------------------------

# Parsed files, by path -> ((mtime_ns, size), records). Only filtered datasets are cached: lm-eval
# loads MMLU once per subject (57 times), everything else once per run.
_CACHE: dict[str, tuple[tuple[int, int], list[dict]]] = {}


def _records(path: Path, spec: _Spec, features: "datasets.Features") -> list[dict]:
  cached = spec.names is None
  if cached:
    st = os.stat(path)
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _CACHE.get(str(path))
    if hit is not None and hit[0] == stamp:
      return hit[1]
  records = list(_read_jsonl(path, spec, features))
  if not records:
    raise DharaError(f"{path}: no records (empty file)")
  if cached:
    _CACHE[str(path)] = (stamp, records)
  return records


def _read_jsonl(path: Path, spec: _Spec, features: "datasets.Features"):
  with open(path, "rb") as f:  # decoded a line at a time: a bad byte is then named by its line
    for lineno, data in enumerate(f, 1):
      try:
        line = data.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DharaError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start + 1} "
                         "of the line)") from None
      if not line.strip():
        continue
      try:
        raw = json.loads(line)
        if not isinstance(raw, dict):
          raise _BadRecord(f"expected a JSON object, got {type(raw).__name__}")
        yield _check(spec.convert(raw), features, "")
      except json.JSONDecodeError as e:
        raise DharaError(f"{path}:{lineno}: bad JSON ({e.msg} at column {e.colno})") from None
      except _BadRecord as e:
        raise DharaError(f"{path}:{lineno}: {e}") from None


def _check(value: Any, feature: Any, where: str) -> Any:
  """`value` checked against a datasets feature; dicts come back with exactly its fields, in its
  order (extra jsonl fields are dropped, so columns match the Hub's)."""
  import datasets

  if isinstance(feature, (dict, datasets.Features)):
    if not isinstance(value, dict):
      raise _BadRecord(f"field {where!r} is {type(value).__name__}, expected an object")
    out = {}
    for key, sub in feature.items():
      name = f"{where}.{key}" if where else key
      if key not in value:
        raise _BadRecord(f"missing field {name!r}")
      out[key] = _check(value[key], sub, name)
    return out
  if isinstance(feature, datasets.List):
    if not isinstance(value, list):
      raise _BadRecord(f"field {where!r} is {type(value).__name__}, expected a list")
    return [_check(v, feature.feature, f"{where}[{i}]") for i, v in enumerate(value)]
  if isinstance(feature, datasets.ClassLabel):
    top = feature.num_classes - 1
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
      raise _BadRecord(f"field {where!r} is {value!r}, expected an int in 0..{top}")
    return value
  if isinstance(feature, datasets.Value):
    want = str if feature.dtype == "string" else int
    if isinstance(value, bool) or not isinstance(value, want):
      raise _BadRecord(f"field {where!r} is {type(value).__name__}, expected {want.__name__}")
    return value
  raise TypeError(f"unhandled feature {feature!r}")  # a bug here, not in the data


# --- per-dataset schemas (the Hub's, checked against HF arrow copies) -------------------------

def _hellaswag(rec: dict) -> dict:
  # The rowanz jsonl has an int label; the Hub dataset stores it as a string ("3").
  if isinstance(rec.get("label"), int) and not isinstance(rec["label"], bool):
    rec = {**rec, "label": str(rec["label"])}
  return rec


def _arc(rec: dict) -> dict:
  """The derived test/train format ({choices: [...], gold: i}) -> the Hub's. Validation is
  already in the Hub's format. The original labels were not kept; letters A.. stand in (lm-eval
  scores by `choices.label.index(answerKey)`, which is `gold`)."""
  if "gold" not in rec:
    return rec
  choices, gold = rec.get("choices"), rec["gold"]
  if not isinstance(choices, list) or not choices:
    raise _BadRecord("field 'choices' must be a non-empty list in the derived (gold) format")
  if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
    raise _BadRecord(f"field 'gold' is {gold!r}, expected an int in 0..{len(choices) - 1}")
  letters = list(string.ascii_uppercase[:len(choices)])
  out = {k: rec[k] for k in ("id", "question") if k in rec}  # absent: reported by _check
  return {**out, "choices": {"text": choices, "label": letters}, "answerKey": letters[gold]}


@functools.cache
def _specs() -> dict[str, _Spec]:
  import datasets
  s, i32 = datasets.Value("string"), datasets.Value("int32")
  strs = datasets.List(s)

  def feats(**fields: Any) -> Callable[[], datasets.Features]:
    return lambda: datasets.Features(fields)

  mc_targets = {"choices": strs, "labels": datasets.List(i32)}
  return {
      "Rowan/hellaswag": _Spec(
          _NO_CONFIG,
          lambda _: {"train": "hellaswag_train.jsonl", "validation": "hellaswag_val.jsonl"},
          feats(ind=i32, activity_label=s, ctx_a=s, ctx_b=s, ctx=s, endings=strs,
                source_id=s, split=s, split_type=s, label=s),
          _hellaswag),
      "baber/piqa": _Spec(
          _NO_CONFIG,
          lambda _: {"train": "piqa_train.jsonl", "validation": "piqa_validation.jsonl"},
          feats(goal=s, sol1=s, sol2=s, label=datasets.ClassLabel(names=["0", "1"]))),
      "allenai/winogrande": _Spec(
          ("winogrande_xl",),
          lambda n: {split: f"{n}_{split}.jsonl" for split in ("train", "validation")},
          feats(sentence=s, option1=s, option2=s, answer=s)),
      "allenai/ai2_arc": _Spec(
          ("ARC-Challenge", "ARC-Easy"),
          lambda n: {split: f"{n}_{split}.jsonl" for split in ("train", "validation", "test")},
          feats(id=s, question=s, choices={"text": strs, "label": strs}, answerKey=s),
          _arc),
      # HF has `answer` as ClassLabel(A-D); the records are the same ints.
      "cais/mmlu": _Spec(
          None,
          lambda _: {split: f"mmlu_{split}.jsonl" for split in ("test", "validation", "dev")},
          feats(question=s, subject=s, choices=strs,
                answer=datasets.ClassLabel(names=["A", "B", "C", "D"]))),
      "truthfulqa/truthful_qa": _Spec(
          ("multiple_choice",),
          lambda _: {"validation": "truthfulqa_mc_validation.jsonl"},
          feats(question=s, mc1_targets=mc_targets, mc2_targets=mc_targets)),
      "openai/gsm8k": _Spec(
          ("main",),
          lambda _: {"train": "train.jsonl", "test": "test.jsonl"},
          feats(question=s, answer=s)),
  }
