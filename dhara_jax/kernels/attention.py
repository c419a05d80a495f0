"""FlashAttention over packed documents, chosen by `model.attention_impl`.

- xla: dhara's own attention (model/attention.py): scores materialised per block of queries.
  The fastest choice on CPU, and the only one for sliding-window layers.
- pallas_gpu: JAX's Pallas (Triton) FlashAttention-2 kernel
  (`jax.experimental.pallas.ops.gpu.attention.mha`): the L×S scores never leave the chip;
  segment ids and causality are applied inside the kernel. Grouped key/value heads are repeated
  to the query heads first (their gradients sum back through the repeat).
- auto: $DHARA_ATTENTION_IMPL, else pallas_gpu on GPUs and xla elsewhere.

pallas_gpu is compiled once per shape (forward and backward) before use; if it does not lower
on this backend, one warning is logged and xla runs instead. `interpret=True` (or
DHARA_PALLAS_INTERPRET=1) runs the kernel in Pallas interpret mode, which is how CPU tests
check it.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as pallas_gpu_attention

from dhara_jax.errors import ConfigError
from dhara_jax.kernels.canon.api import INTERPRET_ENV_VAR
from dhara_jax.kernels.lowering import compiles

ENV_VAR = "DHARA_ATTENTION_IMPL"
IMPLS = ("xla", "pallas_gpu")
_AUTO = {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu"}
# The kernel tiles queries and keys in blocks of 128 and needs whole blocks.
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
  return resolve_impl(impl) == "pallas_gpu" and not window and length % BLOCK == 0


def flash_attention(q_BxLxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array,
                    segment_ids_BxL: jax.Array, *, scale: float, causal: bool,
                    interpret: bool | None = None) -> jax.Array | None:
  """softmax(scale·q·kᵀ, within each segment, causal or not)·v with the Pallas GPU kernel, or
  None where that kernel does not lower for these shapes (the caller falls back).

  Segment id 0 (padding) attends to padding, as in model/masks.py; losses ignore those rows.
  """
  if interpret is None:
    interpret = os.environ.get(INTERPRET_ENV_VAR) == "1"
  repeats = q_BxLxHxK.shape[2] // k_BxLxGxK.shape[2]
  args = (q_BxLxHxK, jnp.repeat(k_BxLxGxK, repeats, axis=2),
          jnp.repeat(v_BxLxGxK, repeats, axis=2), segment_ids_BxL.astype(jnp.int32))
  mha = functools.partial(pallas_gpu_attention.mha, sm_scale=scale, causal=causal,
                          interpret=interpret)
  specs = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args)
  if not interpret and not _lowers(specs, scale, causal):
    return None
  return mha(*args)


@functools.lru_cache(maxsize=None)
def _lowers(specs: tuple, scale: float, causal: bool) -> bool:
  mha = functools.partial(pallas_gpu_attention.mha, sm_scale=scale, causal=causal)

  def forward_and_backward(q, k, v, segment_ids):
    out, vjp = jax.vjp(lambda q, k, v: mha(q, k, v, segment_ids), q, k, v)
    return out, vjp(out)

  return compiles(forward_and_backward, specs, kernel="attention: pallas_gpu", fallback="xla")
