"""Orbax checkpoints of a run: train state, data-iterator state, resolved config, tokenizer.

Layout: RUN_DIR/checkpoints/<step>/{state, data, config, tokenizer} (or `train.checkpoint_dir`,
which may be a bucket). The state is saved
asynchronously where the manager allows it; a step directory appears only once complete, so a
run killed mid-save resumes from the previous checkpoint. A save that fails (a full disk, a
bucket that refuses writes) is one line naming the step, with its partial directory removed
and the earlier steps untouched; an async save's failure surfaces at the next save or wait.
What orbax itself prints around such a failure is dropped only while dhara's orbax calls run, a
pending save included (orbax_quiet.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from dhara_jax.errors import DharaError
from dhara_jax.orbax_quiet import quiet, quiet_from_now


ORBAX_MARKERS = ("commit_success.txt",)
SCORE = "diffusion_loss"  # the metric a checkpoint may be saved with, lower is better
T = TypeVar("T")


class FileHandler(ocp.CheckpointHandler):
  """Stores small files (the tokenizer's: a SentencePiece model, or a tokenizer.json and its
  tokenizer_config.json) verbatim inside the checkpoint."""

  def save(self, directory: epath.Path, args: "FileSave") -> None:
    for name, data in args.files.items():
      (directory / name).write_bytes(data)

  def restore(self, directory: epath.Path, args: "FileRestore | None" = None) -> dict[str, bytes]:
    files = [f for f in directory.iterdir()  # orbax adds its own markers to the item dir
             if f.name not in ORBAX_MARKERS and not f.name.startswith("_")]
    if not files:
      raise DharaError(f"checkpoint: expected a file in {directory}")
    return {f.name: f.read_bytes() for f in files}

  def metadata(self, directory: epath.Path) -> None:
    return None


@ocp.args.register_with_handler(FileHandler, for_save=True)
@dataclasses.dataclass
class FileSave(ocp.args.CheckpointArgs):
  files: dict[str, bytes]  # name -> contents


@ocp.args.register_with_handler(FileHandler, for_restore=True)
@dataclasses.dataclass
class FileRestore(ocp.args.CheckpointArgs):
  pass


def ensure_writable(directory: epath.PathLike, what: str) -> None:
  """Creates `directory` and writes a probe file in it: one clear line now (naming it as
  `what`) rather than a traceback at the first save."""
  directory = epath.Path(directory)
  # One probe per process (no races between hosts), named without asking JAX: this runs
  # before jax.distributed.initialize().
  probe = directory / f".write_test_{socket.gethostname()}_{os.getpid()}"
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except Exception as e:  # local OSErrors and the bucket clients' own errors alike
    raise DharaError(f"train: {what} {directory} is not writable "
                     f"({getattr(e, 'strerror', None) or e})") from None


def checkpoint_directory(run_dir: Path, directory: str = "") -> epath.Path:
  """`directory` (`train.checkpoint_dir`), or RUN_DIR/checkpoints when empty. An epath serves
  local folders (made absolute) and buckets (gs://...) alike."""
  return epath.Path(directory if "://" in directory else
                    Path(directory or Path(run_dir) / "checkpoints").resolve())


def holds_checkpoint(directory: epath.PathLike) -> bool:
  """Whether `directory` (which exists) holds a finished step; reads only, takes no lock."""
  return ocp.path.step.any_checkpoint_step(directory) is not None


class Checkpointer:
  def __init__(self, run_dir: Path, keep: int, async_save: bool = True, directory: str = "",
               create: bool = True, best: int = 0):
    """`create=False` for readers (export): they leave no empty checkpoint dir behind. `best`
    > 0 also keeps the `best` checkpoints saved with the lowest `SCORE` metric (a
    conversion's top-k decay checkpoints) beside the `keep` latest."""
    self.directory = checkpoint_directory(run_dir, directory)
    self.async_save = async_save
    policy = ocp.checkpoint_managers
    preservation = policy.LatestN(keep)
    if best:
      preservation = policy.AnyPreservationPolicy([preservation, policy.BestN(
          get_metric_fn=lambda m: m[SCORE], reverse=True, n=best,
          keep_checkpoints_without_metrics=False)])
    # best_fn makes orbax write a save's metrics (the preservation policy ranks by them).
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation, create=create, enable_async_checkpointing=async_save,
        best_fn=(lambda m: m[SCORE]) if best else None, best_mode="min")
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._pending: int | None = None  # the step whose (async) save may still be writing
    # Orbax's noise stays dropped until a pending save is finished: it logs a background
    # save's failure from its own thread.
    self._saving = contextlib.ExitStack()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any, config: dict,
           tokenizer: Any = None, score: float | None = None) -> None:
    """Saves `step` (asynchronously where enabled) with `tokenizer`'s files (a
    data_pipeline Tokenizer); `score` ranks it among the `best`."""
    items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if tokenizer is not None:
      items["tokenizer"] = FileSave(tokenizer.files)
    self.wait()  # the manager would wait too, but blame a failure on this step, not the pending
    self._saving.enter_context(quiet())
    try:
      self._orbax(lambda: self.manager.save(step, args=ocp.args.Composite(**items), force=True,
                                            metrics=None if score is None else {SCORE: score}),
                  functools.partial(self._save_failed, step))
    finally:
      if not self.async_save:  # nothing goes on in the background
        self._saving.close()
    self._pending = step

  def scores(self) -> dict[int, float]:
    """The score of every checkpoint on disk saved with one."""
    out = {}
    for step in self.manager.all_steps():
      metrics = self.manager.metrics(step)
      if metrics and SCORE in metrics:
        out[step] = float(metrics[SCORE])
    return out

  def saved_config(self, step: int) -> dict:
    return self._restore(step, config=ocp.args.JsonRestore())["config"]

  def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
    """Restores the state into the shardings of `abstract_state` (ShapeDtypeStructs), which
    may be a different mesh than the one that saved it, and the iterator in place."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    # A checkpoint made by `dhara import` has no data state: the stream then starts fresh.
    data_dir = self.directory / str(step) / "data"
    if data_iterator is not None and data_dir.exists():
      written = _data_state_files(data_dir)
      if _process_file() in written or not written:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      else:  # saved by a job of another process count
        _set_shared_stream(data_iterator, data_dir, written, step)
    return self._restore(step, **items)["state"]

  def restore_tokenizer(self, step: int) -> dict[str, bytes] | None:
    """The tokenizer files saved with `step`, or None (a run that had no tokenizer)."""
    if not (self.directory / str(step) / "tokenizer").exists():
      return None
    return self._restore(step, tokenizer=FileRestore())["tokenizer"]

  def _restore(self, step: int, **items: ocp.args.CheckpointArgs) -> Any:
    """The manager's restore, with a missing or damaged checkpoint reported in one line."""
    step_dir = self.directory / str(step)
    if not step_dir.exists():
      raise DharaError(f"checkpoint: no step {step} in {self.directory}")
    with quiet():
      return self._orbax(lambda: self.manager.restore(step, args=ocp.args.Composite(**items)),
                         functools.partial(self._restore_failed, step))

  def _restore_failed(self, step: int, error: Exception) -> DharaError:
    """The one-line report of a failed restore of `step`."""
    step_dir = self.directory / str(step)
    differing = _differing_entries(error)
    if differing:
      return DharaError(f"checkpoint: {step_dir} holds a train state with other entries "
                        f"({', '.join(differing[:3])}): it was written by another version of "
                        "dhara-jax")
    earlier = [s for s in self.manager.all_steps() if s < step]
    advice = (f"move it aside to use an earlier checkpoint (step {max(earlier)})" if earlier
              else f"there is no earlier checkpoint in {self.directory} to use instead")
    return DharaError(f"checkpoint: {step_dir} is unreadable ({_root_cause(error)}); {advice}")

  @staticmethod
  def _orbax(call: Callable[[], T], failed: Callable[[Exception], DharaError]) -> T:
    """`call()`, an orbax call made inside `quiet()`; its error (orbax's, tensorstore's, a
    file's) is `failed`'s one line, and what the call abandoned stays quiet when it reports
    itself later (at exit, say)."""
    try:
      return call()
    except DharaError:
      raise
    except Exception as e:
      quiet_from_now()
      raise failed(e) from None

  def wait(self) -> None:
    """Waits for the pending async save; its failure is one line naming its step."""
    self._finish(self.manager.wait_until_finished)

  def close(self) -> None:
    self._finish(self.manager.close)  # close waits for the pending save too

  def _finish(self, call: Callable[[], None]) -> None:
    step, self._pending = self._pending, None  # reported once, as the manager raises it once
    with quiet(), self._saving:  # the pending save is over after this, finished or failed
      self._orbax(call, functools.partial(self._save_failed, step))

  def _save_failed(self, step: int | None, error: Exception) -> DharaError:
    """The one-line report of a failed save of `step`, after removing what it left."""
    if step is not None:
      _join_writer_threads()
      _remove_partial_step(self.directory, step)
    try:
      saved = max(ocp.path.step.checkpoint_steps(self.directory), default=None)
      kept = f"steps ≤ {saved} are saved" if saved is not None else "no step is saved"
    except Exception:  # the listing fails the same way (a bucket refusing reads too)
      kept = "earlier steps are untouched"
    what = "a checkpoint" if step is None else f"step {step}"
    if _no_space(error):
      return DharaError(f"checkpoint: no space left on {_device_of(self.directory)} writing "
                        f"{what}; {kept}; free space and run the same command")
    return DharaError(f"checkpoint: cannot write {what} to {self.directory} "
                      f"({_root_cause(error)}); {kept}; fix that and run the same command")


