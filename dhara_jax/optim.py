"""Optimizer and learning-rate schedules (optax)."""

from __future__ import annotations

from typing import Any

import optax
from flax import traverse_util

from dhara_jax.config import TrainConfig


def learning_rate(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup, then cosine to min_lr, warmup-stable-decay (linear decay over the last
  `decay_fraction` of steps), or constant."""
  warmup = int(round(cfg.warmup_fraction * cfg.steps))
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, cfg.steps, cfg.min_lr)
  if cfg.schedule == "wsd":
    decay = max(1, int(round(cfg.decay_fraction * cfg.steps)))
    stable = cfg.steps - warmup - decay
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, warmup), optax.constant_schedule(cfg.lr),
         optax.linear_schedule(cfg.lr, cfg.min_lr, decay)],
        boundaries=[warmup, warmup + stable])
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup),
                               optax.constant_schedule(cfg.lr)], [warmup])


def decay_mask(params: Any) -> Any:
  """Weight decay on projection matrices and expert stacks only: not on embeddings, norms,
  biases, or the depthwise conv taps of Canon / short-conv layers."""
  def decays(path: tuple[str, ...], leaf: Any) -> bool:
    names = set(path)
    if "embed" in names or "pos_embed" in names or any(n.startswith("canon_") for n in names):
      return False
    return leaf.ndim >= 2 and path[-1] != "conv"

  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: decays(k, v) for k, v in flat.items()})


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """AdamW (f32 moments) with global-norm clipping and the schedule above."""
  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
  parts.append(optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts)
