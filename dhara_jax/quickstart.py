"""`dhara quickstart`: the whole path on the shipped data, in a few minutes on 2 CPU cores.

1. Train a SentencePiece tokenizer on the shipped 50/30/20 mix.
2. Train a tiny LLaMA3-Canon with the AR objective (held-out loss before and after).
3. Sample a continuation (KV-cached AR decoding).
4. Export to PyTorch (custom code: Canon) and compare logits; import back bit-exactly.
5. Convert it to a masked-diffusion model (`dhara convert`, a short WSD ladder): held-out
   diffusion loss of an untrained model, of the AR model and of the converted one; export the
   diffusion model with a parity check.
6. Generate from both: the AR model with its KV cache against the diffusion samplers with the
   exact block cache, tokens/s and speed-up with the quality proxy beside it (the AR model's
   perplexity of each output, its distinct-2-gram rate).
7. Evaluate both on the study's 7 benchmarks through lm-evaluation-harness (`dhara eval`, the
   shipped 100-example slices, `--eval-limit`, default EVAL_LIMIT): scores, standard errors,
   chance floors.
8. Write OUT/summary.json and OUT/loss_curve.png.

Run again with the same OUT, it resumes (a finished run trains no further).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import numpy as np

from dhara_jax import config as config_lib
from dhara_jax import loop
from dhara_jax.convert import convert
from dhara_jax.errors import DharaError
from dhara_jax.export import export_hf, import_hf
from dhara_jax.export.parity import load_torch_model, torch_logits
from dhara_jax.metrics import read_metrics
from dhara_jax.model import forward
from dhara_jax.phases import Phase, run_phase
from dhara_jax.plot import plot_run
from dhara_jax.sampling import Sampling, generate

CONFIG = "configs/runs/quickstart.yaml"
CONVERT_CONFIG = "configs/runs/quickstart_convert.yaml"
PROMPT = "The history of science"
# A tiny model's first sample: a cooler, top-k cut distribution reads as words where T = 0.8 over
# the whole vocabulary did not ("sciencet can in the!libiMoous").
SAMPLE = Sampling(max_new_tokens=48, temperature=0.7, top_k=40)
# Step 6: G new tokens at batch 1; diffusion at one token per step, by threshold, and four tokens
# per step in blocks of four (the cheapest forward on a CPU, where a step's cost grows with its
# block; see docs/generation.md, "Targets, as measured").
GENERATED = 64
DIFFUSION_SETTINGS = {"steps=G": {"steps": GENERATED}, "τ=0.7": {"threshold": 0.7},
                      "4/step, block 4": {"steps": GENERATED // 4, "block_length": 4}}
# Max |Δlogit| between JAX and transformers, both float32. The trained model's attention scores
# reach ~100, so its logits move by ~1e-4 when a matmul sums in another order: torch's CPU
# matmul does so now and then (1.6e-4 and 3.0e-4 seen, against 3.8e-6 usually). An export bug
# (a mis-mapped or mis-laid-out weight, a wrong RoPE or norm) moves them by far more than 1e-3.
PARITY_TOLERANCE = 1e-3
# Step 7: a smoke-sized evaluation (scores of 20 documents say little; `dhara eval` without
# --limit on full data is the real one). The diffusion ELBO takes 8 samples (LLaDA: 128).
EVAL_LIMIT = 20
EVAL_MC_SAMPLES = 8
EVAL_GEN_KWARGS = "max_gen_toks=32"


def run(out_dir: str | Path, config: str = CONFIG, overrides: tuple[str, ...] = (),
        log=print, eval_limit: int = EVAL_LIMIT) -> dict:
  out = loop.prepare_run_dir(Path(out_dir))
  started = time.perf_counter()
  tokenizer_path = out / "tokenizer" / "quickstart.model"
  cfg = config_lib.load(config, [*overrides, f"data.tokenizer={tokenizer_path}"])

  from data_pipeline import load_tokenizer, make_eval_iterator, train_tokenizer

  if tokenizer_path.is_file():
    tokenizer = load_tokenizer(tokenizer_path)
  else:
    log("1/8 tokenizer: SentencePiece BPE on the shipped mix")
    tokenizer = train_tokenizer(cfg.data, cfg.model, log=lambda line: log(f"    {line}"))

  log(f"2/8 training {cfg.model.family} (canon {cfg.model.canon_set or '-'}), "
      f"{cfg.train.steps} steps of {cfg.data.batch_size}×{cfg.data.seq_len} tokens")
  result = loop.run(cfg, out / "run")
  params = jax.device_get(result["state"]["params"])
  rows = read_metrics(out / "run")
  evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
  if len(evals) < 2:
    raise DharaError("quickstart: the run has no held-out losses to compare")

  log("3/8 sampling")
  prompt = tokenizer.encode(PROMPT).tolist()
  sampling = dataclasses.replace(SAMPLE, seed=cfg.train.seed)
  sample = PROMPT + tokenizer.decode(generate(cfg.model, params, [prompt], sampling,
                                              eos_id=tokenizer.eos_id).tokens[0])
  log(f"    {sample!r}")

  log("4/8 export to PyTorch and back")
  batch = next(make_eval_iterator(dataclasses.replace(cfg.data, batch_size=2),
                                  tokenizer=tokenizer))
  export = export_with_parity(cfg.model, params, out / "hf", batch)

  log("5/8 converting to masked diffusion (WSD over the block size)")
  untrained = untrained_diffusion_loss(cfg, tokenizer.mask_id)
  # The AR run's train.* overrides are not the conversion's (its steps come from its budget).
  converted = convert(out / "run", CONVERT_CONFIG,
                      [o for o in overrides if not o.startswith("train.")], out / "diffusion")
  conversion_rows = read_metrics(out / "diffusion")
  diffusion_cfg = config_lib.load(out / "diffusion" / "config.yaml")
  diffusion_export = export_with_parity(
      diffusion_cfg.model, jax.device_get(converted["state"]["params"]), out / "hf_diffusion",
      batch)

  log("6/8 generation: AR with its KV cache against the diffusion model's block cache")
  diffusion_params = jax.device_get(converted["state"]["params"])
  speed = generation_speed(cfg.model, params, diffusion_cfg.model, diffusion_params,
                           run_phase(diffusion_cfg), prompt, tokenizer)
  for name, row in speed["rows"].items():
    log(f"    {name:<28} {row['tokens_per_second']:>8,.0f} tok/s  ×{row['speedup']:.2f}  "
        f"{row['tokens_per_forward']:.1f} tok/forward  judge ppl {_fmt(row['judge_ppl'])}  "
        f"distinct-2 {_fmt(row['distinct_2'], '.2f')}")
  log(f"    diffusion: {speed['diffusion_sample']!r}")

  log(f"7/8 evaluation: the study's 7 benchmarks, --limit {eval_limit} on the shipped slice")
  from eval.registry import task_manager

  tasks = task_manager(None)  # the shipped slices; built once for both runs
  evaluation = {name: evaluate_run(out / name, tasks, log, eval_limit)
                for name in ("run", "diffusion")}

  log("8/8 summary")
  curve = plot_run(out / "run", out / "loss_curve.png")
  trained = [r for r in rows if "loss" in r]
  diffusion = {"untrained": untrained, "ar_model": conversion_rows[0]["diffusion_loss"],
               "converted": converted["diffusion_loss"],
               "steps": converted["steps"], "stages": conversion_stages(conversion_rows),
               "averaged_steps": conversion_rows[-1].get("averaged_steps", [])}
  summary = {
      "config": config, "model": dataclasses.asdict(cfg.model),
      "tokenizer": {"path": str(tokenizer_path), "vocab_size": tokenizer.vocab_size},
      "steps": result["steps"],
      "train_loss": {"first": trained[0]["loss"], "last": trained[-1]["loss"]},
      "held_out_loss": {"before": evals[0], "after": evals[-1]},
      "held_out_loss_fell": evals[-1] < evals[0],
      "tokens_per_second": float(np.median([r["tokens_per_second"] for r in trained])),
      "sample": sample,
      "generation": speed,
      "export": export,
      "diffusion_loss": diffusion,
      "diffusion_loss_fell": diffusion["converted"] < min(diffusion["ar_model"],
                                                          diffusion["untrained"]),
      "diffusion_export": diffusion_export,
      "evaluation": evaluation,
      "loss_curve": str(curve), "seconds": round(time.perf_counter() - started, 1),
  }
  summary["failed"] = failed_checks(summary)
  summary["ok"] = not summary["failed"]
  (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  log(f"    held-out loss {evals[0]:.3f} → {evals[-1]:.3f}; export max |Δlogit| "
      f"{export['max_abs_logit_diff']:.1e}; import "
      f"{'bit-exact' if export['import_exact'] else 'DIFFERS'}")
  log(f"    held-out diffusion loss: untrained {untrained:.3f}, AR model "
      f"{diffusion['ar_model']:.3f}, converted {diffusion['converted']:.3f}; diffusion export "
      f"max |Δlogit| {diffusion_export['max_abs_logit_diff']:.1e}; {summary['seconds']}s")
  return summary


def export_with_parity(model: config_lib.ModelConfig, params, out: Path, batch: dict) -> dict:
  """Exports, reloads in PyTorch and compares logits on `batch`; imports back."""
  hf_dir = export_hf(model, params, out)
  # Full f32 matmuls: on GPU, JAX's default f32 precision is TF32, far from torch-on-CPU.
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(forward(model, params, batch["tokens"])[0])
  theirs = torch_logits(load_torch_model(hf_dir), batch["tokens"])
  max_diff = float(np.max(np.abs(ours - theirs)))
  model_back, params_back = import_hf(hf_dir)
  exact = config_lib.architecture(model_back) == config_lib.architecture(model) and all(
      np.array_equal(np.asarray(a), np.asarray(b))
      for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_back)))
  return {"dir": str(hf_dir), "max_abs_logit_diff": max_diff,
          "parity_ok": max_diff <= PARITY_TOLERANCE, "import_exact": exact}


def generation_speed(ar_model: config_lib.ModelConfig, ar_params, model: config_lib.ModelConfig,
                     params, phase, prompt: list[int], tokenizer) -> dict:
  """Tokens/s at batch 1 (median of 3 timed calls after a compile and a warm-up) of greedy
  KV-cached AR decoding and of the diffusion settings, each with the speed-up over AR and the
  AR model's perplexity of its output (the judge) and distinct-2-gram rate beside it."""
  # Imported here, after training: timing.py turns off JAX's GPU memory preallocation for
  # processes that start their backend after it.
  from dhara_jax.benchmarks.quality import distinct_2, judge_perplexity
  from dhara_jax.benchmarks.timing import timed_calls

  def measured(m, p, sampling, phase):
    out, _, times, _ = timed_calls(
        lambda: generate(m, p, [prompt], sampling, phase=phase, eos_id=tokenizer.eos_id), 3,
        slow_seconds=math.inf)
    tokens = len(out.tokens[0])
    return out, {"tokens_per_second": tokens / float(np.median(times)), "forwards": out.forwards,
                 "tokens_per_forward": tokens / out.forwards,
                 "judge_ppl": judge_perplexity(ar_model, ar_params, [prompt], out.tokens,
                                               len(prompt) + GENERATED),
                 "distinct_2": distinct_2(out.tokens)}

  _, ar = measured(ar_model, ar_params, Sampling(max_new_tokens=GENERATED), Phase("ar"))
  rows, sample = {"AR, KV cache": {**ar, "speedup": 1.0}}, None
  for name, settings in DIFFUSION_SETTINGS.items():
    out, row = measured(model, params, Sampling(max_new_tokens=GENERATED, **settings), phase)
    rows[f"diffusion {name}"] = {**row, "speedup": row["tokens_per_second"] /
                                 ar["tokens_per_second"]}
    sample = sample or PROMPT + tokenizer.decode(out.tokens[0])
  return {"new_tokens": GENERATED, "rows": rows, "diffusion_sample": sample}


