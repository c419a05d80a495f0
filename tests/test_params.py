import json
import subprocess
import sys

import jax
import pytest
from tiny import tiny_config

from dhara_jax import config
from dhara_jax.model import init_params
from dhara_jax.params import count_params

# codelion's layer parameter counts (12·d²·L) for the 7 GPT-2 shapes, from the shapes table of
# huggingface.co/blog/codelion/optimal-model-architecture.
SHAPES = {"gpt2_4l": 28.3, "gpt2_12l": 37.7, "gpt2_16l": 38.5, "gpt2_24l": 42.5,
          "gpt2_32l": 56.6, "gpt2_48l": 59.0, "gpt2_64l": 50.3}


@pytest.mark.parametrize("shape,millions", SHAPES.items())
def test_shape_layer_counts_match_codelion(shape, millions):
  cfg = config.load(f"shapes/{shape}").model
  counts = count_params(cfg)
  assert counts["layer_matrices"] == 12 * cfg.d_model ** 2 * cfg.num_layers
  assert abs(counts["layer_matrices"] / 1e6 - millions) <= 0.05


def test_gpt2_70m_total():
  counts = count_params(config.load("shapes/gpt2_70m").model)
  # Tied head counted once, learned positions included: 64,085,504.
  assert abs(counts["total"] / 1e6 - 64.09) <= 0.05
  assert counts["embedding"] == (50257 + 1024) * 512


def test_counts_agree_with_initialised_params():
  for family in ("gpt2", "moe", "lfm2", "gemma3"):
    cfg = tiny_config(family)
    params = init_params(cfg, jax.random.key(0))
    counts = count_params(cfg)
    assert counts["total"] == sum(x.size for x in jax.tree.leaves(params))
    assert counts["total"] == counts["embedding"] + counts["non_embedding"]
    assert counts["layers"] == sum(counts["per_layer"])
    final_norm = cfg.d_model * (2 if cfg.norm == "layernorm" else 1)  # scale (+ bias)
    assert counts["non_embedding"] == counts["layers"] + final_norm


def test_moe_active_params_and_flops():
  cfg = config.load("moe").model
  counts = count_params(cfg)
  expert = 3 * cfg.d_model * cfg.moe_mlp_dim
  idle = cfg.num_layers * (cfg.num_experts - cfg.experts_per_token) * expert
  assert counts["active"] == counts["total"] - idle
  dense = count_params(config.load("llama3").model)
  assert counts["flops_per_token"] < dense["flops_per_token"]


def test_flops_per_token_formula():
  cfg = config.load("llama3").model
  counts = count_params(cfg, seq_len=512)
  attention = 12 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * 512
  assert counts["flops_per_token"] == 6 * counts["total"] + attention


def test_cli_params_json():
  out = subprocess.run([sys.executable, "-m", "dhara_jax.cli", "params", "shapes/gpt2_70m",
                        "--json"], capture_output=True, text=True, check=True, timeout=300).stdout
  counts = json.loads(out)
  for key in ("total", "embedding", "non_embedding", "per_layer", "layers"):
    assert key in counts
  assert counts["total"] == 64_085_504 and len(counts["per_layer"]) == 12
