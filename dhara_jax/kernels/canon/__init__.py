"""Canon-layer / LFM2 causal depthwise convolution: oracle, XLA and Pallas TPU/GPU kernels."""

from dhara_jax.kernels.canon.api import canon_conv, resolve_impl

__all__ = ["canon_conv", "resolve_impl"]
