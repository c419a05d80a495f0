"""What the grid holds so far, one row per cell, read from the files the cells' commands write
(so a grid run by a scheduler through `--print-commands` reports the same way): the run's
metrics, RUN/eval/summary.json, throughput.json, status.json. Params come from the config, so
even an unstarted grid has its params column."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dhara_jax.metrics import read_metrics
from dhara_jax.params import count_params
from dhara_jax.study import runner
from dhara_jax.study.published import TASKS
from dhara_jax.study.spec import Cell, Study, run_config


def gather(study: Study, out: Path) -> list[dict]:
  rows: dict[str, dict] = {}
  for cell in study.ordered():  # parents first: a conversion's curve continues its parent's
    parent = rows.get(cell.parent) if cell.converted else None
    rows[cell.name] = cell_row(study, out, cell, parent)
  return [rows[c.name] for c in study.cells]


def cell_row(study: Study, out: Path, cell: Cell, parent: dict | None = None) -> dict:
  cfg = run_config(study, cell)
  model, data = cfg.model, cfg.data
  run = runner.run_dir(out, cell)
  status = runner.read_status(out, cell)
  summary = _json(run / "eval" / "summary.json")
  speed = _json(runner.throughput_file(out, cell))
  by_task = {r["task"]: r for r in (summary or {}).get("tasks", [])}
  curve = _curve(run, data.batch_size * data.seq_len,
                 (parent or {}).get("train_tokens") or 0)
  trained = [p for p in curve if p["loss"] is not None]
  held_out = [p["eval_loss"] for p in curve if p["eval_loss"] is not None]
  objective = "mdm" if cell.converted else cfg.train.objective
  return {
      "name": cell.name, "label": cell.label, "tables": list(cell.tables),
      "family": model.family, "kind": "diffusion" if cell.diffusion else "ar",
      "objective": summary.get("objective", objective) if summary else objective,
      "converted_from": cell.parent, "layers": model.num_layers, "width": model.d_model,
      "params": count_params(model)["total"],
      "state": _state(status, summary, speed, curve), "error": status.get("error"),
      "scores": {t: by_task.get(t, {}).get("value") for t in TASKS},
      "stderr": {t: by_task.get(t, {}).get("stderr") for t in TASKS},
      "chance": {t: by_task.get(t, {}).get("chance") for t in TASKS},
      "average_6": (summary or {}).get("average_6"), "average_7": (summary or {}).get("average_7"),
      "tokens_per_second": (speed or {}).get("tokens_per_second"),
      "train_tokens": trained[-1]["tokens"] if trained else None,
      "final_loss": trained[-1]["loss"] if trained else None,
      "held_out_loss": held_out[-1] if held_out else None,
      "curve": curve, "seconds": status.get("seconds", {}),
  }


def _state(status: dict, summary: Any, speed: Any, curve: list) -> str:
  if status.get("state") in ("failed", "stopped"):
    return "failed" if status["state"] == "failed" else "running"
  if summary and speed:
    return "done"
  return "running" if curve or status else "pending"


def _curve(run: Path, tokens_per_step: int, offset: int) -> list[dict]:
  if not (run / "metrics.jsonl").is_file():
    return []
  return [{"step": r["step"], "tokens": offset + r["step"] * tokens_per_step,
           "loss": r.get("loss"), "eval_loss": r.get("eval_loss")}
          for r in read_metrics(run)]


def _json(path: Path) -> Any:
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError:
    return None  # a file being written by a running cell's other process; read next time
