"""`dhara` command line. Every user error is one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import sys

from dhara_jax.errors import DharaError


def _params(args: argparse.Namespace) -> int:
  from dhara_jax import config
  from dhara_jax.params import count_params, format_table

  cfg = config.load(args.config, args.overrides)
  counts = count_params(cfg.model, args.seq_len)
  print(json.dumps(counts, indent=2) if args.json else format_table(counts))
  return 0


def _quickstart(args: argparse.Namespace) -> int:
  from dhara_jax import quickstart

  summary = quickstart.run(args.out)
  print(f"summary: {args.out}/summary.json")
  if not summary["ok"]:
    raise DharaError("quickstart: a parity or import check failed (see summary.json)")
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="dhara", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("params", help="parameter counts and training FLOPs per token")
  p.add_argument("config", help="config file or preset name (e.g. llama3, shapes/gpt2_32l)")
  p.add_argument("overrides", nargs="*", help="section.key=value overrides")
  p.add_argument("--json", action="store_true", help="print JSON instead of a table")
  p.add_argument("--seq-len", type=int, default=None, help="context for FLOPs (default: max)")
  p.set_defaults(func=_params)

  p = sub.add_parser("quickstart", help="small end-to-end run on the shipped data")
  p.add_argument("--out", default="runs/quickstart", help="output directory")
  p.set_defaults(func=_quickstart)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.func(args)
  except DharaError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
