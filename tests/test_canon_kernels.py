"""Canon conv kernels: every implementation's values and gradients equal the shift-and-add oracle.

Pallas kernels run in interpret mode with small tiles (16 rows, 128 channels), so the shapes below
span several time tiles (L = 37, not a multiple of 16) and channel tiles (C = 200, not a multiple
of 128), and segment resets land inside tiles and on the halos between them.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhara_jax.errors import ConfigError
from dhara_jax.kernels import lowering
from dhara_jax.kernels.canon import api, canon_conv, pallas_gpu, pallas_tpu, reference, xla
from dhara_jax.kernels.canon.common import PallasOptions
from dhara_jax.model import conv as model_conv

B, L, C = 2, 37, 200
TILES = dict(block_t=16, block_c=128)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
IMPLS = ["reference", "xla", "pallas_tpu", "pallas_gpu"]
# Every K with and without resets; the dtype alternates so each dtype meets both.
CASES = [(k, seg, jnp.float32 if (k + seg) % 2 else jnp.bfloat16)
         for k in (2, 3, 4, 5) for seg in (False, True)]


def packed_segments(rng, batch: int, length: int) -> np.ndarray:
  """Documents of 1–9 tokens with ids from {0, 1, 2}: padding (0) and ids that come back later."""
  rows = []
  for _ in range(batch):
    runs = [np.full(rng.integers(1, 10), rng.integers(0, 3)) for _ in range(length)]
    rows.append(np.concatenate(runs)[:length])
  return np.stack(rows).astype(np.int32)


def make_inputs(kernel: int, segments: bool, dtype, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((B, L, C)), dtype)
  w = jnp.asarray(rng.uniform(-1, 1, (kernel, C)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((B, L, C)), dtype)
  seg = jnp.asarray(packed_segments(rng, B, L)) if segments else None
  return x, w, g, seg


def value_and_grads(fn, x, w, seg, g):
  y, pullback = jax.vjp(lambda x, w: fn(x, w, seg), x, w)
  return (y, *pullback(g))


def assert_close(actual, expected, dtype):
  tol = TOL[dtype]
  np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                             atol=tol, rtol=tol)


@pytest.mark.parametrize("kernel,segments,dtype", CASES,
                         ids=[f"K{k}-{'seg' if s else 'noseg'}-{d.__name__}" for k, s, d in CASES])
@pytest.mark.parametrize("impl", IMPLS)
def test_values_and_gradients_match_reference(impl, kernel, segments, dtype):
  x, w, g, seg = make_inputs(kernel, segments, dtype)
  fn = functools.partial(canon_conv, impl=impl, interpret=True, **TILES)
  got = jax.jit(value_and_grads, static_argnums=0)(fn, x, w, seg, g)
  want = value_and_grads(reference.causal_depthwise_conv, x, w, seg, g)
  for name, a, b in zip(("y", "dx", "dw"), got, want):
    assert a.dtype == b.dtype, name
    assert_close(a, b, dtype)
  assert float(jnp.max(jnp.abs(got[0].astype(jnp.float32)))) > 0.1  # not a vacuous zero output


def test_reference_matches_naive_loop():
  """The oracle itself, against the definition, with ids that repeat after another document."""
  x, w, _, seg = make_inputs(3, True, jnp.float32, seed=1)
  x, w, seg = np.asarray(x), np.asarray(w), np.asarray(seg)
  naive = np.zeros_like(x)
  for b in range(B):
    for t in range(L):
      for k in range(3):
        src = t - (3 - 1 - k)
        if src >= 0 and seg[b, src] == seg[b, t]:
          naive[b, t] += w[k] * x[b, src]
  out = reference.causal_depthwise_conv(jnp.asarray(x), jnp.asarray(w), jnp.asarray(seg))
  np.testing.assert_allclose(np.asarray(out), naive, atol=1e-5)
  assert (seg[:, 1:] != seg[:, :-1]).any() and (seg == 0).any()


@pytest.mark.parametrize("reverse", [False, True])
def test_segment_reset_zeroes_cross_document_taps(reverse):
  """A one-hot input in document 1 must not leak into document 2 in either direction."""
  hot = 4 if reverse else 3  # the last token of document 1, or the first of document 2
  x = jnp.zeros((1, 8, 128), jnp.float32).at[0, hot].set(1.0)
  seg = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 2]])
  w = jnp.ones((4, 128), jnp.float32)
  interpret = PallasOptions(interpret=True)
  for conv in (reference.conv, xla.conv, functools.partial(pallas_tpu.conv, opts=interpret),
               functools.partial(pallas_gpu.conv, opts=interpret)):
    y = np.asarray(conv(x, w, seg, reverse=reverse))[0, :, 0]
    np.testing.assert_array_equal(y, np.eye(8)[hot])


def test_resolve_impl(monkeypatch):
  monkeypatch.delenv(api.ENV_VAR, raising=False)
  assert api.resolve_impl() == api.CPU_IMPL == api.resolve_impl("auto")
  assert api.resolve_impl("pallas_gpu") == "pallas_gpu"
  monkeypatch.setenv(api.ENV_VAR, "xla")
  assert api.resolve_impl() == "xla"
  assert api.resolve_impl("reference") == "reference"  # the argument wins over the environment
  monkeypatch.setenv(api.ENV_VAR, "cuda")
  with pytest.raises(ConfigError, match=api.ENV_VAR):
    api.resolve_impl()


def test_failed_lowering_warns_once_and_falls_back(caplog):
  """pallas_tpu without interpret mode cannot lower on CPU: the fallback takes over, with one
  warning."""
  lowering._warned.clear()
  api._lowers.cache_clear()
  with caplog.at_level(logging.WARNING, logger=lowering.__name__):
    for length in (11, 12):
      x, w, g, seg = make_inputs(4, True, jnp.float32)
      x, g, seg = x[:, :length], g[:, :length], seg[:, :length]
      fn = functools.partial(canon_conv, impl="pallas_tpu")
      got = jax.jit(value_and_grads, static_argnums=0)(fn, x, w, seg, g)
      want = value_and_grads(reference.causal_depthwise_conv, x, w, seg, g)
      for a, b in zip(got, want):
        assert_close(a, b, jnp.float32)
  warnings = [r for r in caplog.records if "pallas_tpu" in r.getMessage()]
  assert len(warnings) == 1 and api.FALLBACK_IMPL in warnings[0].getMessage()


@pytest.mark.parametrize("x_shape,w_shape,seg_shape,kwargs,match", [
    ((2, 5, 8), (0, 8), None, {}, "K ≥ 1"),
    ((2, 5, 8), (3, 7), None, {}, "K×C"),
    ((2, 5, 8), (8,), None, {}, "K×C"),
    ((5, 8), (3, 8), None, {}, "B×L×C"),
    ((2, 5, 8), (3, 8), (2, 4), {}, "segment_ids"),
    ((2, 5, 8), (3, 8), None, {"impl": "triton"}, "impl='triton'"),
    ((2, 5, 8), (3, 8), None, {"impl": "pallas_tpu", "interpret": True, "block_c": 96},
     "block_c"),
])
def test_bad_arguments_raise_config_error(x_shape, w_shape, seg_shape, kwargs, match):
  x, w = jnp.zeros(x_shape), jnp.zeros(w_shape)
  seg = None if seg_shape is None else jnp.ones(seg_shape, jnp.int32)
  with pytest.raises(ConfigError, match=match) as err:
    canon_conv(x, w, seg, **kwargs)
  assert "\n" not in str(err.value)


@pytest.mark.parametrize("platform,module", [("tpu", pallas_tpu), ("cuda", pallas_gpu)])
def test_kernels_lower_for_their_accelerator(platform, module):
  """Pallas → Mosaic / Triton IR at Dhara shapes (the final Mosaic/PTX compile needs the chip)."""
  x = jax.ShapeDtypeStruct((8, 1024, 768), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((4, 768), jnp.float32)
  seg = jax.ShapeDtypeStruct((8, 1024), jnp.int32)
  allow = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  for fn, args in ((functools.partial(module.conv, reverse=False), (x, w, seg)),
                   (functools.partial(module.conv, reverse=True), (x, w, None)),
                   (functools.partial(module.weight_grad, kernel=4), (x, x, seg))):
    exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=allow)(*args)
    assert "custom_call" in exported.mlir_module()


def test_model_conv_is_the_dispatching_api():
  assert model_conv.causal_depthwise_conv is canon_conv
