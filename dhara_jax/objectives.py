"""The objective table: `train.objective` (or a conversion phase) → the loss of one microbatch.

Every objective returns (loss sum, token count, auxiliary loss) so that gradient accumulation
and data-parallel reductions normalise once over the whole batch. The diffusion objectives draw
their masks from a key the train step splits off the state's `rng` (so a resumed run draws the
same masks) for the whole batch before it is cut into microbatches.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from dhara_jax.config import Config, ModelConfig
from dhara_jax.model import forward_hidden, output_head
from dhara_jax.losses import (MaskDraws, ar_loss, block_predictors, diffusion_loss, draw_masks,
                              logit_chunks, noisy_tokens)
from dhara_jax.phases import Phase

Batch = dict[str, jax.Array]


def add_draws(cfg: ModelConfig, phase: Phase, rng: jax.Array, batch: Batch) -> Batch:
  """The batch with this step's masks (nothing for AR)."""
  if not phase.diffusion:
    return batch
  draws = draw_masks(rng, batch["segment_ids"], cfg.mask_epsilon, phase.draw_block())
  return {**batch, "masked": draws.masked_BxL, "mask_prob": draws.prob_BxL}


def loss_sum(cfg: Config, phase: Phase, params: Any, batch: Batch, batch_shards: int = 1,
             noise_rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(loss sum, token count, auxiliary loss) of one microbatch spread over `batch_shards`
  devices, for `phase`'s objective."""
  tokens_BxL = batch["tokens"]
  chunks = logit_chunks(*tokens_BxL.shape, batch_shards, cfg.train.logit_chunk_tokens)
  return OBJECTIVES[phase.objective](cfg.model, phase, params, batch, chunks, noise_rng)


def _ar(model, phase, params, batch, chunks, noise_rng):
  hidden_BxLxD, aux = forward_hidden(model, params, batch["tokens"], batch["segment_ids"],
                                     batch.get("positions"))
  total, count = ar_loss(hidden_BxLxD, output_head(model, params), batch["tokens"],
                         batch["segment_ids"], chunks)
  return total, count, aux


def _diffusion(model, phase, params, batch, chunks, noise_rng):
  """mdm over x_t, or block diffusion over [x_t ; x_0] with its predictor positions."""
  draws = MaskDraws(batch["masked"], batch["mask_prob"])
  x_t = noisy_tokens(batch["tokens"], draws, model.mask_token_id)
  block_size = phase.block_size if phase.objective == "block" else 0
  inputs = jnp.concatenate([x_t, batch["tokens"]], axis=1) if block_size else x_t
  hidden, aux = forward_hidden(model, _with_mask_noise(model, phase, params, noise_rng), inputs,
                               batch["segment_ids"], batch.get("positions"),
                               block_size=block_size)
  predictors_BxLxD = block_predictors(hidden, block_size) if block_size else hidden
  total, count = diffusion_loss(predictors_BxLxD, output_head(model, params), batch["tokens"],
                                batch["segment_ids"], draws, chunks)
  return total, count, aux


def _with_mask_noise(model: ModelConfig, phase: Phase, params: Any,
                     noise_rng: jax.Array | None) -> Any:
  """Params whose mask-token input embedding carries fresh Gaussian noise (LLaDA 2.0's
  stabiliser early in a conversion); the output head keeps the clean table."""
  if not phase.mask_noise or noise_rng is None:
    return params
  table_VxD = jnp.asarray(params["embed"]["embedding"])
  noise_D = phase.mask_noise * jax.random.normal(noise_rng, table_VxD.shape[1:],
                                                 table_VxD.dtype)
  embed = {**params["embed"], "embedding": table_VxD.at[model.mask_token_id].add(noise_D)}
  return {**params, "embed": embed}


OBJECTIVES: dict[str, Callable] = {"ar": _ar, "mdm": _diffusion, "block": _diffusion}
