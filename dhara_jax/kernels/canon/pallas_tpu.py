"""Pallas TPU kernels: the conv (causal, or anti-causal for dx) and the weight gradient.

Grid (B, C blocks, time tiles), all parallel. Each step gets its B-row's time tile (BT×BC) plus a
halo: the H rows just before it (causal) or just after it (anti-causal), read through a second
BlockSpec on the same array, H = K-1 rounded up to 16 (a whole bf16 sublane tile). Tap j is a
sublane rotation of [halo; tile] by j, sliced back to the tile at an aligned offset; segment
resets compare the segment id column rotated the same way. Sums are float32.

Block shapes lower on TPU: C is zero-padded to a multiple of 128 and L to a multiple of the time
tile (then sliced back); segment ids travel as a B×L×1 int32 column. Without a TPU the kernels run
only in interpret mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dhara_jax.errors import ConfigError
from dhara_jax.kernels.canon.common import (PallasOptions, jit_conv, jit_weight_grad, pad_axis,
                                            round_up, tap_offsets)

LANES = 128
HALO_ALIGN = 16  # bf16 packs 16 rows into one (8, 128) tile
DEFAULT_BLOCK_T = 256
MAX_BLOCK_C = 512


class _Tiling:
  """Padded sizes and tile sizes for one call."""

  def __init__(self, length: int, channels: int, kernel: int, opts: PallasOptions):
    self.halo = round_up(max(kernel - 1, 1), HALO_ALIGN)
    # No tile longer than the (padded) sequence; tiles are whole halos so halo blocks index it.
    want_t = min(opts.block_t or DEFAULT_BLOCK_T, round_up(length, self.halo))
    self.block_t = round_up(want_t, self.halo)
    self.length = round_up(length, self.block_t)
    self.channels = round_up(channels, LANES)
    lane_tiles = self.channels // LANES
    self.block_c = opts.block_c or LANES * max(d for d in range(1, MAX_BLOCK_C // LANES + 1)
                                               if lane_tiles % d == 0)
    if self.block_c % LANES or self.channels % self.block_c:
      raise ConfigError(f"canon conv: block_c={opts.block_c} must be a multiple of {LANES} "
                        f"dividing the padded channel count {self.channels}")
    self.grid_t = self.length // self.block_t


def _shifted_taps(x_ref, xh_ref, seg_refs, *, kernel: int, halo: int, reverse: bool):
  """Yields (k, tap): tap[t] = x[t ∓ j] for w[k] (float32 BT×BC), zero outside the sequence
  or in another document."""
  i = pl.program_id(2)
  has_halo = i < pl.num_programs(2) - 1 if reverse else i > 0
  cur_TxC = x_ref[0].astype(jnp.float32)
  nbr_HxC = jnp.where(has_halo, xh_ref[0].astype(jnp.float32), 0.0)
  block_t, block_c = cur_TxC.shape
  rows = block_t + halo
  # The halo sits after the tile (anti-causal) or before it (causal); `lo` is the tile's start.
  order = (lambda cur, nbr: [cur, nbr]) if reverse else (lambda cur, nbr: [nbr, cur])
  lo = 0 if reverse else halo
  buf_NxC = jnp.concatenate(order(cur_TxC, nbr_HxC), axis=0)
  if seg_refs:
    seg_Tx1 = seg_refs[0][0]
    seg_NxC = jnp.broadcast_to(jnp.concatenate(order(seg_Tx1, seg_refs[1][0]), axis=0),
                               (rows, block_c))
  for k, back in tap_offsets(kernel, reverse):
    if back == 0:
      yield k, cur_TxC
      continue
    # roll: out[r] = buf[r - shift]; `back` never exceeds the halo, so the tile never wraps.
    shift = back % rows
    tap_TxC = pltpu.roll(buf_NxC, shift, 0)[lo:lo + block_t]
    if seg_refs:
      same_TxC = pltpu.roll(seg_NxC, shift, 0)[lo:lo + block_t] == seg_Tx1
      tap_TxC = jnp.where(same_TxC, tap_TxC, 0.0)
    yield k, tap_TxC


def _conv_kernel(*refs, kernel: int, halo: int, reverse: bool, has_seg: bool):
  x_ref, xh_ref, *seg_refs, w_ref, y_ref = refs
  assert len(seg_refs) == (2 if has_seg else 0)
  acc_TxC = None
  for k, tap_TxC in _shifted_taps(x_ref, xh_ref, seg_refs, kernel=kernel, halo=halo,
                                  reverse=reverse):
    term_TxC = tap_TxC * w_ref[pl.ds(k, 1), :]
    acc_TxC = term_TxC if acc_TxC is None else acc_TxC + term_TxC
  y_ref[0] = acc_TxC.astype(y_ref.dtype)


def _weight_grad_kernel(*refs, kernel: int, halo: int, has_seg: bool):
  x_ref, xh_ref, *seg_refs, g_ref, dw_ref = refs
  assert len(seg_refs) == (2 if has_seg else 0)
  g_TxC = g_ref[0].astype(jnp.float32)
  for k, tap_TxC in _shifted_taps(x_ref, xh_ref, seg_refs, kernel=kernel, halo=halo,
                                  reverse=False):
    dw_ref[0, 0, pl.ds(k, 1), :] = jnp.sum(g_TxC * tap_TxC, axis=0, keepdims=True)


def _halo_index(tiling: _Tiling, reverse: bool):
  """Index map of the halo block (units of H rows): the rows just before/after tile i."""
  per_tile = tiling.block_t // tiling.halo
  last = tiling.length // tiling.halo - 1
  if reverse:
    return lambda i: jnp.minimum((i + 1) * per_tile, last)
  return lambda i: jnp.maximum(i * per_tile - 1, 0)


def _stream_specs(tiling: _Tiling, reverse: bool, width: int | None) -> list[pl.BlockSpec]:
  """BlockSpecs for a B×L×width array: its tile and its halo (width None: the channel block)."""
  halo_row = _halo_index(tiling, reverse)
  block_w = tiling.block_c if width is None else width
  col = (lambda c: c) if width is None else (lambda c: 0)
  return [pl.BlockSpec((1, tiling.block_t, block_w), lambda b, c, i: (b, i, col(c))),
          pl.BlockSpec((1, tiling.halo, block_w), lambda b, c, i: (b, halo_row(i), col(c)))]


def _inputs(x_BxLxC, seg_BxL, tiling: _Tiling, reverse: bool):
  """Padded operands and their BlockSpecs: x tile + halo, then (optionally) segment tile + halo."""
  x_pad = pad_axis(pad_axis(x_BxLxC, 1, tiling.length), 2, tiling.channels)
  operands, specs = [x_pad, x_pad], _stream_specs(tiling, reverse, None)
  if seg_BxL is not None:
    seg_pad = pad_axis(seg_BxL.astype(jnp.int32), 1, tiling.length)[..., None]
    operands += [seg_pad, seg_pad]
    specs += _stream_specs(tiling, reverse, 1)
  return operands, specs


def _interpret_arg(interpret: bool):
  return pltpu.InterpretParams() if interpret else False


def _compiler_params():
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))


@jit_conv
def conv(x_BxLxC: jax.Array, w_KxC: jax.Array, seg_BxL: jax.Array | None = None, *,
         reverse: bool = False, opts: PallasOptions = PallasOptions()) -> jax.Array:
  """out[t] = Σ_j w[K-1-j] · x[t-j] (reverse: x[t+j]) over same-segment taps, on padded tiles."""
  batch, length, channels = x_BxLxC.shape
  kernel = w_KxC.shape[0]
  tiling = _Tiling(length, channels, kernel, opts)
  operands, specs = _inputs(x_BxLxC, seg_BxL, tiling, reverse)
  w_KxC = pad_axis(w_KxC.astype(jnp.float32), 1, tiling.channels)
  tile_spec = specs[0]
  y_pad = pl.pallas_call(
      functools.partial(_conv_kernel, kernel=kernel, halo=tiling.halo, reverse=reverse,
                        has_seg=seg_BxL is not None),
      out_shape=jax.ShapeDtypeStruct((batch, tiling.length, tiling.channels), x_BxLxC.dtype),
      grid=(batch, tiling.channels // tiling.block_c, tiling.grid_t),
      in_specs=specs + [pl.BlockSpec((kernel, tiling.block_c), lambda b, c, i: (0, c))],
      out_specs=tile_spec,
      compiler_params=_compiler_params(),
      interpret=_interpret_arg(opts.interpret),
  )(*operands, w_KxC)
  return y_pad[:, :length, :channels]


@jit_weight_grad
def weight_grad(x_BxLxC: jax.Array, g_BxLxC: jax.Array, seg_BxL: jax.Array | None,
                kernel: int, *, opts: PallasOptions = PallasOptions()) -> jax.Array:
  """dw[k, c] = Σ_{b,t} g[b,t,c] · x[b, t-(K-1-k), c] over same-segment taps (float32 K×C).

  Each grid step writes its tile's partial sums; the B·(L/BT) partials are summed here.
  """
  batch, length, channels = x_BxLxC.shape
  tiling = _Tiling(length, channels, kernel, opts)
  operands, specs = _inputs(x_BxLxC, seg_BxL, tiling, reverse=False)
  g_pad = pad_axis(pad_axis(g_BxLxC, 1, tiling.length), 2, tiling.channels)
  partial_BxNxKxC = pl.pallas_call(
      functools.partial(_weight_grad_kernel, kernel=kernel, halo=tiling.halo,
                        has_seg=seg_BxL is not None),
      out_shape=jax.ShapeDtypeStruct((batch, tiling.grid_t, kernel, tiling.channels),
                                     jnp.float32),
      grid=(batch, tiling.channels // tiling.block_c, tiling.grid_t),
      in_specs=specs + [specs[0]],
      out_specs=pl.BlockSpec((1, 1, kernel, tiling.block_c), lambda b, c, i: (b, i, 0, c)),
      compiler_params=_compiler_params(),
      interpret=_interpret_arg(opts.interpret),
  )(*operands, g_pad)
  return jnp.sum(partial_BxNxKxC, axis=(0, 1))[:, :channels]
