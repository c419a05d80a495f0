"""Odd-sized models for the PyTorch twin's tests (tests/test_twin_*.py): sizes none of the
project's presets use (vocab 517, d 96, 6 query / 2 KV heads, 3 layers, L 36, block 6), so a
shape or an index that only works at the usual sizes shows up. Three families: LLaMA3 with
Canon ABCD (k 3), LFM2 (conv, attention, conv; Canon ABCD) and Gemma3 (local, local, global
with a window of 3, smaller than the block)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax
import numpy as np
import torch

from dhara_jax import config
from dhara_jax.config import ModelConfig
from dhara_jax.model import init_params
from dhara_jax.phases import Phase

MASK = 3
BLOCK = 6
LENGTH = 36
ODD = ["model.vocab_size=517", "model.d_model=96", "model.num_layers=3", "model.num_heads=6",
       "model.num_kv_heads=2", "model.mlp_dim=160", f"model.max_seq_len={LENGTH}"]
FAMILIES = {
    "llama3_canon": ("llama3", ["model.canon_set=ABCD", "model.canon_kernel=3"]),
    "lfm2": ("lfm2", ["model.layer_pattern=CAC", "model.canon_set=ABCD"]),
    "gemma3": ("gemma3", ["model.layer_pattern=LLA", "model.sliding_window=3"]),
}
DIFFUSION = ["model.attention=bidirectional", f"model.mask_token_id={MASK}",
             "model.mask_epsilon=0.002"]
PHASES = {"ar": Phase("ar"), "mdm": Phase("mdm"), "block": Phase("block", BLOCK)}
# A left-padded batch of mixed lengths (3, 5, 11 and 1 tokens).
PROMPTS = [[17, 250, 9], [401, 5, 77, 300, 12], [8, 91, 516, 44, 2, 150, 33, 71, 99, 6, 480],
           [260]]


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
  """Tiny models: more torch threads only contend with JAX's."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    yield
  finally:
    torch.set_num_threads(threads)


def odd_config(family: str, objective: str, *overrides: str) -> ModelConfig:
  base, extra = FAMILIES[family]
  diffusion = DIFFUSION if objective != "ar" else [f"model.mask_token_id={MASK}"]
  return config.load(base, ODD + extra + diffusion + list(overrides)).model


def loud_params(cfg: ModelConfig, seed: int = 0):
  """Initialised params with every tensor moved by N(0, 0.15²): norm scales and biases leave
  their constants (a wrong mapping shows), greedy tokens vary and confidences spread over
  (0, 1), so sampler schedules and thresholds matter."""
  params = init_params(cfg, jax.random.key(seed))
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [np.asarray(x) + 0.15 * rng.standard_normal(x.shape)
                                      .astype(np.float32) for x in leaves])


def left_padded(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
  """(ids B×P, attention mask B×P) of prompts left-padded with 0 to the longest."""
  width = max(map(len, prompts))
  ids = np.zeros((len(prompts), width), np.int64)
  mask = np.zeros_like(ids)
  for row, p in enumerate(prompts):
    ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
  return ids, mask
