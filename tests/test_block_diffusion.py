"""Block diffusion over [x_t ; x_0] (BD3-LMs, LLaDA 2.0): the 2L mask, Canon / short-conv taps,
blocked attention, the flash-kernel paths and the decoder at its two limits (block size L: MDLM
over x_t; block size 1: the AR model over x_0)."""

import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import random_params, tiny_config

from dhara_jax.errors import ConfigError
from dhara_jax.kernels import attention as attention_kernels
from dhara_jax.kernels import lowering
from dhara_jax.kernels.canon import canon_conv
from dhara_jax.kernels.canon.reference import causal_depthwise_conv as reference_conv
from dhara_jax.model import forward
from dhara_jax.model.attention import attend, blocked_attention, dot_product_attention
from dhara_jax.model.canon import Canon
from dhara_jax.model.conv import block_diffusion_conv
from dhara_jax.masks import block_diffusion_mask, block_diffusion_pattern

RNG = np.random.default_rng(0)


def packed_segments(length: int) -> np.ndarray:
  """Row 0: two documents whose boundary falls inside a block, then two padding tokens; row 1:
  one document."""
  first = length // 3 + 1
  row = [1] * first + [2] * (length - first - 2) + [0] * 2
  return np.array([row, [1] * length], np.int32)


def brute_force_mask(seg: np.ndarray, block_size: int, window: int = 0) -> np.ndarray:
  """Every (query, key) pair of [x_t ; x_0] decided one at a time by the rule: x_t block k sees
  x_t block k and x_0 blocks < k; x_0 is block-causal over itself and never sees x_t."""
  batch, length = seg.shape
  mask = np.zeros((batch, 1, 2 * length, 2 * length), bool)
  for b in range(batch):
    for q in range(2 * length):
      for k in range(2 * length):
        (q_clean, q_pos), (k_clean, k_pos) = divmod(q, length), divmod(k, length)
        q_block, k_block = q_pos // block_size, k_pos // block_size
        if q_clean:  # x_0: block-causal over x_0, never x_t
          visible = k_clean and k_block <= q_block
        else:  # x_t: its own block of x_t, earlier blocks of x_0
          visible = k_block < q_block if k_clean else k_block == q_block
        in_window = not window or abs(q_pos - k_pos) < window
        mask[b, 0, q, k] = visible and in_window and seg[b, q_pos] == seg[b, k_pos]
  return mask


@pytest.mark.parametrize("length,block_size,window", [(8, 1, 0), (8, 2, 0), (8, 8, 0),
                                                      (12, 4, 0), (12, 4, 3)])
def test_mask_equals_brute_force(length, block_size, window):
  seg = packed_segments(length)
  want = brute_force_mask(seg, block_size, window)
  got = np.asarray(block_diffusion_mask(jnp.asarray(seg), block_size, window=window))
  np.testing.assert_array_equal(got, want)
  # The static part (what splash attention takes) is the mask of one document.
  static = block_diffusion_pattern(length, block_size, window=window)
  assert isinstance(static, np.ndarray)
  np.testing.assert_array_equal(static, brute_force_mask(np.ones((1, length)), block_size,
                                                         window)[0, 0])


@pytest.mark.parametrize("block_size", [0, 3, 16])
def test_block_size_must_divide_the_length(block_size):
  with pytest.raises(ConfigError, match=f"block_size={block_size}"):
    block_diffusion_mask(jnp.ones((1, 8), jnp.int32), block_size)


def test_decoder_refuses_rows_that_are_not_x_t_x_0():
  cfg, params = _model("llama3")
  with pytest.raises(ConfigError, match="odd length 9"):
    forward(cfg, params, np.zeros((1, 9), np.int32), block_size=1)
  with pytest.raises(ConfigError, match="segment_ids must be x_0's"):
    forward(cfg, params, np.zeros((1, 8), np.int32), np.ones((1, 8), np.int32), block_size=2)


def brute_force_conv(x_t, x_0, w, seg, block_size):
  """The conv over [x_t ; x_0], each tap chosen by hand: in x_t a tap inside the output's block
  reads x_t, one in an earlier block reads x_0; x_0 is an ordinary causal conv; no tap crosses
  a document (or the seam: there is nothing to the left of either half's first row)."""
  batch, length, channels = x_t.shape
  kernel = w.shape[0]
  out = np.zeros((batch, 2 * length, channels), np.float64)
  for b in range(batch):
    for t in range(length):
      for back in range(kernel):
        src = t - back
        if src < 0 or seg[b, src] != seg[b, t]:
          continue
        noisy_tap = x_t[b, src] if src // block_size == t // block_size else x_0[b, src]
        out[b, t] += w[kernel - 1 - back] * noisy_tap
        out[b, length + t] += w[kernel - 1 - back] * x_0[b, src]
  return out


