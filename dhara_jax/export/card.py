"""The export's README.md: a model card whose `model-index` carries the run's evaluation
(`eval/summary.json`, written by `dhara eval`) in the Open LLM Leaderboard layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from data_pipeline.config import REPO_ROOT, resolve_input
from dhara_jax.errors import DharaError

SOURCE = {"name": "lm-evaluation-harness (dhara eval)",
          "url": "https://github.com/EleutherAI/lm-evaluation-harness"}
SHIPPED_SLICE = REPO_ROOT / "data" / "eval"  # eval.data.shipped_data_dir()
SCORING = {"ar": "autoregressive", "diffusion": "masked-diffusion"}
AVERAGES = (("average_6", "6-task average (no GSM8K)"), ("average_7", "7-task average"))


def read_summary(path: Path) -> dict | None:
  """The evaluation summary at `path`; None when there is none."""
  path = Path(path)
  if not path.is_file():
    return None
  try:
    summary = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DharaError(f"export: {path} is not valid JSON ({getattr(e, 'msg', e)}); rerun "
                     "`dhara eval` or remove it") from None
  tasks = summary.get("tasks") if isinstance(summary, dict) else None
  if not isinstance(tasks, list) or not all(isinstance(t, dict) and "task" in t for t in tasks):
    raise DharaError(f"export: {path} is not an evaluation summary (no 'tasks' list of "
                     "{'task': ...} entries); rerun `dhara eval` or remove it")
  return summary


def model_card(name: str, summary: dict | None, model_cfg: dict | None = None) -> str:
  """README.md text: YAML front matter (with a model-index when `summary` is given), then a
  description, the results table and the averages. `model_cfg`: the ModelConfig fields as a
  dict, optionally with `num_params`."""
  meta: dict[str, Any] = {"library_name": "transformers", "license": "apache-2.0",
                          "pipeline_tag": "text-generation", "tags": _tags(model_cfg)}
  results = [_index_entry(t) for t in (summary or {}).get("tasks", ())
             if _number(t.get("value")) is not None]
  if results:
    meta["model-index"] = [{"name": name, "results": results}]
  front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
  lines = [f"---\n{front}---", "", f"# {name}", "", _description(model_cfg), "", *_usage(), ""]
  lines += _results(summary) if summary else [
      "## Evaluation", "", "No evaluation is stored with this run: `dhara eval RUN_DIR` adds "
      "one (`RUN_DIR/eval/summary.json`), and the next `dhara export` puts it here."]
  return "\n".join(lines) + "\n"


def write_model_card(out_dir: Path, name: str, summary: dict | None,
                     model_cfg: dict | None = None) -> Path:
  path = Path(out_dir) / "README.md"
  try:
    path.write_text(model_card(name, summary, model_cfg), encoding="utf-8")
  except OSError as e:
    raise DharaError(f"export: cannot write {path}: {e.strerror or e}") from None
  return path


def _number(x: Any) -> float | None:
  # lm-eval writes "N/A" for a stderr it could not compute.
  return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _percent(x: Any) -> str:
  value = _number(x)
  return "—" if value is None else f"{100 * value:.2f}"


def _tags(cfg: dict | None) -> list[str]:
  tags = ["dhara-jax", "text-generation"]
  if cfg:
    tags.append(str(cfg.get("family", "")))
    if cfg.get("attention") == "bidirectional":
      tags.append("diffusion")
    if cfg.get("canon_set"):
      tags.append("canon")
  return [t for t in tags if t]


def _index_entry(task: dict) -> dict:
  """One model-index result (Open LLM Leaderboard layout); values in percent."""
  shots = task.get("num_fewshot") or 0
  label = task.get("name") or task["task"]
  dataset = {"name": f"{label} ({shots}-Shot)", "type": task.get("dataset") or task["task"]}
  if task.get("dataset_name") is not None:
    dataset["config"] = task["dataset_name"]
  if task.get("split"):
    dataset["split"] = task["split"]
  dataset["args"] = {"num_few_shot": shots}
  metric = {"type": task.get("metric", "acc"), "value": round(100 * float(task["value"]), 2)}
  if task.get("metric_name"):
    metric["name"] = task["metric_name"]
  return {"task": {"type": "text-generation", "name": "Text Generation"}, "dataset": dataset,
          "metrics": [metric], "source": dict(SOURCE)}


def _description(cfg: dict | None) -> str:
  text = "A language model trained with dhara-jax, exported to transformers"
  if not cfg:
    return text + "."
  kind = "masked-diffusion" if cfg.get("attention") == "bidirectional" else "causal"
  shape = [f"{cfg['num_layers']} layers" if "num_layers" in cfg else "",
           f"d_model {cfg['d_model']}" if "d_model" in cfg else "",
           f"{cfg['num_heads']} heads" if "num_heads" in cfg else "",
           f"vocabulary {cfg['vocab_size']}" if "vocab_size" in cfg else "",
           f"context {cfg['max_seq_len']}" if "max_seq_len" in cfg else ""]
  if cfg.get("canon_set"):
    shape.append(f"Canon layers {cfg['canon_set']}")
  if cfg.get("num_params"):
    shape.append(f"{cfg['num_params'] / 1e6:.2f}M parameters")
  details = ", ".join(s for s in shape if s)
  family = cfg.get("family", "decoder")
  return f"{text}: a {kind} {family} model" + (f" ({details})." if details else ".")


def _usage() -> list[str]:
  return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
          "# trust_remote_code: the custom model code (Canon / diffusion models) and the",
          "# tokenizer's exact decoding (tokenization_dhara.py).",
          'tokenizer = AutoTokenizer.from_pretrained("PATH", trust_remote_code=True)',
          'model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)', "```"]


def _results(summary: dict) -> list[str]:
  step, kind, data = summary.get("step"), summary.get("kind"), summary.get("data")
  version = summary.get("lm_eval_version")
  how = (f"lm-evaluation-harness {version}" if version else "lm-evaluation-harness")
  source = ("" if not data else "the Hub datasets" if data == "hub" else
            "the shipped task slice" if _is_shipped_slice(data) else f"the local copy `{data}`")
  what = ", ".join(s for s in (f"step {step}" if step is not None else "",
                               f"{SCORING.get(kind, kind)} scoring" if kind else "",
                               f"data: {source}" if source else "") if s)
  lines = ["## Evaluation", "", f"With {how} (`dhara eval`)" + (f", {what}" if what else "")
           + ". Scores in percent; chance is the score of a uniform random guess.", "",
           "| Task | Metric | Score | ± stderr | Chance | n |",
           "|---|---|---:|---:|---:|---:|"]
  for t in summary.get("tasks", ()):
    shots = t.get("num_fewshot") or 0
    label = f"{t.get('name') or t['task']} ({shots}-shot)"
    stderr = _percent(t.get("stderr"))
    lines.append(f"| {label} | {t.get('metric_name') or t.get('metric', '')} | "
                 f"{_percent(t.get('value'))} | {'' if stderr == '—' else '± '}{stderr} | "
                 f"{_percent(t.get('chance'))} | {t.get('n', '—')} |")
  lines.append("")
  for key, label in AVERAGES:
    value = _percent(summary.get(key))
    lines.append(f"- **{label}**: " + (value if value != "—" else "— (not every task ran)"))
  notes = []
  if summary.get("limit") is not None:
    notes.append(f"at most {summary['limit']} examples per task (`--limit {summary['limit']}`)")
  if data and _is_shipped_slice(data):
    notes.append("the task slice shipped with dhara-jax (100 examples per task), not the full "
                 "datasets")
  if notes:
    lines += ["", f"**Note:** this evaluation used {' and '.join(notes)}: not comparable to "
              "full-benchmark scores."]
  return lines


def _is_shipped_slice(data: str) -> bool:
  """`dhara eval` writes "shipped slice" for its default data, else the --data-dir given."""
  if data == "shipped slice":
    return True
  try:
    return resolve_input(data).resolve() == SHIPPED_SLICE
  except (OSError, ValueError):
    return False
