"""`dhara convert`: an AR run → a masked-diffusion model (Dhara-70M's recipe, LLaDA 2.0's WSD).

The conversion is a plan over the ordinary training loop (loop.run), not a second loop: the
AR model is block diffusion with block size 1, so warmup climbs the block ladder (1 → 4 → 32 →
64), stable trains `mdm` over the whole row, and decay steps back down (→ 32), with one
learning-rate schedule over all of it. It starts from the AR run's weights with a fresh
optimizer, and ends with the mean of the k decay checkpoints of lowest held-out diffusion loss.
The plan follows from the resolved config alone, so a resumed conversion is in the same stage
at the same step; `conversion.json` in the run dir names the AR checkpoint it started from.
"""

from __future__ import annotations

import dataclasses
import json
from itertools import zip_longest
from pathlib import Path
from typing import Any

import jax

from data_pipeline.config import resolve_input
from data_pipeline.tokenizer import load_tokenizer
from dhara_jax import config as config_lib
from dhara_jax.config import Config
from dhara_jax.errors import ConfigError, DharaError
from dhara_jax.loop import run
from dhara_jax.phases import Phase, Plan, Stage
from dhara_jax.runs import open_run

# Model fields a conversion may change: the attention becomes bidirectional, a mask token
# comes in; everything else must be the AR model's.
DIFFUSION_FIELDS = ("attention", "mask_token_id", "mask_epsilon")
RECORD = "conversion.json"


def conversion_plan(cfg: Config) -> Plan:
  """The WSD stages over `cfg.train.steps` steps (see ConvertConfig)."""
  c, length, total = cfg.convert, cfg.data.seq_len, cfg.train.steps
  _check_ladder(cfg)
  ladder = [("warmup", b, c.warmup_share / len(c.warmup_blocks)) for b in c.warmup_blocks]
  ladder += [("decay", b, c.decay_share / len(c.decay_blocks)) for b in c.decay_blocks]
  steps = {i: round(share * total) for i, (_, _, share) in enumerate(ladder)}
  stable = total - sum(steps.values())
  stages, end = [], 0
  order = [*range(len(c.warmup_blocks)), None, *range(len(c.warmup_blocks), len(ladder))]
  for i in order:
    name, block, count = ("stable", length, stable) if i is None else (*ladder[i][:2], steps[i])
    if count < 1:
      raise ConfigError(f"convert: the {name} stage at block size {block} gets {count} of the "
                        f"{total} conversion steps; raise the token budget (convert.tokens, "
                        f"convert.token_fraction) or its share")
    phase = Phase("mdm") if name == "stable" else Phase("block", block)
    if not stages and c.mask_noise:  # LLaDA 2.0's stabiliser, early in the conversion only
      phase = dataclasses.replace(phase, mask_noise=c.mask_noise)
    end += count
    stages.append(Stage(name, phase, end))
  top_k = c.average_top_k if c.decay_blocks else 0
  return Plan(tuple(stages), average_top_k=top_k, average_stage="decay")


def _check_ladder(cfg: Config) -> None:
  for field in ("warmup_blocks", "decay_blocks"):
    bad = [b for b in getattr(cfg.convert, field) if cfg.data.seq_len % b]
    if bad:
      raise ConfigError(f"convert.{field}: block size {bad[0]} does not divide "
                        f"data.seq_len={cfg.data.seq_len}")


def load_conversion_config(ar_cfg: Config, spec: str | Path, overrides: list[str]) -> Config:
  """The conversion config: the AR run's model, data and mesh sections under what the file (or
  an override) sets, so a recipe names only what conversion changes. A model field that
  changes the architecture beyond DIFFUSION_FIELDS (and the runtime kernels / dtype) is
  refused."""
  raw = config_lib.apply_overrides(config_lib.load_raw(spec), overrides)
  inherited = {k: v for k, v in config_lib.to_dict(ar_cfg).items()
               if k in ("model", "data", "mesh")}
  cfg = config_lib.from_dict(config_lib.merge(inherited, raw))
  ours, theirs = (config_lib.architecture(m) for m in (cfg.model, ar_cfg.model))
  changed = [k for k in ours if k not in DIFFUSION_FIELDS and ours[k] != theirs[k]]
  if changed:
    k = changed[0]
    raise ConfigError(f"convert: the config's model.{k}={ours[k]!r} differs from the AR run's "
                      f"{theirs[k]!r}; a conversion keeps the AR architecture")
  if cfg.model.attention != "bidirectional":
    raise ConfigError("convert: model.attention must be bidirectional (a diffusion model)")
  return cfg


def with_budget(cfg: Config, ar_cfg: Config, ar_step: int) -> Config:
  """`cfg` with train.steps set by the token budget, and the objective the converted model
  ends with (block diffusion at the last decay block size, else mdm)."""
  _check_ladder(cfg)  # before the final block size becomes train.block_size
  row_tokens = cfg.data.batch_size * cfg.data.seq_len
  ar_tokens = ar_step * ar_cfg.data.batch_size * ar_cfg.data.seq_len
  tokens = cfg.convert.tokens or round(cfg.convert.token_fraction * ar_tokens)
  steps = max(1, round(tokens / row_tokens))
  decay = cfg.convert.decay_blocks
  train = dataclasses.replace(cfg.train, steps=steps, objective="block" if decay else "mdm",
                              block_size=decay[-1] if decay else 0)
  return dataclasses.replace(cfg, train=train)


