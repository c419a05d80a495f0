"""What a run optimises at each step: a plan of stages, each a phase (objective + settings).

A `dhara train` run is one stage for all its steps. A conversion (`dhara convert`, convert.py) is
the WSD ladder over the block size: warmup stages, the stable `mdm` stage, decay stages. The
plan is a function of the resolved config alone, so a resumed run is in the same stage at the
same step; the training loop asks it for each step's phase and compiles one train step per
phase.
"""

from __future__ import annotations

import dataclasses

from dhara_jax.config import Config


@dataclasses.dataclass(frozen=True)
class Phase:
  """One objective and its settings (hashable: the loop keys compiled steps by it)."""

  objective: str = "ar"
  block_size: int = 0  # block objective: tokens per block
  mask_noise: float = 0.0  # std of Gaussian noise on the mask token's input embedding

  @property
  def diffusion(self) -> bool:
    return self.objective != "ar"

  def draw_block(self) -> int:
    """Tokens per noise level: a block for `block`, the whole row for `mdm`."""
    return self.block_size if self.objective == "block" else 0


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str  # metrics' `phase`: train, or warmup / stable / decay in a conversion
  phase: Phase
  last_step: int  # the stage runs up to and including this step


@dataclasses.dataclass(frozen=True)
class Plan:
  stages: tuple[Stage, ...]
  # At the last step, average the parameters of the k checkpoints of the `average_stage`
  # stages with the lowest held-out diffusion loss (0: off).
  average_top_k: int = 0
  average_stage: str = "decay"

  def stage_at(self, step: int) -> Stage:
    """The stage step `step` (1-based) belongs to; the last one past the plan's end."""
    return next((s for s in self.stages if step <= s.last_step), self.stages[-1])

  @property
  def diffusion(self) -> bool:
    """Whether rows report the held-out diffusion loss (the `mdm` ELBO) and name stages."""
    return any(s.phase.diffusion for s in self.stages)


def run_phase(cfg: Config) -> Phase:
  """The phase of a plain `dhara train` run."""
  return Phase(cfg.train.objective, cfg.train.block_size)


def run_plan(cfg: Config) -> Plan:
  return Plan((Stage("train", run_phase(cfg), cfg.train.steps),))
