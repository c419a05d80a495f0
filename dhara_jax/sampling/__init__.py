"""Generation: KV-cached AR decoding and the masked-diffusion samplers (with the exact block KV
cache), behind one `generate`."""

from dhara_jax.sampling.api import generate  # noqa: F401
from dhara_jax.sampling.rows import left_aligned  # noqa: F401
from dhara_jax.sampling.settings import Generation, Sampling, check_sampling  # noqa: F401
from dhara_jax.sampling.settings import tokens_per_forward  # noqa: F401
