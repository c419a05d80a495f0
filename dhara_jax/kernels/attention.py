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

Block diffusion ([x_t ; x_0], masks.block_diffusion_mask): splash takes the mask's
document-free part as a static NumpyMask and the documents as segment ids (both halves'); the
GPU kernel knows only causal and full masks over segment ids, so it warns once and xla runs.
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
from dhara_jax.masks import block_diffusion_pattern
from dhara_jax.kernels.lowering import compiles, interpret_requested, warn_once

ENV_VAR = "DHARA_ATTENTION_IMPL"
IMPLS = ("xla", "pallas_gpu", "pallas_tpu")
_AUTO = {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu", "tpu": "pallas_tpu"}
# Both kernels tile queries and keys in blocks of 128 and need whole blocks.
BLOCK = 128
# The kernels that can take the block-diffusion mask.
BLOCK_DIFFUSION_IMPLS = ("pallas_tpu",)


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


def flash_applies(impl: str, length: int, window: int, block_size: int = 0) -> bool:
  """Whether a layer with this sequence length (2L in block-diffusion mode, `block_size` > 0)
  and sliding window runs FlashAttention. A kernel that cannot take the block-diffusion mask
  says so once and the layer runs xla."""
  impl = resolve_impl(impl)
  if impl == "xla" or window or length % BLOCK:
    return False
  if block_size and impl not in BLOCK_DIFFUSION_IMPLS:
    warn_once(f"attention: {impl} (block diffusion)", "attention: %s cannot express the "
              "block-diffusion mask; using the xla path", impl)
    return False
  return True


def flash_attention(impl: str, q_BxLxHxK: jax.Array, k_BxLxGxK: jax.Array,
                    v_BxLxGxK: jax.Array, segment_ids_BxL: jax.Array, *, scale: float,
                    causal: bool, block_size: int = 0,
                    interpret: bool | None = None) -> jax.Array | None:
  """softmax(scale·q·kᵀ, within each segment, causal or not)·v with `impl`'s Pallas kernel, or
  None where that kernel does not lower for these shapes (the caller falls back).

  With `block_size` > 0, q/k/v are over [x_t ; x_0] (B×2L), segment ids are x_0's (B×L), the
  mask is masks.block_diffusion_mask and `causal` is ignored (pallas_tpu only). Segment id 0
  (padding) attends to padding, as in dhara_jax/masks.py; losses ignore those rows.
  """
  interpret = interpret_requested(interpret)
  impl = resolve_impl(impl)
  if block_size:
    segment_ids_BxL = jnp.concatenate([segment_ids_BxL] * 2, axis=1)  # both halves share them
    causal = False
  args = (q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL.astype(jnp.int32))
  specs = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args)
  if not interpret and not _lowers(impl, specs, scale, causal, block_size):
    return None
  return _KERNELS[impl](*args, scale=scale, causal=causal, block_size=block_size,
                        interpret=interpret)


def _pallas_gpu(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, *, scale, causal, block_size,
                interpret):
  if block_size:  # flash_applies keeps block diffusion off this kernel
    raise ValueError("attention: pallas_gpu cannot express the block-diffusion mask")
  repeats = q_BxLxHxK.shape[2] // k_BxLxGxK.shape[2]
  return pallas_gpu_attention.mha(
      q_BxLxHxK, jnp.repeat(k_BxLxGxK, repeats, axis=2), jnp.repeat(v_BxLxGxK, repeats, axis=2),
      segment_ids_BxL, sm_scale=scale, causal=causal, interpret=interpret)


def _pallas_tpu(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, *, scale, causal, block_size,
                interpret):
  length, heads = q_BxLxHxK.shape[1:3]
  kernel = _splash_kernel(length, heads, causal, block_size, interpret)

  def one_row(q_LxHxK, k_LxGxK, v_LxGxK, segment_ids_L):
    heads_first = lambda x: jnp.swapaxes(x, 0, 1)
    out_HxLxK = kernel(heads_first((q_LxHxK * scale).astype(q_LxHxK.dtype)),
                       heads_first(k_LxGxK), heads_first(v_LxGxK),
                       segment_ids=splash_attention.SegmentIds(segment_ids_L, segment_ids_L))
    return heads_first(out_HxLxK)

  return jax.vmap(one_row)(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)


@functools.lru_cache(maxsize=None)
def _splash_kernel(length: int, heads: int, causal: bool, block_size: int, interpret: bool):
  """The splash kernel for one row (its block-sparsity tables are built once per shape)."""
  shape = (length, length)
  if block_size:  # [x_t ; x_0]: the documents come as segment ids, the rest is static
    mask = splash_attention.NumpyMask(block_diffusion_pattern(length // 2, block_size))
  elif causal:
    mask = splash_attention.CausalMask(shape)
  else:
    mask = splash_attention.FullMask(shape)
  return splash_attention.make_splash_mha_single_device(
      splash_attention.MultiHeadMask([mask] * heads), interpret=interpret)


_KERNELS = {"pallas_gpu": _pallas_gpu, "pallas_tpu": _pallas_tpu}


def forward_and_backward(impl: str, *, scale: float, causal: bool,
                         block_size: int = 0) -> Callable:
  """(q, k, v, segment_ids) → (output, gradients of q, k, v): every program a training step
  compiles from `impl`'s kernel (for checking that they lower). Segment ids cover the whole
  row: 2L, x_0's twice, in block-diffusion mode."""
  kernel = functools.partial(_KERNELS[impl], scale=scale, causal=causal, block_size=block_size,
                             interpret=False)

  def run(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL):
    out, vjp = jax.vjp(lambda q, k, v: kernel(q, k, v, segment_ids_BxL), q_BxLxHxK, k_BxLxGxK,
                       v_BxLxGxK)
    return out, vjp(out)

  return run


@functools.lru_cache(maxsize=None)
def _lowers(impl: str, specs: tuple, scale: float, causal: bool, block_size: int) -> bool:
  return compiles(forward_and_backward(impl, scale=scale, causal=causal, block_size=block_size),
                  specs, kernel=f"attention: {impl}", fallback="xla")
