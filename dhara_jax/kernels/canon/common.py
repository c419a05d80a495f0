"""Helpers shared by the Canon conv implementations: time shifts, segment masks, tiling."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def shift_time(x_BxLx: jax.Array, back: int) -> jax.Array:
  """x[:, t - back], zero where t - back falls outside [0, L); a negative `back` reads ahead."""
  length = x_BxLx.shape[1]
  pad = [(0, 0)] * x_BxLx.ndim
  pad[1] = (max(back, 0), max(-back, 0))
  start = max(-back, 0)
  return jax.lax.slice_in_dim(jnp.pad(x_BxLx, pad), start, start + length, axis=1)


def same_segment(seg_BxL: jax.Array, back: int) -> jax.Array:
  """Whether position t - back lies in the same document as t (bool B×L)."""
  return shift_time(seg_BxL, back) == seg_BxL


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Zero-pads `axis` at the end up to `size` (no copy when it already has that size)."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, extra)
  return jnp.pad(x, pad)


def tap_offsets(kernel: int, reverse: bool) -> list[tuple[int, int]]:
  """(tap index into w, how far back the tap reads) for every tap.

  The causal conv reads t - j with w[K-1-j]; the anti-causal one (the transpose, used for dx)
  reads t + j with the same w[K-1-j].
  """
  sign = -1 if reverse else 1
  return [(kernel - 1 - j, sign * j) for j in range(kernel)]


class PallasOptions(NamedTuple):
  """How a Pallas kernel runs: interpret mode (CPU tests) and tile sizes (None: its default)."""
  interpret: bool = False
  block_t: int | None = None
  block_c: int | None = None


# The Pallas entry points' static arguments.
jit_conv = functools.partial(jax.jit, static_argnames=("reverse", "opts"))
jit_weight_grad = functools.partial(jax.jit, static_argnames=("kernel", "opts"))
