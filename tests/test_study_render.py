"""`dhara study` report: report.md tables beside codelion's numbers, results.csv, the PNGs, and a
grid where nothing has finished (no JAX: the rows are synthetic)."""

from __future__ import annotations

import csv

import pytest

from dhara_jax.study.published import PUBLISHED, TASKS
from dhara_jax.study.render import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STUDY = {"name": "tiny", "description": "A small grid for tests.",
         "config": "configs/studies/tiny.yaml",
         "eval": {"tasks": "codelion", "limit": 20, "data_dir": "data/eval"},
         "throughput": {"new_tokens": 100, "batch": 1}, "seconds": 3725.0}
CHANCE = {"hellaswag": 0.25, "piqa": 0.5, "winogrande": 0.5, "arc_challenge": 0.25,
          "mmlu": 0.25, "truthfulqa_mc2": 0.3, "gsm8k": None}


def _row(name, label, tables, layers, width, params, scores=None, kind="ar", state="done",
         **extra):
  scores = scores or {}
  done = [scores[t] for t in TASKS if scores.get(t) is not None]
  row = {
      "name": name, "label": label, "tables": tables, "family": extra.pop("family", "gpt2"),
      "kind": kind, "objective": "mdm" if kind == "diffusion" else "ar",
      "converted_from": None, "layers": layers, "width": width, "params": params,
      "state": state, "error": None,
      "scores": {t: scores.get(t) for t in TASKS},
      "stderr": {t: 0.01 if scores.get(t) is not None else None for t in TASKS},
      "chance": dict(CHANCE) if scores else {t: None for t in TASKS},
      "average_6": sum(done[:6]) / 6 if len(done) == 7 else None,
      "average_7": sum(done) / 7 if len(done) == 7 else None,
      "tokens_per_second": None, "train_tokens": None, "final_loss": None,
      "held_out_loss": None, "curve": [], "seconds": {},
  }
  row.update(extra)
  return row


def _scores(base):
  return {"hellaswag": 0.2512, "piqa": base, "winogrande": 0.5, "arc_challenge": 0.22,
          "mmlu": 0.24, "truthfulqa_mc2": 0.47, "gsm8k": 0.0}


def _curve(start, steps, loss):
  return [{"step": s, "tokens": start + s * 1000, "loss": loss - 0.1 * s,
           "eval_loss": loss - 0.1 * s + 0.05 if s % 2 == 0 else None} for s in range(steps)]


@pytest.fixture
def rows():
  return [
      _row("gpt2_12l", "GPT-2 12L", ["shapes"], 12, 64, 3_456_789, _scores(0.55),
           tokens_per_second=80.0, train_tokens=9000, final_loss=3.1, held_out_loss=3.2,
           curve=_curve(0, 10, 4.0)),
      _row("gpt2_32l", "GPT-2 32L", ["shapes", "families"], 32, 48, 2_345_678,
           _scores(0.56), tokens_per_second=30.0, curve=_curve(0, 10, 4.2)),
      _row("gpt2_4l", "GPT-2 4L", ["shapes"], 4, 96, 5_000_000, state="failed",
           error="train: loss is NaN at step 12"),
      _row("llama3_canon", "LLaMA3-Canon", ["families"], 32, 48, 2_500_000, _scores(0.57),
           family="llama3", tokens_per_second=40.0, curve=_curve(0, 10, 4.1)),
      _row("dhara_70m", "Dhara 70M", ["families"], 32, 48, 2_600_000, _scores(0.52),
           kind="diffusion", family="llama3", converted_from="llama3_canon",
           tokens_per_second=150.0, curve=_curve(9000, 5, 5.0)),
  ]


def _lines_starting(text, prefix):
  return [line for line in text.splitlines() if line.startswith(prefix)]


