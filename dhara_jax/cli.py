"""`dhara` command line. Every user error is one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import os
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

  summary = quickstart.run(args.out, args.config, tuple(args.overrides))
  print(f"summary: {args.out}/summary.json")
  if not summary["ok"]:
    raise DharaError(f"quickstart: {'; '.join(summary['failed'])} (see {args.out}/summary.json)")
  return 0


def _train(args: argparse.Namespace) -> int:
  from pathlib import Path

  from dhara_jax import config, loop

  cfg = config.load(args.config, args.overrides)
  run_dir = Path(args.run_dir or Path("runs") / Path(args.config).stem)
  summary = loop.run(cfg, run_dir, stop_at=args.steps, progress=not args.no_progress)
  if summary["steps"] <= summary["start_step"]:
    print(f"run: {run_dir} is already at step {summary['start_step']} (asked to train to "
          f"{summary['steps']}); nothing to do")
  else:
    print(f"run: {run_dir}  steps {summary['start_step']}→{summary['steps']}  "
          f"loss {summary['final_loss']}  held-out {summary['eval_loss']}")
  return 0


def _convert(args: argparse.Namespace) -> int:
  from pathlib import Path

  from dhara_jax.convert import convert

  run_dir = Path(args.run_dir or Path("runs") / f"{Path(args.ar_run).name}_diffusion")
  summary = convert(args.ar_run, args.config, args.overrides, run_dir, args.step, args.steps,
                    progress=not args.no_progress)
  if summary["steps"] <= summary["start_step"]:
    print(f"run: {run_dir} is already at step {summary['start_step']}; nothing to do")
  else:
    print(f"run: {run_dir}  steps {summary['start_step']}→{summary['steps']}  "
          f"loss {summary['final_loss']}  held-out diffusion {summary['diffusion_loss']}")
  return 0


def _export(args: argparse.Namespace) -> int:
  from dhara_jax.runs import export_run

  out = export_run(args.run_dir, args.out, args.step, args.code)
  print(f"exported: {out}")
  return 0


def _import(args: argparse.Namespace) -> int:
  from dhara_jax import config
  from dhara_jax.runs import import_into_run

  base = config.load(args.config, args.overrides) if args.config else None
  print(f"imported into: {import_into_run(args.hf_dir, args.run_dir, base)}")
  return 0


def _plot(args: argparse.Namespace) -> int:
  from dhara_jax.plot import plot_run

  print(f"wrote: {plot_run(args.run_dir, args.out)}")
  return 0


def _tokenizer_train(args: argparse.Namespace) -> int:
  from data_pipeline import commands
  from dhara_jax import config

  commands.tokenizer_train(config.load(args.config, args.overrides))
  return 0


def _data_prepare(args: argparse.Namespace) -> int:
  from data_pipeline import commands
  from dhara_jax import config

  commands.data_prepare(config.load(args.config, args.overrides), progress=not args.no_progress)
  return 0


def _data_tfds(args: argparse.Namespace) -> int:
  from data_pipeline import commands
  from dhara_jax import config

  commands.data_tfds(config.load(args.config, args.overrides), args.out)
  return 0


def _add_config_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", default="data/mix",
                 help="config file or preset with a data: section (default: data/mix)")
  p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.seed=1")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="dhara", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("params", help="parameter counts and training FLOPs per token")
  p.add_argument("config", help="config file or preset name (e.g. llama3, shapes/gpt2_32l)")
  p.add_argument("overrides", nargs="*", help="section.key=value overrides")
  p.add_argument("--json", action="store_true", help="print JSON instead of a table")
  p.add_argument("--seq-len", type=positive_int, default=None,
                 help="context for FLOPs (default: max)")
  p.set_defaults(func=_params)

  p = sub.add_parser("train", help="train (resumes from the run dir's latest checkpoint)")
  p.add_argument("config", help="config file or preset")
  p.add_argument("overrides", nargs="*", help="section.key=value overrides")
  p.add_argument("--run-dir", default=None, help="default: runs/<config name>")
  p.add_argument("--steps", type=positive_int, default=None,
                 help="stop at this step (the schedule still spans train.steps)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.set_defaults(func=_train)

  p = sub.add_parser("convert", help="an AR run → masked diffusion (WSD over the block size; "
                     "resumes if --run-dir has checkpoints)")
  p.add_argument("ar_run", help="the AR run directory")
  p.add_argument("--config", required=True, help="the conversion recipe, e.g. configs/runs/"
                 "wsd.yaml (sections it omits come from the AR run)")
  p.add_argument("overrides", nargs="*", help="section.key=value overrides")
  p.add_argument("--run-dir", default=None, help="default: runs/<AR run name>_diffusion")
  p.add_argument("--step", type=non_negative_int, default=None,
                 help="the AR checkpoint to start from (default: its latest)")
  p.add_argument("--steps", type=positive_int, default=None,
                 help="stop at this step (the plan still spans the whole budget)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.set_defaults(func=_convert)

  p = sub.add_parser("export", help="a run's checkpoint → transformers directory")
  p.add_argument("run_dir")
  p.add_argument("--out", required=True)
  p.add_argument("--step", type=non_negative_int, default=None, help="default: latest checkpoint")
  p.add_argument("--code", choices=("auto", "transformers", "custom"), default="auto",
                 help="transformers class or custom code (auto: the class when it fits)")
  p.set_defaults(func=_export)

  p = sub.add_parser("import", help="transformers directory → a new run (step-0 checkpoint)")
  p.add_argument("hf_dir")
  p.add_argument("--run-dir", required=True)
  p.add_argument("--config", default=None, help="train/data settings for the new run")
  p.add_argument("overrides", nargs="*", help="section.key=value overrides")
  p.set_defaults(func=_import)

  p = sub.add_parser("plot", help="loss and learning-rate curves of a run as PNG")
  p.add_argument("run_dir")
  p.add_argument("--out", default=None, help="default: RUN_DIR/curves.png")
  p.set_defaults(func=_plot)

  p = sub.add_parser("quickstart", help="small end-to-end run on the shipped data")
  p.add_argument("--out", default="runs/quickstart", help="output directory")
  p.add_argument("--config", default="configs/runs/quickstart.yaml")
  p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=50")
  p.set_defaults(func=_quickstart)

  p = sub.add_parser("tokenizer", help="SentencePiece tokenizer of the data mix")
  tok = p.add_subparsers(dest="action", required=True)
  p = tok.add_parser("train", help="train on a sample of the configured mix; writes "
                     "data.tokenizer")
  _add_config_args(p)
  p.set_defaults(func=_tokenizer_train)

  p = sub.add_parser("data", help="data pipeline: token cache, TFDS export")
  data = p.add_subparsers(dest="action", required=True)
  p = data.add_parser("prepare", help="tokenize every source into data.cache_dir (resumable)")
  _add_config_args(p)
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  p.set_defaults(func=_data_prepare)
  p = data.add_parser("tfds", help="write every source as a TFDS array_record dataset")
  _add_config_args(p)
  p.add_argument("--out", required=True, help="output folder (one dataset per source)")
  p.set_defaults(func=_data_tfds)
  return parser


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


def parse(argv: list[str] | None = None) -> argparse.Namespace:
  """Arguments of one command; key=value overrides may also follow its options (argparse alone
  stops collecting positionals at the first option)."""
  parser = build_parser()
  args, rest = parser.parse_known_args(argv)
  late = [a for a in rest if "=" in a and not a.startswith("-")]
  unknown = [a for a in rest if a not in late]
  if unknown or (late and not hasattr(args, "overrides")):
    parser.error(f"unrecognized arguments: {' '.join(rest)}")
  if late:
    args.overrides = [*args.overrides, *late]
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse(argv)
  try:
    return args.func(args)
  except DharaError as e:
    print(f"error: {e}", file=sys.stderr)
    if getattr(e, "stuck", False):  # a stuck data reader thread would keep the process alive
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(2)
    return 2
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return 130
  except BrokenPipeError:  # e.g. `dhara params ... | head`: the reader left, nothing to report
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
  except OSError as e:  # the machine's, not the input's: a full disk, a vanished mount
    where = f" ({e.filename})" if e.filename else ""
    print(f"error: {e.strerror or e}{where}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
