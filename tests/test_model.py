import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import (compiled_dot_operand_types, logits_before_after_change, random_params,
                  tiny_config)

from dhara_jax.config import FAMILIES
from dhara_jax.model import forward, init_params
from dhara_jax.model.conv import causal_depthwise_conv
from dhara_jax.model.layers import rope_table
from dhara_jax.masks import attention_mask, segment_positions
from dhara_jax.model.moe import MoeMlp

RNG = np.random.default_rng(0)


def test_attention_mask_causal_segments_window():
  seg = jnp.array([[1, 1, 1, 2, 2, 0]])
  m = np.asarray(attention_mask(seg, causal=True))[0, 0]
  expected = np.array([[1, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0],
                       [0, 0, 0, 1, 0, 0],
                       [0, 0, 0, 1, 1, 0],
                       [0, 0, 0, 0, 0, 1]], bool)
  np.testing.assert_array_equal(m, expected)
  bi = np.asarray(attention_mask(seg, causal=False))[0, 0]
  np.testing.assert_array_equal(bi, expected | expected.T)
  win = np.asarray(attention_mask(jnp.ones((1, 5), jnp.int32), causal=True, window=2))[0, 0]
  np.testing.assert_array_equal(win, np.tri(5, dtype=bool) & ~np.tri(5, k=-2, dtype=bool))


def test_segment_positions_restart_per_document():
  seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
  np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_rope_table_is_cos_sin_of_the_angles_and_no_sin_cos_runs_per_step():
  positions = jnp.array([[0, 1, 2, 0, 1, 7]])
  cos, sin = rope_table(positions, head_dim=8, theta=10_000.0, max_position=8)
  angles = positions[..., None] * 10_000.0 ** (-jnp.arange(0, 8, 2) / 8)
  np.testing.assert_allclose(cos, jnp.cos(angles), atol=1e-6)
  np.testing.assert_allclose(sin, jnp.sin(angles), atol=1e-6)
  cos, _ = rope_table(jnp.array([[3, 9]]), head_dim=8, theta=10_000.0, max_position=8)
  assert np.isfinite(cos[0, 0]).all() and np.isnan(cos[0, 1]).all()  # past the table: NaN
  # The table is a constant: the compiled gradient evaluates no sin/cos on activations.
  cfg = tiny_config("llama3")
  params = init_params(cfg, jax.random.key(0))
  tokens = jnp.asarray(RNG.integers(0, cfg.vocab_size, (2, 16)))
  grad = jax.jit(jax.grad(lambda p: jnp.sum(forward(cfg, p, tokens)[0])))
  hlo = grad.lower(params).compile().as_text()
  assert " sine(" not in hlo and " cosine(" not in hlo


