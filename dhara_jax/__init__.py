"""dhara-jax: small language models in JAX/Flax, from the Dhara-70M study."""

__version__ = "0.1.0"
