import jax
import jax.numpy as jnp
import numpy as np

from dhara_jax.objectives import cross_entropy_sum

RNG = np.random.default_rng(0)


def _reference_cross_entropy(logits, targets, weights):
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - target_logit) * weights)


def test_cross_entropy_value_and_gradient_equal_autodiff():
  logits = jnp.asarray(RNG.standard_normal((2, 7, 13)) * 4, jnp.float32)
  targets = jnp.asarray(RNG.integers(0, 13, (2, 7)))
  weights = jnp.asarray(RNG.integers(0, 2, (2, 7)), jnp.float32)
  got, got_grad = jax.value_and_grad(cross_entropy_sum)(logits, targets, weights)
  want, want_grad = jax.value_and_grad(_reference_cross_entropy)(logits, targets, weights)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got_grad, want_grad, atol=1e-6)
  assert float(jnp.abs(got_grad[weights == 0]).max()) == 0.0  # unweighted tokens get nothing
