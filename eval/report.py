"""`dhara eval`: lm-eval's `simple_evaluate` over a run, its results stored in the run dir, and
the study's table (scores with standard errors, chance floors, 6- and 7-task averages).

Stored in RUN_DIR/eval/, which holds the latest evaluation's files only (replaced whole):
results.json (lm-eval's results dict, as its CLI writes it), samples/<task>.jsonl (every request
with its responses), summary.json (one row per reported task; `dhara export` puts it in the
model card) and table.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

import jax

from dhara_jax.errors import DharaError
from dhara_jax.files import check_writable, whole_folder, write_whole
from dhara_jax.runs import open_run
from eval import harness, registry
from eval.harness import DharaLM, Options
from eval.registry import STUDY, STUDY_TASKS, StudyTask, lm_eval_version

EVAL_DIR = "eval"
log = logging.getLogger(__name__)


def evaluate(run_dir: str | Path, tasks: str = STUDY, *, limit: int | None = None,
             data_dir: str | Path | None = None, out: str | Path | None = None,
             step: int | None = None, options: Options = Options(),
             gen_kwargs: str | None = None, diffusion_options: Sequence[str] = (),
             task_manager: Any = None) -> dict:
  """Evaluates a run on lm-eval tasks; returns the summary (also written to RUN_DIR/eval).
  `task_manager`: one from `registry.task_manager(data_dir)` to reuse (its index takes ~10 s
  to build)."""
  if limit is not None and limit < 1:
    raise DharaError(f"eval: --limit must be ≥ 1, got {limit}")
  run_dir = Path(run_dir)
  with open_run(run_dir) as opened:
    step = opened.step(step)
    # The phase needs no params: options that do not fit the run fail before lm-eval's task
    # index (~10 s) is built.
    harness.check_options(opened.phase, diffusion_options)
    harness.check_gen_kwargs(opened.phase, gen_kwargs)
    if out is not None:  # now, not after an evaluation that may take hours
      check_writable(out, "eval")
    tm = task_manager or registry.task_manager(data_dir)  # checks the data dir
    names = registry.resolve_tasks(tasks, tm)
    run = opened.load(step)
  lm = DharaLM(run, options)
  started = time.perf_counter()
  results = _simple_evaluate(lm, names, tm, limit, gen_kwargs)
  seconds = time.perf_counter() - started
  summary = summarize(results, run, limit, data_dir, seconds)
  if jax.process_index() == 0:  # every process of a job has the results; one writes them
    if out is not None:  # first: an --out that cannot be written leaves RUN_DIR/eval as it was
      _write(Path(out), _results_json(results))
    store(run_dir / EVAL_DIR, results, summary)
  return summary


def _simple_evaluate(lm: DharaLM, names: list[str], tm: Any, limit: int | None,
                     gen_kwargs: str | None) -> dict:
  import lm_eval
  import lm_eval.evaluator

  quiet = not lm.options.progress and "TQDM_DISABLE" not in os.environ
  if quiet:  # lm-eval's own bars (one per task while it builds requests)
    os.environ["TQDM_DISABLE"] = "1"
  git_hash = lm_eval.evaluator.get_git_commit_hash  # simple_evaluate records it in results
  lm_eval.evaluator.get_git_commit_hash = _git_hash_quietly
  try:
    return lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=tm, limit=limit,
                                   log_samples=True, gen_kwargs=gen_kwargs,
                                   bootstrap_iters=1000)
  except DharaError:
    raise
  except (KeyError, ValueError, FileNotFoundError, ConnectionError) as e:
    # lm-eval and datasets fail deep inside; one line naming the cause is what a user needs.
    raise DharaError(f"eval: lm-eval failed: {type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}") from e
  finally:
    lm_eval.evaluator.get_git_commit_hash = git_hash
    if quiet:
      del os.environ["TQDM_DISABLE"]


def _git_hash_quietly() -> str | None:
  """lm-eval's get_git_commit_hash (`git describe --always` in the working directory, else
  what ./.git names) with git's stderr kept from ours: outside a repository, git would print
  "fatal: not a git repository" on every evaluation."""
  from lm_eval.loggers.utils import get_commit_from_path

  try:
    return subprocess.run(["git", "describe", "--always"], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (subprocess.CalledProcessError, FileNotFoundError):  # no repository; no git at all
    return get_commit_from_path(os.getcwd())


# --- the study's table ------------------------------------------------------------------------


def study_row(task: str) -> StudyTask | None:
  return next((t for t in STUDY_TASKS if t.task == task), None)


def reported(results: dict) -> list[tuple[str, StudyTask]]:
  """The tasks (and groups) a table row is made for: the study's seven when present, then any
  other top-level task with its first metric."""
  rows = []
  top = results.get("groups", {}) | results.get("results", {})
  subtasks = {t for group in results.get("group_subtasks", {}).values() for t in group}
  for task in top:
    if task == STUDY or (task in subtasks and study_row(task) is None):
      continue
    if (row := study_row(task)) is None:
      metric = next((k.split(",")[0] for k in top[task]
                     if "," in k and "_stderr" not in k and k.split(",")[0] != "alias"), None)
      if metric is None:
        continue
      filter_ = next(k.split(",")[1] for k in top[task] if k.startswith(metric + ","))
      row = StudyTask(task, top[task].get("alias", task).strip(" -"), metric, metric, filter_)
    rows.append((task, row))
  order = [t.task for t in STUDY_TASKS]
  return sorted(rows, key=lambda r: order.index(r[0]) if r[0] in order else len(order))


def chance(task: str, results: dict) -> float | None:
  """The score of guessing, from the evaluated documents: the mean of 1 / choices for
  multiple choice, the mean share of true answers for TruthfulQA mc2 (uniform probabilities),
  0 for generation."""
  leaves = results.get("group_subtasks", {}).get(task) or [task]
  values = []
  for leaf in leaves:
    if leaf in results.get("group_subtasks", {}):
      sub = chance(leaf, results)
      n = _count(leaf, results)
      values += [sub] * n if sub is not None else []
      continue
    kind = results.get("configs", {}).get(leaf, {}).get("output_type")
    for sample in _documents(leaf, results):
      if leaf.startswith("truthfulqa_mc2"):
        labels = sample["doc"]["mc2_targets"]["labels"]
        values.append(sum(labels) / len(labels))
      elif kind == "multiple_choice":
        values.append(1.0 / len(sample["arguments"]))
      elif kind == "generate_until":
        values.append(0.0)
  return sum(values) / len(values) if values else None


def _documents(task: str, results: dict) -> list[dict]:
  """One sample per document (lm-eval logs a document once per filter, e.g. GSM8K's two)."""
  seen, docs = set(), []
  for sample in results.get("samples", {}).get(task, []):
    if sample["doc_id"] not in seen:
      seen.add(sample["doc_id"])
      docs.append(sample)
  return docs


def _count(task: str, results: dict) -> int:
  leaves = results.get("group_subtasks", {}).get(task)
  if leaves:
    return sum(_count(leaf, results) for leaf in leaves)
  n = results.get("n-samples", {}).get(task, {})
  return int(n.get("effective", len(_documents(task, results))))


def summarize(results: dict, run: Any, limit: int | None, data_dir: Any,
              seconds: float) -> dict:
  top = results.get("groups", {}) | results.get("results", {})
  configs = results.get("configs", {})
  rows = []
  for task, row in reported(results):
    scores = top[task]
    key = f"{row.metric},{row.filter}"
    value, stderr = scores.get(key), scores.get(f"{row.metric}_stderr,{row.filter}")
    leaf = (results.get("group_subtasks", {}).get(task) or [task])[0]
    while leaf in results.get("group_subtasks", {}):
      leaf = results["group_subtasks"][leaf][0]
    cfg = configs.get(leaf, {})
    rows.append({
        "task": task, "name": row.name, "metric": row.metric, "metric_name": row.metric_name,
        "filter": row.filter, "value": _number(value), "stderr": _number(stderr),
        "chance": chance(task, results), "n": _count(task, results),
        "num_fewshot": results.get("n-shot", {}).get(leaf, cfg.get("num_fewshot")),
        "dataset": cfg.get("dataset_path"),
        "dataset_name": None if task != leaf else cfg.get("dataset_name"),
        "split": cfg.get("test_split") or cfg.get("validation_split"),
    })
  return {
      "model": run.run_dir.name, "run": str(run.run_dir), "step": run.step,
      "kind": "diffusion" if run.phase.diffusion else "ar", "objective": run.phase.objective,
      "limit": limit, "data": str(data_dir) if data_dir is not None else "shipped slice",
      "lm_eval_version": lm_eval_version(), "seconds": round(seconds, 1),
      "tasks": rows, **averages(rows),
  }


def _number(x: Any) -> float | None:
  return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def averages(rows: list[dict]) -> dict:
  """codelion's two averages, when every study task was evaluated: the 6-task one leaves out
  GSM8K, the 7-task one counts it."""
  by_task = {r["task"]: r["value"] for r in rows}
  study = [t.task for t in STUDY_TASKS]
  if not all(by_task.get(t) is not None for t in study):
    return {"average_6": None, "average_7": None}
  six = [by_task[t.task] for t in STUDY_TASKS if t.in_6_task]
  return {"average_6": sum(six) / len(six),
          "average_7": sum(by_task[t] for t in study) / len(study)}


def table(summary: dict) -> str:
  """Markdown: one row per task, scores in percent."""
  pct = lambda x: "—" if x is None else f"{100 * x:.2f}"  # noqa: E731
  lines = ["| Task | Metric | Score | ± stderr | Chance | n |", "|---|---|---:|---:|---:|---:|"]
  for r in summary["tasks"]:
    shots = f" ({r['num_fewshot']}-shot)" if r.get("num_fewshot") else ""
    lines.append(f"| {r['name']}{shots} | {r['metric_name']} | {pct(r['value'])} | "
                 f"{pct(r['stderr'])} | {pct(r['chance'])} | {r['n']} |")
  if summary.get("average_6") is not None:
    lines.append(f"| **6-task average** (no GSM8K) | | **{pct(summary['average_6'])}** | | | |")
    lines.append(f"| **7-task average** | | **{pct(summary['average_7'])}** | | | |")
  limited = f", --limit {summary['limit']}" if summary.get("limit") else ""
  lines.append("")
  lines.append(f"{summary['model']} step {summary['step']} ({summary['kind']}), data: "
               f"{summary['data']}{limited}; lm-eval {summary['lm_eval_version']}, "
               f"{summary['seconds']:.0f} s.")
  return "\n".join(lines)


# --- files ------------------------------------------------------------------------------------


def _results_json(results: dict) -> str:
  from lm_eval.utils import handle_non_serializable

  body = {k: v for k, v in results.items() if k != "samples"}
  return json.dumps(body, indent=2, default=handle_non_serializable, ensure_ascii=False)


def store(eval_dir: Path, results: dict, summary: dict) -> None:
  """RUN_DIR/eval replaced whole: this evaluation's files and no earlier one's (a task
  evaluated before and not now keeps no samples beside the new results)."""
  from lm_eval.utils import handle_non_serializable

  files = {"results.json": _results_json(results)}
  for task, samples in results.get("samples", {}).items():
    files[f"samples/{task}.jsonl"] = "".join(
        json.dumps(s, default=handle_non_serializable, ensure_ascii=False) + "\n"
        for s in samples)
  files["summary.json"] = json.dumps(summary, indent=2) + "\n"
  files["table.md"] = table(summary) + "\n"
  with whole_folder(eval_dir, "eval") as new:
    for name, text in files.items():
      (new / name).parent.mkdir(exist_ok=True)
      (new / name).write_bytes(text.encode())


def _write(path: Path, text: str) -> None:
  write_whole(path, text, "eval")
