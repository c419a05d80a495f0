"""metrics.jsonl: rows a killed run left half-written, resume truncation, damaged lines."""

import json

import pytest

from dhara_jax.errors import DharaError
from dhara_jax.metrics import MetricsWriter, read_metrics


def _write_rows(run_dir, steps, tail=""):
  text = "".join(json.dumps({"step": s, "loss": 1.0 / (s + 1)}) + "\n" for s in steps)
  (run_dir / "metrics.jsonl").write_text(text + tail)


def test_a_half_written_last_row_is_not_a_row(tmp_path):
  _write_rows(tmp_path, [0, 1, 2], tail='{"step": 3, "lo')  # killed mid-write, or being written
  assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]


def test_resume_keeps_rows_up_to_the_checkpoint_and_drops_a_half_written_one(tmp_path):
  _write_rows(tmp_path, [0, 1, 2, 3], tail='{"step": 4, "lo')
  writer = MetricsWriter(tmp_path, resume_step=2, tensorboard=False)
  writer.write({"step": 3, "loss": 0.5})
  writer.close()
  rows = read_metrics(tmp_path)
  assert [(r["step"], r["loss"]) for r in rows] == [(0, 1.0), (1, 0.5), (2, 1 / 3), (3, 0.5)]
  assert (tmp_path / "metrics.jsonl").read_text().endswith("}\n")


def test_a_fresh_run_drops_every_old_row_even_damaged_ones(tmp_path):
  (tmp_path / "metrics.jsonl").write_text("not json\n")
  MetricsWriter(tmp_path, resume_step=None, tensorboard=False).close()
  assert read_metrics(tmp_path) == []


@pytest.mark.parametrize("line, message", [("not json", "line 2 of .* is not JSON"),
                                           ("[1, 2]", "line 2 of .* is not a row with a step")])
def test_a_damaged_line_is_one_error_naming_it(tmp_path, line, message):
  (tmp_path / "metrics.jsonl").write_text(f'{{"step": 0}}\n{line}\n{{"step": 1}}\n')
  with pytest.raises(DharaError, match=message):
    read_metrics(tmp_path)
  with pytest.raises(DharaError, match=message):  # resuming does not rewrite it silently
    MetricsWriter(tmp_path, resume_step=1, tensorboard=False)