@pytest.mark.parametrize("kernel", [1, 3, 4])
def test_causal_conv_matches_naive_loop(kernel):
  x = RNG.standard_normal((2, 9, 5)).astype(np.float32)
  w = RNG.standard_normal((kernel, 5)).astype(np.float32)
  seg = np.array([[1] * 4 + [2] * 5, [1] * 9])
  out = np.asarray(causal_depthwise_conv(jnp.asarray(x), jnp.asarray(w), jnp.asarray(seg)))
  naive = np.zeros_like(x)
  for b in range(2):
    for t in range(9):
      for k in range(kernel):
        src = t - (kernel - 1 - k)
        if src >= 0 and seg[b, src] == seg[b, t]:
          naive[b, t] += w[k] * x[b, src]
  np.testing.assert_allclose(out, naive, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_documents_equal_separate_runs(family):
  """Segment ids keep documents apart: packing two documents into one row changes nothing."""
  cfg = tiny_config(family)
  params = random_params(cfg)
  doc_a, doc_b = RNG.integers(0, cfg.vocab_size, 7), RNG.integers(0, cfg.vocab_size, 5)
  packed = np.concatenate([doc_a, doc_b])[None]
  seg = np.array([[1] * 7 + [2] * 5])
  logits_packed, _ = forward(cfg, params, packed, seg)
  logits_a, _ = forward(cfg, params, doc_a[None])
  logits_b, _ = forward(cfg, params, doc_b[None])
  np.testing.assert_allclose(logits_packed[0, :7], logits_a[0], atol=1e-5)
  np.testing.assert_allclose(logits_packed[0, 7:], logits_b[0], atol=1e-5)


@pytest.mark.parametrize("family", ["llama3", "lfm2"])
def test_causal_outputs_ignore_future_and_bidirectional_does_not(family):
  cfg = tiny_config(family)
  params = random_params(cfg)
  tokens = RNG.integers(0, cfg.vocab_size, (1, 10))
  causal_a, causal_b = logits_before_after_change(cfg, params, tokens, position=9)
  np.testing.assert_allclose(causal_a[0, :-1], causal_b[0, :-1], atol=1e-6)
  bi = tiny_config(family, "model.attention=bidirectional")
  bi_a, bi_b = logits_before_after_change(bi, params, tokens, position=9)
  assert np.max(np.abs(bi_a[0, :-1] - bi_b[0, :-1])) > 1e-4


def test_sliding_window_limits_receptive_field():
  cfg = tiny_config("gemma3", "model.layer_pattern=L", "model.num_layers=1",
                    "model.sliding_window=3")
  a, b = logits_before_after_change(cfg, random_params(cfg),
                                    RNG.integers(0, cfg.vocab_size, (1, 8)), position=0)
  assert np.max(np.abs(a[0, :3] - b[0, :3])) > 1e-4   # positions 0..2 see token 0
  np.testing.assert_allclose(a[0, 3:], b[0, 3:], atol=1e-6)  # one local layer: no further


def test_moe_matches_dense_per_token_reference():
  cfg = tiny_config("moe")
  layer = MoeMlp(cfg.num_experts, cfg.experts_per_token, cfg.moe_mlp_dim, "swiglu", True)
  x = jnp.asarray(RNG.standard_normal((2, 6, cfg.d_model)), jnp.float32)
  variables = layer.init(jax.random.key(1), x, jnp.ones((2, 6), bool))
  y, state = layer.apply(variables, x, jnp.ones((2, 6), bool), mutable=["intermediates"])
  p = jax.tree.map(np.asarray, nn.meta.unbox(variables["params"]))
  flat = np.asarray(x).reshape(-1, cfg.d_model)
  expected = np.zeros_like(flat)
  for n, tok in enumerate(flat):
    logits = tok @ p["router"]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = np.argsort(-probs)[:cfg.experts_per_token]
    weights = probs[top] / probs[top].sum()
    for e, w in zip(top, weights):
      gate = tok @ p["gate"][e]
      h = gate / (1 + np.exp(-gate)) * (tok @ p["up"][e])
      expected[n] += w * (h @ p["down"][e])
  np.testing.assert_allclose(np.asarray(y).reshape(-1, cfg.d_model), expected, atol=1e-5)
  aux = state["intermediates"]["moe_aux_loss"][0]
  assert 0.9 * cfg.experts_per_token <= float(aux) <= cfg.num_experts  # k when balanced


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_are_finite_and_nonzero(family):
  cfg = tiny_config(family)
  params = init_params(cfg, jax.random.key(0))
  tokens = RNG.integers(0, cfg.vocab_size, (2, 8))

  def loss(p):
    logits, aux = forward(cfg, p, tokens)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1)) + aux

  grads = jax.grad(loss)(params)
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) > 0.9 * len(norms)


def test_bfloat16_compute_is_close_to_float32():
  cfg = tiny_config("llama3")
  params = random_params(cfg)
  tokens = RNG.integers(0, cfg.vocab_size, (2, 8))
  f32, _ = forward(cfg, params, tokens)
  bf16, _ = forward(tiny_config("llama3", "model.dtype=bfloat16"), params, tokens)
  assert bf16.dtype == jnp.float32  # logits are returned in float32
  assert float(jnp.max(jnp.abs(f32 - bf16))) < 0.1 * float(jnp.max(jnp.abs(f32)))


@pytest.mark.parametrize("causal,window", [(True, 0), (True, 40), (False, 40), (False, 0)])
def test_blocked_attention_equals_full(causal, window):
  from dhara_jax.model.attention import blocked_attention, dot_product_attention
  length = 300  # not a multiple of the query block
  q = jnp.asarray(RNG.standard_normal((2, length, 4, 8)), jnp.float32)
  k = jnp.asarray(RNG.standard_normal((2, length, 2, 8)), jnp.float32)
  v = jnp.asarray(RNG.standard_normal((2, length, 2, 8)), jnp.float32)
  seg = jnp.asarray(np.repeat([[1] * 170 + [2] * 100 + [0] * 30], 2, axis=0))
  mask = attention_mask(seg, causal=causal, window=window)
  full = dot_product_attention(q, k, v, mask, 0.3)
  blocked = blocked_attention(q, k, v, mask, 0.3, causal=causal, window=window)
  np.testing.assert_allclose(np.asarray(blocked), np.asarray(full), atol=1e-5)


