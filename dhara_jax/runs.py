"""Reading a run directory — the one place every command that reads a run opens it (generate,
eval, convert, export, the benchmarks, the study): its config (parsed once), its checkpoints
(opened once, read-only), the phase its final parameters were trained with, and a
checkpoint's tokenizer and parameters. Also `dhara export` and `dhara import` of run dirs."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
import yaml
from jax.sharding import Mesh

from data_pipeline.tokenizer import Tokenizer, check_tokenizer_fits, load_tokenizer, read_tokenizer
from dhara_jax import config as config_lib
from dhara_jax.checkpoint import Checkpointer
from dhara_jax.config import Config, DataConfig, MeshConfig
from dhara_jax.errors import DharaError
from dhara_jax.export import import_with_phase, place
from dhara_jax.export.card import read_summary, write_model_card
from dhara_jax.export.gguf import transformers_dir
from dhara_jax.export.io import write_hf
from dhara_jax.export.tokenizer import import_tokenizer, write_token_ids, write_tokenizer
from dhara_jax.loop import prepare_run_dir
from dhara_jax.phases import Phase, run_phase
from dhara_jax.sharding import make_mesh
from dhara_jax.train import abstract_state, build, init_state

log = logging.getLogger(__name__)
SINGLE_DEVICE = MeshConfig(data=1, fsdp=1, tensor=1)


def load_run_config(run_dir: Path) -> Config:
  path = Path(run_dir) / "config.yaml"
  if not path.is_file():
    raise DharaError(f"run: {path} not found (is {run_dir} a dhara run directory?)")
  return config_lib.load(path)


def job_mesh() -> Mesh:
  """Every device of the job (all processes) on the batch axis: data parallel, parameters
  replicated — how evaluation, generation and export hold a run's model."""
  return make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1))


@dataclasses.dataclass
class LoadedRun:
  """A run's parameters with what generating from them or scoring with them needs."""

  run_dir: Path
  cfg: Config
  params: Any
  step: int
  tokenizer: Tokenizer
  phase: Phase  # the objective the parameters were trained with


class RunDir:
  """A run directory opened for reading (`open_run`)."""

  def __init__(self, path: Path, cfg: Config, checkpoints: Checkpointer):
    self.path, self.cfg, self.checkpoints = path, cfg, checkpoints
    self.steps = sorted(checkpoints.manager.all_steps())  # on disk, oldest first

  @property
  def phase(self) -> Phase:
    """The objective (and block size) the final parameters were trained with. A conversion's
    resolved config names its last stage's (convert.with_budget), so this is the config's."""
    return run_phase(self.cfg)

  def step(self, step: int | None = None, who: str = "run") -> int:
    """`step` (default: the latest), or one line (from `who`) when the run has no such
    checkpoint."""
    if not self.steps:
      raise DharaError(f"{who}: {self.path} has no checkpoint yet")
    if step is None:
      return self.steps[-1]
    if step not in self.steps:
      raise DharaError(f"{who}: {self.path} has no checkpoint of step {step} (it has "
                       f"{', '.join(map(str, self.steps))})")
    return step

  def saved_tokenizer(self, step: int) -> Tokenizer | None:
    """The tokenizer saved with checkpoint `step` (None for a run that had none)."""
    files = self.checkpoints.restore_tokenizer(step)
    if files is None:
      return None
    where = Path(self.checkpoints.directory) / str(step) / "tokenizer"
    return read_tokenizer(files, f"checkpoint: {where}", where)

  def tokenizer(self, step: int) -> Tokenizer:
    """The tokenizer saved with checkpoint `step`, else (a run that saved none) the config's
    data.tokenizer; one line if neither exists or it has ids the model's embedding lacks."""
    tokenizer = self.saved_tokenizer(step)
    if tokenizer is None:
      tokenizer = load_tokenizer(self.cfg.data.tokenizer)
    check_tokenizer_fits(tokenizer, self.cfg.model)
    return tokenizer

  def params(self, step: int, mesh: Mesh | None = None) -> Any:
    """The parameters of checkpoint `step`, restored straight into their shardings on `mesh`
    (default: `job_mesh()`): in a job of several processes each reads what its own devices
    hold. Every process must ask for the same (orbax's reads are collective)."""
    tx, shardings = build(self.cfg, mesh or job_mesh())
    return self.checkpoints.restore(step, abstract_state(self.cfg, tx, shardings), None)["params"]

  def load(self, step: int | None = None, mesh: Mesh | None = None) -> LoadedRun:
    """Parameters, tokenizer and phase of checkpoint `step` (default: the latest)."""
    step = self.step(step)
    tokenizer = self.tokenizer(step)  # a bad tokenizer fails before the parameters are read
    return LoadedRun(self.path, self.cfg, self.params(step, mesh), step, tokenizer, self.phase)


