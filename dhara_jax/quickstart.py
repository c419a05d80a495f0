"""`dhara quickstart`: a small end-to-end run on this machine.

For now: every family (and LLaMA3-Canon) is built at a small size, run forward (jit), exported to
transformers (custom code for Canon), reloaded in PyTorch and compared logit by logit, and
imported back bit-exactly. The summary goes
to OUT/summary.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dhara_jax import config
from dhara_jax.config import FAMILIES
from dhara_jax.errors import DharaError
from dhara_jax.export import export_hf, import_hf
from dhara_jax.export.parity import load_torch_model, torch_logits
from dhara_jax.model import forward, init_params
from dhara_jax.params import count_params

SMALL = ["model.vocab_size=1024", "model.d_model=128", "model.num_layers=6",
         "model.num_heads=4", "model.num_kv_heads=2", "model.mlp_dim=256",
         "model.max_seq_len=128"]
SMALL_FAMILY = {"gpt2": ["model.num_kv_heads=4", "model.mlp_dim=512"],
                "moe": ["model.num_experts=4", "model.moe_mlp_dim=64"],
                "gemma3": ["model.sliding_window=16"]}
PARITY_TOLERANCE = 1e-4
# Every family through its transformers class, plus LLaMA3-Canon through custom code.
PRESETS = FAMILIES + ("llama3_canon",)


def run(out_dir: str | Path, families: tuple[str, ...] = PRESETS, seed: int = 0) -> dict:
  out = Path(out_dir)
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise DharaError(f"quickstart: cannot create {out}: {e.strerror or e}") from None
  tokens = np.random.default_rng(seed).integers(0, 1024, (2, 64)).astype(np.int32)
  results = {}
  for family in families:
    started = time.perf_counter()
    cfg = config.load(family, SMALL + SMALL_FAMILY.get(family, [])).model
    params = init_params(cfg, jax.random.key(seed))
    logits, _ = jax.jit(forward, static_argnums=0)(cfg, params, jnp.asarray(tokens))
    hf_dir = export_hf(cfg, params, out / family)
    theirs = torch_logits(load_torch_model(hf_dir), tokens)
    max_diff = float(np.max(np.abs(np.asarray(logits) - theirs)))
    cfg_back, params_back = import_hf(hf_dir)
    exact = cfg_back == cfg and all(jax.tree.leaves(jax.tree.map(
        lambda a, b: bool(np.array_equal(np.asarray(a), b)), params, params_back)))
    results[family] = {"params": count_params(cfg)["total"], "max_abs_logit_diff": max_diff,
                       "parity_ok": max_diff <= PARITY_TOLERANCE, "import_exact": exact,
                       "seconds": round(time.perf_counter() - started, 2)}
    r = results[family]
    print(f"{family:12s} {r['params'] / 1e6:6.2f}M params  export→torch max |Δlogit| "
          f"{max_diff:.2e} {'ok' if r['parity_ok'] else 'FAIL'}  import "
          f"{'bit-exact' if exact else 'DIFFERS'}  ({r['seconds']}s)", flush=True)
  summary = {"families": results,
             "ok": all(r["parity_ok"] and r["import_exact"] for r in results.values())}
  (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  return summary
