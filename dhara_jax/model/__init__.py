"""Pure-functional entry points: params are a plain pytree, forward has no hidden state."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dhara_jax.config import ModelConfig
from dhara_jax.kernels import attention as attention_kernels
from dhara_jax.model.cache import Decode
from dhara_jax.model.canon import conv_impl
from dhara_jax.model.layers import matmul, soft_cap
from dhara_jax.model.transformer import Transformer
from dhara_jax.sharding import spec_for

Params = dict[str, Any]


def _dummy_tokens(cfg: ModelConfig) -> jax.Array:
  return jnp.zeros((1, min(cfg.max_seq_len, 8)), jnp.int32)


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
  """Random parameters (float32), unboxed to a plain nested dict."""
  boxed = Transformer(cfg).init(rng, _dummy_tokens(cfg))["params"]
  return nn.meta.unbox(boxed)


@functools.lru_cache(maxsize=32)
def _abstract_init(cfg: ModelConfig) -> Any:
  """The boxed parameter tree as shapes, without allocating. Tracing the model is seconds for a
  30-layer one and a command asks for shapes and axes several times, so once per config."""
  return jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), _dummy_tokens(cfg)))


def logical_axes(cfg: ModelConfig) -> Params:
  """The logical axis names (a PartitionSpec of names) of every parameter, without allocating."""
  return nn.get_partition_spec(_abstract_init(cfg))["params"]


def param_shapes(cfg: ModelConfig) -> Params:
  """ShapeDtypeStructs of every parameter (float32), without allocating."""
  return nn.meta.unbox(_abstract_init(cfg))["params"]


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> Params:
  """NamedSharding for every parameter, from its logical axes (sharding.LOGICAL_RULES)."""
  return jax.tree.map(lambda spec, shape: NamedSharding(mesh, spec_for(spec, shape.shape, mesh)),
                      logical_axes(cfg), param_shapes(cfg),
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def forward(cfg: ModelConfig, params: Params, tokens_BxL: jax.Array,
            segment_ids_BxL: jax.Array | None = None,
            positions_BxL: jax.Array | None = None,
            block_size: int = 0) -> tuple[jax.Array, jax.Array]:
  """Returns (logits B×L×V float32, auxiliary loss: the MoE load-balancing loss summed over layers,
  already multiplied by `moe_aux_loss_weight`; 0 for dense models).

  Block-diffusion mode, `block_size` > 0 (a Python int dividing L; each value compiles its own
  program): tokens are B×2L = concatenate([x_t, x_0], axis=1), segment ids and positions are
  x_0's, B×L, shared by both halves, and the logits are B×2L×V (see `Transformer`)."""
  return _apply(cfg, params, tokens_BxL, segment_ids_BxL, positions_BxL, True, block_size)


def forward_hidden(cfg: ModelConfig, params: Params, tokens_BxL: jax.Array,
                   segment_ids_BxL: jax.Array | None = None,
                   positions_BxL: jax.Array | None = None,
                   block_size: int = 0) -> tuple[jax.Array, jax.Array]:
  """`forward` without the output head: (final hidden states B×L×D in the compute dtype,
  auxiliary loss; B×2L×D with `block_size` > 0). `output_head` gives the head."""
  return _apply(cfg, params, tokens_BxL, segment_ids_BxL, positions_BxL, False, block_size)


Cache = dict[str, Any]


def init_cache(cfg: ModelConfig, batch: int, length: int) -> Cache:
  """An empty generation cache for `batch` rows of `length` slots (model/cache.py): keys and
  values per attention layer, the last K−1 inputs per convolution; in the compute dtype."""
  decode = Decode(jnp.zeros((), jnp.int32), jnp.zeros((batch,), jnp.int32), length)
  shapes = jax.eval_shape(lambda p: forward_cached(cfg, p, jnp.zeros((batch, 1), jnp.int32),
                                                   {}, decode)[1], param_shapes(cfg))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def forward_cached(cfg: ModelConfig, params: Params, tokens_BxC: jax.Array, cache: Cache,
                   decode: Decode, head: bool = True) -> tuple[jax.Array, Cache]:
  """(logits B×C×V float32, the cache with this chunk's keys, values and conv tails written):
  a chunk of tokens against the generation cache. A caller that must not commit the chunk
  (a diffusion step) keeps the cache it passed in. `head=False` gives the final hidden states
  instead, for `apply_head` on only the rows a sampler reads."""
  out, state = Transformer(cfg).apply({"params": params, "cache": cache}, tokens_BxC,
                                      head=head, decode=decode,
                                      mutable=["cache", "intermediates"])
  return out, state["cache"]


def apply_head(cfg: ModelConfig, params: Params, hidden_BxNxD: jax.Array) -> jax.Array:
  """Logits B×N×V (float32) of final hidden states: the Transformer's own head."""
  h = output_head(cfg, params)
  flat_NxD = hidden_BxNxD.reshape(-1, hidden_BxNxD.shape[-1]).astype(jnp.dtype(cfg.dtype))
  logits = matmul(flat_NxD, h.kernel, jnp.float32, kernel_transposed=h.transposed)
  return soft_cap(logits, h.softcap).reshape(*hidden_BxNxD.shape[:-1], -1)


def kernel_choices(cfg: ModelConfig) -> dict[str, str]:
  """The attention and Canon kernels this config runs on the default backend. Reads the
  $DHARA_ATTENTION_IMPL / $DHARA_CANON_IMPL overrides, so calling it before writing anything
  makes a bad override fail first instead of at the first trace."""
  choices = {"attention": attention_kernels.resolve_impl(cfg.attention_impl)}
  if cfg.canon_set:
    choices["canon"] = conv_impl(cfg)
  return choices


class Head(NamedTuple):
  """The output projection, for losses that apply it themselves."""

  kernel: jax.Array  # float32: D×V, or the tied V×D embedding table
  transposed: bool  # kernel is the tied V×D table
  softcap: float  # logits = softcap·tanh(logits/softcap) when > 0


def output_head(cfg: ModelConfig, params: Params) -> Head:
  if cfg.tie_embeddings:
    kernel, transposed = params["embed"]["embedding"], True
  else:
    kernel, transposed = params["lm_head"]["kernel"], False
  return Head(kernel, transposed, cfg.final_logit_softcap)


def _apply(cfg, params, tokens_BxL, segment_ids_BxL, positions_BxL, head, block_size):
  out, state = Transformer(cfg).apply({"params": params}, tokens_BxL, segment_ids_BxL,
                                      positions_BxL, head, block_size, mutable=["intermediates"])
  aux_losses = jax.tree.leaves(state.get("intermediates", {}))
  aux = sum(aux_losses, jnp.zeros((), jnp.float32)) * cfg.moe_aux_loss_weight
  return out, aux
