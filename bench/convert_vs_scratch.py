"""The 10× claim at quickstart scale: a diffusion model converted from AR with a tenth of the
tokens vs one trained from scratch (Dhara-70M's recipe against dLLM-Canon, as in
huggingface.co/blog/codelion/optimal-model-architecture).

On the shipped text, the same LLaMA3-Canon architecture is trained
  (a) as a masked-diffusion model from scratch (`dllm_canon`-style: bidirectional, mdm) on N tokens,
  (b) AR on N tokens (`configs/runs/quickstart.yaml`), then converted (`dhara convert`, the
      quickstart's ladder) on N/10,
and the script prints each model's held-out diffusion loss (the mdm ELBO on the same held-out
rows and masks) and the AR model's held-out AR loss. Whatever it prints is the result.

  python bench/convert_vs_scratch.py [--steps 300] [--out runs/bench_convert] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dhara_jax import config, loop
from dhara_jax.arg_types import positive_int
from dhara_jax.convert import convert
from dhara_jax.metrics import read_metrics

AR_CONFIG = "configs/runs/quickstart.yaml"
CONVERT_CONFIG = "configs/runs/quickstart_convert.yaml"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=positive_int, default=300, help="N in steps of the AR "
                      "and the from-scratch run (the quickstart's batch: 16 × 128 tokens)")
  parser.add_argument("--out", default="runs/bench_convert")
  parser.add_argument("overrides", nargs="*", help="section.key=value for both runs")
  args = parser.parse_args()
  out = Path(args.out)
  common = [*args.overrides, f"train.steps={args.steps}", "train.eval_every=50"]

  started = time.perf_counter()
  scratch_cfg = config.load(AR_CONFIG, [*common, "model.attention=bidirectional",
                                        "train.objective=mdm"])
  scratch = loop.run(scratch_cfg, out / "scratch", progress=False)
  scratch_s = time.perf_counter() - started

  started = time.perf_counter()
  ar = loop.run(config.load(AR_CONFIG, common), out / "ar", progress=False)
  converted = convert(out / "ar", CONVERT_CONFIG,
                      [*args.overrides, "convert.tokens=0", "convert.token_fraction=0.1"],
                      out / "converted", progress=False)
  convert_s = time.perf_counter() - started
  before = read_metrics(out / "converted")[0]["diffusion_loss"]
  # From the metrics, not the summaries: a rerun finds the runs done and evaluates nothing.
  scratch = {"eval_loss": last_value(out / "scratch", "eval_loss")}
  ar = {"eval_loss": last_value(out / "ar", "eval_loss")}
  converted = {"steps": converted["steps"],
               "diffusion_loss": last_value(out / "converted", "averaged_diffusion_loss")}

  tokens = args.steps * scratch_cfg.data.batch_size * scratch_cfg.data.seq_len
  conversion_tokens = converted["steps"] * scratch_cfg.data.batch_size * scratch_cfg.data.seq_len
  result = {
      "tokens": tokens, "conversion_tokens": conversion_tokens,
      "scratch_diffusion_loss": scratch["eval_loss"],
      "ar_loss": ar["eval_loss"], "ar_model_diffusion_loss": before,
      "converted_diffusion_loss": converted["diffusion_loss"],
      "converted_minus_scratch": converted["diffusion_loss"] - scratch["eval_loss"],
      "seconds": {"scratch": round(scratch_s, 1), "ar_and_conversion": round(convert_s, 1)},
  }
  print(f"(a) diffusion from scratch, {tokens:,} tokens: held-out diffusion loss "
        f"{scratch['eval_loss']:.3f}")
  print(f"(b) AR on {tokens:,} tokens: held-out AR loss {ar['eval_loss']:.3f}, diffusion loss "
        f"{before:.3f}; converted on {conversion_tokens:,} more: diffusion loss "
        f"{converted['diffusion_loss']:.3f}")
  print(f"converted − scratch: {result['converted_minus_scratch']:+.3f} nats/token "
        f"({'converted better' if result['converted_minus_scratch'] < 0 else 'scratch better'})")
  (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")


def last_value(run_dir: Path, key: str) -> float:
  return [r[key] for r in read_metrics(run_dir) if key in r][-1]


if __name__ == "__main__":
  main()
