"""FlashAttention (kernels/attention.py) against dhara's own masked attention.

The Pallas kernels run in interpret mode here, the only way they run on a CPU; on a GPU or TPU
the same calls compile them (Triton, Mosaic).
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhara_jax import config
from dhara_jax.errors import ConfigError
from dhara_jax.kernels import attention, lowering
from dhara_jax.model import forward
from dhara_jax.model.attention import attend, blocked_attention
from dhara_jax.masks import attention_mask
from tiny import random_params, tiny_config

RNG = np.random.default_rng(0)
# Two documents and padding in one row, one document in the other.
SEGMENTS = np.array([[1] * 100 + [2] * 120 + [0] * 36, [1] * 256], np.int32)


def qkv(heads=4, kv_heads=2, head_dim=48, length=256):
  shapes = [(2, length, heads, head_dim)] + [(2, length, kv_heads, head_dim)] * 2
  return [jnp.asarray(RNG.standard_normal(s), jnp.float32) for s in shapes]


def test_auto_is_xla_on_cpu_and_the_environment_can_choose(monkeypatch):
  monkeypatch.delenv(attention.ENV_VAR, raising=False)
  assert attention.resolve_impl("auto") == "xla"
  assert attention.resolve_impl("pallas_gpu") == "pallas_gpu"
  assert attention.resolve_impl("pallas_tpu") == "pallas_tpu"
  monkeypatch.setenv(attention.ENV_VAR, "pallas_gpu")
  assert attention.resolve_impl("auto") == "pallas_gpu"
  assert attention.resolve_impl("xla") == "xla"  # the config's explicit choice wins
  monkeypatch.setenv(attention.ENV_VAR, "cudnn")
  with pytest.raises(ConfigError, match=attention.ENV_VAR):
    attention.resolve_impl("auto")
  with pytest.raises(ConfigError, match="model.attention_impl"):
    config.load("llama3", ["model.attention_impl=flash"])


def test_flash_applies_only_to_whole_blocks_without_a_window():
  assert attention.flash_applies("pallas_gpu", 1024, window=0)
  assert attention.flash_applies("pallas_tpu", 1024, window=0)
  assert not attention.flash_applies("pallas_gpu", 1024, window=512)  # sliding-window layers
  assert not attention.flash_applies("pallas_gpu", 200, window=0)  # not whole 128-token blocks
  assert not attention.flash_applies("xla", 1024, window=0)


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("causal", [True, False])
def test_flash_attention_equals_masked_attention(impl, causal, interpret_pallas):
  """Values and gradients on the real tokens, with grouped KV heads, two documents in a row and
  padding; head_dim 48 is the Dhara-70M one."""
  q, k, v = qkv()
  mask = attention_mask(jnp.asarray(SEGMENTS), causal=causal)
  real = jnp.asarray(SEGMENTS > 0)[:, :, None, None]
  scale = 48 ** -0.5

  def masked(q, k, v):
    return blocked_attention(q, k, v, mask, scale, causal)

  def flash(q, k, v):
    return attention.flash_attention(impl, q, k, v, jnp.asarray(SEGMENTS), scale=scale,
                                     causal=causal)

  def loss(fn, q, k, v):
    return jnp.sum(jnp.where(real, fn(q, k, v), 0.0) ** 2)

  want = jax.value_and_grad(functools.partial(loss, masked), argnums=(0, 1, 2))(q, k, v)
  got = jax.value_and_grad(functools.partial(loss, flash), argnums=(0, 1, 2))(q, k, v)
  jax.block_until_ready(got)
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5)


def _loss_and_grads(cfg, params, tokens, seg, shardings=None):
  def loss_fn(p):
    return jnp.mean(forward(cfg, p, tokens, seg)[0] ** 2)

  if shardings is None:
    out = jax.jit(jax.value_and_grad(loss_fn))(params)
  else:
    out = jax.jit(jax.value_and_grad(loss_fn), in_shardings=(shardings,))(
        jax.device_put(params, shardings))
  return jax.block_until_ready(out)  # no work queued behind interpreter callbacks


# pallas_tpu runs on one device only here: its interpreter's callbacks dispatch JAX ops that
# deadlock against the test's own on a mesh of 8 fake CPU devices (as in test_canon_model.py).
# The shard_map around the kernel is the same code for both kernels.
@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_model_with_flash_attention_matches_xla(impl, interpret_pallas):
  """The whole decoder, its gradients included; on a data×fsdp×tensor mesh the kernel runs per
  batch shard (XLA cannot partition a Pallas call)."""
  from dhara_jax.config import MeshConfig
  from dhara_jax.model import param_shardings
  from dhara_jax.sharding import axis_rules, make_mesh

  overrides = ["model.num_layers=2", "model.max_seq_len=128"]
  flash = tiny_config("llama3", *overrides, f"model.attention_impl={impl}")
  xla = tiny_config("llama3", *overrides, "model.attention_impl=xla")
  params = random_params(xla)
  tokens = RNG.integers(0, xla.vocab_size, (4, 128))
  seg = np.repeat(np.array([[1] * 70 + [2] * 58]), 4, axis=0)
  want = _loss_and_grads(xla, params, tokens, seg)
  results = [_loss_and_grads(flash, params, tokens, seg)]
  if impl == "pallas_gpu":
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    shardings = param_shardings(flash, mesh)
    with jax.set_mesh(mesh), axis_rules():
      results.append(_loss_and_grads(flash, params, tokens, seg, shardings))
  for loss, grads in results:
    np.testing.assert_allclose(float(loss), float(want[0]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want[1])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                 atol=1e-5 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_kernel_that_does_not_lower_warns_once_and_runs_masked_attention(impl, monkeypatch,
                                                                          caplog):
  """Compiled for real (not interpreted), neither kernel lowers on a CPU: the layer falls back
  to the masked attention with one warning."""
  monkeypatch.delenv(lowering.INTERPRET_ENV_VAR, raising=False)
  lowering._warned.clear()
  attention._lowers.cache_clear()
  q, k, v = qkv(length=128)
  seg = jnp.asarray(SEGMENTS[:, :128])
  mask = attention_mask(seg, causal=True)
  with caplog.at_level(logging.WARNING, logger=lowering.__name__):
    for _ in range(2):
      got = attend(impl, q, k, v, mask, seg, scale=0.1, causal=True, window=0)
  np.testing.assert_array_equal(np.asarray(got),
                                np.asarray(blocked_attention(q, k, v, mask, 0.1, True)))
  warnings = [r for r in caplog.records if f"attention: {impl}" in r.getMessage()]
  assert len(warnings) == 1 and "xla" in warnings[0].getMessage()


@pytest.mark.parametrize("platform,impl", [("tpu", "pallas_tpu"), ("cuda", "pallas_gpu")])
def test_flash_kernels_lower_for_their_accelerator(platform, impl):
  """Forward and backward lower to Mosaic / Triton IR at the Dhara-70M attention shape (bf16,
  8/4 heads, head_dim 48, T 1024); the final Mosaic/PTX compile needs the chip."""
  q = jax.ShapeDtypeStruct((2, 1024, 8, 48), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 1024, 4, 48), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, 1024), jnp.int32)
  program = attention.forward_and_backward(impl, scale=48 ** -0.5, causal=True)
  allow = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  exported = jax.export.export(jax.jit(program), platforms=[platform],
                               disabled_checks=allow)(q, kv, kv, seg)
  assert "custom_call" in exported.mlir_module()
