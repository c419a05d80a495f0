"""`dhara eval` end to end on tiny runs (AR and a converted diffusion run): the printed table, the
files stored in RUN_DIR/eval, the model card `dhara export` makes from them, and bad inputs as
one line that writes nothing. Scores of untrained models are not test material."""

import contextlib
import io
import json
import shutil

import pytest
import yaml

from dhara_jax.cli import main
from eval.data import shipped_data_dir
from test_generate_cli import one_step_run, shortest_conversion

# The prompts need a context of 64; 4 × 64 tokens a step keeps the conversion at 3 steps.
CONTEXT = ["model.max_seq_len=64", "data.seq_len=64", "data.batch_size=4"]
TASKS = ["piqa", "gsm8k", "truthfulqa_mc2"]
LIMIT = 3
SHORT = "max_gen_toks=8"  # GSM8K's default is 256 new tokens
SUMMARY_KEYS = {"model", "run", "step", "kind", "objective", "limit", "data", "lm_eval_version",
                "seconds", "tasks", "average_6", "average_7"}
ROW_KEYS = {"task", "name", "metric", "metric_name", "filter", "value", "stderr", "chance", "n",
            "num_fewshot", "dataset", "dataset_name", "split"}


@pytest.fixture(scope="module", autouse=True)
def one_task_index():
  """lm-eval's task index (14k YAML files, ~10 s) built once for the module: a pure function of
  the files; every call still makes its own TaskManager, and the factory copies the entries."""
  from lm_eval.tasks._index import TaskIndex

  build, built = TaskIndex.build, {}

  def cached(paths, **kwargs):
    key = (tuple(map(str, paths)), tuple(sorted(kwargs.items())))
    if key not in built:
      built[key] = build(paths, **kwargs)
    return dict(built[key])

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(TaskIndex, "build", staticmethod(cached))
    yield


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory):
  return one_step_run(tmp_path_factory.mktemp("ar"), *CONTEXT)


@pytest.fixture(scope="module")
def diffusion_run(ar_run, tmp_path_factory):
  return shortest_conversion(ar_run, tmp_path_factory.mktemp("diffusion"))


def _dhara(*argv):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = main([str(a) for a in argv])
  return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def ar_eval(ar_run, tmp_path_factory):
  """The AR run evaluated on a multiple-choice, a generation and an mc2 task: (stdout, --out)."""
  out_file = tmp_path_factory.mktemp("copy") / "results.json"
  code, out, err = _dhara("eval", ar_run, "--tasks", ",".join(TASKS), "--limit", LIMIT,
                          "--no-progress", "--gen-kwargs", SHORT, "--out", out_file)
  assert code == 0, err
  return out, out_file


def _files(directory):
  """Every file under `directory` with its size and mtime: what a failing call must not touch."""
  if not directory.exists():
    return {}
  return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


def _rows(table: str) -> dict[str, list[str]]:
  """The markdown table's task rows by name: [metric, score, stderr, chance, n]."""
  rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
          if line.startswith("| ") and not line.startswith("| Task")]
  return {r[0]: r[1:] for r in rows}


# --- bad inputs: one line, nothing written (the cheap ones first) -----------------------------


def _fails(run_dir, *argv, match):
  before = _files(run_dir / "eval")
  code, out, err = _dhara("eval", run_dir, "--no-progress", *argv)
  assert code == 2, (out, err)
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
  assert _files(run_dir / "eval") == before