CONV_CASES = [(8, 1), (8, 2), (8, 8), (12, 4)]  # 4, 3, 1 and 2 colours (K = 4)


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("length,block_size", CONV_CASES)
def test_canon_equals_brute_force(impl, length, block_size):
  """The whole Canon layer (bias, SiLU and residual on, all after the conv) in 2L mode."""
  cfg = tiny_config("llama3", "model.canon_set=A", "model.canon_bias=true",
                    "model.canon_activation=true", f"model.canon_impl={impl}")
  seg = packed_segments(length)
  x_t, x_0 = (RNG.standard_normal((2, length, 5)).astype(np.float32) for _ in range(2))
  h = jnp.asarray(np.concatenate([x_t, x_0], axis=1))
  canon = Canon(cfg, block_size)
  variables = nn.meta.unbox(canon.init(jax.random.key(0), h, jnp.asarray(seg)))
  bias = RNG.standard_normal(5).astype(np.float32)
  variables["params"]["bias"] = jnp.asarray(bias)
  w = np.asarray(variables["params"]["kernel"])
  conv = brute_force_conv(x_t, x_0, w, seg, block_size)
  silu = lambda y: y / (1 + np.exp(-y))
  want = np.asarray(h) + silu(conv + bias)
  got = np.asarray(canon.apply(variables, h, jnp.asarray(seg)))
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_block_conv_with_pallas_kernels_equals_brute_force(impl, interpret_pallas):
  length, block_size = 12, 4
  seg = packed_segments(length)
  x_t, x_0 = (RNG.standard_normal((2, length, 5)).astype(np.float32) for _ in range(2))
  w = RNG.standard_normal((4, 5)).astype(np.float32)
  got = block_diffusion_conv(functools.partial(canon_conv, impl=impl),
                             jnp.asarray(np.concatenate([x_t, x_0], axis=1)), jnp.asarray(w),
                             jnp.asarray(seg), block_size)
  np.testing.assert_allclose(np.asarray(jax.block_until_ready(got)),
                             brute_force_conv(x_t, x_0, w, seg, block_size), atol=1e-5)


def test_block_conv_gradients_equal_plain_autodiff():
  """The kernels' custom VJP through the 2L construction equals autodiff of the jnp oracle."""
  length, block_size = 12, 4
  seg = jnp.asarray(packed_segments(length))
  x = jnp.asarray(RNG.standard_normal((2, 2 * length, 5)), jnp.float32)
  w = jnp.asarray(RNG.standard_normal((4, 5)), jnp.float32)
  cotangent = jnp.asarray(RNG.standard_normal(x.shape), jnp.float32)

  def loss(conv, x, w):
    return jnp.sum(block_diffusion_conv(conv, x, w, seg, block_size) * cotangent)

  want = jax.grad(functools.partial(loss, reference_conv), argnums=(0, 1))(x, w)
  for impl in ("reference", "xla"):
    got = jax.grad(functools.partial(loss, functools.partial(canon_conv, impl=impl)),
                   argnums=(0, 1))(x, w)
    for g, e in zip(got, want):
      np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=1e-5, err_msg=impl)


# Canon AC (Dhara-70M) on LLaMA3; GPT-2's learned positions; LFM2's short convs with Canon B on
# them; Gemma3's sliding-window layers and sandwich norms; MoE routing over both halves. Two
# layers where every layer is global attention, three (all the kinds) for LFM2 and Gemma3.
FAMILIES = {"llama3": ["model.canon_set=AC", "model.num_layers=2"],
            "gpt2": ["model.num_layers=2"], "lfm2": ["model.canon_set=ABCD"], "gemma3": [],
            "moe": ["model.canon_set=A", "model.num_layers=2"]}
LENGTH = 12


def _model(family, *overrides):
  cfg = tiny_config(family, *FAMILIES[family], "model.canon_impl=reference", *overrides)
  return cfg, _params(family)


@functools.lru_cache(maxsize=None)
def _params(family):
  return random_params(tiny_config(family, *FAMILIES[family]))


@functools.lru_cache(maxsize=None)
def _jit_forward(cfg, block_size):
  return jax.jit(lambda params, tokens, seg: forward(cfg, params, tokens, seg,
                                                     block_size=block_size)[0])


def _logits(cfg, params, tokens, seg, block_size=0):
  return np.asarray(_jit_forward(cfg, block_size)(params, jnp.asarray(tokens), jnp.asarray(seg)))


def _rows(cfg):
  x_t, x_0 = (RNG.integers(0, cfg.vocab_size, (2, LENGTH)) for _ in range(2))
  return x_t, x_0, packed_segments(LENGTH)