def _process_file() -> str:
  """The name grain's checkpoint handler gives this process's data state."""
  return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def _data_state_files(data_dir: epath.Path) -> list[str]:
  return sorted(f.name for f in data_dir.iterdir() if re.fullmatch(r"process_\d+-of-\d+\.json",
                                                                      f.name))


def _set_shared_stream(data_iterator: Any, data_dir: epath.Path, written: list[str],
                       step: int) -> None:
  """Restores a data state written by a job of another process count, which only a stream
  every process reads whole (`data.host_split: rows`) can take; otherwise one line."""
  saved = int(written[0].split("-of-")[1].split(".")[0])
  try:
    state = json.loads((data_dir / written[0]).read_text())
  except (OSError, ValueError) as e:
    raise DharaError(f"checkpoint: {data_dir / written[0]} is unreadable ({e})") from None
  if state.get("pipeline", {}).get("host_split") != "rows":
    raise DharaError(
        f"checkpoint: step {step} in {data_dir.parent.parent} was written by a job of {saved} "
        f"process{'es' if saved > 1 else ''} and this one has {jax.process_count()}: each "
        "process's position in its share of the data is its own, so resume it with "
        f"{saved}; runs with data.host_split=rows resume on any process count")
  data_iterator.set_state(state)


def _join_writer_threads(timeout: float = 30.0) -> None:
  """Waits (up to `timeout` s in all) for orbax's writer threads: a save stops waiting at its
  first failed write while its other writes go on, and those would re-create the partial step
  directory after it was removed (or at exit, which waits for them)."""
  deadline = time.monotonic() + timeout
  for thread in threading.enumerate():
    if thread is not threading.current_thread() and type(thread).__module__.startswith("orbax"):
      thread.join(max(0.0, deadline - time.monotonic()))


