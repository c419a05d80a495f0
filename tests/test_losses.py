import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import compiled_dot_operand_types

from dhara_jax.model import Head
from dhara_jax.losses import head_cross_entropy_sum

RNG = np.random.default_rng(0)


def _reference_cross_entropy(logits, targets, weights):
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - target_logit) * weights)


@pytest.mark.parametrize("transposed,softcap,chunks,d_model", [
    (True, 0.0, 1, 8), (True, 0.0, 3, 8), (False, 0.0, 3, 8), (True, 5.0, 3, 8),
    (True, 0.0, 1, 7)])  # d_model and vocab both odd: the table's transpose cannot be hidden
def test_fused_head_cross_entropy_equals_logits_then_cross_entropy(transposed, softcap, chunks,
                                                                   d_model):
  """Same loss and gradients as materialising the logits, for any chunking; in bf16 it runs
  (XLA:CPU fails on a bf16 dot off its AMX path) with every compiled dot taking bf16."""
  batch, length, vocab = 2, 9, 13
  hidden = jnp.asarray(RNG.standard_normal((batch, length, d_model)), jnp.float32)
  kernel = jnp.asarray(RNG.standard_normal((vocab, d_model) if transposed else
                                           (d_model, vocab)), jnp.float32)
  targets = jnp.asarray(RNG.integers(0, vocab, (batch, length)))
  weights = jnp.asarray(RNG.integers(0, 2, (batch, length)), jnp.float32)

  def reference(hidden, kernel):
    logits = hidden @ (kernel.T if transposed else kernel)
    logits = softcap * jnp.tanh(logits / softcap) if softcap else logits
    return _reference_cross_entropy(logits, targets, weights)

  def fused(hidden, kernel):
    return head_cross_entropy_sum(hidden, Head(kernel, transposed, softcap), targets, weights,
                                  chunks)

  want, want_grads = jax.value_and_grad(reference, argnums=(0, 1))(hidden, kernel)
  got, got_grads = jax.value_and_grad(fused, argnums=(0, 1))(hidden, kernel)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(jax.jit(fused)(hidden, kernel), want, rtol=1e-5)  # no grad

  bf16 = jax.value_and_grad(lambda h, k: fused(h.astype(jnp.bfloat16), k), argnums=(0, 1))
  got, got_grads = bf16(hidden, kernel)
  assert abs(float(got) - float(want)) < 2e-2 * abs(float(want))
  for g, w in zip(got_grads, want_grads):
    assert float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w))) < 3e-2
  types = compiled_dot_operand_types(bf16, hidden, kernel)
  # With both dims odd the table gradient's dot has no bf16 form and is upcast instead.
  assert types == {"bf16"} if d_model % 2 == 0 else "bf16" in types