@pytest.mark.parametrize("family", FAMILIES)
def test_block_size_l_is_bidirectional_over_each_half(family):
  """At block size L, x_t sees all of x_t and no x_0, with its convs causal over x_t: MDLM's
  bidirectional forward over x_t. x_0 sees its one block: the bidirectional forward over x_0
  (causal convs again) — whatever `model.attention` says, here the preset's causal."""
  cfg, params = _model(family)
  bidirectional, _ = _model(family, "model.attention=bidirectional")
  x_t, x_0, seg = _rows(cfg)
  got = _logits(cfg, params, np.concatenate([x_t, x_0], axis=1), seg, block_size=LENGTH)
  np.testing.assert_allclose(got[:, :LENGTH], _logits(bidirectional, params, x_t, seg),
                             atol=1e-5)
  np.testing.assert_allclose(got[:, LENGTH:], _logits(bidirectional, params, x_0, seg),
                             atol=1e-5)


@pytest.mark.parametrize("family", ["llama3", "gpt2", "lfm2", "gemma3"])
def test_block_size_1_clean_half_is_the_causal_model(family):
  """At block size 1, x_0 is causal over itself: the AR forward over x_0 (the WSD conversion's
  starting point). With x_t = x_0 the noisy half computes the same (see below)."""
  cfg, params = _model(family, "model.attention=bidirectional")  # ignored in block mode
  causal, _ = _model(family)
  x_t, x_0, seg = _rows(cfg)
  got = _logits(cfg, params, np.concatenate([x_t, x_0], axis=1), seg, block_size=1)
  np.testing.assert_allclose(got[:, LENGTH:], _logits(causal, params, x_0, seg), atol=1e-5)


@pytest.mark.parametrize("family,block_size", [("llama3", 1), ("llama3", 4), ("lfm2", 4)])
def test_equal_halves_give_equal_outputs(family, block_size):
  """With x_t = x_0, x_t block k reads the same values as x_0 block k (its own block, earlier
  clean blocks, the same conv taps), so both halves agree at every block size."""
  cfg, params = _model(family)
  _, x_0, seg = _rows(cfg)
  got = _logits(cfg, params, np.concatenate([x_0, x_0], axis=1), seg, block_size=block_size)
  np.testing.assert_allclose(got[:, :LENGTH], got[:, LENGTH:], atol=1e-5)
  if block_size == 1:
    np.testing.assert_allclose(got[:, LENGTH:], _logits(cfg, params, x_0, seg), atol=1e-5)


@pytest.mark.parametrize("family", ["llama3", "lfm2"])
def test_what_each_row_can_see(family):
  """Block size 4, L 12, one document: a change of x_t in block 1 moves only x_t block 1; a
  change of x_0 in block 1 moves x_t block 2 and x_0 blocks 1-2, never x_t blocks 0-1 — not
  even by a rounding error."""
  cfg, params = _model(family)
  block_size, position = 4, 5  # block 1
  x_t, x_0, _ = _rows(cfg)
  seg = np.ones((2, LENGTH), np.int32)
  tokens = np.concatenate([x_t, x_0], axis=1)
  base = _logits(cfg, params, tokens, seg, block_size)
  noisy_rows, clean_rows = np.arange(LENGTH), np.arange(LENGTH, 2 * LENGTH)
  for changed_row, moved in [(position, noisy_rows[4:8]),
                             (LENGTH + position, np.r_[noisy_rows[8:], clean_rows[4:]])]:
    changed = tokens.copy()
    changed[:, changed_row] = (changed[:, changed_row] + 1) % cfg.vocab_size
    delta = np.max(np.abs(_logits(cfg, params, changed, seg, block_size) - base), axis=(0, 2))
    still = np.setdiff1d(np.arange(2 * LENGTH), moved)
    np.testing.assert_array_equal(delta[still], 0.0)
    assert np.min(delta[moved]) > 1e-4, (changed_row, delta)


ATTENTION_CASES = [(192, 48, 0), (192, 192, 0), (192, 48, 40), (40, 1, 0)]


def _qkv(length, heads=4, kv_heads=2, head_dim=16):
  shapes = [(2, length, heads, head_dim)] + [(2, length, kv_heads, head_dim)] * 2
  return [jnp.asarray(RNG.standard_normal(s), jnp.float32) for s in shapes]


