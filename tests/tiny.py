"""Tiny versions of the real presets, so tests exercise the shipped family configs."""

from __future__ import annotations

import re

import jax
import numpy as np

from dhara_jax import config
from dhara_jax.config import ModelConfig
from dhara_jax.model import init_params

TINY = ["model.vocab_size=128", "model.d_model=64", "model.num_layers=3", "model.num_heads=4",
        "model.num_kv_heads=2", "model.mlp_dim=96", "model.max_seq_len=64"]
PER_FAMILY = {
    "gpt2": ["model.num_kv_heads=4"],
    "gemma3": ["model.layer_pattern=LLA", "model.sliding_window=4"],
    "moe": ["model.num_experts=4", "model.moe_mlp_dim=32"],
}


def tiny_config(family: str, *overrides: str) -> ModelConfig:
  return config.load(family, TINY + PER_FAMILY.get(family, []) + list(overrides)).model


def random_params(cfg: ModelConfig, seed: int = 0):
  """Initialised params with every tensor perturbed, so norm scales and biases are not the
  constants they start at and a wrong mapping of any of them shows up in the logits."""
  params = init_params(cfg, jax.random.key(seed))
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  leaves = [np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32)
            for x in leaves]
  return jax.tree.unflatten(treedef, leaves)


def logits_before_after_change(cfg: ModelConfig, params, tokens, position: int):
  """Logits for `tokens` and for `tokens` with the token at `position` changed: which outputs
  move tells which positions can see `position`."""
  from dhara_jax.model import forward

  changed = np.array(tokens, copy=True)
  changed[0, position] = (changed[0, position] + 1) % cfg.vocab_size
  return np.asarray(forward(cfg, params, tokens)[0]), np.asarray(forward(cfg, params, changed)[0])


def compiled_dot_operand_types(fn, *args) -> set[str]:
  """Runs jit(fn) and returns the element types of every dot operand in the program XLA
  compiled for this backend. XLA:CPU silently upcasts a bf16 dot it cannot run on its AMX path
  to f32, and fails at run time on one that a later pass took off that path."""
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  hlo = compiled.as_text()
  types, names = set(), {}
  for line in hlo.splitlines():
    for name, dtype in re.findall(r"%?([\w.-]+): (\w+)\[", line):  # computation parameters
      names[name] = dtype
    if m := re.match(r"\s*(?:ROOT )?%?([\w.-]+) = (\w+)\[", line):
      names[m[1]] = m[2]
    if m := re.search(r" dot\(%?([\w.-]+), %?([\w.-]+)\)", line):
      types |= {names[m[1]], names[m[2]]}
  assert types, "no dot in the compiled program"
  return types
