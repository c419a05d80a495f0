"""Pallas GPU kernels (Triton lowering): the conv (causal, or anti-causal for dx) and dw.

Why Triton and not Mosaic GPU: a tap is a load of x shifted by j rows, which Triton expresses as
plain pointer arithmetic with a mask (the K shifted loads of a tile hit L1/L2, so HBM traffic
stays ≈ one read of x). Mosaic GPU wants TMA-aligned SMEM tiles, and shifting by 1..K-1 rows in
SMEM/registers is where an untested kernel would go wrong. The Triton path is selected explicitly
by its `CompilerParams`, so the `jax_pallas_use_mosaic_gpu` default does not matter.

Grid (B, time tiles, channel tiles); a step owns BT×BC outputs (powers of two, as Triton needs).
No padding: rows and channels past the end are masked. Row indices are clamped to ≥ 0 before
masking so that a masked lane never forms a negative offset (and so that the CPU interpreter,
whose gathers wrap negative indices, computes the same thing). Sums are float32.

Checked here only in interpret mode (`interpret=True` runs the same kernel body on CPU) and by
lowering to Triton IR for CUDA without compiling it; PTX compilation and timing need a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from dhara_jax.kernels.canon.common import PallasOptions, jit_conv, jit_weight_grad, tap_offsets

DEFAULT_BLOCK_T = 64
DEFAULT_BLOCK_C = 128


def _block_sizes(opts: PallasOptions) -> tuple[int, int]:
  return (pl.next_power_of_2(opts.block_t or DEFAULT_BLOCK_T),
          pl.next_power_of_2(opts.block_c or DEFAULT_BLOCK_C))


class _Tile:
  """Row/channel indices of this grid step and the loads that read shifted rows of it."""

  def __init__(self, length: int, channels: int, block_t: int, block_c: int, seg_ref):
    self.b = pl.program_id(0)
    self.t0 = pl.program_id(1) * block_t
    self.c0 = pl.program_id(2) * block_c
    self.rows = self.t0 + jnp.arange(block_t, dtype=jnp.int32)
    self.cols = self.c0 + jnp.arange(block_c, dtype=jnp.int32)
    self.length = length
    self.col_ok = self.cols < channels
    self.row_ok = self.rows < length
    self.seg_ref = seg_ref
    if seg_ref is not None:
      self.seg_T = pltr.load(seg_ref.at[self.b, self.rows], mask=self.row_ok, other=-2)

  def rows_back(self, back: int) -> tuple[jax.Array, jax.Array]:
    """(clamped source rows t - back, whether each source row is readable and same-document)."""
    src = self.rows - back
    ok = (src >= 0) & (src < self.length)
    src = jnp.maximum(src, 0)
    if self.seg_ref is not None and back != 0:
      ok = ok & (pltr.load(self.seg_ref.at[self.b, src], mask=ok, other=-1) == self.seg_T)
    return src, ok

  def load(self, ref, src: jax.Array, ok: jax.Array) -> jax.Array:
    """ref[b, src, cols] as float32 BT×BC, zero where not `ok` or past the channels."""
    mask = ok[:, None] & self.col_ok[None, :]
    tile = pltr.load(ref.at[self.b, src[:, None], self.cols[None, :]], mask=mask, other=0)
    return tile.astype(jnp.float32)

  def taps(self, x_ref, kernel: int, reverse: bool):
    """Yields (k, tap): tap[t] = x[t ∓ j] for w[k], zero outside the sequence/document."""
    for k, back in tap_offsets(kernel, reverse):
      yield k, self.load(x_ref, *self.rows_back(back))


def _split(refs, has_seg: bool):
  x_ref, *rest = refs
  return (x_ref, rest[0], rest[1:]) if has_seg else (x_ref, None, rest)


def _conv_kernel(*refs, length: int, channels: int, kernel: int, block_t: int, block_c: int,
                 reverse: bool, has_seg: bool):
  x_ref, seg_ref, (w_ref, y_ref) = _split(refs, has_seg)
  tile = _Tile(length, channels, block_t, block_c, seg_ref)
  acc_TxC = jnp.zeros((block_t, block_c), jnp.float32)
  for k, tap_TxC in tile.taps(x_ref, kernel, reverse):
    # Static indices are written as 1-row slices: the interpreter rejects plain Python ints.
    w_1xC = pltr.load(w_ref.at[pl.ds(k, 1), pl.ds(tile.c0, block_c)], mask=tile.col_ok[None, :],
                      other=0)
    acc_TxC += tap_TxC * w_1xC
  pltr.store(y_ref.at[tile.b, pl.ds(tile.t0, block_t), pl.ds(tile.c0, block_c)],
             acc_TxC.astype(y_ref.dtype), mask=tile.row_ok[:, None] & tile.col_ok[None, :])


def _weight_grad_kernel(*refs, length: int, channels: int, kernel: int, block_t: int,
                        block_c: int, has_seg: bool):
  x_ref, seg_ref, (g_ref, dw_ref) = _split(refs, has_seg)
  tile = _Tile(length, channels, block_t, block_c, seg_ref)
  g_TxC = tile.load(g_ref, tile.rows, tile.row_ok)
  for k, tap_TxC in tile.taps(x_ref, kernel, reverse=False):
    pltr.store(dw_ref.at[tile.b, pl.program_id(1), pl.ds(k, 1), pl.ds(tile.c0, block_c)],
               jnp.sum(g_TxC * tap_TxC, axis=0, keepdims=True), mask=tile.col_ok[None, :])


def _call(body, out_shape, grid, interpret: bool, *operands):
  return pl.pallas_call(
      body, out_shape=out_shape, grid=grid,
      compiler_params=pltr.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
  )(*operands)


def _seg_operands(seg_BxL: jax.Array | None) -> list[jax.Array]:
  return [] if seg_BxL is None else [seg_BxL.astype(jnp.int32)]


@jit_conv
def conv(x_BxLxC: jax.Array, w_KxC: jax.Array, seg_BxL: jax.Array | None = None, *,
         reverse: bool = False, opts: PallasOptions = PallasOptions()) -> jax.Array:
  """out[t] = Σ_j w[K-1-j] · x[t-j] (reverse: x[t+j]) over same-segment taps, unpadded."""
  batch, length, channels = x_BxLxC.shape
  block_t, block_c = _block_sizes(opts)
  body = functools.partial(_conv_kernel, length=length, channels=channels,
                           kernel=w_KxC.shape[0], block_t=block_t, block_c=block_c,
                           reverse=reverse, has_seg=seg_BxL is not None)
  grid = (batch, pl.cdiv(length, block_t), pl.cdiv(channels, block_c))
  return _call(body, jax.ShapeDtypeStruct(x_BxLxC.shape, x_BxLxC.dtype), grid, opts.interpret,
               x_BxLxC, *_seg_operands(seg_BxL), w_KxC.astype(jnp.float32))


@jit_weight_grad
def weight_grad(x_BxLxC: jax.Array, g_BxLxC: jax.Array, seg_BxL: jax.Array | None,
                kernel: int, *, opts: PallasOptions = PallasOptions()) -> jax.Array:
  """dw[k, c] = Σ_{b,t} g[b,t,c] · x[b, t-(K-1-k), c] over same-segment taps (float32 K×C).

  Each grid step writes its tile's partial sums; the B·⌈L/BT⌉ partials are summed here.
  """
  batch, length, channels = x_BxLxC.shape
  block_t, block_c = _block_sizes(opts)
  body = functools.partial(_weight_grad_kernel, length=length, channels=channels, kernel=kernel,
                           block_t=block_t, block_c=block_c, has_seg=seg_BxL is not None)
  grid = (batch, pl.cdiv(length, block_t), pl.cdiv(channels, block_c))
  partial_shape = jax.ShapeDtypeStruct((batch, grid[1], kernel, channels), jnp.float32)
  partial_BxNxKxC = _call(body, partial_shape, grid, opts.interpret,
                          x_BxLxC, *_seg_operands(seg_BxL), g_BxLxC)
  return jnp.sum(partial_BxNxKxC, axis=(0, 1))
