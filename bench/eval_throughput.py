"""`dhara eval`'s model against lm-eval's own HFLM on the run's export: the same tasks, the
same --limit, the same CPUs, one after the other, each in a process of its own.

  python bench/eval_throughput.py RUN_DIR [--tasks codelion] [--limit 20] [--data-dir D]

Prints requests per second of each side per request type (time inside the model's
loglikelihood / generate_until calls, as lm-eval issues them) and the ratio, for the first
evaluation (JAX compiles its few programs there) and for a second one in the same process
(warm). The scores of both sides are printed beside the speeds, with the number of documents
whose score differs between the sides (tests/test_eval_agreement*.py check the agreement request
by request; HFLM here is stock float32, whose log-softmax over a large vocabulary can move a
near-tie).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _per_document(results: dict) -> dict[tuple[str, int, str], dict[str, float]]:
  """Each sample's numeric metrics, keyed by (task, document, filter)."""
  return {(task, s["doc_id"], s.get("filter", "")):
          {k: float(v) for k, v in s.items()
           if k in ("acc", "acc_norm", "exact_match") and isinstance(v, (bool, int, float))}
          for task, samples in results.get("samples", {}).items() for s in samples}


def _side(name: str, run_dir: str, export_dir: str, eos_prefix: bool,
          args: argparse.Namespace) -> dict:
  """One side's two evaluations: model seconds and requests per request type, and scores."""
  import lm_eval

  from eval import registry
  from eval.harness import DharaLM, Options
  from eval.peer import Timed, hflm
  from eval.report import reported

  tm = registry.task_manager(args.data_dir)
  names = registry.resolve_tasks(args.tasks, tm)
  if name == "dhara":
    model = DharaLM.from_run(run_dir, options=Options(progress=False))
  else:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model = hflm(export_dir, batch_size=args.batch_size, eos_prefix=eos_prefix)
  passes = []
  for _ in range(2):
    timed = Timed(model)
    started = time.perf_counter()
    results = lm_eval.simple_evaluate(model=timed, tasks=names, task_manager=tm,
                                      limit=args.limit, gen_kwargs=args.gen_kwargs,
                                      bootstrap_iters=0, log_samples=True)
    top = results.get("groups", {}) | results["results"]
    scores = {task: top[task].get(f"{row.metric},{row.filter}")
              for task, row in reported(results)}
    passes.append({"seconds": timed.seconds, "requests": timed.requests, "scores": scores,
                   "wall": time.perf_counter() - started,
                   "documents": _per_document(results) if not passes else {}})
  return {"name": name, "passes": passes}


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("run_dir", help="an AR run")
  p.add_argument("--tasks", default="codelion")
  p.add_argument("--limit", type=int, default=20)
  p.add_argument("--data-dir", default=None, help="default: the shipped slice")
  p.add_argument("--batch-size", type=int, default=16, help="HFLM's batch size")
  p.add_argument("--gen-kwargs", default="max_gen_toks=32",
                 help="lm-eval's generation overrides (default: 32 new tokens)")
  args = p.parse_args()

  from dhara_jax.benchmarks.timing import in_own_process
  from dhara_jax.runs import export_run, open_run
  from eval.harness import prefix_token_id

  with open_run(args.run_dir) as run:
    diffusion = run.phase.diffusion
    # HFLM prefixes an empty context as DharaLM does for this run's tokenizer (eval.harness).
    tokenizer = run.tokenizer(run.step())
    eos_prefix = prefix_token_id(tokenizer) == tokenizer.eos_id
  if diffusion:  # HFLM would score it as a causal LM
    sys.exit("error: HFLM has no diffusion likelihood; give an AR run")
  with tempfile.TemporaryDirectory() as tmp:
    export = str(export_run(Path(args.run_dir), Path(tmp) / "hf"))
    sides = [in_own_process(_side, name, args.run_dir, export, eos_prefix, args)
             for name in ("dhara", "hflm")]
  print(f"{args.tasks}, --limit {args.limit}, {args.gen_kwargs}; {os.cpu_count()} CPUs")
  for label, index in (("first evaluation (JAX compiles)", 0), ("second evaluation", 1)):
    ours, theirs = (s["passes"][index] for s in sides)
    print(f"\n{label}")
    print(f"  {'request type':<22} {'requests':>9} {'dhara req/s':>12} {'HFLM req/s':>11} "
          f"{'ratio':>7}")
    for kind in sorted(ours["requests"]):
      n = ours["requests"][kind]
      mine, peer = n / ours["seconds"][kind], n / theirs["seconds"][kind]
      print(f"  {kind:<22} {n:>9,} {mine:>12,.2f} {peer:>11,.2f} {mine / peer:>6.2f}×")
    n = sum(ours["requests"].values())
    mine, peer = n / sum(ours["seconds"].values()), n / sum(theirs["seconds"].values())
    print(f"  {'all':<22} {n:>9,} {mine:>12,.2f} {peer:>11,.2f} {mine / peer:>6.2f}×")
    print(f"  wall (incl. lm-eval's own work): dhara {ours['wall']:.1f} s, "
          f"HFLM {theirs['wall']:.1f} s")
  print("\nscores (dhara / HFLM):")
  for task, value in sides[0]["passes"][0]["scores"].items():
    peer = sides[1]["passes"][0]["scores"].get(task)
    print(f"  {task:<16} {_pct(value)} / {_pct(peer)}")
  ours, theirs = (s["passes"][0]["documents"] for s in sides)
  differing = collections.Counter(
      key[0] for key, metrics in ours.items() if key in theirs
      and any(abs(v - theirs[key].get(k, v)) > 1e-3 for k, v in metrics.items()))
  print(f"documents scored differently: {sum(differing.values())} of {len(ours)} "
        f"({', '.join(f'{t} {n}' for t, n in sorted(differing.items())) or 'none'}); "
        f"on one side only: {len(ours.keys() ^ theirs.keys())}")
  return 0


def _pct(x) -> str:
  return "—" if x is None else f"{100 * x:.2f}"


if __name__ == "__main__":
  sys.exit(main())
