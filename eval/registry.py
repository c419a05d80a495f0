"""Which lm-eval tasks run, and on what data.

Tasks are lm-eval's own configs (prompts, preprocessing, few-shot sampling, metrics): this
module only adds `tasks/` as an include path (the `codelion` group: the study's 7 benchmarks at
its shot counts) and, unless the data comes from the Hub, points every task whose dataset we
hold locally at files in the layout of data/eval (eval/data.py) through lm-eval's
`custom_dataset` hook.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Any

from dhara_jax.errors import DharaError

TASKS_DIR = Path(__file__).parent / "tasks"
HUB = "hub"  # --data-dir value: lm-eval's own download from the Hugging Face Hub
STUDY = "codelion"
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StudyTask:
  """A benchmark of the study and the score codelion's tables report for it."""

  task: str  # lm-eval task or group name
  name: str
  metric: str  # lm-eval metric key, before the filter: "acc_norm", "exact_match"
  metric_name: str
  filter: str = "none"  # lm-eval filter whose value is reported ("strict-match" for GSM8K)
  in_6_task: bool = True  # codelion's 6-task average leaves GSM8K out


STUDY_TASKS = (
    StudyTask("hellaswag", "HellaSwag", "acc_norm", "normalized accuracy"),
    StudyTask("piqa", "PIQA", "acc_norm", "normalized accuracy"),
    StudyTask("winogrande", "WinoGrande", "acc", "accuracy"),
    StudyTask("arc_challenge", "ARC-Challenge", "acc_norm", "normalized accuracy"),
    StudyTask("mmlu", "MMLU", "acc", "accuracy"),
    StudyTask("truthfulqa_mc2", "TruthfulQA", "acc", "mc2"),
    StudyTask("gsm8k", "GSM8K", "exact_match", "exact match (strict)", "strict-match",
              in_6_task=False),
)


def offline() -> None:
  """No network at evaluation time: lm-eval and datasets must not reach for the Hub."""
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  import datasets

  datasets.disable_progress_bars()  # one "Map" bar per task and split otherwise


def task_manager(data_dir: str | Path | None) -> Any:
  """lm-eval's TaskManager with our include path; tasks read local files from `data_dir`
  (None: the shipped slice), or the Hub when `data_dir` is "hub"."""
  from lm_eval.tasks import TaskManager

  from eval import data

  if str(data_dir) == HUB:
    tm = TaskManager(include_path=str(TASKS_DIR))
  else:
    offline()
    root = data.check_data_dir(data_dir if data_dir is not None else data.shipped_data_dir())
    tm = TaskManager(include_path=str(TASKS_DIR))
    tm._factory = _local_factory(tm._factory, root)  # pinned lm-eval: see pyproject
    # lm-eval logs a hint about --metadata for every task with a custom_dataset (ours: all).
    logging.getLogger("lm_eval.api.task").addFilter(_not_the_metadata_hint)
  return tm


def _not_the_metadata_hint(record: logging.LogRecord) -> bool:
  return "Custom kwargs can be passed" not in record.getMessage()


def _local_factory(factory: Any, root: Path) -> Any:
  """The TaskFactory with one change: a task whose dataset we hold locally gets a
  `custom_dataset` reading it from `root`, and drops the splits `root` does not have."""
  from lm_eval.tasks._factory import TaskFactory

  from eval import data

  class LocalFactory(TaskFactory):
    def _load_full_config(self, entry, overrides=None):
      cfg = super()._load_full_config(entry, overrides)
      path = cfg.get("dataset_path")
      if path not in data.HUB_DATASETS or cfg.get("custom_dataset"):
        return cfg
      dataset = data.load_local(path, cfg.get("dataset_name"), root)  # read once
      cfg["custom_dataset"] = functools.partial(_loaded, dataset)
      present = set(dataset)
      for key in SPLIT_KEYS:
        if cfg.get(key) and cfg[key] not in present:
          log.info("%s: no local %s split in %s", cfg.get("task"), cfg[key], root)
          cfg[key] = None
      if not any(cfg.get(k) for k in ("validation_split", "test_split")):
        raise DharaError(f"eval: {root} has no evaluation split of {path} for task "
                         f"{cfg.get('task')}")
      return cfg

  return LocalFactory(meta=factory._meta)


def _loaded(dataset: Any, **_: Any) -> Any:
  """lm-eval calls custom_dataset with the task's metadata as keywords."""
  return dataset


def resolve_tasks(spec: str, tm: Any) -> list[str]:
  """--tasks: "codelion", or comma-separated lm-eval task / group / tag names."""
  names = [t.strip() for t in spec.split(",") if t.strip()]
  if not names:
    raise DharaError("eval: --tasks is empty")
  known = set(tm.all_tasks)
  unknown = [n for n in names if n not in known]
  if unknown:
    raise DharaError(f"eval: unknown task {unknown[0]!r} (lm-eval {lm_eval_version()} has "
                     f"{len(known)} tasks; `lm_eval ls tasks` lists them, or use {STUDY})")
  return names


def lm_eval_version() -> str:
  from importlib.metadata import version

  return version("lm_eval")
