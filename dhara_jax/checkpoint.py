"""Orbax checkpoints of a run: train state, data-iterator state, resolved config, tokenizer.

Layout: RUN_DIR/checkpoints/<step>/{state, data, config, tokenizer} (or `train.checkpoint_dir`,
which may be a bucket). The state is saved
asynchronously where the manager allows it; a step directory appears only once complete, so a
run killed mid-save resumes from the previous checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

import grain
import orbax.checkpoint as ocp
from etils import epath

from dhara_jax.errors import DharaError


ORBAX_MARKERS = ("commit_success.txt",)


class FileHandler(ocp.CheckpointHandler):
  """Stores one small file (the tokenizer model) verbatim inside the checkpoint."""

  def save(self, directory: epath.Path, args: "FileSave") -> None:
    (directory / args.name).write_bytes(args.data)

  def restore(self, directory: epath.Path, args: "FileRestore | None" = None) -> bytes:
    files = [f for f in directory.iterdir()  # orbax adds its own markers to the item dir
             if f.name not in ORBAX_MARKERS and not f.name.startswith("_")]
    if len(files) != 1:
      raise DharaError(f"checkpoint: expected one file in {directory}")
    return files[0].read_bytes()

  def metadata(self, directory: epath.Path) -> None:
    return None


@ocp.args.register_with_handler(FileHandler, for_save=True)
@dataclasses.dataclass
class FileSave(ocp.args.CheckpointArgs):
  name: str
  data: bytes


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


class Checkpointer:
  def __init__(self, run_dir: Path, keep: int, async_save: bool = True, directory: str = ""):
    self.directory = checkpoint_directory(run_dir, directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any, config: dict,
           tokenizer: Path | None = None) -> None:
    items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if tokenizer is not None:
      items["tokenizer"] = FileSave(Path(tokenizer).name, Path(tokenizer).read_bytes())
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def saved_config(self, step: int) -> dict:
    return self._restore(step, config=ocp.args.JsonRestore())["config"]

  def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
    """Restores the state into the shardings of `abstract_state` (ShapeDtypeStructs), which
    may be a different mesh than the one that saved it, and the iterator in place."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    # A checkpoint made by `dhara import` has no data state: the stream then starts fresh.
    if data_iterator is not None and (self.directory / str(step) / "data").exists():
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self._restore(step, **items)["state"]

  def restore_tokenizer(self, step: int) -> bytes | None:
    """The tokenizer model saved with `step`, or None (`dhara import` checkpoints have none)."""
    if not (self.directory / str(step) / "tokenizer").exists():
      return None
    return self._restore(step, tokenizer=FileRestore())["tokenizer"]

  def _restore(self, step: int, **items: ocp.args.CheckpointArgs) -> Any:
    """The manager's restore, with a missing or damaged checkpoint reported in one line."""
    step_dir = self.directory / str(step)
    if not step_dir.exists():
      raise DharaError(f"checkpoint: no step {step} in {self.directory}")
    _silence_abandoned_reads()  # before: a read can be abandoned while the error propagates
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**items))
    except DharaError:
      raise
    except Exception as e:  # orbax, tensorstore and file errors alike
      differing = _differing_entries(e)
      if differing:
        raise DharaError(f"checkpoint: {step_dir} holds a train state with other entries "
                         f"({', '.join(differing[:3])}): it was written by another version of "
                         "dhara-jax") from None
      raise DharaError(f"checkpoint: {step_dir} is unreadable ({_root_cause(e)}); move it "
                       "aside to use an earlier checkpoint") from None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _root_cause(error: Exception) -> str:
  """The first and last links of a tensorstore-style 'A: B: ...: cause [spec]' message."""
  lines = str(error).split(" [tensorstore_spec")[0].strip().splitlines()
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


@functools.cache  # once per process: each failed restore would otherwise stack another filter
def _silence_abandoned_reads() -> None:
  """After a failed restore, orbax has closed its event loop while tensorstore still finishes
  the other reads; each then reports 'Event loop is closed' as an unraisable exception, and
  their failed futures are logged as never retrieved when collected: a screenful of tracebacks
  under our one-line error. Drop exactly those. Installed before the first restore, since the
  first abandoned read can complete before the restore's exception reaches us."""
  logging.getLogger("asyncio").addFilter(
      lambda record: "exception was never retrieved" not in record.getMessage())
  previous = sys.unraisablehook

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)

  sys.unraisablehook = hook
