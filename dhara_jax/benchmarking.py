"""Timing helpers shared by the scripts in bench/ (compile once, warm up, block, time)."""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np

from dhara_jax.config import Config, MeshConfig
from dhara_jax.sharding import make_mesh
from dhara_jax.train import build, init_state, make_train_step


def seconds_per_call(fn: Callable[[], Any], steps: int, warmup: int = 1) -> float:
  """Mean wall time of fn() over `steps` calls after `warmup` calls; waits for JAX outputs."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  start = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def train_step_seconds(cfg: Config, tokens_BxL: np.ndarray, steps: int,
                       mesh: MeshConfig = MeshConfig(1, 1, 1)) -> float:
  """Seconds per full dhara-jax train step (forward, backward, clipping, AdamW) on one batch."""
  mesh = make_mesh(mesh, jax.devices()[:mesh.data * mesh.fsdp * mesh.tensor])
  tx, shardings = build(cfg, mesh)
  step = make_train_step(cfg, mesh, tx, shardings)
  batch = {"tokens": np.asarray(tokens_BxL, np.int32),
           "segment_ids": np.ones(tokens_BxL.shape, np.int32)}
  box = {"state": init_state(cfg, mesh, tx, shardings)}

  def one_step():
    box["state"], metrics = step(box["state"], batch)  # the state is donated: keep the new one
    return metrics["loss"]

  return seconds_per_call(one_step, steps)