def evaluate_run(run_dir: Path, tasks, log=print, limit: int = EVAL_LIMIT) -> dict:
  """`dhara eval RUN_DIR --limit LIMIT` (results stored in RUN_DIR/eval) with the task
  manager `tasks`, its table logged."""
  from eval.harness import Options
  from eval.report import evaluate, table

  summary = evaluate(run_dir, limit=limit, gen_kwargs=EVAL_GEN_KWARGS,
                     options=Options(mc_samples=EVAL_MC_SAMPLES, progress=False),
                     task_manager=tasks)
  for line in table(summary).splitlines():
    log(f"    {line}")
  return summary


def _fmt(x, spec: str = ".1f") -> str:
  return "n/a" if x is None else format(x, spec)


def untrained_diffusion_loss(cfg: config_lib.Config, mask_token_id: int) -> float:
  """The held-out diffusion loss (the mdm ELBO, fixed masks) of a freshly initialised
  diffusion model of the quickstart's architecture: the floor a conversion must beat."""
  from data_pipeline import make_eval_iterator
  from dhara_jax.sharding import make_mesh
  from dhara_jax.train import build, init_state, make_eval_step

  model = dataclasses.replace(cfg.model, attention="bidirectional",
                              mask_token_id=mask_token_id)
  cfg = dataclasses.replace(cfg, model=model)
  mesh = make_mesh(cfg.mesh)
  tx, shardings = build(cfg, mesh)
  params = init_state(cfg, mesh, tx, shardings)["params"]
  step = make_eval_step(cfg, mesh, shardings, Phase("mdm"))
  batches = make_eval_iterator(cfg.data, mesh)
  return loop.evaluate(step, params, batches, cfg.train.eval_batches)


