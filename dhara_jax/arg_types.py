"""argparse types shared by the `dhara` command line and the scripts in bench/: a bad value is a
usage error that names it. Below both, so that neither imports the other."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
  """argparse type: 1, 2, ... (a usage error otherwise)."""
  if not text.isdigit() or int(text) < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
  return int(text)


def non_negative_int(text: str) -> int:
  """argparse type: 0, 1, ... (a usage error otherwise)."""
  if not text.isdigit():
    raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
  return int(text)


def positive_ints(text: str) -> tuple[int, ...]:
  """argparse type: a comma-separated list of positive integers, e.g. 1,8,64."""
  parts = text.split(",")
  if not all(p.isdigit() and int(p) >= 1 for p in parts):
    raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got "
                                     f"{text!r}")
  return tuple(int(p) for p in parts)
