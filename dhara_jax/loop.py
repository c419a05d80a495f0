"""`dhara train`: the training loop around the sharded train step.

RUN_DIR holds config.yaml (resolved), the tokenizer, metrics.jsonl, tensorboard/ and
checkpoints/. A run resumes from its latest checkpoint by default; a checkpoint is written every
`train.checkpoint_every` steps and at the end, never for a non-finite loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import yaml
from jax.sharding import Mesh

from data_pipeline.tokenizer import files_sha256
from dhara_jax import config as config_lib
from dhara_jax import distributed
from dhara_jax.checkpoint import (Checkpointer, checkpoint_directory, ensure_writable,
                                  holds_checkpoint)
from dhara_jax.config import Config
from dhara_jax.errors import DharaError
from dhara_jax.metrics import MetricsWriter, mfu
from dhara_jax.model import kernel_choices
from dhara_jax.params import count_params
from dhara_jax.phases import Phase, Plan, run_plan
from dhara_jax.sharding import make_mesh
from dhara_jax.stopping import DataStop, SavedPosition, StopSignals, next_batch
from dhara_jax.train import (abstract_state, build, init_state, make_eval_step,
                             make_train_step)


def prepare_run_dir(run_dir: Path) -> Path:
  run_dir = Path(run_dir)
  ensure_writable(run_dir, "run dir")
  return run_dir


@contextlib.contextmanager
def exclusive_use(run_dir: Path) -> Iterator[None]:
  """Holds RUN_DIR/.lock while training: a second `dhara train` on the same run dir would
  interleave its checkpoints and metrics with this one's. The OS drops the lock when the
  process ends, however it ends (a killed run resumes without cleanup)."""
  if jax.process_index() != 0:  # one holder per run, also when hosts share the run dir
    yield
    return
  with open(run_dir / ".lock", "a") as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise DharaError(f"train: another dhara train is using {run_dir}; wait for it to end "
                       "or use another --run-dir") from None
    except OSError:  # a file system without locks (some network mounts): train unguarded
      pass
    yield


def architecture_diff(saved_model: dict, model: dict) -> list[str]:
  """How a checkpoint's model section and the config's differ in what they compute, compared
  resolved (`config.architecture`): a run imported from transformers continues with the preset
  it came from, however each spells head_dim or layer_pattern."""
  known = {f.name for f in dataclasses.fields(config_lib.ModelConfig)}
  unknown = [f"model.{k}: checkpoint {v!r}, config has no such field"
             for k, v in saved_model.items() if k not in known]
  sides = [{k: v for k, v in m.items() if k in known} for m in (saved_model, model)]
  try:  # fields a checkpoint omits (it is older than them) take their defaults
    saved, current = (config_lib.architecture(config_lib.ModelConfig(**m)) for m in sides)
  except (DharaError, TypeError):  # values this version refuses: compare them as written
    saved, current = ({k: v for k, v in m.items() if k not in config_lib.RUNTIME_FIELDS}
                      for m in sides)
  return unknown + [f"model.{k}: checkpoint {saved.get(k)!r}, config {v!r}"
                    for k, v in current.items() if saved.get(k) != v]


def evaluate(eval_step: Callable, params: Any, batches: Iterator[dict], count: int,
             fetch: Callable[[Iterator[dict]], dict] = next) -> float:
  total, tokens = 0.0, 0.0
  for index in range(count):
    out = eval_step(params, model_inputs(fetch(batches)), index)
    total += float(out["loss_sum"])
    tokens += float(out["tokens"])
  return total / max(tokens, 1.0)


@dataclasses.dataclass
class Data:
  """What the loop needs from the data pipeline."""

  train: Any  # iterator of batch dicts with get_state / set_state (grain DatasetIterator)
  eval_batches: Callable[[], Iterator[dict]] | None  # a fresh held-out iterator per evaluation
  tokenizer: Any = None  # data_pipeline.Tokenizer: saved with every checkpoint, in the run dir


MODEL_INPUTS = ("tokens", "segment_ids", "positions")


def pipeline_data(cfg: Config, mesh: Mesh) -> Data:
  """The configured data pipeline: train batches, held-out batches, the tokenizer."""
  from data_pipeline import (check_tokenizer_fits, load_tokenizer, make_eval_iterator,
                             make_train_iterator)

  tokenizer = load_tokenizer(cfg.data.tokenizer)
  check_tokenizer_fits(tokenizer, cfg.model)
  tokenizer.required_id("eos", "separates documents in packed rows")
  train = make_train_iterator(cfg.data, mesh, tokenizer=tokenizer)
  held_out = None
  if cfg.data.eval_fraction > 0:
    held_out = lambda: make_eval_iterator(cfg.data, mesh, tokenizer=tokenizer)
  return Data(train, held_out, tokenizer)


def model_inputs(batch: dict) -> dict:
  return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def run(cfg: Config, run_dir: Path, data: Callable[[Config, Mesh], Data] = pipeline_data, *,
        stop_at: int | None = None, progress: bool = True,
        plan: Callable[[Config], Plan] = run_plan,
        initial_params: Callable[[Config, Any], Any] | None = None,
        command: str = "train") -> dict:
  """Trains until `train.steps` (or `stop_at`, if earlier); returns a summary dict.

  `plan` gives each step's objective (one stage for `dhara train`, the WSD ladder for
  `dhara convert`); `initial_params(cfg, mesh)`, when given, starts a new run from those
  weights (in the run's parameter shardings on `mesh`, with a fresh optimizer) instead of
  random ones. `command` names the run in a stop's message (`convert: stopped by SIGTERM`)."""
  if cfg.train.multihost:  # before anything touches JAX; a no-op if the CLI started the job
    distributed.start(distributed.Launch(detect=True), preemption=True)
  cfg.check_rows_fit_model()
  cfg.check_objective_fits_model()
  kernel_choices(cfg.model)
  # Both dirs are checked before any data is read. A checkpoint dir of its own goes first, so
  # that refusing it leaves no empty run dir behind; the default one lives in the run dir.
  checkpoint_dir = checkpoint_directory(run_dir, cfg.train.checkpoint_dir)
  new_dirs = [Path(d) for d in (checkpoint_dir, run_dir) if "://" not in str(d)
              and not Path(d).exists()]
  if cfg.train.checkpoint_dir:
    ensure_writable(checkpoint_dir, "checkpoint dir")
  run_dir = prepare_run_dir(run_dir)
  if not cfg.train.checkpoint_dir:
    ensure_writable(checkpoint_dir, "checkpoint dir")
  with _removed_if_left_empty(new_dirs):  # a start that fails (data, mesh) leaves no trace
    mesh = make_mesh(cfg.mesh)
    data = data(cfg, mesh)
    cfg = cfg.with_mask_token(data.tokenizer)
    tx, shardings = build(cfg, mesh)
    # A new run's starting weights are read before the run dir gets its lock or the plan its
    # record: a source checkpoint that fails to read (a conversion's AR run) leaves no trace.
    start_params = (initial_params(cfg, mesh)
                    if initial_params is not None and not holds_checkpoint(checkpoint_dir)
                    else None)
    steps_plan = plan(cfg)
  resolved = config_lib.to_dict(cfg)
  with contextlib.ExitStack() as cleanup:
    cleanup.enter_context(exclusive_use(run_dir))
    checkpoints = Checkpointer(run_dir, cfg.train.keep_checkpoints, cfg.train.async_checkpoint,
                               cfg.train.checkpoint_dir, best=steps_plan.average_top_k)
    cleanup.callback(checkpoints.close)
    cleanup.callback(checkpoints.wait)  # runs first: pending async saves finish, even on errors
    latest = checkpoints.latest_step()
    if latest is not None:
      problems = architecture_diff(checkpoints.saved_config(latest)["model"], resolved["model"])
      if problems:
        raise DharaError(f"train: {run_dir} holds a checkpoint of another architecture "
                         f"({problems[0]}); use a new --run-dir")
      saved_files = checkpoints.restore_tokenizer(latest)
      if (saved_files is not None and data.tokenizer is not None
          and files_sha256(saved_files) != data.tokenizer.sha256):
        raise DharaError(f"train: {run_dir} was trained with another tokenizer than "
                         f"{data.tokenizer.path} (its checkpoint holds the one it used); use a "
                         f"new --run-dir, or set data.tokenizer to the run's copy in {run_dir}")
      state = checkpoints.restore(latest, abstract_state(cfg, tx, shardings), data.train)
    else:
      if initial_params is not None and start_params is None:  # a checkpoint was seen above
        start_params = initial_params(cfg, mesh)
      state = init_state(cfg, mesh, tx, shardings, start_params)
      if jax.process_index() == 0:  # one writer on a shared run dir
        (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        if data.tokenizer is not None:
          data.tokenizer.save_to(run_dir)
    metrics = MetricsWriter(run_dir, resume_step=latest)
    cleanup.callback(metrics.close)
    signals = cleanup.enter_context(StopSignals(several=jax.process_count() > 1))
    return _loop(cfg, mesh, tx, shardings, state, data, checkpoints, metrics, resolved,
                 start=latest or 0, last=min(cfg.train.steps, stop_at or cfg.train.steps),
                 last_good=latest, progress=progress, signals=signals, plan=steps_plan,
                 command=command)


@contextlib.contextmanager
def _removed_if_left_empty(directories: list[Path]) -> Iterator[None]:
  """On an error, removes those of `directories` (made by this run, children first) that are
  still empty; rmdir never removes a directory with anything in it."""
  try:
    yield
  except BaseException:
    for directory in directories:
      with contextlib.suppress(OSError):
        directory.rmdir()
    raise


class _Steps:
  """The compiled train and eval steps, one per phase (a conversion has a handful)."""

  def __init__(self, cfg: Config, mesh: Mesh, tx: Any, shardings: Any):
    self.cfg, self.mesh, self.tx, self.shardings = cfg, mesh, tx, shardings
    # The held-out diffusion loss is the mdm ELBO over the whole row whatever a phase trains:
    # comparable across phases, runs and families.
    self.diffusion_cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, attention="bidirectional"))
    self._train: dict[Phase, Callable] = {}
    self._eval: dict[tuple[bool, Phase], Callable] = {}

  def train(self, phase: Phase) -> Callable:
    if phase not in self._train:
      self._train[phase] = make_train_step(self.cfg, self.mesh, self.tx, self.shardings, phase)
    return self._train[phase]

  def eval(self, phase: Phase, diffusion: bool = False) -> Callable:
    phase = dataclasses.replace(phase, mask_noise=0.0)  # noise is a training device only
    key = (diffusion, phase)
    if key not in self._eval:
      cfg = self.diffusion_cfg if diffusion else self.cfg
      self._eval[key] = make_eval_step(cfg, self.mesh, self.shardings, phase)
    return self._eval[key]