def conversion_stages(rows: list[dict]) -> list[str]:
  """The conversion's stages in order, as `name@block_size`."""
  out = []
  for r in rows:
    if "phase" in r and (not out or out[-1] != f"{r['phase']}@{r['block_size']}"):
      out.append(f"{r['phase']}@{r['block_size']}")
  return out


def failed_checks(summary: dict) -> list[str]:
  """One phrase per check the quickstart did not pass, with the numbers that decided it."""
  held_out, export = summary["held_out_loss"], summary["export"]
  failed = []
  if not summary["held_out_loss_fell"]:
    failed.append(f"held-out loss did not fall ({held_out['before']:.4f} → "
                  f"{held_out['after']:.4f})")
  if not export["parity_ok"]:
    failed.append(f"exported PyTorch logits differ by {export['max_abs_logit_diff']:.2e} "
                  f"(tolerance {PARITY_TOLERANCE:.0e})")
  if not export["import_exact"]:
    failed.append("importing the export did not give back the same config and params")
  diffusion, diffusion_export = summary["diffusion_loss"], summary["diffusion_export"]
  if not summary["diffusion_loss_fell"]:
    failed.append(f"the converted model's held-out diffusion loss {diffusion['converted']:.4f} "
                  f"is not below the AR model's {diffusion['ar_model']:.4f} and an untrained "
                  f"one's {diffusion['untrained']:.4f}")
  if not diffusion_export["parity_ok"]:
    failed.append(f"the exported diffusion model's PyTorch logits differ by "
                  f"{diffusion_export['max_abs_logit_diff']:.2e} (tolerance "
                  f"{PARITY_TOLERANCE:.0e})")
  if not diffusion_export["import_exact"]:
    failed.append("importing the diffusion export did not give back the same config and params")
  for name, evaluation in summary.get("evaluation", {}).items():
    missing = [r["task"] for r in evaluation["tasks"] if r["value"] is None]
    if missing or evaluation["average_7"] is None:
      failed.append(f"the evaluation of {name} has no score for {', '.join(missing) or 'all 7'}")
  return failed