@contextlib.contextmanager
def open_run(run_dir: str | Path) -> Iterator[RunDir]:
  """The run directory opened for reading: its config, and its checkpoints where it saved them
  (`train.checkpoint_dir`, if set); no directory is made. A missing or foreign dir is one
  line, before orbax looks."""
  path = Path(run_dir)
  cfg = load_run_config(path)
  checkpoints = Checkpointer(path, keep=1_000_000, async_save=False,
                             directory=cfg.train.checkpoint_dir, create=False)
  try:
    yield RunDir(path, cfg, checkpoints)
  finally:
    checkpoints.close()


def load_run(run_dir: str | Path, step: int | None = None) -> LoadedRun:
  """`open_run(run_dir).load(step)`: what one command needs of one checkpoint."""
  with open_run(run_dir) as run:
    return run.load(step)


def export_run(run_dir: Path, out: Path, step: int | None = None, code: str = "auto",
               force: bool = False) -> Path:
  """The transformers directory of checkpoint `step` (default: latest), with the run's
  tokenizer (its special ids then fill config.json) and a README.md model card carrying
  `eval/summary.json` when the run has one. It replaces `out` whole once complete, and only
  an export of the same run and architecture unless `force` (export/place.py)."""
  run_dir = Path(run_dir)
  summary_path = run_dir / "eval" / "summary.json"
  summary = read_summary(summary_path)  # a damaged one fails before anything is written
  with open_run(run_dir) as run:
    cfg, step = run.cfg, run.step(step)
    identity = place.record(run_dir, step, cfg.model, code, run_phase(cfg))
    # Before the checkpoint is read.
    place.check_replaceable(out, identity, force, keep=(str(run.checkpoints.directory),))
    params = run.params(step)
    tokenizer = _export_tokenizer(run, step)
  # Every process reads the checkpoint (orbax's reads are collective) and holds all of the
  # replicated parameters; process 0 alone writes, from the host copy (an op on the global
  # arrays would wait for the others).
  params = jax.tree.map(np.asarray, params)
  if jax.process_index() != 0:
    return Path(out)
  if summary is not None and summary.get("step") not in (None, step):
    log.warning("export: %s is of step %s, the export of step %d", summary_path,
                summary["step"], step)
  num_params = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  with place.staged(out, identity) as folder:
    write_hf(cfg.model, params, folder, code, run_phase(cfg))  # config.json carries the phase
    if tokenizer is not None:
      write_tokenizer(tokenizer, folder, cfg.model.max_seq_len)
      write_token_ids(folder, tokenizer)
    write_model_card(folder, run_dir.resolve().name, summary,
                     {**dataclasses.asdict(cfg.model), "num_params": num_params})
  return Path(out)


def _export_tokenizer(run: RunDir, step: int) -> Tokenizer | None:
  """The run's tokenizer, or None (logged) when it has no usable one."""
  try:
    return run.tokenizer(step)
  except DharaError as e:
    log.warning("export: no tokenizer written (%s)", e)
    return None


def import_into_run(source: Path, run_dir: Path, base: Config | None = None) -> Path:
  """A new run whose step-0 checkpoint holds the imported weights (fresh optimizer state) and
  the source's tokenizer (also copied into the run dir, which data.tokenizer then names);
  `source` is a transformers directory or a GGUF file. The run's train.objective and
  block_size are the export's (config.json's phase): `dhara train RUN_DIR/config.yaml --run-dir
  RUN_DIR` continues from it as it was trained, and generate / eval use its sampler."""
  with transformers_dir(source) as hf_dir:
    model, params, phase = import_with_phase(hf_dir)
    tokenizer = import_tokenizer(hf_dir, model)
  if base is None:  # default data settings, rows at most the imported model's context
    seq_len = min(DataConfig().seq_len, model.max_seq_len)
    base = Config(data=DataConfig(seq_len=seq_len - seq_len % max(phase.block_size, 1)))
  train = dataclasses.replace(base.train, objective=phase.objective, block_size=phase.block_size)
  cfg = dataclasses.replace(base, model=model, train=train, mesh=SINGLE_DEVICE)
  if tokenizer is not None:  # the run's own copy, whatever the base config named
    copy = Path(run_dir).resolve() / tokenizer.main_file
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(copy)))
  cfg.check_rows_fit_model()  # before anything is written: `dhara train` would refuse it
  run_dir = prepare_run_dir(run_dir)
  checkpoints = Checkpointer(run_dir, keep=cfg.train.keep_checkpoints, async_save=False,
                             directory=cfg.train.checkpoint_dir)  # where `dhara train` looks
  if checkpoints.latest_step() is not None:
    raise DharaError(f"import: {run_dir} already holds checkpoints; use an empty --run-dir")
  mesh = make_mesh(cfg.mesh, jax.devices()[:1])
  tx, shardings = build(cfg, mesh)
  state = init_state(cfg, mesh, tx, shardings, jax.device_put(params, shardings["params"]))
  resolved = config_lib.to_dict(cfg)
  (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
  if tokenizer is not None:
    tokenizer.save_to(run_dir)
  checkpoints.save(0, state, None, resolved, tokenizer)
  checkpoints.wait()
  checkpoints.close()
  return run_dir