def _remove_partial_step(directory: epath.Path, step: int) -> None:
  """Removes the unfinished directory of `step` only: `<step>.orbax-checkpoint-tmp*` where
  orbax renames when done, or `<step>` without its commit marker (buckets). Best effort: the
  error that stopped the save may stop this too."""
  partial = re.compile(rf"{step}{re.escape(ocp.path.step.TMP_DIR_SUFFIX)}.*")
  try:
    entries = list(directory.iterdir())
  except Exception:
    return
  for entry in entries:
    if partial.fullmatch(entry.name) or (entry.name == str(step) and
                                         not ocp.path.step.is_path_finalized(entry)):
      try:
        entry.rmtree()
      except Exception:
        pass


def _causes(error: BaseException | None) -> list[BaseException]:
  """`error` and what caused it, outermost first (explicit causes, else the context)."""
  chain: list[BaseException] = []
  while error is not None and error not in chain:
    chain.append(error)
    error = error.__cause__ or error.__context__
  return chain


def _no_space(error: Exception) -> bool:
  """Whether a full disk stopped the save: an OSError from Python, tensorstore's status text."""
  return any((isinstance(e, OSError) and e.errno == errno.ENOSPC)
             or "No space left on device" in str(e) for e in _causes(error))


def _device_of(directory: epath.Path) -> str:
  """The mount point holding `directory` (its nearest existing ancestor's file system, found by
  walking up while st_dev stays the same), or a bucket path's bucket."""
  text = str(directory)
  if "://" in text:
    scheme, rest = text.split("://", 1)
    return f"{scheme}://{rest.split('/')[0]}"
  path = Path(text)
  try:
    while not path.exists() and path != path.parent:
      path = path.parent
    device = path.stat().st_dev
    while path != path.parent and path.parent.stat().st_dev == device:
      path = path.parent
  except OSError:
    pass
  return str(path)


def _root_cause(error: BaseException) -> str:
  """The innermost explicit cause of `error`, as its OSError reason or the first and last links
  of a tensorstore-style 'A: B: ...: cause [spec]' message. Innermost: orbax wraps failed reads
  in an Exception whose text quotes a bound method's repr instead of the store's spec."""
  while error.__cause__ is not None:
    error = error.__cause__
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  text = str(error).split(" [tensorstore_spec")[0]
  lines = re.sub(r" \[os_error_code=[^\]]*\]", "", text).strip().splitlines()
  if not lines:
    return type(error).__name__
  links = lines[0].split(": ")
  return (f"{links[0]}: {links[-1]}" if len(links) > 2 else lines[0])[:300]


def _differing_entries(error: Exception) -> list[str]:
  """The state entries named by orbax's 'tree structures do not match' error, if it is one."""
  lines = str(error).splitlines()
  if not lines or "tree structures do not match" not in lines[0]:
    return []
  return [line.rstrip(":") for line in lines[1:] if line.endswith(":") and line[:1].strip()]