def test_report_holds_both_tables_with_ours_and_codelions_numbers(tmp_path, rows):
  out = write_report(STUDY, rows, tmp_path)
  report = out["report"].read_text()
  assert out["report"] == tmp_path / "report.md"
  assert report.startswith("# Study `tiny`")
  assert "A small grid for tests." in report and "`--limit 20`" in report
  assert "1h 02m" in report and "G = 100" in report
  shapes = report.index("## Shapes")
  families = report.index("## Families")
  assert shapes < families
  shape_rows = [line for line in report[shapes:families].splitlines() if line.startswith("| ")]
  # Ordered by layers, not grid order.
  assert [r.split(" | ")[0] for r in shape_rows[2:]] == [
      "| GPT-2 4L", "| GPT-2 12L", "| *GPT-2 12L (codelion)*", "| GPT-2 32L"]
  ours_12 = _lines_starting(report, "| GPT-2 12L |")[0]
  assert "| 3.46M |" in ours_12 and "| 25.12 | 55.00 |" in ours_12
  assert "| 38.15 | high |" in ours_12  # codelion avg (6) and tier
  theirs_12 = _lines_starting(report, "| *GPT-2 12L (codelion)* |")[0]
  assert "*27.03*" in theirs_12 and "*57.29*" in theirs_12 and "*64.09M*" in theirs_12
  assert "| 38.50 | high |" in _lines_starting(report, "| GPT-2 32L |")[0]
  assert "| 31.98 | low |" in _lines_starting(report, "| GPT-2 4L |")[0]
  # The failed shape cell: params filled, "—" for every score.
  assert _lines_starting(report, "| GPT-2 4L |")[0].count("—") == 9
  family_text = report[families:]
  assert "| 33.18 |" in _lines_starting(family_text, "| GPT-2 32L |")[0]  # codelion avg (7)
  dhara = _lines_starting(report, "| Dhara 70M |")[0]
  assert "| mdm |" in dhara and "| 150.0 |" in dhara and "| 31.85 |" in dhara
  avg7 = f"{100 * sum(_scores(0.52).values()) / 7:.2f}"
  assert f"| {avg7} |" in dhara
  theirs = _lines_starting(report, "| *Dhara 70M (codelion)* |")[0]
  assert "*25.58*" in theirs and "*47.50*" in theirs and "*0.00*" in theirs
  assert "*31.85*" in theirs and "*183.0*" in theirs and "*71.34M*" in theirs


def test_report_lists_failed_cells_chance_floors_speedups_and_plots(tmp_path, rows):
  report = write_report(STUDY, rows, tmp_path)["report"].read_text()
  failed = report[report.index("## Failed or unfinished cells"):]
  assert "`gpt2_4l`" in failed and "failed" in failed
  assert "train: loss is NaN at step 12" in failed
  assert "`gpt2_12l`" not in failed
  assert "HellaSwag 25.00" in report and "TruthfulQA 30.00" in report
  # Dhara converts llama3_canon, which has a throughput: 150 / 40.
  throughput = report[report.index("## Throughput"):]
  assert "**3.75×**" in throughput and "LLaMA3-Canon 40.0 tok/s" in throughput
  assert "3.8×" in throughput
  for name in ("depth", "families", "truthfulqa", "throughput", "curves"):
    assert f"]({name}.png)" in report


def test_speedup_falls_back_to_the_fastest_ar_cell_of_the_same_table(tmp_path, rows):
  rows[3]["tokens_per_second"] = None  # the parent has no throughput: llama3_canon
  rows.append(_row("dllm_canon", "dLLM-Canon", ["families"], 32, 48, 2_600_000, _scores(0.5),
                   kind="diffusion", tokens_per_second=60.0))
  report = write_report(STUDY, rows, tmp_path)["report"].read_text()
  throughput = report[report.index("## Throughput"):]
  assert "**5.00×**" in throughput  # Dhara 150 / GPT-2 32L 30 (GPT-2 12L is not a family)
  assert "**2.00×**" in throughput  # dLLM-Canon 60 / 30


def test_results_csv_holds_every_row(tmp_path, rows):
  out = write_report(STUDY, rows, tmp_path)
  with out["csv"].open(newline="") as f:
    table = list(csv.DictReader(f))
  assert [r["name"] for r in table] == [r["name"] for r in rows]
  by_name = {r["name"]: r for r in table}
  assert by_name["gpt2_32l"]["tables"] == "shapes;families"
  assert float(by_name["gpt2_12l"]["hellaswag"]) == pytest.approx(0.2512)
  assert int(by_name["gpt2_12l"]["params"]) == 3_456_789
  assert float(by_name["gpt2_32l"]["published_average_6"]) == pytest.approx(0.385)
  assert float(by_name["gpt2_32l"]["published_average_7"]) == pytest.approx(0.3318)
  assert float(by_name["dhara_70m"]["tokens_per_second"]) == 150.0
  assert by_name["dhara_70m"]["converted_from"] == "llama3_canon"
  assert by_name["dhara_70m"]["published_average_6"] == ""
  assert by_name["gpt2_4l"]["state"] == "failed"
  assert by_name["gpt2_4l"]["error"] == "train: loss is NaN at step 12"
  assert by_name["gpt2_4l"]["hellaswag"] == "" and by_name["gpt2_4l"]["average_7"] == ""
  assert float(by_name["gpt2_12l"]["final_loss"]) == 3.1


