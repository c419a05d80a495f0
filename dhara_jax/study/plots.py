"""The study report's figures, one function per PNG. Each takes the gathered rows and the
report folder, and returns the path it wrote, or None (writing nothing) when no row has the
data the figure needs yet, so a half-run grid still renders."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from dhara_jax.files import write_whole
from dhara_jax.study.published import PUBLISHED, TASKS, TASKS_6

AR_COLOUR, DIFFUSION_COLOUR = "tab:blue", "tab:orange"


def depth_plot(rows: list[dict], out_dir: Path) -> Path | None:
  """6-task average vs depth for the shape cells, coloured by width; codelion's as hollow
  markers, one marker per tier."""
  ours = [r for r in _table(rows, "shapes")
          if number(r.get("average_6")) is not None and number(r.get("layers")) is not None]
  if not ours:
    return None
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  points = ax.scatter([r["layers"] for r in ours], [100 * r["average_6"] for r in ours],
                      c=[r.get("width") or 0 for r in ours], cmap="viridis", s=60, zorder=3,
                      label="this study")
  fig.colorbar(points, ax=ax, label="width (d_model)")
  for tier, marker in (("high", "^"), ("low", "v")):
    theirs = [p for p in PUBLISHED.values()
              if p.tier == tier and p.average_6 is not None and p.layers is not None]
    if theirs:
      ax.scatter([p.layers for p in theirs], [p.average_6 for p in theirs], marker=marker, s=70,
                 facecolors="none", edgecolors="black", label=f"codelion, {tier} tier")
  ax.set_xscale("log", base=2)  # 4 … 64 layers: even spacing per doubling
  depths = sorted({int(r["layers"]) for r in ours}
                  | {p.layers for p in PUBLISHED.values() if p.tier and p.layers})
  ax.set_xticks(depths, [str(d) for d in depths])
  ax.minorticks_off()
  ax.set(xlabel="layers", ylabel="6-task average (%)", title="Depth vs accuracy (shapes)")
  ax.legend(fontsize=8)
  return _save(fig, out_dir / "depth.png")


def family_bars(rows: list[dict], out_dir: Path) -> Path | None:
  """7-task average per family cell, its chance floor as a black line, codelion's as a dot."""
  ours = [r for r in _table(rows, "families") if number(r.get("average_7")) is not None]
  if not ours:
    return None
  return _bars(ours, [100 * r["average_7"] for r in ours], [chance_floor(r) for r in ours],
               [_published(r, lambda p: p.average_7) for r in ours],
               "7-task average (%)", "Families: 7-task average (GSM8K counted)",
               out_dir / "families.png")


def truthfulqa_bars(rows: list[dict], out_dir: Path) -> Path | None:
  """TruthfulQA mc2 per family cell (where dLLM-Canon stood out), with chance and codelion's."""
  task = "truthfulqa_mc2"
  ours = [r for r in _table(rows, "families") if number(_get(r, "scores", task)) is not None]
  if not ours:
    return None
  floors = [_pct(_get(r, "chance", task)) for r in ours]
  return _bars(ours, [100 * r["scores"][task] for r in ours], floors,
               [_published(r, lambda p: p.scores.get(task)) for r in ours],
               "TruthfulQA mc2 (%)", "Families: TruthfulQA mc2", out_dir / "truthfulqa.png")


def throughput_accuracy(rows: list[dict], out_dir: Path) -> Path | None:
  """Generation speed (batch 1) vs 7-task average, AR and diffusion apart."""
  ours = [r for r in rows if (number(r.get("tokens_per_second")) or 0) > 0
          and number(r.get("average_7")) is not None]
  if not ours:
    return None
  plt = _pyplot()
  from matplotlib.ticker import FuncFormatter

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for kind, colour, marker in (("ar", AR_COLOUR, "o"), ("diffusion", DIFFUSION_COLOUR, "s")):
    group = [r for r in ours if _kind(r) == kind]
    if group:
      ax.scatter([r["tokens_per_second"] for r in group], [100 * r["average_7"] for r in group],
                 color=colour, marker=marker, s=50, label=kind.upper() if kind == "ar" else kind)
  for r in ours:
    ax.annotate(r.get("label") or r["name"], (r["tokens_per_second"], 100 * r["average_7"]),
                textcoords="offset points", xytext=(4, 4), fontsize=7)
  ax.set_xscale("log")
  plain = FuncFormatter(lambda v, _: f"{v:g}")  # 30, 40, 100, not 3×10¹
  ax.xaxis.set_major_formatter(plain)
  ax.xaxis.set_minor_formatter(plain)
  ax.tick_params(axis="x", which="minor", labelsize=7)
  ax.set(xlabel="tokens/s (batch 1, log)", ylabel="7-task average (%)",
         title="Throughput vs accuracy")
  ax.legend(fontsize=8)
  return _save(fig, out_dir / "throughput.png")


