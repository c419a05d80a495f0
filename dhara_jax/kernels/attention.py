"""FlashAttention over packed documents, chosen by `model.attention_impl`.

- xla: dhara's own attention (model/attention.py): scores materialised per block of queries.
  The fastest choice on CPU, and the only one for sliding-window layers.
- pallas_gpu: JAX's Pallas (Triton) FlashAttention-2 kernel
  (`jax.experimental.pallas.ops.gpu.attention.mha`). Grouped key/value heads are repeated to the
  query heads first (their gradients sum back through the repeat).
- pallas_tpu: JAX's Pallas TPU splash attention
  (`jax.experimental.pallas.ops.tpu.splash_attention`), grouped heads native, one row at a time.
- auto: $DHARA_ATTENTION_IMPL, else pallas_gpu on GPUs, pallas_tpu on TPUs and xla elsewhere.

Both kernels keep the L×S scores on chip and apply segment ids and causality inside. Each is
compiled once per shape (forward and backward) before use; if it does not lower on this backend,
one warning is logged and xla runs instead. `interpret=True` (or DHARA_PALLAS_INTERPRET=1) runs
them in Pallas interpret mode, which is how CPU tests check them.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as pallas_gpu_attention
from jax.experimental.pallas.ops.tpu import splash_attention

from dhara_jax.errors import ConfigError
from dhara_jax.kernels.lowering import compiles, interpret_requested

ENV_VAR = "DHARA_ATTENTION_IMPL"
IMPLS = ("xla", "pallas_gpu", "pallas_tpu")
_AUTO = {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu", "tpu": "pallas_tpu"}
# Both kernels tile queries and keys in blocks of 128 and need whole blocks.
BLOCK = 128


def resolve_impl(impl: str = "auto") -> str:
  """The implementation `model.attention_impl=impl` runs on the default backend."""
  source = "model.attention_impl"
  if impl == "auto":
    impl, source = os.environ.get(ENV_VAR, "auto"), ENV_VAR
    if impl == "auto":
      return _AUTO.get(jax.default_backend(), "xla")
  if impl not in IMPLS:
    raise ConfigError(f"attention: {source}={impl!r} is not one of {', '.join([*IMPLS, 'auto'])}")
  return impl


def flash_applies(impl: str, length: int, window: int) -> bool:
  """Whether a layer with this sequence length and sliding window runs FlashAttention."""
  return resolve_impl(impl) != "xla" and not window and length % BLOCK == 0


def flash_attention(impl: str, q_BxLxHxK: jax.Array, k_BxLxGxK: jax.Array,
                    v_BxLxGxK: jax.Array, segment_ids_BxL: jax.Array, *, scale: float,
                    causal: bool, interpret: bool | None = None) -> jax.Array | None:
  """softmax(scale·q·kᵀ, within each segment, causal or not)·v with `impl`'s Pallas kernel, or
  None where that kernel does not lower for these shapes (the caller falls back).

  Segment id 0 (padding) attends to padding, as in model/masks.py; losses ignore those rows.
  """
  interpret = interpret_requested(interpret)
  impl = resolve_impl(impl)
  args = (q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL.astype(jnp.int32))
  specs = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args)
  if not interpret and not _lowers(impl, specs, scale, causal):
    return None
  return _KERNELS[impl](*args, scale=scale, causal=causal, interpret=interpret)


def _pallas_gpu(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, *, scale, causal, interpret):
  repeats = q_BxLxHxK.shape[2] // k_BxLxGxK.shape[2]
  return pallas_gpu_attention.mha(
      q_BxLxHxK, jnp.repeat(k_BxLxGxK, repeats, axis=2), jnp.repeat(v_BxLxGxK, repeats, axis=2),
      segment_ids_BxL, sm_scale=scale, causal=causal, interpret=interpret)


def _pallas_tpu(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, *, scale, causal, interpret):
  length, heads = q_BxLxHxK.shape[1:3]
  kernel = _splash_kernel(length, heads, causal, interpret)

  def one_row(q_LxHxK, k_LxGxK, v_LxGxK, segment_ids_L):
    heads_first = lambda x: jnp.swapaxes(x, 0, 1)
    out_HxLxK = kernel(heads_first((q_LxHxK * scale).astype(q_LxHxK.dtype)),
                       heads_first(k_LxGxK), heads_first(v_LxGxK),
                       segment_ids=splash_attention.SegmentIds(segment_ids_L, segment_ids_L))
    return heads_first(out_HxLxK)

  return jax.vmap(one_row)(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)


@functools.lru_cache(maxsize=None)
def _splash_kernel(length: int, heads: int, causal: bool, interpret: bool):
  """The splash kernel for one row (its block-sparsity tables are built once per shape)."""
  shape = (length, length)
  mask = splash_attention.CausalMask(shape) if causal else splash_attention.FullMask(shape)
  return splash_attention.make_splash_mha_single_device(
      splash_attention.MultiHeadMask([mask] * heads), interpret=interpret)


_KERNELS = {"pallas_gpu": _pallas_gpu, "pallas_tpu": _pallas_tpu}


def forward_and_backward(impl: str, *, scale: float, causal: bool) -> Callable:
  """(q, k, v, segment_ids) → (output, gradients of q, k, v): every program a training step
  compiles from `impl`'s kernel (for checking that they lower)."""
  kernel = functools.partial(_KERNELS[impl], scale=scale, causal=causal, interpret=False)

  def run(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL):
    out, vjp = jax.vjp(lambda q, k, v: kernel(q, k, v, segment_ids_BxL), q_BxLxHxK, k_BxLxGxK,
                       v_BxLxGxK)
    return out, vjp(out)

  return run


@functools.lru_cache(maxsize=None)
def _lowers(impl: str, specs: tuple, scale: float, causal: bool) -> bool:
  return compiles(forward_and_backward(impl, scale=scale, causal=causal), specs,
                  kernel=f"attention: {impl}", fallback="xla")
