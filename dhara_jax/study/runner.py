"""`dhara study CONFIG --out OUT`: every cell of the grid as its own processes — train (or
convert from its AR cell), `dhara eval`, `dhara bench throughput` — then the report.

OUT/study.json names the study; OUT/cells/NAME/ holds the cell's composed config.yaml, its run
(run/), throughput.json, log.txt (every step's output) and status.json (the steps done, the
error of a failed one). A finished cell is skipped; an interrupted one resumes at its first
unfinished step (train and convert resume from their latest checkpoint); a failed cell is
recorded and the grid goes on. SIGTERM stops the running step (it checkpoints) and the study.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

from dhara_jax.errors import DharaError
from dhara_jax.files import write_whole
from dhara_jax.sampler_options import option_flag
from dhara_jax.study.spec import Cell, Study

CELLS = "cells"
KILL_AFTER_SECONDS = 120  # a stopped step's grace to write its checkpoint, then it is killed


def cell_dir(out: Path, cell: Cell) -> Path:
  return out / CELLS / cell.name


def run_dir(out: Path, cell: Cell) -> Path:
  return cell_dir(out, cell) / "run"


def throughput_file(out: Path, cell: Cell) -> Path:
  return cell_dir(out, cell) / "throughput.json"


def steps(study: Study, out: Path, cell: Cell) -> list[tuple[str, list[str]]]:
  """(step name, `dhara ...` argv) of a cell, in order."""
  here, run = cell_dir(out, cell), str(run_dir(out, cell))
  if cell.converted:
    first = ("convert", ["dhara", "convert", str(run_dir(out, study.cell(cell.parent))),
                         "--config", str(here / "config.yaml"), "--run-dir", run,
                         "--no-progress"])
  else:
    first = ("train", ["dhara", "train", str(here / "config.yaml"), "--run-dir", run,
                       "--no-progress"])
  e = study.eval
  evaluate = ["dhara", "eval", run, "--tasks", e.tasks, "--no-progress"]
  evaluate += ["--limit", str(e.limit)] if e.limit else []
  evaluate += ["--data-dir", e.data_dir] if e.data_dir else []
  evaluate += ["--gen-kwargs", e.gen_kwargs] if e.gen_kwargs else []
  evaluate += ["--mc-samples", str(e.mc_samples)] if e.mc_samples and cell.diffusion else []
  t = study.throughput
  speed = ["dhara", "bench", "throughput", run, "--new-tokens", str(t.new_tokens), "--batch",
           str(t.batch), "--runs", str(t.runs), "--prompt-tokens", str(t.prompt_tokens),
           "--out", str(throughput_file(out, cell))]
  if cell.diffusion:
    speed += [f"{option_flag(k)}={v}" for k, v in t.diffusion]
  return [first, ("eval", evaluate), ("throughput", speed)]


def setup_steps(study: Study, out: Path) -> list[tuple[str, list[str]]]:
  config = str(out / "setup.yaml")
  argv = {"tokenizer": ["dhara", "tokenizer", "train", "--config", config],
          "data": ["dhara", "data", "prepare", "--config", config, "--no-progress"]}
  return [(name, argv[name]) for name in study.setup]


def prepare(study: Study, out: Path) -> None:
  """Claims OUT for this study and writes every cell's config (refusing another study's OUT, or
  a cell whose config changed after its run began)."""
  marker = out / "study.json"
  if marker.is_file():
    try:
      claimed = json.loads(marker.read_text()).get("name")
    except (json.JSONDecodeError, AttributeError):
      raise DharaError(f"study: {marker} is not a study record; use another --out") from None
    if claimed != study.name:
      raise DharaError(f"study: {out} holds the results of study {claimed!r}, not "
                       f"{study.name!r}; use another --out")
  elif out.is_dir() and any(out.iterdir()):
    raise DharaError(f"study: {out} is not empty and holds no study.json; use an empty or new "
                     "--out")
  _write(marker, json.dumps({"name": study.name, "config": str(study.path),
                             "cells": [c.name for c in study.cells]}, indent=2) + "\n")
  if study.setup:
    _write(out / "setup.yaml", yaml.safe_dump(study.shared, sort_keys=False))
  for cell in study.cells:
    status = read_status(out, cell)
    if status and status.get("fingerprint") != cell.fingerprint():
      run = run_dir(out, cell)
      if run.is_dir() and any(run.iterdir()):
        raise DharaError(f"study: cell {cell.name!r} changed since its run began "
                         f"({cell_dir(out, cell)}); delete that folder to rerun it, or use "
                         "another --out")
      (cell_dir(out, cell) / "status.json").unlink()  # nothing trained yet: start afresh
    _write(cell_dir(out, cell) / "config.yaml", yaml.safe_dump(cell.raw, sort_keys=False))


def print_commands(study: Study, out: Path) -> str:
  """A shell script of the grid: the setup, then one line per cell (conversions after their
  parent's line). Each cell's line is independent of the others but its parent's."""
  lines = [f"# study {study.name}: {len(study.cells)} cells into {out} (configs in "
           f"{out}/{CELLS}/*/config.yaml)", "set -e"]
  if study.setup:
    lines.append("# setup, once before any cell")
    lines += [shlex.join(argv) for _, argv in setup_steps(study, out)]
  for cell in study.ordered():
    after = f" (after {cell.parent}'s line)" if cell.converted else ""
    lines.append(f"# cell {cell.name}{after}; or: dhara study {shlex.quote(str(study.path))} "
                 f"--out {shlex.quote(str(out))} --cell {cell.name}")
    lines.append(" && ".join(shlex.join(argv) for _, argv in steps(study, out, cell)))
  lines.append(f"# then: dhara study {shlex.quote(str(study.path))} --out "
               f"{shlex.quote(str(out))} --report")
  return "\n".join(lines)


def read_status(out: Path, cell: Cell) -> dict:
  path = cell_dir(out, cell) / "status.json"
  if not path.is_file():
    return {}
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError:
    raise DharaError(f"study: {path} is not JSON; delete it to rerun the cell") from None


def run(study: Study, out: Path, only: str | None = None,
        log: Callable[[str], None] = print) -> dict:
  """Runs the grid (or the cell `only`); returns {cell name: its status}."""
  prepare(study, out)
  with _Stopper() as stopper:
    if only is None and study.setup:
      _setup(study, out, stopper, log)
    cells = [study.cell(only)] if only else study.ordered()
    for cell in cells:
      _run_cell(study, out, cell, stopper, log)
  return {c.name: read_status(out, c) for c in study.cells}


def _setup(study: Study, out: Path, stopper: "_Stopper", log: Callable[[str], None]) -> None:
  from dhara_jax import config as config_lib

  tokenizer = Path(config_lib.from_dict(study.shared).data.tokenizer)
  for name, argv in setup_steps(study, out):
    if name == "tokenizer" and tokenizer.exists():  # a model file, or a tokenizer folder
      continue
    log(f"study: setup {name}: {shlex.join(argv)}")
    code, error = _run_step(argv, out / "setup.log", study.step_timeout_minutes, stopper)
    if code:
      raise DharaError(f"study: setup step {name} failed: {error} (see {out}/setup.log)")


def _run_cell(study: Study, out: Path, cell: Cell, stopper: "_Stopper",
              log: Callable[[str], None]) -> None:
  status = read_status(out, cell) or {"fingerprint": cell.fingerprint(), "done": [],
                                      "seconds": {}}
  if status.get("state") == "done":
    log(f"study: {cell.name}: finished earlier, skipped")
    return
  if cell.converted:
    parent = read_status(out, study.cell(cell.parent))
    if not parent_trained(out, study.cell(cell.parent), parent):
      why = parent.get("error") or "it has not run"
      _save(out, cell, {**status, "state": "failed", "failed_step": "convert",
                        "error": f"its AR cell {cell.parent} has not finished training ({why})"})
      log(f"study: {cell.name}: skipped, its AR cell {cell.parent} has not finished training")
      return
  for name, argv in steps(study, out, cell):
    if name in status["done"]:
      continue
    _save(out, cell, {**status, "state": "running", "step": name, "error": None})
    log(f"study: {cell.name}: {name}: {shlex.join(argv)}")
    started = time.perf_counter()
    code, error = _run_step(argv, cell_dir(out, cell) / "log.txt",
                            study.step_timeout_minutes, stopper)
    seconds = round(time.perf_counter() - started, 1)
    if stopper.signal:
      _save(out, cell, {**status, "state": "stopped", "step": name})
      raise DharaError(f"study: stopped by {stopper.signal} in {cell.name}'s {name} step; run "
                       "the same command again to resume")
    if code:
      _save(out, cell, {**status, "state": "failed", "failed_step": name, "error": error})
      log(f"study: {cell.name}: {name} failed: {error}")
      return
    status = {**status, "done": [*status["done"], name],
              "seconds": {**status["seconds"], name: seconds}}
    _save(out, cell, {**status, "state": "running", "step": None})
  _save(out, cell, {**status, "state": "done", "step": None, "error": None})
  log(f"study: {cell.name}: done ({sum(status['seconds'].values()):.0f} s)")


def parent_trained(out: Path, parent: Cell, status: dict) -> bool:
  """Whether an AR cell has finished training: by its status, or (trained by a printed
  command, so with no status) by a checkpoint of its last step."""
  if "train" in status.get("done", []):
    return True
  if status:
    return False
  from dhara_jax import config as config_lib

  train = config_lib.from_dict(parent.raw).train
  root = (Path(train.checkpoint_dir) if train.checkpoint_dir
          else run_dir(out, parent) / "checkpoints")
  return (root / str(train.steps)).is_dir()


def _run_step(argv: list[str], log_path: Path, timeout_minutes: float,
              stopper: "_Stopper") -> tuple[int, str]:
  """Runs `dhara ...` as a child process (output appended to log_path); (exit code, the
  error line it printed). Bounded: past the timeout the child is stopped like a SIGTERM."""
  log_path.parent.mkdir(parents=True, exist_ok=True)
  with open(log_path, "a") as f:
    f.write(f"$ {shlex.join(argv)}\n")
    f.flush()
    start = f.tell()
    child = subprocess.Popen([sys.executable, "-m", "dhara_jax.cli", *argv[1:]],
                             stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
    stopper.child = child
    deadline = time.monotonic() + timeout_minutes * 60
    timed_out = False
    try:
      while child.poll() is None:
        if not timed_out and time.monotonic() > deadline:
          timed_out = True
          child.terminate()
          deadline = time.monotonic() + KILL_AFTER_SECONDS
        elif timed_out and time.monotonic() > deadline:
          child.kill()
        try:
          child.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
          pass
    finally:
      stopper.child = None
  if timed_out:
    return 1, f"{argv[1]} timed out after {timeout_minutes:g} minutes"
  if child.returncode == 0:
    return 0, ""
  with open(log_path) as f:
    f.seek(start)
    lines = [line.strip() for line in f.read().splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("error:")]
  last = (errors or lines or [f"exit status {child.returncode}"])[-1]
  return child.returncode, last.removeprefix("error: ")


class _Stopper:
  """SIGTERM / SIGINT: passed on to the running step (which checkpoints and exits), then the
  study stops. A second signal kills the step."""

  def __init__(self):
    self.child: subprocess.Popen | None = None
    self.signal: str | None = None
    self._previous: dict = {}

  def __enter__(self) -> "_Stopper":
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum: int, frame) -> None:
    first = self.signal is None
    self.signal = signal.Signals(signum).name
    if self.child is not None and self.child.poll() is None:
      (self.child.terminate if first else self.child.kill)()
    elif first:
      raise DharaError(f"study: stopped by {self.signal}; run the same command again to "
                       "resume")


def _save(out: Path, cell: Cell, status: dict) -> None:
  _write(cell_dir(out, cell) / "status.json", json.dumps(status, indent=2) + "\n")


def _write(path: Path, text: str) -> None:
  write_whole(path, text, "study")