def training_curves(rows: list[dict], out_dir: Path) -> Path | None:
  """Every cell's train loss against tokens; diffusion dashed (its loss is the masked-diffusion
  ELBO, not comparable with next-token loss), held-out losses as dots of the same colour."""
  curves = [(r, _points(r, "loss"), _points(r, "eval_loss")) for r in rows]
  curves = [c for c in curves if c[1] or c[2]]
  if not curves:
    return None
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(9, 5))
  colours = plt.get_cmap("tab20")
  for i, (r, train, held) in enumerate(curves):
    colour, diffusion = colours(i % 20), _kind(r) == "diffusion"
    label = (r.get("label") or r["name"]) + (" (diffusion ELBO)" if diffusion else "")
    if train:
      ax.plot(*zip(*train), linestyle="--" if diffusion else "-", color=colour, linewidth=1,
              label=label)
    if held:
      ax.plot(*zip(*held), "o", color=colour, markersize=3,
              label=None if train else f"{label}, held-out")
  ax.set(xlabel="training tokens", ylabel="loss (nats/token)",
         title="Training loss (dots: held-out; dashed: masked-diffusion ELBO, not next-token "
               "loss)")
  ax.title.set_fontsize(9)
  ax.legend(fontsize=7, ncol=2)
  return _save(fig, out_dir / "curves.png")


FIGURES = {"depth": depth_plot, "families": family_bars, "truthfulqa": truthfulqa_bars,
           "throughput": throughput_accuracy, "curves": training_curves}


def chance_floor(row: dict) -> float | None:
  """A row's 7-task chance floor in percent (GSM8K's chance is 0), or None when a
  multiple-choice task's chance is missing."""
  chance = row.get("chance") or {}
  values = [number(chance.get(t)) for t in TASKS_6]
  if any(v is None for v in values):
    return None
  return 100 * (sum(values) + (number(chance.get("gsm8k")) or 0.0)) / len(TASKS)


def _bars(rows: list[dict], heights: list[float], floors: list[float | None],
          theirs: list[float | None], ylabel: str, title: str, path: Path) -> Path:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(rows) + 3.5), 4.5))
  xs = range(len(rows))
  ax.bar(xs, heights, color=[DIFFUSION_COLOUR if _kind(r) == "diffusion" else AR_COLOUR
                             for r in rows])
  labelled = set()
  for x, floor, published in zip(xs, floors, theirs):
    if floor is not None:
      ax.hlines(floor, x - 0.4, x + 0.4, colors="black", linewidth=2,
                label=None if "chance" in labelled else "chance floor")
      labelled.add("chance")
    if published is not None:
      ax.scatter([x], [published], marker="D", color="red", zorder=3,
                 label=None if "codelion" in labelled else "codelion (published)")
      labelled.add("codelion")
  ax.bar([0], [0], color=AR_COLOUR, label="AR")  # legend swatches for the two kinds
  ax.bar([0], [0], color=DIFFUSION_COLOUR, label="diffusion")
  ax.set_xticks(list(xs), [r.get("label") or r["name"] for r in rows], rotation=30, ha="right",
                fontsize=8)
  ax.set(ylabel=ylabel, title=title)
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside: bars fill it
  return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
  """Writes the PNG whole or not at all."""
  import matplotlib.pyplot as plt

  png = io.BytesIO()
  try:
    fig.tight_layout()
    fig.savefig(png, format="png", dpi=100)
  finally:
    plt.close(fig)
  write_whole(path, png.getvalue(), "study report")
  return path


def _pyplot() -> Any:
  import matplotlib

  matplotlib.use("Agg")  # files only: no display on a training machine
  import matplotlib.pyplot as plt

  return plt


def _points(row: dict, key: str) -> list[tuple[float, float]]:
  """(tokens, loss) of a row's curve points that have both."""
  points = [(number(p.get("tokens")), number(p.get(key))) for p in row.get("curve") or ()]
  return [(x, y) for x, y in points if x is not None and y is not None]


def _table(rows: list[dict], table: str) -> list[dict]:
  return [r for r in rows if table in (r.get("tables") or ())]


def _kind(row: dict) -> str:
  return "diffusion" if row.get("kind") == "diffusion" else "ar"


def _published(row: dict, pick: Any) -> float | None:
  p = PUBLISHED.get(row.get("name"))
  return pick(p) if p is not None else None


def _get(row: dict, section: str, key: str) -> Any:
  return (row.get(section) or {}).get(key)


def _pct(value: Any) -> float | None:
  value = number(value)
  return None if value is None else 100 * value


def number(value: Any) -> float | None:
  """A finite number, or None (a missing score, or NaN from a failed eval)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    return None
  return float(value)