def convert(ar_run: Path, spec: str | Path, overrides: list[str], run_dir: Path,
            ar_step: int | None = None, stop_at: int | None = None,
            progress: bool = True) -> dict:
  """Runs (or resumes) the conversion of `ar_run` into `run_dir`; returns loop.run's summary.
  The AR run is opened once, and stays open while its weights are read into the new run."""
  ar_run, run_dir = Path(ar_run), Path(run_dir)
  with open_run(ar_run) as ar:
    if ar.cfg.train.objective != "ar":
      raise DharaError(f"convert: {ar_run} is not an AR run (train.objective: "
                       f"{ar.cfg.train.objective}); convert an AR run")
    record = _read_record(run_dir)
    # A config without a record is another run (the AR run itself, say): writing the record
    # into it would make it read as a conversion, and the loop would refuse it only afterwards.
    if record is None and (run_dir / "config.yaml").is_file():
      what = ("is the AR run itself" if run_dir.resolve() == ar_run.resolve() else
              f"holds a run that is not a conversion (no {RECORD})")
      raise DharaError(f"convert: --run-dir {run_dir} {what}; use a new --run-dir")
    if record is not None:
      if Path(record["ar_run"]).resolve() != ar_run.resolve():
        raise DharaError(f"convert: {run_dir} is a conversion of {record['ar_run']}, not of "
                         f"{ar_run}; use a new --run-dir")
      ar_step = record["ar_step"] if ar_step is None else ar_step
    ar_step = ar.step(ar_step, who="convert")
    if record is not None and record["ar_step"] != ar_step:
      raise DharaError(f"convert: {run_dir} was started from step {record['ar_step']} of "
                       f"{ar_run}, not {ar_step}; use a new --run-dir")
    cfg = with_budget(load_conversion_config(ar.cfg, spec, overrides), ar.cfg, ar_step)
    plan = conversion_plan(cfg)  # refuses a bad ladder before anything is written
    planned = _plan_record(cfg, plan)
    if record is not None:
      _check_same_plan(run_dir, record, planned)
    tokenizer = ar.tokenizer(ar_step)
    path = resolve_input(cfg.data.tokenizer)
    if path.exists() and load_tokenizer(path).sha256 != tokenizer.sha256:
      raise DharaError(f"convert: data.tokenizer {path} is not the tokenizer {ar_run} was "
                       f"trained with; use its copy in {ar_run}")
    cfg.with_mask_token(tokenizer)  # no usable mask id: refused before anything is written

    def ar_params(run_cfg: Config, mesh: Any) -> Any:
      return ar.params(ar_step, mesh)  # the AR and diffusion shardings agree

    def record_start(run_cfg: Config) -> Plan:
      if record is None and jax.process_index() == 0:
        _write_record(run_dir, {"ar_run": str(ar_run.resolve()), "ar_step": ar_step,
                                **planned})
      return plan

    return run(cfg, run_dir, stop_at=stop_at, progress=progress, plan=record_start,
               initial_params=ar_params, command="convert")


def _read_record(run_dir: Path) -> dict | None:
  path = run_dir / RECORD
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise DharaError(f"convert: {path} is unreadable ({e}); mend or delete it") from None


def _plan_record(cfg: Config, plan: Plan) -> dict:
  """What conversion.json records of the plan: the budget and the stages it makes."""
  stages = []
  for stage in plan.stages:
    phase = stage.phase
    block = f" {phase.block_size}" if phase.objective == "block" else ""
    noise = f" (mask noise {phase.mask_noise:g})" if phase.mask_noise else ""
    stages.append(f"{stage.name} {phase.objective}{block}{noise} to step {stage.last_step}")
  return {"steps": cfg.train.steps,
          "tokens": cfg.train.steps * cfg.data.batch_size * cfg.data.seq_len,
          "stages": stages, "average_top_k": plan.average_top_k}


def _check_same_plan(run_dir: Path, record: dict, planned: dict) -> None:
  """Refuses to resume a conversion under another plan than the one it started with: its
  steps so far followed that one (a record older than `stages` names the budget only)."""
  again = "resume with the settings it started with, or use a new --run-dir"
  if record.get("steps") != planned["steps"]:
    raise DharaError(f"convert: {run_dir} was planned for {record.get('tokens')} tokens "
                     f"({record.get('steps')} steps), this config's budget is "
                     f"{planned['tokens']} tokens ({planned['steps']} steps; convert.tokens, "
                     f"convert.token_fraction); {again}")
  stages = zip_longest(record.get("stages", planned["stages"]), planned["stages"],
                       fillvalue="none")
  for i, (was, now) in enumerate(stages, start=1):
    if was != now:
      raise DharaError(f"convert: {run_dir} was planned with stage {i} '{was}', this config "
                       f"plans '{now}' (convert.*_blocks, convert.*_share); {again}")
  if record.get("average_top_k", planned["average_top_k"]) != planned["average_top_k"]:
    raise DharaError(f"convert: {run_dir} was planned to average the best "
                     f"{record['average_top_k']} decay checkpoints, this config "
                     f"{planned['average_top_k']} (convert.average_top_k); {again}")


def _write_record(run_dir: Path, record: dict) -> None:
  run_dir.mkdir(parents=True, exist_ok=True)
  (run_dir / RECORD).write_text(json.dumps(record, indent=2) + "\n")
