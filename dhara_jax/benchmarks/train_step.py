"""A dhara-jax train step as a zero-argument call, the same step in transformers, and their
side-by-side comparison: the flags and setup of bench/train_step.py and
bench/forward_backward_vs_torch.py (the PyTorch peer is imported lazily: only they need torch),
and the step bench/train_mfu.py and bench/input_pipeline.py time."""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
from typing import Any, Callable

import jax
import numpy as np

from dhara_jax import config
from dhara_jax.arg_types import positive_int
from dhara_jax.benchmarks.timing import Round, interleaved_seconds, seconds_per_call
from dhara_jax.config import Config, MeshConfig
from dhara_jax.export import export_hf
from dhara_jax.model import init_params
from dhara_jax.sharding import make_mesh
from dhara_jax.train import build, init_state, make_train_step


def one_document_batch(tokens_BxL: np.ndarray) -> dict[str, np.ndarray]:
  """A model batch of these tokens, every row one document."""
  return {"tokens": np.asarray(tokens_BxL, np.int32),
          "segment_ids": np.ones(tokens_BxL.shape, np.int32)}


def jax_train_step(cfg: Config, tokens_BxL: np.ndarray,
                   mesh: MeshConfig = MeshConfig(1, 1, 1)) -> Callable[[], jax.Array]:
  """A full dhara-jax train step (forward, backward, clipping, AdamW) on one batch, as a
  zero-argument call returning the loss; each call advances the optimizer state."""
  mesh = make_mesh(mesh)
  tx, shardings = build(cfg, mesh)
  step = make_train_step(cfg, mesh, tx, shardings)
  batch = one_document_batch(tokens_BxL)
  box = {"state": init_state(cfg, mesh, tx, shardings)}

  def one_step():
    box["state"], metrics = step(box["state"], batch)  # the state is donated: keep the new one
    return metrics["loss"]

  return one_step


def train_step_seconds(cfg: Config, tokens_BxL: np.ndarray, steps: int,
                       mesh: MeshConfig = MeshConfig(1, 1, 1)) -> float:
  """Seconds per full dhara-jax train step on one batch."""
  return seconds_per_call(jax_train_step(cfg, tokens_BxL, mesh), steps)


def model_arguments(description: str) -> argparse.ArgumentParser:
  """The flags every model benchmark takes: which config, how deep, batch shape, dtype."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--config", default="llama3")
  parser.add_argument("--layers", type=positive_int, default=8)
  parser.add_argument("--batch", type=positive_int, default=8)
  parser.add_argument("--seq", type=positive_int, default=512)
  parser.add_argument("--steps", type=positive_int, default=3,
                      help="timed steps per side per round")
  parser.add_argument("--rounds", type=positive_int, default=3,
                      help="rounds in which the two sides take turns; medians are reported")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="compute dtype on both sides (torch: CPU autocast); weights stay f32")
  return parser


def load_benchmark(args: argparse.Namespace) -> tuple[Config, np.ndarray]:
  """The config the flags describe (codelion's optimizer settings) and a random token batch;
  prints one line saying what runs where."""
  cfg = config.load(args.config, [f"model.num_layers={args.layers}",
                                  f"model.max_seq_len={max(args.seq, 1024)}",
                                  f"model.dtype={args.dtype}", "train.lr=5e-4",
                                  "train.warmup_fraction=0", "train.clip_norm=1.0"])
  tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (args.batch, args.seq))
  print(f"{cfg.model.family}: {args.layers} layers, d {cfg.model.d_model}, "
        f"B·T {args.batch}·{args.seq}, {args.dtype}, {jax.default_backend()}, "
        f"{os.cpu_count()} CPUs, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  return cfg, tokens


def torch_train_step(model: Any, tokens_BxL: np.ndarray, dtype: str,
                     optimizer: bool) -> Callable[[], Any]:
  """A transformers step on the same batch, as a zero-argument call returning the loss:
  next-token loss and backward, plus global-norm clipping at 1.0 and AdamW (lr 5e-4, betas
  0.9/0.95, wd 0.1) when `optimizer`. On a CUDA GPU when torch sees one (as JAX does)."""
  import torch

  device = "cuda" if torch.cuda.is_available() else "cpu"
  model.to(device).train()
  ids = torch.tensor(tokens_BxL, dtype=torch.long, device=device)
  opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.95), weight_decay=0.1)

  def step():
    model.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if optimizer:
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      opt.step()
    return loss.item()  # waits for the step on a GPU, like block_until_ready on the JAX side

  return step


def compare_with_torch(cfg: Config, tokens_BxL: np.ndarray,
                       jax_side: Callable[[], Callable[[], Any]], args: argparse.Namespace,
                       optimizer: bool) -> None:
  """Times `jax_side` (a picklable maker, whose params come from cfg's seed) against the same
  initial weights in transformers, taking turns (`interleaved_seconds`), and prints the
  comparison."""
  with tempfile.TemporaryDirectory() as hf_dir:
    export_hf(cfg.model, init_params(cfg.model, jax.random.key(cfg.train.seed)), hf_dir)
    torch_side = functools.partial(_torch_step_from_dir, hf_dir, tokens_BxL, args.dtype,
                                   optimizer)
    rounds = interleaved_seconds({"jax": jax_side, "torch": torch_side}, args.steps,
                                 args.rounds)
  print_ratio(tokens_BxL.size, rounds["jax"], rounds["torch"])


def _torch_step_from_dir(hf_dir, tokens_BxL, dtype, optimizer):
  from dhara_jax.export.parity import load_torch_model
  return torch_train_step(load_torch_model(hf_dir), tokens_BxL, dtype, optimizer)


def print_ratio(tokens_per_step: int, jax_rounds: list[Round],
                torch_rounds: list[Round]) -> None:
  """Median tokens/s of each side over the rounds (with the range) and the ratio of medians,
  the range of the per-round ratios, and where each side's step time went (CPU seconds in
  user and kernel mode, page faults): on a CPU, the kernel part varies with the machine's
  memory state and can move the wall-clock ratio by itself."""
  sides = {"dhara-jax": jax_rounds, "torch/hf": torch_rounds}
  median = lambda rounds, field: np.median([getattr(r, field) for r in rounds])
  for name, rounds in sides.items():
    tps = tokens_per_step / np.asarray([r.seconds for r in rounds])
    print(f"{name:15s} {np.median(tps):9.1f} tok/s  ({median(rounds, 'seconds'):.2f} s/step; "
          f"{tps.min():.1f}–{tps.max():.1f} over {len(rounds)} rounds)")
  for name, rounds in sides.items():
    print(f"{name:15s} per step: CPU {median(rounds, 'user'):.2f} s user + "
          f"{median(rounds, 'system'):.2f} s kernel, "
          f"{median(rounds, 'page_faults') / 1e3:.0f}k page faults")
  per_round = np.asarray([t.seconds / j.seconds for j, t in zip(jax_rounds, torch_rounds)])
  print(f"ratio jax/torch {median(torch_rounds, 'seconds') / median(jax_rounds, 'seconds'):.2f}x "
        f"(per round {per_round.min():.2f}–{per_round.max():.2f}x)")