def _loop(cfg: Config, mesh: Mesh, tx: Any, shardings: Any, state: Any, data: Data,
          checkpoints: Checkpointer, metrics: MetricsWriter, resolved: dict, *, start: int,
          last: int, last_good: int | None, progress: bool, signals: StopSignals,
          plan: Plan, command: str) -> dict:
  steps = _Steps(cfg, mesh, tx, shardings)
  flops_per_token = count_params(cfg.model, cfg.data.seq_len)["flops_per_token"]
  epochs = f" (data.num_epochs={cfg.data.num_epochs})"
  next_train = functools.partial(
      next_batch, signals=signals, timeout_s=cfg.data.wait_timeout_s, what="training batch",
      ran_out=f"the training data ran out before train.steps={cfg.train.steps}{epochs}")
  # A step's held-out evaluation is part of the step: a stop signal waits for it (and for the
  # final averaging) to end, so no step is saved owing its row. Its waits stay bounded by the
  # timeout, and a second signal still ends the run at once.
  next_held_out = functools.partial(
      next_batch, signals=StopSignals(enabled=False), timeout_s=cfg.data.wait_timeout_s,
      what="held-out batch",
      ran_out=f"the held-out data ran out before train.eval_batches={cfg.train.eval_batches}"
              f"{epochs}")

  def held_out_loss(params: Any, phase: Phase, diffusion: bool = False) -> float:
    try:
      return evaluate(steps.eval(phase, diffusion), params, data.eval_batches(),
                      cfg.train.eval_batches, next_held_out)
    except DataStop:
      raise
    except DharaError as e:  # opening the held-out stream again failed
      raise DataStop(str(e)) from None

  def held_out(params: Any, phase: Phase) -> dict[str, float]:
    """`eval_loss` of the phase's objective, and in diffusion runs `diffusion_loss`."""
    out = {"eval_loss": held_out_loss(params, phase)}
    if plan.diffusion:
      out["diffusion_loss"] = (out["eval_loss"] if phase.objective == "mdm" else
                               held_out_loss(params, Phase("mdm"), diffusion=True))
    return out

  evaluating = data.eval_batches is not None and cfg.train.eval_every > 0
  bar = _progress(progress, start, last)
  loss = row = None
  evals: dict[str, float] = {}
  # The last step that owes nothing more (its row is written) and the stream position after it:
  # what a stop saves. `state` is that step's unless a step trained since (`row` is set).
  done, position = start, SavedPosition(data.train.get_state())
  try:
    if start == 0 and evaluating:
      evals = held_out(state["params"], plan.stage_at(1).phase)
      metrics.write({"step": 0, **evals})
    for step in range(start + 1, last + 1):
      stage = plan.stage_at(step)
      train_step = steps.train(stage.phase)
      started = time.perf_counter()
      state, out = train_step(state, model_inputs(next_train(data.train)))
      loss = float(out["loss"])  # also waits for the step: timings below are real
      grad_norm, param_norm = float(out["grad_norm"]), float(out["param_norm"])
      if not all(map(math.isfinite, (loss, grad_norm, param_norm))):
        kept = (f"last good checkpoint is step {last_good} in {checkpoints.directory}"
                if last_good is not None else "no checkpoint was written")
        raise DharaError(f"train: non-finite values at step {step} (loss {loss}, grad norm "
                         f"{grad_norm}, param norm {param_norm}); stopped, {kept}")
      tokens_per_second = float(out["tokens"]) / (time.perf_counter() - started)
      row = {"step": step, "loss": loss, "perplexity": math.exp(min(loss, 50.0)),
             "lr": float(out["lr"]), "grad_norm": grad_norm, "param_norm": param_norm,
             "tokens_per_second": tokens_per_second,
             "mfu": mfu(flops_per_token, tokens_per_second)}
      if plan.diffusion:
        row.update(phase=stage.name, objective=stage.phase.objective,
                   block_size=stage.phase.block_size or cfg.data.seq_len)
      evaluated = evaluating and (step % cfg.train.eval_every == 0 or step == last)
      if evaluated:
        evals = held_out(state["params"], stage.phase)
        row.update(evals)
      # An averaging stage keeps its evaluated checkpoints, ranked by their diffusion loss.
      score = (evals["diffusion_loss"] if evaluated and plan.average_top_k
               and stage.name == plan.average_stage else None)
      if step == plan.stages[-1].last_step and plan.average_top_k:
        state, averaged = _average_best(cfg, tx, shardings, checkpoints, state, step, score,
                                        plan.average_top_k)
        row["averaged_steps"] = averaged
        if evaluating:  # the average's own held-out losses
          evals = held_out(state["params"], stage.phase)
          row.update({f"averaged_{k}": v for k, v in evals.items()})
        score = None  # the average is no candidate
      metrics.write(row)
      row = None
      done, position = step, SavedPosition(data.train.get_state())
      stopping = signals.requested(step)
      if ((cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0)
          or step == last or stopping or score is not None):
        checkpoints.save(step, state, data.train, resolved, data.tokenizer, score)
        last_good = step
      bar(step, loss)
      if stopping and step < last:
        raise DharaError(_stopped(f"{command}: stopped by {signals.received}", step, last_good,
                                  checkpoints.directory))
  except DataStop as stop:
    # A step whose evaluation failed (`row` unwritten) is not saved: it trains again on resume,
    # from the checkpoint before it, and its row comes out whole. Hosts cannot agree to save.
    if row is None and done > (last_good or 0) and jax.process_count() == 1:
      checkpoints.save(done, state, position, resolved, data.tokenizer)
      last_good = done
    # A signal met while waiting for data reads as one met during a step.
    why = f"{command}: stopped by {stop.signal}" if stop.signal else f"{stop}; stopped"
    raise DataStop(_stopped(why, done, last_good, checkpoints.directory, mend=not stop.signal),
                   stop.signal, stop.stuck) from None
  return {"steps": last, "start_step": start, "final_loss": loss,
          "eval_loss": evals.get("eval_loss"), "diffusion_loss": evals.get("diffusion_loss"),
          "state": state}


