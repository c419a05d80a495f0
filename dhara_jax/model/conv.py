"""Causal depthwise 1-D convolution (LFM2 short conv, Canon layers): see dhara_jax.kernels.canon."""

from dhara_jax.kernels.canon import canon_conv as causal_depthwise_conv  # noqa: F401