def test_mixed_precision_matmul_gradients():
  """The custom-VJP matmul: f32 gradients equal plain autodiff; for bf16 compute they match the
  f32 ones to bf16 precision and every backward matmul takes bf16 operands."""
  from dhara_jax.model.layers import matmul

  rng = np.random.default_rng(0)
  x_NxI = jnp.asarray(rng.standard_normal((64, 48)), jnp.float32)
  kernel_IxO = jnp.asarray(rng.standard_normal((48, 32)) * 0.1, jnp.float32)
  target_NxO = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
  loss = lambda mm, x, k: jnp.sum((mm(x, k).astype(jnp.float32) - target_NxO) ** 2)
  plain = lambda x, k: x @ k
  want = jax.grad(lambda x, k: loss(plain, x, k), argnums=(0, 1))(x_NxI, kernel_IxO)
  got = jax.grad(lambda x, k: loss(matmul, x, k), argnums=(0, 1))(x_NxI, kernel_IxO)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)

  bf16_grad = jax.grad(lambda x, k: loss(matmul, x.astype(jnp.bfloat16), k), argnums=(0, 1))
  got = bf16_grad(x_NxI, kernel_IxO)
  assert got[1].dtype == jnp.float32  # the master weight's gradient
  for g, w in zip(got, want):
    assert float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w))) < 2e-2
  dots = list(_dot_generals(jax.make_jaxpr(bf16_grad)(x_NxI, kernel_IxO).jaxpr))
  assert len(dots) >= 3  # forward, dx, dkernel (and dkernel's per-platform variants)
  assert all(v.aval.dtype == jnp.bfloat16 for eqn in dots for v in eqn.invars)
  assert compiled_dot_operand_types(bf16_grad, x_NxI, kernel_IxO) == {"bf16"}

  # A tied head contracts the O×I table in place: same values and gradients, in bf16 too.
  kernel_OxI = jnp.asarray(np.asarray(kernel_IxO).T)
  tied = lambda x, k: loss(lambda x, k: matmul(x, k, jnp.float32, kernel_transposed=True), x, k)
  want = (want[0], want[1].T)
  got = jax.grad(tied, argnums=(0, 1))(x_NxI, kernel_OxI)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  tied_bf16_grad = jax.grad(lambda x, k: tied(x.astype(jnp.bfloat16), k), argnums=(0, 1))
  for g, w in zip(tied_bf16_grad(x_NxI, kernel_OxI), want):
    assert float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w))) < 2e-2
  assert compiled_dot_operand_types(tied_bf16_grad, x_NxI, kernel_OxI) == {"bf16"}


def test_bf16_matmul_gradients_run_with_odd_dims():
  """With every dim odd the weight gradient has no bf16 form on XLA:CPU's AMX path; it must
  fall back to f32, not fail at run time."""
  from dhara_jax.model.layers import matmul

  x_NxI = jnp.asarray(RNG.standard_normal((9, 7)), jnp.float32)
  kernel_OxI = jnp.asarray(RNG.standard_normal((13, 7)), jnp.float32)
  loss = lambda x, k: jnp.sum(matmul(x, k, jnp.float32, kernel_transposed=True) ** 2)
  want = jax.grad(loss, argnums=(0, 1))(x_NxI, kernel_OxI)
  bf16_grad = jax.grad(lambda x, k: loss(x.astype(jnp.bfloat16), k), argnums=(0, 1))
  assert "bf16" in compiled_dot_operand_types(bf16_grad, x_NxI, kernel_OxI)
  for g, w in zip(jax.jit(bf16_grad)(x_NxI, kernel_OxI), want):
    assert float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w))) < 3e-2


def test_attention_gradients_equal_autodiff_of_plain_softmax():
  """The FlashAttention-style backward equals autodiff of a plain softmax attention (GQA,
  packed documents, fully masked padding rows); in bf16 every compiled dot takes bf16."""
  from dhara_jax.model.attention import dot_product_attention

  def plain(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask_Bx1xLxS, scale):
    repeats = q_BxLxHxK.shape[2] // k_BxSxGxK.shape[2]
    k_BxSxHxK, v_BxSxHxK = (jnp.repeat(t, repeats, axis=2) for t in (k_BxSxGxK, v_BxSxGxK))
    scores = jnp.einsum("blhk,bshk->bhls", q_BxLxHxK * scale, k_BxSxHxK)
    probs = jax.nn.softmax(jnp.where(mask_Bx1xLxS, scores, jnp.finfo(jnp.float32).min))
    return jnp.einsum("bhls,bshk->blhk", probs, v_BxSxHxK)

  length = 40
  q, k, v = (jnp.asarray(RNG.standard_normal((2, length, h, 8)), jnp.float32) for h in (4, 2, 2))
  mask = attention_mask(jnp.asarray(np.repeat([[1] * 20 + [2] * 14 + [0] * 6], 2, axis=0)),
                        causal=True)
  weights = jnp.asarray(RNG.standard_normal((2, length, 4, 8)), jnp.float32)
  loss = lambda attend, *qkv: jnp.sum(attend(*qkv, mask, 0.3).astype(jnp.float32) * weights)
  want = jax.grad(lambda *qkv: loss(plain, *qkv), argnums=(0, 1, 2))(q, k, v)
  got = jax.grad(lambda *qkv: loss(dot_product_attention, *qkv), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)

  bf16_grad = jax.grad(lambda *qkv: loss(dot_product_attention,
                                         *(t.astype(jnp.bfloat16) for t in qkv)),
                       argnums=(0, 1, 2))
  for g, w in zip(bf16_grad(q, k, v), want):
    assert float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w))) < 3e-2
  assert compiled_dot_operand_types(bf16_grad, q, k, v) == {"bf16"}


def _dot_generals(jaxpr):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
          yield from _dot_generals(getattr(sub, "jaxpr", sub))
