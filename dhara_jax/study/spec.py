"""A study config (configs/studies/*.yaml): the grid's cells, the sections they share, the
evaluation and the throughput settings. Loading one checks every cell's run config, so a grid
with a bad cell fails before anything trains.

    study: tiny                      # the name OUT/study.json records
    description: ...
    setup: [tokenizer, data]         # optional: `dhara tokenizer train` / `dhara data prepare`
    step_timeout_minutes: 30         # one train / convert / eval / throughput process at most
    shared: {model: ..., data: ..., train: ..., mesh: ...}  # over every trained cell's preset
    eval: {tasks: codelion, limit: 20, data_dir: null, mc_samples: 8, gen_kwargs: null}
    throughput: {new_tokens: 100, batch: 1, runs: 3, prompt_tokens: 16,
                 diffusion: {steps: 0, block_length: 0, threshold: 0.0, cache: auto}}
    cells:
      - {name: gpt2_12l, label: GPT-2 12L, tables: [shapes], preset: shapes/gpt2_70m,
         set: {model: {d_model: 64}}}                     # trained: preset ← shared ← set
      - {name: dhara_70m, tables: [families], convert: llama3_canon, recipe: runs/wsd}
                                                      # converted: recipe ← set
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from dhara_jax import config as config_lib
from dhara_jax.errors import ConfigError, DharaError
from dhara_jax.sampler_options import SAMPLER_KEYS

TABLES = ("shapes", "families")
SETUP_STEPS = ("tokenizer", "data")


@dataclasses.dataclass(frozen=True)
class Cell:
  name: str
  label: str
  tables: tuple[str, ...]
  preset: str | None  # trained cells: a run config or preset
  parent: str | None  # converted cells: the AR cell they start from
  recipe: str | None  # converted cells: the conversion recipe
  raw: dict  # the composed config: preset ← shared ← set, or recipe ← set

  @property
  def converted(self) -> bool:
    return self.parent is not None

  @property
  def diffusion(self) -> bool:
    return self.converted or self.raw.get("train", {}).get("objective", "ar") != "ar"

  def fingerprint(self) -> str:
    """Changes whenever the cell's run config does (a resumed run must be the same run)."""
    text = json.dumps([self.preset, self.parent, self.recipe, self.raw], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  tasks: str = "codelion"
  limit: int | None = None
  data_dir: str | None = None
  mc_samples: int | None = None  # diffusion cells only; None: dhara eval's default
  gen_kwargs: str | None = None


@dataclasses.dataclass(frozen=True)
class ThroughputSettings:
  new_tokens: int = 100  # Dhara's protocol: 100 new tokens per prompt, batch 1
  batch: int = 1
  runs: int = 3
  prompt_tokens: int = 16
  diffusion: tuple[tuple[str, Any], ...] = ()  # sampler settings for diffusion cells


@dataclasses.dataclass(frozen=True)
class Study:
  name: str
  description: str
  path: Path
  cells: tuple[Cell, ...]
  eval: EvalSettings
  throughput: ThroughputSettings
  setup: tuple[str, ...] = ()
  shared: dict = dataclasses.field(default_factory=dict)
  step_timeout_minutes: float = 24 * 60

  def cell(self, name: str) -> Cell:
    return next(c for c in self.cells if c.name == name)

  def ordered(self) -> list[Cell]:
    """Trained cells first (in grid order), then conversions: a parent finishes first."""
    return [c for c in self.cells if not c.converted] + [c for c in self.cells if c.converted]


def is_study(spec: str | Path) -> bool:
  """Whether a config file is a study (it has `cells:`) rather than a run config."""
  path = Path(spec)
  if not path.is_file():
    return False
  try:
    raw = config_lib.read_yaml(path)
  except ConfigError:
    return False
  return isinstance(raw, Mapping) and "cells" in raw


def load(path: str | Path) -> Study:
  path = Path(path)
  if not path.is_file():
    raise DharaError(f"study: no such study config: {path}")
  try:
    raw = config_lib.read_yaml(path)
  except ConfigError as e:
    raise DharaError(f"study: {str(e).removeprefix('config: ')}") from None
  if not isinstance(raw, Mapping) or not isinstance(raw.get("cells"), list) or not raw["cells"]:
    raise DharaError(f"study: {path} needs a non-empty `cells:` list")
  known = {"study", "description", "setup", "step_timeout_minutes", "shared", "eval",
           "throughput", "cells"}
  if unknown := sorted(set(raw) - known):
    raise DharaError(f"study: {path}: unknown key {unknown[0]!r} (known: "
                     f"{', '.join(sorted(known))})")
  name = raw.get("study")
  if not isinstance(name, str) or not name:
    raise DharaError(f"study: {path} needs `study: NAME`")
  shared = raw.get("shared") or {}
  if not isinstance(shared, Mapping):
    raise DharaError(f"study: {path}: `shared:` must be a mapping of config sections")
  if "base" in shared:  # e.g. the data mix's own config file, under the shared sections
    shared = dict(shared)
    bases = shared.pop("base")
    merged: dict = {}
    for base in bases if isinstance(bases, list) else [bases]:
      merged = config_lib.merge(merged, _load_raw(path, base, f"study: {path}: shared"))
    shared = config_lib.merge(merged, shared)
  setup = tuple(raw.get("setup") or ())
  if bad := [s for s in setup if s not in SETUP_STEPS]:
    raise DharaError(f"study: {path}: setup step {bad[0]!r} is not one of "
                     f"{', '.join(SETUP_STEPS)}")
  timeout = raw.get("step_timeout_minutes", 24 * 60)
  if not isinstance(timeout, (int, float)) or timeout <= 0:
    raise DharaError(f"study: {path}: step_timeout_minutes must be a positive number")
  cells = _cells(path, raw["cells"], dict(shared))
  return Study(name=name, description=str(raw.get("description") or ""), path=path,
               cells=cells, eval=_settings(EvalSettings, raw.get("eval"), path, "eval"),
               throughput=_throughput(raw.get("throughput"), path), setup=setup,
               shared=dict(shared), step_timeout_minutes=float(timeout))


def _cells(path: Path, items: list, shared: dict) -> tuple[Cell, ...]:
  cells: list[Cell] = []
  for i, item in enumerate(items):
    if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
      raise DharaError(f"study: {path}: cell {i + 1} needs a `name:`")
    name = item["name"]
    where = f"study: {path}: cell {name!r}"
    if any(c.name == name for c in cells):
      raise DharaError(f"{where}: two cells are named {name!r}")
    if unknown := sorted(set(item) - {"name", "label", "tables", "preset", "convert", "recipe",
                                      "set"}):
      raise DharaError(f"{where}: unknown key {unknown[0]!r}")
    tables = tuple(item.get("tables") or ("families",))
    if bad := [t for t in tables if t not in TABLES]:
      raise DharaError(f"{where}: table {bad[0]!r} is not one of {', '.join(TABLES)}")
    overrides = item.get("set") or {}
    if not isinstance(overrides, Mapping):
      raise DharaError(f"{where}: `set:` must be a mapping of config sections")
    parent, recipe, preset = item.get("convert"), item.get("recipe"), item.get("preset")
    if (parent is None) == (preset is None):
      raise DharaError(f"{where}: give either `preset:` (a trained cell) or `convert:` (the AR "
                       "cell it converts)")
    if parent is not None:
      if recipe is None:
        raise DharaError(f"{where}: a conversion cell needs `recipe:` (e.g. runs/wsd)")
      raw = config_lib.merge(_load_raw(path, recipe, where), overrides)
    else:
      raw = config_lib.merge(config_lib.merge(_load_raw(path, preset, where), shared), overrides)
    cell = Cell(name=name, label=str(item.get("label") or name), tables=tables, preset=preset,
                parent=parent, recipe=recipe, raw=raw)
    _check(cell, where)
    cells.append(cell)
  names = {c.name: c for c in cells}
  for c in cells:
    if c.converted and c.parent not in names:
      raise DharaError(f"study: {path}: cell {c.name!r} converts {c.parent!r}, which is not a "
                       f"cell of the grid (cells: {', '.join(names)})")
    if c.converted and names[c.parent].diffusion:
      raise DharaError(f"study: {path}: cell {c.name!r} converts {c.parent!r}, which is not an "
                       "AR cell")
  return tuple(cells)


def _load_raw(path: Path, preset: Any, where: str) -> dict:
  if not isinstance(preset, str):
    raise DharaError(f"{where}: a preset must be a file or preset name, got {preset!r}")
  beside = path.parent / preset
  try:
    return config_lib.load_raw(beside if beside.is_file() else preset)
  except ConfigError as e:
    raise DharaError(f"{where}: {str(e).removeprefix('config: ')}") from None


def _check(cell: Cell, where: str) -> None:
  """Builds the cell's config: a bad key or value fails here, not hours into the grid."""
  try:
    cfg = config_lib.from_dict(cell.raw)
    if not cell.converted:
      cfg.check_objective_fits_model()
      cfg.check_rows_fit_model()
  except ConfigError as e:
    raise DharaError(f"{where}: {e}") from None


def run_config(study: Study, cell: Cell) -> config_lib.Config:
  """The cell's run config: its own, or for a conversion the recipe's sections over its
  parent's (as `dhara convert` builds it)."""
  if not cell.converted:
    return config_lib.from_dict(cell.raw)
  return config_lib.from_dict(config_lib.merge(study.cell(cell.parent).raw, cell.raw))


def _settings(cls: type, raw: Any, path: Path, section: str) -> Any:
  raw = raw or {}
  if not isinstance(raw, Mapping):
    raise DharaError(f"study: {path}: `{section}:` must be a mapping")
  fields = {f.name for f in dataclasses.fields(cls)}
  if unknown := sorted(set(raw) - fields):
    raise DharaError(f"study: {path}: {section}.{unknown[0]} is not a setting (known: "
                     f"{', '.join(sorted(fields))})")
  return cls(**raw)


def _throughput(raw: Any, path: Path) -> ThroughputSettings:
  raw = dict(raw or {})
  diffusion = raw.pop("diffusion", None) or {}
  if not isinstance(diffusion, Mapping) or set(diffusion) - set(SAMPLER_KEYS):
    raise DharaError(f"study: {path}: throughput.diffusion takes {', '.join(SAMPLER_KEYS)}")
  out = _settings(ThroughputSettings, raw, path, "throughput")
  for field in ("new_tokens", "batch", "runs", "prompt_tokens"):
    if not isinstance(getattr(out, field), int) or getattr(out, field) < 1:
      raise DharaError(f"study: {path}: throughput.{field} must be a positive integer")
  return dataclasses.replace(out, diffusion=tuple(sorted(diffusion.items())))
