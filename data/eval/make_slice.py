"""Rebuilds data/eval/ (the shipped benchmark slice) from a full copy of the eval data.

The slice lets `dhara eval` and the quickstart run anywhere; it is for smoke runs, not for
reporting scores. Folder and file names are those of the full data, so `--data-dir <full copy>`
and the default are interchangeable. Every file holds byte-identical copies of source lines,
in source order, so its records equal the first records of the full data:

- eval splits and few-shot sources: the first HEAD_LINES lines of each file in HEAD_FILES;
- MMLU: all of dev (5 exemplars per subject), the first 2 test and 1 validation rows per subject.

  python data/eval/make_slice.py --src ../shared/data --out data/eval
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEAD_LINES = 100
HEAD_FILES = [
    "hellaswag/hellaswag_val.jsonl",
    "piqa/piqa_validation.jsonl", "piqa/piqa_train.jsonl",
    "winogrande/winogrande_xl_validation.jsonl", "winogrande/winogrande_xl_train.jsonl",
    *(f"arc/{name}_{split}.jsonl" for name in ("ARC-Challenge", "ARC-Easy")
      for split in ("test", "train", "validation")),
    "truthfulqa/truthfulqa_mc_validation.jsonl",
    "gsm8k/test.jsonl", "gsm8k/train.jsonl",
]
# MMLU file -> rows kept per subject (None: all rows).
MMLU_FILES = {"mmlu/mmlu_dev.jsonl": None, "mmlu/mmlu_test.jsonl": 2,
              "mmlu/mmlu_validation.jsonl": 1}


def read_lines(path: Path) -> list[bytes]:
  if not path.is_file():
    raise SystemExit(f"make_slice: source file {path} not found")
  return path.read_bytes().splitlines(keepends=True)


def per_subject(lines: list[bytes], keep: int | None) -> list[bytes]:
  seen: collections.Counter[str] = collections.Counter()
  out = []
  for line in lines:
    subject = json.loads(line)["subject"]
    if keep is None or seen[subject] < keep:
      out.append(line)
    seen[subject] += 1
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--src", default=str(HERE.parents[2] / "shared" / "data"),
                      help="full copy of the eval data (default: ../shared/data)")
  parser.add_argument("--out", default=str(HERE), help="slice folder (default: data/eval)")
  args = parser.parse_args()
  src, out = Path(args.src), Path(args.out)
  picked = {rel: read_lines(src / rel)[:HEAD_LINES] for rel in HEAD_FILES}
  picked |= {rel: per_subject(read_lines(src / rel), keep) for rel, keep in MMLU_FILES.items()}
  total = 0
  for rel, lines in picked.items():
    dest = out / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join(lines)
    dest.write_bytes(data)
    total += len(data)
    print(f"{rel:45s} {len(lines):4d} rows {len(data):8,d} B")
  print(f"{'total':45s} {sum(map(len, picked.values())):4d} rows {total:8,d} B")


if __name__ == "__main__":
  main()
