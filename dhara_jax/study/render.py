"""The study's report: report.md (the shapes and families tables beside codelion's published
numbers, chance floors, throughput, unfinished cells, plots), results.csv (one line per cell)
and the PNGs. Rendering takes whatever the rows hold, so a grid that is half-run, or where
nothing has finished, still gives both tables with "—" for what is not measured yet."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from dhara_jax.files import write_whole
from dhara_jax.study import plots
from dhara_jax.study.plots import number
from dhara_jax.study.published import (AR_TOKENS_PER_SECOND, DIFFUSION_TOKENS_PER_SECOND,
                                       PUBLISHED, SPEEDUP, TASK_NAMES, TASKS, Published)

MISSING = "—"
PLOT_TITLES = {"depth": "6-task average vs depth (shapes)",
               "families": "7-task average per family",
               "truthfulqa": "TruthfulQA mc2 per family",
               "throughput": "Throughput vs 7-task average",
               "curves": "Training curves"}
CSV_COLUMNS = ("name", "label", "tables", "family", "kind", "objective", "converted_from",
               "layers", "width", "params", "state", *TASKS, "average_6", "average_7",
               "tokens_per_second", "train_tokens", "final_loss", "held_out_loss",
               "published_average_6", "published_average_7", "error")


def write_report(study: dict, rows: list[dict], out_dir: Path) -> dict[str, Any]:
  """Writes out_dir/report.md, results.csv and the plots that have data; returns
  {"report": path, "csv": path, "plots": {name: path}}."""
  out_dir = Path(out_dir)
  written = {}
  for name, figure in plots.FIGURES.items():  # first: the report links only what exists
    if (path := figure(rows, out_dir)) is not None:
      written[name] = path
  csv_path, report_path = out_dir / "results.csv", out_dir / "report.md"
  _write(csv_path, results_csv(rows))
  _write(report_path, report_markdown(study, rows, written))
  return {"report": report_path, "csv": csv_path, "plots": written}


def report_markdown(study: dict, rows: list[dict], plot_paths: dict[str, Path]) -> str:
  parts = [f"# Study `{study.get('name', '?')}`"]
  if study.get("description"):
    parts.append(str(study["description"]).strip())
  parts.append(_how_it_was_run(study))
  shapes = sorted(_in_table(rows, "shapes"), key=lambda r: (r.get("layers") is None,
                                                            r.get("layers") or 0))
  parts += ["## Shapes", _shapes_table(shapes) if shapes else "No shape cells in this grid."]
  families = _in_table(rows, "families")
  parts += ["## Families",
            _families_table(families) if families else "No family cells in this grid."]
  parts.append(_chance_line(rows))
  parts += ["## Throughput", _throughput(study, rows)]
  unfinished = [r for r in rows if r.get("state") != "done"]
  if unfinished:
    parts += ["## Failed or unfinished cells", "\n".join(_unfinished(r) for r in unfinished)]
  parts.append("## Plots")
  if plot_paths:
    parts.append("\n\n".join(f"![{PLOT_TITLES.get(name, name)}]({path.name})"
                             for name, path in plot_paths.items()))
  else:
    parts.append("No plots yet: no cell has the data for one.")
  return "\n\n".join(parts) + "\n"


def results_csv(rows: list[dict]) -> str:
  """One line per cell. Scores, averages and codelion's averages are all fractions (0..1), so
  the columns share one unit; report.md shows percent."""
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(CSV_COLUMNS)
  for r in rows:
    p = PUBLISHED.get(r.get("name"))
    scores = r.get("scores") or {}
    values = [r.get("name"), r.get("label"), ";".join(r.get("tables") or ()), r.get("family"),
              r.get("kind"), r.get("objective"), r.get("converted_from"), r.get("layers"),
              r.get("width"), r.get("params"), r.get("state"), *(scores.get(t) for t in TASKS),
              r.get("average_6"), r.get("average_7"), r.get("tokens_per_second"),
              r.get("train_tokens"), r.get("final_loss"), r.get("held_out_loss"),
              _fraction(p.average_6 if p else None), _fraction(p.average_7 if p else None),
              _one_line(r.get("error"))]
    writer.writerow(["" if v is None else v for v in values])
  return buf.getvalue()


def speedups(rows: list[dict]) -> list[dict]:
  """Each diffusion cell with a throughput against an AR baseline: the AR cell it was converted
  from when that has a throughput, else the fastest AR cell sharing a table with it."""
  by_name = {r.get("name"): r for r in rows}
  out = []
  for r in rows:
    speed = _positive(r.get("tokens_per_second"))
    if r.get("kind") != "diffusion" or speed is None:
      continue
    parent = by_name.get(r.get("converted_from"))
    if parent is not None and _positive(parent.get("tokens_per_second")) is not None:
      base, why = parent, "the AR cell it was converted from"
    else:
      tables = set(r.get("tables") or ())
      candidates = [a for a in rows if a.get("kind") != "diffusion"
                    and tables & set(a.get("tables") or ())
                    and _positive(a.get("tokens_per_second")) is not None]
      base = max(candidates, key=lambda a: a["tokens_per_second"], default=None)
      why = "the fastest AR cell in its table"
    out.append({"row": r, "base": base, "why": why if base else None,
                "ratio": speed / base["tokens_per_second"] if base else None})
  return out


def _how_it_was_run(study: dict) -> str:
  ev, tp = study.get("eval") or {}, study.get("throughput") or {}
  limit = ev.get("limit")
  sample = (f"`--limit {limit}` (at most {limit} examples per task, so scores are noisy and not "
            "comparable one-to-one with codelion's full-set numbers)" if limit
            else "no `--limit` (full task sets)")
  data = (f"data from `{ev['data_dir']}`" if ev.get("data_dir")
          else "the shipped eval slices (data/eval)")
  seconds = study.get("seconds")
  wall = _duration(seconds) if isinstance(seconds, (int, float)) else "not recorded"
  config = f"Config `{study['config']}`. " if study.get("config") else ""
  return (f"**How it was run.** {config}Evaluated on the `{ev.get('tasks', '?')}` tasks with "
          f"{sample}, {data}. Throughput: G = {tp.get('new_tokens', '?')} new tokens per "
          f"prompt, batch {tp.get('batch', '?')} (codelion: 100 new tokens, batch 1). The "
          f"cells' steps took {wall} in all (summed over cells: a grid spread over machines "
          f"reports its total). Scores are percent; {MISSING} marks one not measured (yet). "
          "Avg (6) leaves GSM8K out, Avg (7) counts it; the codelion columns and the "
          "*(codelion)* rows are their published numbers.")


def _shapes_table(rows: list[dict]) -> str:
  header = ["Config", "Layers", "Width", "Params", *(TASK_NAMES[t] for t in TASKS), "Avg (6)",
            "Avg (7)", "codelion avg (6)", "tier"]
  lines = []
  for r in rows:
    p = PUBLISHED.get(r.get("name"))
    lines.append([_text(r.get("label") or r.get("name")), _int(r.get("layers")),
                  _int(r.get("width")), _params(r.get("params")), *_scores(r),
                  _pct(r.get("average_6")), _pct(r.get("average_7")),
                  _pub(p.average_6 if p else None), (p.tier if p else None) or MISSING])
    if p is not None and p.scores:
      lines.append(_italic([f"{_text(r.get('label') or r.get('name'))} (codelion)",
                            _int(p.layers), _int(p.width), _pub_params(p),
                            *_published_scores(p), _pub(p.average_6), _pub(p.average_7)])
                   + ["", ""])
  return _table(header, lines)


def _families_table(rows: list[dict]) -> str:
  header = ["Family", "Objective", "Params", *(TASK_NAMES[t] for t in TASKS), "Avg (6)",
            "Avg (7)", "codelion avg (7)", "tok/s"]
  lines = []
  for r in rows:
    p = PUBLISHED.get(r.get("name"))
    lines.append([_text(r.get("label") or r.get("name")), _text(r.get("objective")),
                  _params(r.get("params")), *_scores(r), _pct(r.get("average_6")),
                  _pct(r.get("average_7")), _pub(p.average_7 if p else None),
                  _speed(r.get("tokens_per_second"))])
    if p is not None and p.scores:
      row = _italic([f"{_text(r.get('label') or r.get('name'))} (codelion)", "",
                     _pub_params(p), *_published_scores(p), _pub(p.average_6),
                     _pub(p.average_7)])
      lines.append(row + ["", _italic([_speed(p.tokens_per_second)])[0]])
  return _table(header, lines, text_columns=2)


def _chance_line(rows: list[dict]) -> str:
  means = []
  for t in TASKS:
    values = [v for r in rows if (v := number((r.get("chance") or {}).get(t))) is not None]
    means.append(f"{TASK_NAMES[t]} {_pct(sum(values) / len(values)) if values else MISSING}")
  if all(m.endswith(MISSING) for m in means):
    return "**Chance floors:** none reported yet."
  return ("**Chance floors** (per task, mean over the cells that report one): "
          + " · ".join(means) + ". A score near its floor is no better than guessing.")


def _throughput(study: dict, rows: list[dict]) -> str:
  tp = study.get("throughput") or {}
  codelion = (f"codelion: Dhara-70M {DIFFUSION_TOKENS_PER_SECOND:.0f} tok/s vs "
              f"{AR_TOKENS_PER_SECOND:.0f} tok/s AR = {SPEEDUP}×")
  intro = (f"Generation throughput at G = {tp.get('new_tokens', '?')} new tokens, batch "
           f"{tp.get('batch', '?')} ({codelion}).")
  lines = []
  for s in speedups(rows):
    r, base = s["row"], s["base"]
    head = f"- {_text(r.get('label') or r.get('name'))}: {r['tokens_per_second']:.1f} tok/s"
    if base is None:
      lines.append(f"{head}; no AR cell with a throughput to compare against.")
    else:
      lines.append(f"{head} vs {_text(base.get('label') or base.get('name'))} "
                   f"{base['tokens_per_second']:.1f} tok/s ({s['why']}) = **{s['ratio']:.2f}×** "
                   f"(codelion: {SPEEDUP}×).")
  if not lines:
    lines.append("No diffusion cell has a throughput yet.")
  return intro + "\n\n" + "\n".join(lines)


def _unfinished(row: dict) -> str:
  error = _one_line(row.get("error"))
  line = f"- `{row.get('name')}` ({_text(row.get('label') or row.get('name'))}): "
  return line + str(row.get("state") or "unknown") + (f" — {_text(error)}" if error else "")


def _table(header: list[str], lines: list[list[str]], text_columns: int = 1) -> str:
  rule = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)  # numbers right
  return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, rule, *lines])


def _in_table(rows: list[dict], table: str) -> list[dict]:
  return [r for r in rows if table in (r.get("tables") or ())]


def _scores(row: dict) -> list[str]:
  scores = row.get("scores") or {}
  return [_pct(scores.get(t)) for t in TASKS]


def _published_scores(p: Published) -> list[str]:
  return [_pub(p.scores.get(t)) for t in TASKS]


def _italic(cells: list[str]) -> list[str]:
  return [c if c in ("", MISSING) else f"*{c}*" for c in cells]


def _pct(fraction: Any) -> str:
  value = number(fraction)
  return MISSING if value is None else f"{100 * value:.2f}"


def _pub(percent: float | None) -> str:
  return MISSING if percent is None else f"{percent:.2f}"


def _params(count: Any) -> str:
  value = number(count)
  return MISSING if value is None else f"{value / 1e6:.2f}M"


def _pub_params(p: Published) -> str:
  return MISSING if p.params is None else f"{p.params:.2f}M"


def _speed(value: Any) -> str:
  value = number(value)
  return MISSING if value is None else f"{value:.1f}"


def _int(value: Any) -> str:
  return MISSING if value is None else str(value)


def _text(value: Any) -> str:
  """Text for a table cell: a `|` would end the cell, a newline the row."""
  return MISSING if value is None else " ".join(str(value).split()).replace("|", "\\|")


def _one_line(value: Any) -> str | None:
  return None if value is None else " ".join(str(value).split())


def _fraction(percent: float | None) -> float | None:
  return None if percent is None else round(percent / 100, 6)


def _positive(value: Any) -> float | None:
  value = number(value)
  return value if value is not None and value > 0 else None


def _duration(seconds: float) -> str:
  s = int(round(seconds))
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m {s % 60:02d}s"
  return f"{s // 3600}h {s % 3600 // 60:02d}m"


def _write(path: Path, text: str) -> None:
  write_whole(path, text, "study report")
