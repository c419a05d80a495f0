"""The `dhara study` and `dhara params STUDY` commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from dhara_jax.errors import DharaError
from dhara_jax.study import results, runner, spec


def study(config: str | Path, out: str | Path, *, report_only: bool = False,
          print_only: bool = False, cell: str | None = None,
          log: Callable[[str], None] = print) -> dict:
  """Runs the grid (or one cell), then writes the report; returns the report's paths and the
  rows. A grid with failed cells still gets its report, then fails with one line naming them."""
  grid = spec.load(config)
  out = Path(out)
  if cell is not None and cell not in {c.name for c in grid.cells}:
    raise DharaError(f"study: no cell named {cell!r} (cells: "
                     f"{', '.join(c.name for c in grid.cells)})")
  if print_only:
    runner.prepare(grid, out)
    log(runner.print_commands(grid, out))
    return {}
  if report_only:
    if not (out / "study.json").is_file():
      raise DharaError(f"study: {out} holds no study results (no study.json)")
    runner.prepare(grid, out)  # checks OUT is this study's
  else:
    runner.run(grid, out, cell, log)
  rows = results.gather(grid, out)
  seconds = sum(sum(r["seconds"].values()) for r in rows)
  info = {"name": grid.name, "description": grid.description, "config": str(grid.path),
          "eval": {"tasks": grid.eval.tasks, "limit": grid.eval.limit,
                   "data_dir": grid.eval.data_dir},
          "throughput": {"new_tokens": grid.throughput.new_tokens,
                         "batch": grid.throughput.batch},
          "seconds": seconds or None}
  from dhara_jax.study import render

  paths = render.write_report(info, rows, out)
  log(f"study: report {paths['report']} ({sum(r['state'] == 'done' for r in rows)} of "
      f"{len(rows)} cells finished; {seconds / 60:.1f} min of cell steps in all)")
  failed = [r for r in rows if r["state"] == "failed"]
  if failed and not report_only:
    raise DharaError(f"study: {len(failed)} of {len(rows)} cells failed: " + "; ".join(
        f"{r['name']} ({r['error']})" for r in failed) + f" — report {paths['report']}")
  return {"paths": paths, "rows": rows}


def params_table(config: str | Path, as_json: bool = False) -> str:
  """`dhara params STUDY.yaml`: every cell's parameter counts, beside codelion's where stated."""
  from dhara_jax.params import count_params
  from dhara_jax.study.published import PUBLISHED

  grid = spec.load(config)
  rows = []
  for cell in grid.cells:
    model = spec.run_config(grid, cell).model
    counts = count_params(model)
    stated = PUBLISHED.get(cell.name)
    rows.append({"cell": cell.name, "family": model.family, "layers": model.num_layers,
                 "width": model.d_model, "params": counts["total"],
                 "layer_matrices": counts["layer_matrices"],
                 "codelion_params_m": stated.params if stated else None})
  if as_json:
    return json.dumps(rows, indent=2)
  lines = [f"{'cell':<16} {'family':<8} {'layers':>6} {'width':>5} {'params':>10} "
           f"{'12·d²·L':>9} {'codelion':>9}"]
  for r in rows:
    stated = f"{r['codelion_params_m']:.2f}M" if r["codelion_params_m"] else "—"
    lines.append(f"{r['cell']:<16} {r['family']:<8} {r['layers']:>6} {r['width']:>5} "
                 f"{r['params'] / 1e6:>9.2f}M {r['layer_matrices'] / 1e6:>8.1f}M {stated:>9}")
  return "\n".join(lines)
