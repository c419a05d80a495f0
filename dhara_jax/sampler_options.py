"""The diffusion sampler's command-line options, declared once: `dhara generate`, `dhara eval`
and `dhara bench throughput` take them, and the study's throughput.diffusion settings are
passed on as them. Defaults are Sampling's (dhara_jax/sampling/settings.py), written out: importing
it would load JAX for every command's --help (tests/test_sampler_options.py keeps them equal)."""

from __future__ import annotations

import argparse
from typing import Any

from dhara_jax.arg_types import non_negative_int

# Sampling's diffusion fields, in its order: the options' dests and the study's keys.
SAMPLER_KEYS = ("steps", "block_length", "remasking", "threshold", "cache")
SAMPLING_DEFAULTS = {"steps": 0, "block_length": 0, "remasking": "low_confidence",
                     "threshold": 0.0, "cache": "auto"}


def add_sampler_args(p: argparse.ArgumentParser, defaults: bool) -> None:
  """--steps, --block-length, --remasking, --threshold, --cache. `defaults`: Sampling's values
  (generate); otherwise None, so that the command sees which were given (eval and bench
  throughput refuse them for an AR run)."""
  default = lambda key: SAMPLING_DEFAULTS[key] if defaults else None
  p.add_argument("--steps", type=non_negative_int, default=default("steps"),
                 help="diffusion: denoising steps in all (0: G, one token per step)")
  p.add_argument("--block-length", type=non_negative_int, default=default("block_length"),
                 help="diffusion: tokens per block (0: the trained block size, else G)")
  p.add_argument("--remasking", default=default("remasking"), metavar="low_confidence|random",
                 help="diffusion: which masked tokens a step commits (default: low_confidence)")
  p.add_argument("--threshold", type=float, default=default("threshold"),
                 help="diffusion: τ of threshold decoding (0: off, fixed steps)")
  p.add_argument("--cache", default=default("cache"), metavar="auto|none|block|approx",
                 help="diffusion: KV cache (auto: block for block-trained models, else none)")


def sampler_options(args: argparse.Namespace) -> dict[str, Any]:
  """The sampler options `args` sets: all of them with defaults, else those given."""
  return {k: getattr(args, k) for k in SAMPLER_KEYS if getattr(args, k) is not None}


def option_flag(key: str) -> str:
  """The command-line flag of an option's key: block_length → --block-length."""
  return "--" + key.replace("_", "-")
