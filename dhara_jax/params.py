"""Parameter counts and training FLOPs per token of a model config (no weights allocated)."""

from __future__ import annotations

import math
from typing import Any

from flax import traverse_util

from dhara_jax.config import ModelConfig
from dhara_jax.model import param_shapes

# Counting convention: `embedding` = token table + learned position table + an untied output
# head; a tied head shares the token table and is counted once. `total` counts every trainable
# parameter once. With this convention codelion/gpt-2-70m (12L/512/8H, vocab 50,257, 1,024
# positions, tied) has 64,085,504 = 64.09M parameters.
EMBEDDING_PREFIXES = ("embed/", "pos_embed/", "lm_head/")


def count_params(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, Any]:
  shapes = {k: v.shape for k, v in
            traverse_util.flatten_dict(param_shapes(cfg), sep="/").items()}
  flat = {k: math.prod(shape) for k, shape in shapes.items()}
  total = sum(flat.values())
  embedding = sum(n for k, n in flat.items() if k.startswith(EMBEDDING_PREFIXES))
  per_layer = [sum(n for k, n in flat.items() if k.startswith(f"layers_{i}/"))
               for i in range(cfg.num_layers)]
  # Weight matrices inside the blocks only (no biases, norm scales or depthwise conv taps): the
  # 12·d²·L that codelion's shape table reports for GPT-2 blocks.
  layer_matrices = sum(n for k, n in flat.items()
                       if k.startswith("layers_") and len(shapes[k]) >= 2
                       and "/canon_" not in k and not k.endswith("/conv/conv"))
  canon = sum(n for k, n in flat.items() if "/canon_" in k)
  active = _active_params(cfg, flat)
  seq_len = seq_len or cfg.max_seq_len
  return {
      "family": cfg.family,
      "total": total,
      "embedding": embedding,
      "non_embedding": total - embedding,
      "layers": sum(per_layer),
      "layer_matrices": layer_matrices,
      "canon": canon,
      "per_layer": per_layer,
      "num_layers": cfg.num_layers,
      "active": active,
      "seq_len": seq_len,
      "flops_per_token": training_flops_per_token(cfg, active, seq_len),
  }


def _active_params(cfg: ModelConfig, flat: dict[str, int]) -> int:
  """Parameters one token uses: MoE layers count only `experts_per_token` experts."""
  if not cfg.num_experts:
    return sum(flat.values())
  inactive_fraction = 1 - cfg.experts_per_token / cfg.num_experts
  expert_params = sum(n for k, n in flat.items()
                      if "/moe/" in k and not k.endswith("/router"))
  return sum(flat.values()) - round(expert_params * inactive_fraction)


def training_flops_per_token(cfg: ModelConfig, active: int, seq_len: int) -> int:
  """6 · (parameters a token uses, lookup-only tables excluded) + 12 · Σ_attn-layers
  heads · head_dim · context (PaLM's convention, no causal discount; sliding-window layers see
  at most `sliding_window` keys).

  Embedding lookups are not matmuls; the output projection is, tied or not.
  """
  # Tables used only as lookups: the token table when an untied lm_head does the output
  # matmul, and learned positions. A tied table is also the output projection, so it counts.
  lookup_only = (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
  if cfg.position == "learned":
    lookup_only += cfg.max_seq_len * cfg.d_model
  matmul_params = active - lookup_only
  attention = 0
  for kind in cfg.layer_kinds:
    if kind == "C":
      continue
    context = min(seq_len, cfg.sliding_window) if kind == "L" else seq_len
    attention += 12 * cfg.num_heads * cfg.resolved_head_dim * context
  return 6 * matmul_params + attention


def format_table(counts: dict[str, Any]) -> str:
  m = lambda n: f"{n / 1e6:10.3f}M  ({n:,})"
  lines = [
      f"family          {counts['family']}",
      f"total           {m(counts['total'])}",
      f"embedding       {m(counts['embedding'])}",
      f"non-embedding   {m(counts['non_embedding'])}",
      f"layers          {m(counts['layers'])}  over {counts['num_layers']} layers",
      f"layer matrices  {m(counts['layer_matrices'])}  (block weight matrices only)",
  ]
  if counts["canon"]:
    lines.append(f"canon           {m(counts['canon'])}  "
                 f"({100 * counts['canon'] / counts['total']:.2f}% of total)")
  distinct = sorted(set(counts["per_layer"]))
  lines.append("per layer       " + ", ".join(f"{n:,}" for n in distinct)
               + ("" if len(distinct) == 1 else "  (layer kinds differ)"))
  if counts["active"] != counts["total"]:
    lines.append(f"active/token    {m(counts['active'])}")
  lines.append(f"train FLOPs/tok {counts['flops_per_token'] / 1e6:10.1f}M  "
               f"(seq_len {counts['seq_len']})")
  return "\n".join(lines)
