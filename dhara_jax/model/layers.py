"""Building blocks of the decoder: projections, embeddings, norms, RoPE, MLPs.

Every parameter is created with logical axis names (see `dhara_jax.sharding` for the rules that
map them onto the mesh).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Axes = tuple[str | None, ...]


def param_init(std: float, axes: Axes) -> nn.initializers.Initializer:
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def matmul(x_NxI: jax.Array, kernel: jax.Array, out_dtype: jnp.dtype | None = None,
           kernel_transposed: bool = False) -> jax.Array:
  """x @ kernel with x's dtype as the compute dtype and float32 accumulation.

  `kernel` is the float32 master weight, I×O, or O×I with `kernel_transposed` (a tied
  embedding table: contracting it in place keeps XLA:CPU on its bf16 path, where transposing
  it first does not). The result is in `out_dtype` (default: x's dtype).

  For bf16 compute the backward's matmuls also take bf16 operands and accumulate in float32
  (dx in x's dtype, dkernel in float32). Plain autodiff of a matmul with an f32 result would
  hand the backward an f32 cotangent and run both gradient matmuls in f32 instead: half speed
  or worse on TPU, GPU and CPU alike.
  """
  return _matmul_fwd(x_NxI, kernel, out_dtype, kernel_transposed)[0]


def _dims(lhs_contract: int, rhs_contract: int):
  return ((lhs_contract,), (rhs_contract,)), ((), ())


def _matmul_fwd(x_NxI, kernel, out_dtype, kernel_transposed):
  y_NxO = jax.lax.dot_general(x_NxI, kernel.astype(x_NxI.dtype),
                              _dims(1, 1 if kernel_transposed else 0),
                              preferred_element_type=jnp.float32)
  return y_NxO.astype(out_dtype or x_NxI.dtype), (x_NxI, kernel)


def _matmul_bwd(out_dtype, kernel_transposed, residuals, dy_NxO):
  x_NxI, master = residuals
  kernel = master.astype(x_NxI.dtype)
  dy_NxO = dy_NxO.astype(x_NxI.dtype)
  dx_NxI = jax.lax.dot_general(dy_NxO, kernel, _dims(1, 0 if kernel_transposed else 1),
                               preferred_element_type=jnp.float32)
  dkernel = matmul_at_b(x_NxI, dy_NxO, transpose_result=kernel_transposed)
  return dx_NxI.astype(x_NxI.dtype), dkernel.astype(master.dtype)


def matmul_at_b(a_xNxA: jax.Array, b_xNxB: jax.Array, transpose_result: bool = False
                ) -> jax.Array:
  """aᵀ·b over the row dim N (…×A×B, or …×B×A with `transpose_result`), in float32; leading
  dims are batch dims. The shape of every weight gradient.

  XLA:CPU runs a bf16 dot on its AMX path (YNNPACK) only if the left operand is contracted
  on its last dim in row-major layout; contracting N directly, the dot would be upcast to f32
  and run 3x slower. So on CPU the dot gets a materialised aᵀ (and the result is transposed
  after, if asked); other backends contract N in place.
  """
  batch = tuple(range(a_xNxA.ndim - 2))
  row = a_xNxA.ndim - 2
  swap = (*batch, row + 1, row)

  def in_place(a, b):
    a, b = (b, a) if transpose_result else (a, b)
    return jax.lax.dot_general(a, b, (((row,), (row,)), (batch, batch)),
                               preferred_element_type=jnp.float32)

  def cpu(a, b):
    result_shape = (*a.shape[:-2], a.shape[-1], b.shape[-1])
    if a.dtype != jnp.bfloat16 or _split_axis(a.shape, swap) is None or (
        transpose_result and _split_axis(result_shape, swap) is None):
      return in_place(a, b)  # XLA:CPU upcasts this dot to f32 before any pass can fold into it
    at_b = jax.lax.dot_general(_copied_transpose(a, swap), b,
                               (((row + 1,), (row,)), (batch, batch)),
                               preferred_element_type=jnp.float32)
    return _copied_transpose(at_b, swap) if transpose_result else at_b

  return jax.lax.platform_dependent(a_xNxA, b_xNxB, cpu=cpu, default=in_place)


def transpose_copy(x: jax.Array, perm: tuple[int, ...]) -> jax.Array:
  """x.transpose(perm) for an operand or result of a bf16 dot: on CPU, written so that the
  dot stays on XLA:CPU's AMX path (see `_copied_transpose`); a plain transpose elsewhere."""
  return jax.lax.platform_dependent(x, cpu=lambda x: _copied_transpose(x, perm),
                                    default=lambda x: x.transpose(perm))


def _copied_transpose(x: jax.Array, perm: tuple[int, ...]) -> jax.Array:
  """x.transpose(perm), written so that XLA:CPU copies the data in row-major layout.

  XLA:CPU decides whether a bf16 dot runs on its AMX path before layout assignment; a plain
  transpose operand then has a permuted layout and the dot is upcast to f32, and a transpose
  of the result can be folded into the dot, which then fails at run time (XLA:CPU has no bf16
  dot off the AMX path). Splitting an even moved dim in two around the transpose hides it from
  both. If every moved dim is odd, a plain transpose: callers that transpose a bf16 dot's
  result check `_split_axis` first.
  """
  axis = _split_axis(x.shape, perm)
  if axis is None:
    return x.transpose(perm)
  split = x.reshape(*x.shape[:axis], x.shape[axis] // 2, 2, *x.shape[axis + 1:])
  split_perm = [q for p in perm for q in ((p, p + 1) if p == axis else (p + (p > axis),))]
  return split.transpose(split_perm).reshape([x.shape[p] for p in perm])


def _split_axis(shape: tuple[int, ...], perm: tuple[int, ...]) -> int | None:
  """The last even-sized dim that the transpose moves, or None."""
  even = [p for i, p in enumerate(perm) if p != i and shape[p] % 2 == 0]
  return max(even, default=None)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def soft_cap(x: jax.Array, cap: float) -> jax.Array:
  """cap·tanh(x/cap) (Gemma's logit soft-capping); x itself when cap is 0."""
  return cap * jnp.tanh(x / cap) if cap else x


class Dense(nn.Module):
  """y = x @ W (+ b) with a 2-D kernel.

  Leading dims are flattened into one matmul on purpose: XLA:CPU runs one large 2-D dot much
  faster than a batched 3-D one, and TPU/GPU lose nothing.
  """

  features: int
  kernel_axes: Axes
  use_bias: bool = False
  init_std: float = 0.02
  dtype: jnp.dtype = jnp.float32
  out_dtype: jnp.dtype | None = None  # default: dtype

  @nn.compact
  def __call__(self, x_NxI: jax.Array) -> jax.Array:
    in_features = x_NxI.shape[-1]
    kernel_IxO = self.param("kernel", param_init(self.init_std, self.kernel_axes),
                            (in_features, self.features), jnp.float32)
    # Accumulate in float32 even for bf16 inputs: more accurate, and XLA:CPU's bf16 dot with a
    # float32 result runs ~3.5x faster than one with a bf16 result (its AMX path).
    y = matmul(x_NxI.reshape(-1, in_features).astype(self.dtype), kernel_IxO, self.out_dtype)
    if self.use_bias:
      bias_O = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                               self.kernel_axes[1:]),
                          (self.features,), jnp.float32)
      y = y + bias_O.astype(y.dtype)
    return y.reshape(*x_NxI.shape[:-1], self.features)


class Embed(nn.Module):
  """Token or position table; `attend` gives tied output logits."""

  num_embeddings: int
  features: int
  axes: Axes = ("vocab", "embed")
  init_std: float = 0.02
  dtype: jnp.dtype = jnp.float32

  def setup(self) -> None:
    self.embedding = self.param("embedding", param_init(self.init_std, self.axes),
                                (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, ids: jax.Array) -> jax.Array:
    # Gather from a table whose FSDP-sharded feature dim is all-gathered first: GSPMD then
    # keeps the lookup batch-sharded instead of rematerialising the whole activation.
    table = nn.with_logical_constraint(self.embedding, (self.axes[0], None))
    return jnp.take(table, ids, axis=0).astype(self.dtype)

  def attend(self, x_NxD: jax.Array) -> jax.Array:
    flat = x_NxD.reshape(-1, self.features).astype(self.dtype)
    # Logits stay float32: they feed the softmax.
    logits = matmul(flat, self.embedding, jnp.float32, kernel_transposed=True)
    return logits.reshape(*x_NxD.shape[:-1], self.num_embeddings)


class Norm(nn.Module):
  """LayerNorm (with bias) or RMSNorm over the last axis, computed in float32.

  `unit_offset` is Gemma's variant: the stored scale w is applied as (1 + w) and starts at 0.
  """

  kind: str = "rmsnorm"
  eps: float = 1e-6
  unit_offset: bool = False
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale_init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
    scale = self.param("scale", nn.with_logical_partitioning(scale_init, (self.axis_name,)),
                       (features,), jnp.float32)
    h = x.astype(jnp.float32)
    if self.kind == "layernorm":
      h = h - jnp.mean(h, axis=-1, keepdims=True)
    h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + self.eps)
    h = h * (1.0 + scale if self.unit_offset else scale)
    if self.kind == "layernorm":
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             (self.axis_name,)),
                        (features,), jnp.float32)
      h = h + bias
    return h.astype(x.dtype)