def test_bad_runs_and_options_fail_before_lm_eval_builds_its_tasks(ar_run, diffusion_run,
                                                                   tmp_path, monkeypatch):
  import lm_eval.tasks

  def no_task_manager(*_, **__):
    raise AssertionError("built lm-eval's TaskManager for an input it could refuse before")

  monkeypatch.setattr(lm_eval.tasks, "TaskManager", no_task_manager)
  _fails(tmp_path, "--tasks", "piqa", match=f"is {tmp_path} a dhara run directory?")
  fresh = tmp_path / "fresh"  # a run that saved its config but no checkpoint
  fresh.mkdir()
  (fresh / "config.yaml").write_text((ar_run / "config.yaml").read_text())
  _fails(fresh, "--tasks", "piqa", match=f"run: {fresh} has no checkpoint yet")
  _fails(ar_run, "--tasks", "piqa", "--limit", 0, match="eval: --limit must be ≥ 1, got 0")
  _fails(ar_run, "--tasks", "piqa", "--mc-samples", 4,
         match="eval: --mc-samples is for diffusion runs; this run is AR")
  _fails(diffusion_run, "--tasks", "gsm8k", "--gen-kwargs", "top_k=5",
         match="eval: gen_kwargs top_k is for AR runs; this run is diffusion")
  _fails(ar_run, "--tasks", "gsm8k", "--gen-kwargs", "max_gen_toks=abc",
         match="error: eval: --gen-kwargs max_gen_toks=abc: expected an integer ≥ 1")
  _fails(ar_run, "--tasks", "gsm8k", "--gen-kwargs", f"{SHORT},temperature=nan",
         match="error: eval: --gen-kwargs temperature=nan: expected a finite number ≥ 0")
  _fails(ar_run, "--tasks", "piqa", "--data-dir", tmp_path / "absent",
         match=f"eval data dir {tmp_path / 'absent'} does not exist")
  (tmp_path / "file").write_text("")
  _fails(ar_run, "--tasks", "piqa", "--out", tmp_path,
         match=f"error: eval: cannot write {tmp_path}: Is a directory")
  _fails(ar_run, "--tasks", "piqa", "--out", tmp_path / "file" / "results.json",
         match=f"error: eval: cannot write {tmp_path / 'file' / 'results.json'}: Not a directory")


def test_unknown_tasks_and_missing_task_data_are_one_line(ar_run, tmp_path):
  _fails(ar_run, "--tasks", "piqa,no_such_task", match="eval: unknown task 'no_such_task'")
  empty = tmp_path / "empty"
  empty.mkdir()
  _fails(ar_run, "--tasks", "piqa", "--data-dir", empty,
         match=f"no baber/piqa data in {empty / 'piqa'}")
  (tmp_path / "binary" / "piqa").mkdir(parents=True)
  binary = tmp_path / "binary" / "piqa" / "piqa_validation.jsonl"
  first = (shipped_data_dir() / "piqa" / binary.name).read_bytes().splitlines(keepends=True)[0]
  binary.write_bytes(first + b"\x89PNG\r\n\x1a\n\x00\x00")
  _fails(ar_run, "--tasks", "piqa", "--data-dir", tmp_path / "binary",
         match=f"error: {binary}:2: not UTF-8 text (invalid start byte at byte 1 of the line)")


def test_eval_outside_a_git_repository_prints_nothing_of_git(ar_run, tmp_path, monkeypatch,
                                                             capfd):
  """lm-eval records `git describe` of the working directory in its results; outside a
  repository, git's "fatal: not a git repository" reached stderr on every evaluation."""
  run_dir = tmp_path / "run"  # a copy: this evaluation does not replace the module's
  shutil.copytree(ar_run, run_dir, ignore=shutil.ignore_patterns("eval"))
  monkeypatch.chdir(tmp_path)
  code, _, err = _dhara("eval", run_dir, "--tasks", "piqa", "--limit", 1, "--no-progress")
  assert code == 0, err
  assert "fatal" not in capfd.readouterr().err + err
  assert json.loads((run_dir / "eval" / "results.json").read_text())["git_hash"] is None


# --- evaluations ----------------------------------------------------------------------------