def _average_best(cfg: Config, tx: Any, shardings: Any, checkpoints: Checkpointer, state: Any,
                  step: int, score: float | None, k: int) -> tuple[Any, list[int]]:
  """The state with its parameters replaced by the mean of the k best-scoring checkpoints'
  (this step's own, scored `score`, among them); and those steps, best first."""
  checkpoints.wait()  # a candidate may still be being written, its score not yet readable
  scores = checkpoints.scores()
  if score is not None:
    scores[step] = score
  best = sorted(scores, key=lambda s: (scores[s], s))[:k]
  if not best:  # nothing was evaluated in the averaging stage: keep the last state
    return state, []
  target = abstract_state(cfg, tx, shardings)
  params = [state["params"] if s == step else checkpoints.restore(s, target, None)["params"]
            for s in best]
  mean = jax.jit(lambda *p: jax.tree.map(lambda *x: sum(x) / len(x), *p),
                 out_shardings=shardings["params"])(*params)
  return {**state, "params": mean}, best


def _stopped(why: str, done: int, last_good: int | None, directory: Any,
             mend: bool = False) -> str:
  """The one line a run that stops early ends with: why, what is saved, how to go on."""
  kept = ("checkpoint saved in" if last_good == done else
          f"latest checkpoint is step {last_good} in" if last_good is not None else
          "no checkpoint in")
  return (f"{why} after step {done}, {kept} {directory}; "
          f"{'mend that and ' if mend else ''}run the same command to resume")


def _progress(enabled: bool, start: int, last: int) -> Callable[[int, float], None]:
  if not enabled or jax.process_index() != 0:
    return lambda step, loss: None
  from tqdm import tqdm

  bar = tqdm(total=last, initial=start, unit="step", dynamic_ncols=True,
             disable=not os.isatty(2) and None)

  def update(step: int, loss: float) -> None:
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.3f}")
    if step == last:
      bar.close()

  return update
