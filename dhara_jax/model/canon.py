"""Canon layers (Allen-Zhu, Physics of Language Models 4.1): h + causal_depthwise_conv(h).

Positions in a pre-norm block (PhysicsLM4 semantics): A after the mixer pre-norm, B on the
concatenated q/k/v projections (after QK-norm, before RoPE; on LFM2 conv layers, on the in_proj
output), C after the MLP pre-norm, D on the gated MLP activation. The conv stays causal in
bidirectional (diffusion) mode so AR weights transfer 1:1, and taps reset at document boundaries.
In block-diffusion mode ([x_t ; x_0], `block_size` > 0) x_t's taps into earlier blocks read x_0
(model/conv.py `block_diffusion_conv`).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from dhara_jax.config import ModelConfig
from dhara_jax.kernels.canon import canon_conv, resolve_impl
from dhara_jax.model.cache import Decode, cached_conv
from dhara_jax.model.conv import block_diffusion_conv
from dhara_jax.sharding import per_batch_shard


def torch_conv_init(kernel: int) -> nn.initializers.Initializer:
  """PyTorch Conv1d's default for a depthwise conv: uniform(±1/sqrt(fan_in)), fan_in = K."""
  bound = 1.0 / math.sqrt(kernel)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _requested_impl(cfg: ModelConfig) -> str | None:
  """`model.canon_impl` as canon_conv takes it: None (auto) lets $DHARA_CANON_IMPL choose."""
  return None if cfg.canon_impl == "auto" else cfg.canon_impl


def conv_impl(cfg: ModelConfig) -> str:
  """The Canon conv kernel this config runs on the default backend."""
  return resolve_impl(_requested_impl(cfg))


def conv(cfg: ModelConfig, h_BxLxC: jax.Array, w_KxC: jax.Array,
         segment_ids_BxL: jax.Array, block_size: int = 0) -> jax.Array:
  """The Canon conv with the configured kernel; with `block_size` > 0, h is [x_t ; x_0]
  (B×2L×C) and segment_ids B×L (see `block_diffusion_conv`).

  Under a multi-device mesh every kernel but the plain-jnp reference runs per batch shard in
  `shard_map` (never split over time: the K-1 halo would cross devices). XLA cannot partition a
  Pallas call at all, and its SPMD partitioner doubles the grouped-conv weight gradient when the
  activations are replicated over `tensor` (seen with jax 0.10.2; tests/test_canon_model.py).
  """
  return block_diffusion_conv(_kernel(cfg), h_BxLxC, w_KxC, segment_ids_BxL, block_size)


def _kernel(cfg: ModelConfig):
  fn = functools.partial(canon_conv, impl=_requested_impl(cfg))
  if conv_impl(cfg) != "reference":
    fn = per_batch_shard(fn, split=(True, False, True))
  return fn


class Canon(nn.Module):
  cfg: ModelConfig
  block_size: int = 0  # > 0: h is the block-diffusion row [x_t ; x_0], segment ids x_0's

  @nn.compact
  def __call__(self, h_BxLxC: jax.Array, segment_ids_BxL: jax.Array,
               decode: Decode | None = None) -> jax.Array:
    cfg = self.cfg
    channels = h_BxLxC.shape[-1]
    w_KxC = self.param("kernel", nn.with_logical_partitioning(
        torch_conv_init(cfg.canon_kernel), ("conv_kernel", "canon_channels")),
                       (cfg.canon_kernel, channels), jnp.float32)
    if decode is None:
      y_BxLxC = conv(cfg, h_BxLxC, w_KxC, segment_ids_BxL, self.block_size)
    else:
      y_BxLxC = cached_conv(self, _kernel(cfg), h_BxLxC, w_KxC, decode)
    if cfg.canon_bias:
      bias_C = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                               ("canon_channels",)),
                          (channels,), jnp.float32)
      y_BxLxC = y_BxLxC + bias_C.astype(y_BxLxC.dtype)
    if cfg.canon_activation:
      y_BxLxC = jax.nn.silu(y_BxLxC)
    return h_BxLxC + y_BxLxC if cfg.canon_residual else y_BxLxC


def maybe_canon(cfg: ModelConfig, position: str, h_BxLxC: jax.Array,
                segment_ids_BxL: jax.Array, name: str, block_size: int = 0,
                decode: Decode | None = None) -> jax.Array:
  """Applies the Canon layer for `position` (one of ABCD) when the config enables it
  (`decode`: a chunk against the generation cache, model/cache.py).

  Call only from inside a compact module's __call__: the layer binds to the calling module.
  """
  if position not in cfg.canon_set:
    return h_BxLxC
  return Canon(cfg, block_size, name=name)(h_BxLxC, segment_ids_BxL, decode)