def test_ar_eval_prints_the_table_and_stores_lm_eval_results(ar_run, ar_eval):
  out, out_file = ar_eval
  rows = _rows(out)
  assert set(rows) == {"PIQA", "GSM8K (5-shot)", "TruthfulQA"}, out
  assert rows["PIQA"][3] == "50.00" and rows["GSM8K (5-shot)"][3] == "0.00"  # two choices; none
  assert all(r[4] == str(LIMIT) for r in rows.values())
  assert "6-task average" not in out and f"--limit {LIMIT}" in out

  stored = ar_run / "eval"
  assert (stored / "table.md").read_text().strip() in out
  results = json.loads((stored / "results.json").read_text())
  assert {"results", "configs", "versions", "n-shot", "n-samples"} <= set(results)
  assert set(TASKS) <= set(results["results"]) and "samples" not in results
  assert json.loads(out_file.read_text()) == results
  for task in TASKS:
    lines = (stored / "samples" / f"{task}.jsonl").read_text().splitlines()
    samples = [json.loads(line) for line in lines]
    assert sorted({s["doc_id"] for s in samples}) == list(range(LIMIT))
    filters = 2 if task == "gsm8k" else 1  # strict-match and flexible-extract
    assert len(samples) == LIMIT * filters
    if task == "gsm8k":  # generation stops at 8 new tokens
      assert all(len(s["resps"][0][0]) < 200 for s in samples)

  summary = json.loads((stored / "summary.json").read_text())
  assert set(summary) == SUMMARY_KEYS
  assert (summary["kind"], summary["objective"], summary["limit"]) == ("ar", "ar", LIMIT)
  assert summary["step"] == 1 and summary["data"] == "shipped slice"
  assert summary["average_6"] is None and summary["average_7"] is None  # not all 7 tasks
  by_task = {r["task"]: r for r in summary["tasks"]}
  assert list(by_task) == ["piqa", "truthfulqa_mc2", "gsm8k"]  # the study's order
  for task, row in by_task.items():
    assert set(row) == ROW_KEYS and row["n"] == LIMIT
    assert 0 <= row["value"] <= 1 and 0 <= row["chance"] <= 1
    assert row["stderr"] is None or row["stderr"] >= 0
  assert by_task["piqa"]["chance"] == 0.5 and by_task["gsm8k"]["chance"] == 0.0
  assert by_task["gsm8k"]["filter"] == "strict-match"
  assert by_task["gsm8k"]["num_fewshot"] == 5 and by_task["piqa"]["num_fewshot"] == 0


def test_an_out_found_unwritable_only_at_the_end_leaves_the_run_s_eval_as_it_was(
    ar_run, ar_eval, tmp_path, monkeypatch):
  """A full disk, say: the check before the evaluation passed, the write after it fails."""
  from eval import report

  monkeypatch.setattr(report, "check_writable", lambda *_: None)
  monkeypatch.setattr(report, "_simple_evaluate", lambda *_: json.loads(ar_eval[1].read_text()))
  assert _files(ar_run / "eval")  # the evaluation's files, which must stay as they are
  _fails(ar_run, "--tasks", "piqa", "--out", tmp_path,
         match=f"error: eval: cannot write {tmp_path}: Is a directory")


def test_export_puts_the_evaluation_in_the_model_card(ar_run, ar_eval, tmp_path):
  code, out, err = _dhara("export", ar_run, "--out", tmp_path / "hf")
  assert code == 0, err
  text = (tmp_path / "hf" / "README.md").read_text()
  meta = yaml.safe_load(text.split("---\n")[1])
  [entry] = meta["model-index"]
  assert entry["name"] == ar_run.name
  datasets = [(r["dataset"]["type"], r["dataset"]["args"]["num_few_shot"])
              for r in entry["results"]]
  assert datasets == [("baber/piqa", 0), ("truthfulqa/truthful_qa", 0), ("openai/gsm8k", 5)]
  summary = json.loads((ar_run / "eval" / "summary.json").read_text())
  assert [r["metrics"][0]["value"] for r in entry["results"]] == [
      round(100 * t["value"], 2) for t in summary["tasks"]]


@pytest.mark.slow  # the file's longest: a conversion's ELBO and diffusion sampler programs
def test_diffusion_eval_scores_with_the_elbo_and_generates(diffusion_run):
  code, out, err = _dhara("eval", diffusion_run, "--tasks", "piqa,gsm8k", "--limit", 2,
                          "--mc-samples", 2, "--steps", 4, "--block-length", 8,
                          "--gen-kwargs", SHORT, "--no-progress")
  assert code == 0, err
  assert set(_rows(out)) == {"PIQA", "GSM8K (5-shot)"} and "(diffusion)" in out
  summary = json.loads((diffusion_run / "eval" / "summary.json").read_text())
  assert (summary["kind"], summary["objective"], summary["step"]) == ("diffusion", "block", 3)
  assert [(r["task"], r["n"]) for r in summary["tasks"]] == [("piqa", 2), ("gsm8k", 2)]
  samples = (diffusion_run / "eval" / "samples" / "gsm8k.jsonl").read_text().splitlines()
  assert len(samples) == 2 * 2  # two documents, two filters
