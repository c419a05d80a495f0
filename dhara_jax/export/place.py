"""Where `dhara export` puts a run's export: what the folder may replace, and the record that says
whose export a folder holds.

Every export `dhara export` writes holds `dhara_export.json`: the run dir (resolved), the step,
the class config.json names and the model's architecture fields. A folder that holds nothing, or
an export of the same run and architecture (any step), is replaced; any other folder only with
--force. The new export is written into a temp folder beside it, which takes its place once
complete (`files.whole_folder`): a failed export leaves the folder as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Iterator

from dhara_jax.config import ModelConfig
from dhara_jax.errors import DharaError
from dhara_jax.export.custom import ARCH_FIELDS
from dhara_jax.export.io import architecture
from dhara_jax.phases import Phase
from dhara_jax.files import whole_folder

RECORD = "dhara_export.json"


@dataclasses.dataclass(frozen=True)
class Held:
  """What a folder holds, for the refusal: an export's record, or a phrase saying what else."""
  record: dict | None
  what: str


def record(run_dir: str | Path, step: int, cfg: ModelConfig, code: str = "auto",
           phase: Phase | None = None) -> dict:
  """The identity of the export of checkpoint `step` of `run_dir` (trained with `phase`) with
  `code`."""
  model = {name: getattr(cfg, name) for name in ARCH_FIELDS}
  return {"run": str(Path(run_dir).resolve()), "step": step,
          "architecture": architecture(cfg, code, phase),
          "model": json.loads(json.dumps(model))}  # as read back: tuples become lists


def check_replaceable(out: str | Path, new: dict, force: bool = False,
                      keep: tuple[str, ...] = ()) -> None:
  """Refuses, in one line naming what is there, to replace `out` unless it holds nothing or an
  export of the same run and architecture, or `force`. Never a file, nor a folder holding the
  run or any of `keep` (its checkpoints, which may lie elsewhere)."""
  out = Path(out)
  for kept in (new["run"], *keep):
    if "://" not in kept and (out.resolve() == Path(kept).resolve()
                              or out.resolve() in Path(kept).resolve().parents):
      raise DharaError(f"export: --out {out} holds {kept}, part of the run it exports; "
                       "choose another --out")
  if out.exists() and not out.is_dir():
    raise DharaError(f"export: {out} is a file, not a folder; choose another --out")
  held = holds(out)
  if force or held is None:
    return
  if held.record is not None:
    difference = _difference(held.record, new)
    if difference is None:
      return
    what = f"{held.what} ({difference})"
  else:
    what = held.what
  raise DharaError(f"export: {out} holds {what}; choose another --out, or add --force to "
                   "replace it")


def holds(folder: Path) -> Held | None:
  """What `folder` holds: None when it is absent or empty."""
  if not folder.is_dir():
    return None
  names = sorted(p.name for p in folder.iterdir())
  if not names:
    return None
  try:
    held = json.loads((folder / RECORD).read_text())
    run, step, arch = held["run"], held["step"], held["architecture"]
    return Held(held, f"the export of {run} step {step} as {arch}")
  except FileNotFoundError:
    pass
  except (OSError, ValueError, KeyError, TypeError):  # damaged: not ours to judge
    return Held(None, f"an export whose {RECORD} is unreadable")
  if "config.json" in names:
    return Held(None, f"an export without {RECORD} (written by another tool or an older dhara)")
  shown = ", ".join(names[:3]) + (f", … ({len(names)} in all)" if len(names) > 3 else "")
  return Held(None, f"files that are not an export ({shown})")


def _difference(held: dict, new: dict) -> str | None:
  """Why the export `held` describes is not one `new` may replace: None if it may."""
  if held["run"] != new["run"]:
    return "another run"
  if held["architecture"] != new["architecture"]:
    return f"not {new['architecture']}"
  model = held.get("model", {})
  for name, value in new["model"].items():
    if model.get(name) != value:
      return f"another architecture: model.{name} {model.get(name)!r}, not {value!r}"
  return None


@contextlib.contextmanager
def staged(out: str | Path, new: dict) -> Iterator[Path]:
  """A temp folder to write the export into; with its record added, it replaces `out` once the
  block ends. A failure is one line naming `out`, which stays as it was."""
  with whole_folder(out, "export") as folder:
    yield folder
    (folder / RECORD).write_text(json.dumps(new, indent=2) + "\n")