def test_every_plot_is_a_png(tmp_path, rows):
  out = write_report(STUDY, rows, tmp_path)
  assert set(out["plots"]) == {"depth", "families", "truthfulqa", "throughput", "curves"}
  for path in out["plots"].values():
    assert path.parent == tmp_path
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)
  assert not list(tmp_path.glob(".*.tmp"))  # no temp files left behind


def test_a_grid_where_nothing_finished_still_renders_both_tables(tmp_path, rows):
  pending = [_row(r["name"], r["label"], r["tables"], r["layers"], r["width"], r["params"],
                  kind=r["kind"], state="pending", converted_from=r["converted_from"])
             for r in rows]
  out = write_report(STUDY | {"seconds": None, "eval": {"tasks": "codelion", "limit": None,
                                                        "data_dir": None}}, pending, tmp_path)
  assert out["plots"] == {}
  assert not list(tmp_path.glob("*.png"))
  report = out["report"].read_text()
  assert "## Shapes" in report and "## Families" in report
  for r in rows:
    line = _lines_starting(report, f"| {r['label']} |")[0]
    assert f"{r['params'] / 1e6:.2f}M" in line
  assert "| *Dhara 70M (codelion)* |" in report  # theirs, even before ours exists
  assert "none reported yet" in report and "No plots yet" in report
  assert "No diffusion cell has a throughput yet" in report
  assert "not recorded" in report and "no `--limit`" in report
  with out["csv"].open(newline="") as f:
    assert [r["state"] for r in csv.DictReader(f)] == ["pending"] * len(rows)


def test_partial_rows_only_plot_what_they_hold(tmp_path, rows):
  for r in rows:  # curves only: training ran, nothing evaluated
    r.update(scores={}, chance={}, average_6=None, average_7=None, tokens_per_second=None)
  out = write_report(STUDY, rows, tmp_path)
  assert set(out["plots"]) == {"curves"}
  assert "](curves.png)" in out["report"].read_text()


def test_published_holds_the_numbers_references_states():
  assert PUBLISHED["gpt2_32l"].average_6 == 38.50 and PUBLISHED["gpt2_32l"].tier == "high"
  assert PUBLISHED["gpt2_32l"].average_7 == 33.18
  assert PUBLISHED["gpt2_4l"].average_6 == 31.98 and PUBLISHED["gpt2_4l"].tier == "low"
  assert PUBLISHED["gpt2_4l"].layer_params == 28.3
  shapes = {k: (p.average_6, p.tier) for k, p in PUBLISHED.items() if k.startswith("gpt2_")}
  assert shapes == {"gpt2_4l": (31.98, "low"), "gpt2_12l": (38.15, "high"),
                    "gpt2_16l": (32.61, "low"), "gpt2_24l": (31.79, "low"),
                    "gpt2_32l": (38.50, "high"), "gpt2_48l": (32.45, "low"),
                    "gpt2_64l": (38.21, "high")}
  gpt2 = PUBLISHED["gpt2_12l"]
  assert gpt2.scores == {"mmlu": 24.11, "hellaswag": 27.03, "arc_challenge": 21.67,
                         "piqa": 57.29, "winogrande": 51.46, "truthfulqa_mc2": 47.31}
  assert gpt2.params == 64.09 and gpt2.average_7 is None
  dhara = PUBLISHED["dhara_70m"]
  assert dhara.scores == {"hellaswag": 25.58, "piqa": 51.58, "winogrande": 49.64,
                          "arc_challenge": 24.83, "mmlu": 23.85, "truthfulqa_mc2": 47.50,
                          "gsm8k": 0.0}
  assert dhara.average_7 == 31.85 and dhara.params == 71.34 and dhara.average_6 is None
  assert PUBLISHED["dllm_canon"].average_7 == 31.81
  assert PUBLISHED["dllm_canon"].scores == {"truthfulqa_mc2": 49.27}
  families = {k: PUBLISHED[k].average_7 for k in ("llama3_canon", "moe", "gemma3", "qwen3",
                                                  "lfm2")}
  assert families == {"llama3_canon": 33.22, "moe": 33.02, "gemma3": 32.47, "qwen3": 32.36,
                      "lfm2": 32.16}
  assert "llama3" not in PUBLISHED and "dllm" not in PUBLISHED  # no published average
  # Each stated per-task set agrees with its stated average (a typo would show here).
  assert sum(gpt2.scores.values()) / 6 == pytest.approx(38.15, abs=0.005)
  assert sum(dhara.scores.values()) / 7 == pytest.approx(31.85, abs=0.005)
