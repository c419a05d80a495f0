"""RUN_DIR/eval holds one evaluation's files: a newer evaluation replaces the folder whole (no
samples of tasks it did not evaluate stay beside its results), and a failed write leaves the
older one as it was."""

import errno
import json
from pathlib import Path

import pytest

from dhara_jax.errors import DharaError
from eval import report

SUMMARY = {"model": "run", "step": 1, "kind": "ar", "tasks": [], "limit": 2, "data": "slice",
           "lm_eval_version": "0.4.13", "seconds": 1.0}


def _results(*tasks):
  return {"results": {t: {"acc,none": 0.5} for t in tasks},
          "samples": {t: [{"doc_id": 0, "task": t}] for t in tasks}}


def _tree(folder: Path) -> dict[str, str]:
  return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*"))
          if p.is_file()}


def test_a_newer_evaluation_replaces_the_folder_whole(tmp_path):
  folder = tmp_path / "eval"
  report.store(folder, _results("piqa", "arc_easy"), SUMMARY)
  assert set(_tree(folder)) == {"results.json", "summary.json", "table.md",
                                "samples/piqa.jsonl", "samples/arc_easy.jsonl"}
  report.store(folder, _results("piqa"), SUMMARY)
  assert set(_tree(folder)) == {"results.json", "summary.json", "table.md",
                                "samples/piqa.jsonl"}
  assert json.loads(_tree(folder)["samples/piqa.jsonl"]) == {"doc_id": 0, "task": "piqa"}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]  # no temp folder left


def test_a_failed_write_is_one_line_and_leaves_the_older_evaluation(tmp_path, monkeypatch):
  folder = tmp_path / "eval"
  report.store(folder, _results("piqa", "arc_easy"), SUMMARY)
  before = _tree(folder)
  written = []

  def full_disk(self, data):
    written.append(self)
    if len(written) == 2:
      raise OSError(errno.ENOSPC, "No space left on device")
    return Path.write_text(self, data.decode())

  monkeypatch.setattr(Path, "write_bytes", full_disk)
  with pytest.raises(DharaError, match=r"^eval: cannot write .*eval: No space left on device$"):
    report.store(folder, _results("hellaswag"), SUMMARY)
  monkeypatch.undo()
  assert _tree(folder) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]


def test_a_file_in_the_folders_place_is_one_line(tmp_path):
  (tmp_path / "eval").write_text("not a folder")
  with pytest.raises(DharaError, match="eval: cannot write .*: Not a directory"):
    report.store(tmp_path / "eval", _results("piqa"), SUMMARY)
  assert (tmp_path / "eval").read_text() == "not a folder"
