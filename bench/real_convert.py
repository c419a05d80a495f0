"""What a conversion of a real AR model learned: a `dhara convert` run of an imported model
(e.g. SmolLM2-135M to `block` diffusion, docs/real-models.md) against its AR parent.

  python bench/real_convert.py DIFFUSION_RUN [--ar-run AR_RUN] [--new-tokens 128] [--runs 1]

Prints, from the run and in this invocation:
  - the conversion's budget: steps, tokens, its stages, and the CPU time its rows record;
  - the held-out diffusion loss (the mdm ELBO on fixed masks, the loss every conversion row
    records) of a freshly initialised model of the same architecture, of the AR parent (the
    conversion's step 0) and of the converted model (its last row; the top-k average's when the
    recipe averages);
  - a greedy sample of the converted model (`dhara generate`) beside the parent's;
  - `dhara bench generate` at B = 1: tokens/s, forwards, tokens per forward and the parent's
    ("the judge's") perplexity of each setting's tokens, against the parent's KV-cached AR.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dhara_jax.arg_types import positive_int  # noqa: E402
from dhara_jax.benchmarks.generate import ar_run_of  # noqa: E402
from dhara_jax.metrics import read_metrics  # noqa: E402
from dhara_jax.quickstart import conversion_stages, untrained_diffusion_loss  # noqa: E402
from dhara_jax.runs import open_run  # noqa: E402

PROMPT = "The history of science is"


def dhara(*args: str) -> str:
  """A `dhara` command in a process of its own (each JAX runtime alone on the CPUs)."""
  out = subprocess.run([sys.executable, "-m", "dhara_jax.cli", *args], capture_output=True,
                       text=True, timeout=3600)
  if out.returncode:
    raise SystemExit(f"bench: dhara {args[0]} failed: {out.stderr.strip().splitlines()[-1:]}")
  return out.stdout


def losses(run_dir: Path) -> dict:
  rows = read_metrics(run_dir)
  evals = [r for r in rows if "diffusion_loss" in r]
  last = evals[-1]
  with open_run(run_dir) as run:
    cfg = run.cfg
  steps = [r for r in rows if "loss" in r]
  seconds = sum(cfg.data.batch_size * cfg.data.seq_len / r["tokens_per_second"] for r in steps
                if r.get("tokens_per_second"))
  return {"steps": steps[-1]["step"], "tokens": steps[-1]["step"] * cfg.data.batch_size
          * cfg.data.seq_len, "stages": conversion_stages(rows), "step_seconds": seconds,
          "untrained": untrained_diffusion_loss(cfg, cfg.model.mask_token_id),
          "ar_parent": evals[0]["diffusion_loss"],
          "converted": last.get("averaged_diffusion_loss", last["diffusion_loss"]),
          "averaged_steps": last.get("averaged_steps")}


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("run_dir", type=Path, help="the diffusion run (a `dhara convert` output)")
  p.add_argument("--ar-run", default=None, help="the AR parent (default: the conversion's)")
  p.add_argument("--new-tokens", type=positive_int, default=128, help="G (default 128)")
  p.add_argument("--runs", type=positive_int, default=1, help="timed runs per setting")
  args = p.parse_args()
  ar_run = ar_run_of(args.run_dir, args.ar_run)

  got = losses(args.run_dir)
  print(f"conversion: {got['steps']} steps, {got['tokens']:,} tokens, stages "
        f"{' → '.join(got['stages'])}; {got['step_seconds'] / 60:.0f} min in its steps")
  print("held-out diffusion loss (nats/token, lower is better):")
  print(f"  untrained {got['untrained']:.3f} | AR parent {got['ar_parent']:.3f} | converted "
        f"{got['converted']:.3f}" + (f" (mean of steps {got['averaged_steps']})"
                                    if got["averaged_steps"] else ""))
  for name, run in (("converted", args.run_dir), ("AR parent", ar_run)):
    text = json.loads(dhara("generate", str(run), "--prompt", PROMPT, "--max-new-tokens", "48",
                            "--json"))["samples"][0]["text"]
    print(f"sample ({name}, greedy): {text!r}")
  print(dhara("bench", "generate", str(args.run_dir), "--ar-run", str(ar_run), "--batches", "1",
              "--new-tokens", str(args.new_tokens), "--runs", str(args.runs)))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