@pytest.mark.parametrize("length,block_size,window", ATTENTION_CASES)
def test_blocked_attention_equals_full_masked_attention(length, block_size, window):
  """Query chunks of 128 over 2L = 384 rows, with chunks that end inside a block (48), blocks
  larger than a chunk (192), a window, and block size 1 in a half shorter than one chunk;
  values and gradients."""
  q, k, v = _qkv(2 * length)
  mask = block_diffusion_mask(jnp.asarray(packed_segments(length)), block_size, window=window)
  cotangent = jnp.asarray(RNG.standard_normal(q.shape), jnp.float32)

  @functools.partial(jax.jit, static_argnums=0)
  def output_and_grads(fn, q, k, v, mask, cotangent):  # arguments, so XLA folds no constants
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
    return out, vjp(cotangent)

  blocked = lambda q, k, v, mask: blocked_attention(q, k, v, mask, 0.25, True, window,
                                                    block_size)
  full = lambda q, k, v, mask: dot_product_attention(q, k, v, mask, 0.25)
  want, got = (output_and_grads(fn, q, k, v, mask, cotangent) for fn in (full, blocked))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)


def _attend_twice_in_block_mode(impl, caplog):
  """Attention by `impl` twice in block mode (L 64, b 16: 2L = 128 is one whole flash block,
  so only block mode can stop a flash kernel): its last output, the xla path's, and the
  warnings `impl` logged."""
  length, block_size = 64, 16
  q, k, v = _qkv(2 * length)
  seg = jnp.asarray(packed_segments(length))
  mask = block_diffusion_mask(seg, block_size)
  with caplog.at_level(logging.WARNING, logger=lowering.__name__):
    outs = [attend(impl, q, k, v, mask, seg, scale=0.25, causal=True, window=0,
                   block_size=block_size) for _ in range(2)]
  warnings = [r.getMessage() for r in caplog.records if f"attention: {impl}" in r.getMessage()]
  want = blocked_attention(q, k, v, mask, 0.25, True, 0, block_size)
  return np.asarray(jax.block_until_ready(outs[-1])), np.asarray(want), warnings


def test_gpu_flash_kernel_warns_once_and_runs_xla_in_block_mode(interpret_pallas, caplog):
  """Pallas GPU's mha takes only causal/full masks over segment ids: block mode runs xla."""
  lowering._warned.clear()
  got, want, warnings = _attend_twice_in_block_mode("pallas_gpu", caplog)
  np.testing.assert_array_equal(got, want)
  assert len(warnings) == 1 and "block-diffusion mask" in warnings[0] and "xla" in warnings[0]


def test_tpu_flash_kernel_that_does_not_lower_warns_once_and_runs_xla(monkeypatch, caplog):
  """Compiled for real, splash does not lower on a CPU: block mode falls back like any shape."""
  monkeypatch.delenv(lowering.INTERPRET_ENV_VAR, raising=False)
  lowering._warned.clear()
  attention_kernels._lowers.cache_clear()
  got, want, warnings = _attend_twice_in_block_mode("pallas_tpu", caplog)
  np.testing.assert_array_equal(got, want)
  assert len(warnings) == 1 and "does not lower" in warnings[0] and "xla" in warnings[0]


def test_splash_attention_takes_the_block_mask(interpret_pallas):
  """Splash attention with the static block pattern and both halves' segment ids equals the
  masked attention, values and gradients (interpret mode)."""
  length, block_size = 128, 32
  q, k, v = _qkv(2 * length, heads=2, kv_heads=1, head_dim=48)
  seg_np = packed_segments(length)
  seg = jnp.asarray(seg_np)
  mask = block_diffusion_mask(seg, block_size)
  real = jnp.asarray(np.concatenate([seg_np, seg_np], axis=1) > 0)[:, :, None, None]

  def loss(fn, q, k, v):
    return jnp.sum(jnp.where(real, fn(q, k, v), 0.0) ** 2)

  def flash(q, k, v):
    return attention_kernels.flash_attention("pallas_tpu", q, k, v, seg, scale=0.25,
                                             causal=True, block_size=block_size)

  masked = lambda q, k, v: blocked_attention(q, k, v, mask, 0.25, True, 0, block_size)
  want = jax.value_and_grad(functools.partial(loss, masked), argnums=(0, 1, 2))(q, k, v)
  got = jax.block_until_ready(
      jax.value_and_grad(functools.partial(loss, flash), argnums=(0, 1, 2))(q, k, v))
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5)


def test_splash_block_mode_lowers_for_tpu():
  """Forward and backward with the block pattern lower to Mosaic at the Dhara-70M shape (bf16,
  8/4 heads of 48, L 1024 so 2L 2048, block 32); the final compile needs the chip."""
  q = jax.ShapeDtypeStruct((2, 2048, 8, 48), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 2048, 4, 48), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, 2048), jnp.int32)
  program = attention_kernels.forward_and_backward("pallas_tpu", scale=48 ** -0.5, causal=False,
                                                   block_size=32)
  exported = jax.export.export(jax.jit(program), platforms=["tpu"])(q, kv, kv, seg)
  assert "custom_call" in exported.mlir_module()
