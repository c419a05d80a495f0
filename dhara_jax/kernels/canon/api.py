"""`canon_conv`: the causal depthwise conv with a custom VJP, dispatched to one implementation.

Choice of implementation, first that applies: the `impl` argument, the environment variable
DHARA_CANON_IMPL, then "auto" (TPU → pallas_tpu, GPU → pallas_gpu, CPU → CPU_IMPL). A Pallas
path is compiled once per shape before use; if it does not lower on this backend, one warning is
logged and that op runs on FALLBACK_IMPL instead. `interpret=True` (or DHARA_PALLAS_INTERPRET=1)
runs the Pallas kernels in interpret mode (CPU tests).
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import jax

from dhara_jax.errors import ConfigError
from dhara_jax.kernels.canon import pallas_gpu, pallas_tpu, reference, xla
from dhara_jax.kernels.canon.common import PallasOptions
from dhara_jax.kernels.lowering import compiles, interpret_requested

ENV_VAR = "DHARA_CANON_IMPL"
IMPLS: dict[str, ModuleType] = {"reference": reference, "xla": xla, "pallas_tpu": pallas_tpu,
                                "pallas_gpu": pallas_gpu}
# bench/canon_kernel.py on the 2-core dev CPU: XLA:CPU's grouped conv is ~100× slower than the
# fused shift-and-add (8×1024×768 f32 forward: ~360 ms vs ~4 ms).
CPU_IMPL = "reference"
# Where a Pallas kernel that does not lower goes: the fused shift-and-add, which XLA compiles
# well on every backend (the grouped conv is the slow one on CPU, see above).
FALLBACK_IMPL = "reference"
_AUTO = {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu"}


def resolve_impl(impl: str | None = None) -> str:
  """The implementation name that `canon_conv(..., impl=impl)` runs on the default backend."""
  source = "impl"
  if impl is None:
    impl, source = os.environ.get(ENV_VAR, "auto"), ENV_VAR
  if impl == "auto":
    return _AUTO.get(jax.default_backend(), CPU_IMPL)
  if impl not in IMPLS:
    raise ConfigError(f"canon conv: {source}={impl!r} is not one of "
                      f"{', '.join([*IMPLS, 'auto'])}")
  return impl


def _check_args(x_BxLxC: jax.Array, w_KxC: jax.Array, seg_BxL: jax.Array | None) -> None:
  if x_BxLxC.ndim != 3:
    raise ConfigError(f"canon conv: x must be B×L×C, got shape {tuple(x_BxLxC.shape)}")
  if w_KxC.ndim != 2 or w_KxC.shape[0] < 1 or w_KxC.shape[1] != x_BxLxC.shape[2]:
    raise ConfigError(f"canon conv: w must be K×C with K ≥ 1 and C = {x_BxLxC.shape[2]}, "
                      f"got shape {tuple(w_KxC.shape)}")
  if seg_BxL is not None and tuple(seg_BxL.shape) != tuple(x_BxLxC.shape[:2]):
    raise ConfigError(f"canon conv: segment_ids must be B×L = {tuple(x_BxLxC.shape[:2])}, "
                      f"got shape {tuple(seg_BxL.shape)}")


def _spec(a: jax.Array | None) -> jax.ShapeDtypeStruct | None:
  return None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype)


@functools.lru_cache(maxsize=None)
def _lowers(impl: str, op: str, kwargs: tuple, specs: tuple, backend: str) -> bool:
  """Whether `impl`'s `op` compiles for these shapes on this backend (warns once per impl)."""
  fn = functools.partial(getattr(IMPLS[impl], op), **dict(kwargs))
  return compiles(fn, specs, kernel=f"canon conv: {impl}", fallback=FALLBACK_IMPL)


def _run(options: tuple[str, PallasOptions], op: str, *args, **kwargs) -> jax.Array:
  """Runs `op` ("conv" or "weight_grad") of the chosen implementation, or the fallback's."""
  impl, opts = options
  if impl.startswith("pallas"):
    pallas_kwargs = {**kwargs, "opts": opts}
    if opts.interpret or _lowers(impl, op, tuple(sorted(pallas_kwargs.items())),
                                 tuple(map(_spec, args)), jax.default_backend()):
      return getattr(IMPLS[impl], op)(*args, **pallas_kwargs)
    impl = FALLBACK_IMPL
  return getattr(IMPLS[impl], op)(*args, **kwargs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _canon_conv(options, x_BxLxC, w_KxC, seg_BxL):
  return _run(options, "conv", x_BxLxC, w_KxC, seg_BxL, reverse=False)


def _canon_conv_fwd(options, x_BxLxC, w_KxC, seg_BxL):
  y_BxLxC = _run(options, "conv", x_BxLxC, w_KxC, seg_BxL, reverse=False)
  return y_BxLxC, (x_BxLxC, w_KxC, seg_BxL)


def _canon_conv_bwd(options, residuals, g_BxLxC):
  x_BxLxC, w_KxC, seg_BxL = residuals
  # dx: the transpose of the causal conv is the anti-causal one with the same taps.
  dx_BxLxC = _run(options, "conv", g_BxLxC, w_KxC, seg_BxL, reverse=True)
  dw_KxC = _run(options, "weight_grad", x_BxLxC, g_BxLxC, seg_BxL, kernel=w_KxC.shape[0])
  return dx_BxLxC, dw_KxC.astype(w_KxC.dtype), None


_canon_conv.defvjp(_canon_conv_fwd, _canon_conv_bwd)


def canon_conv(x_BxLxC: jax.Array, w_KxC: jax.Array, segment_ids_BxL: jax.Array | None = None,
               *, impl: str | None = None, interpret: bool | None = None,
               block_t: int | None = None,
               block_c: int | None = None) -> jax.Array:
  """Causal depthwise conv over time: out[t] = Σ_k w[k] · x[t-(K-1-k)], taps in the same segment.

  x: B×L×C; w: K×C (tap K-1 multiplies the current token, as PyTorch's Conv1d with padding K-1
  truncated to L); segment_ids: optional B×L ints (0 = padding, ≥ 1 = document), a tap counts
  only where its segment id equals the output's. No bias, residual or activation. Sums are
  float32; the output has x's dtype. Differentiable in x and w (dw is accumulated in float32,
  then cast to w's dtype).

  impl: reference | xla | pallas_tpu | pallas_gpu | auto (None: $DHARA_CANON_IMPL, else auto).
  interpret: run Pallas kernels in interpret mode (None: $DHARA_PALLAS_INTERPRET == "1").
  block_t, block_c: Pallas tile sizes (None: each kernel's default).
  """
  _check_args(x_BxLxC, w_KxC, segment_ids_BxL)
  options = (resolve_impl(impl), PallasOptions(interpret_requested(interpret), block_t, block_c))
  return _canon_conv(options, x_BxLxC, w_KxC, segment_ids_BxL)