RopeTable = tuple[jax.Array, jax.Array]  # (cos, sin) of the rotary angles, each B×L×K/2


def rope_table(positions_BxL: jax.Array, head_dim: int, theta: float,
               max_position: int) -> RopeTable:
  """cos and sin of the rotary angles, looked up by position in a table of positions
  0 … max(max_position, L) − 1 computed at trace time: XLA:CPU evaluates sin/cos one element
  at a time, and it fused them from the positions into each layer's rotation, forward and
  backward (~3% of a CPU train step). Positions past the table give NaN, not a silent clamp."""
  inv_freq_K2 = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  rows = max(max_position, positions_BxL.shape[-1])
  angles_PxK2 = np.arange(rows, dtype=np.float32)[:, None] * inv_freq_K2
  return tuple(jnp.take(jnp.asarray(table_PxK2), positions_BxL, axis=0, mode="fill",
                        fill_value=jnp.nan)
               for table_PxK2 in (np.cos(angles_PxK2), np.sin(angles_PxK2)))


def apply_rope(x_BxLxHxK: jax.Array, table: RopeTable) -> jax.Array:
  """Rotary embedding in the rotate-half layout (the one transformers' Llama uses)."""
  cos, sin = (t[:, :, None, :] for t in table)
  x = x_BxLxHxK.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxK.dtype)


def activation(name: str):
  """The MLP nonlinearity: GPT-2 and GeGLU use tanh-GELU, SwiGLU uses SiLU."""
  return jax.nn.silu if name == "swiglu" else (lambda x: jax.nn.gelu(x, approximate=True))
