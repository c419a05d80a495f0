"""Mappings to transformers classes: one per family.

A family spec says which `ModelConfig` values its transformers class can express, how config
fields are named there, and where every parameter goes (name, transpose, fused or split
projections, tied head). Every entry has an exact inverse, so import(export(params)) is
bit-identical. Files are written and read by `dhara_jax.export.io`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import numpy as np
from flax import traverse_util

from dhara_jax.config import ModelConfig, compact_pattern
from dhara_jax.errors import DharaError
from dhara_jax.model import param_shapes

Arrays = dict[str, np.ndarray]


# ---------------------------------------------------------------------------------------------
# Tensor mapping entries.

@dataclasses.dataclass(frozen=True)
class Entry:
  """One transformers tensor made from one or more dhara-jax tensors, and back."""

  hf: str
  paths: tuple[str, ...]
  to_hf: Callable[..., np.ndarray]
  from_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  stack_index: int | None = None  # set when the tensor is one slice of a stacked dhara tensor


def same(hf: str, path: str) -> Entry:
  return Entry(hf, (path,), lambda a: a, lambda a: (a,))


def linear(hf: str, path: str) -> Entry:
  """Flax Dense kernels are (in, out); torch Linear weights are (out, in)."""
  return Entry(hf, (path,), lambda a: a.T, lambda a: (a.T,))


def fused(hf: str, paths: tuple[str, ...], sizes: tuple[int, ...], axis: int,
          transpose: tuple[int, ...] | None = None) -> Entry:
  """Concatenate along `axis` (then optionally transpose); the inverse splits at `sizes`."""
  splits = np.cumsum(sizes)[:-1]
  inverse = np.argsort(transpose) if transpose is not None else None

  def to_hf(*arrays):
    out = np.concatenate(arrays, axis=axis)
    return out.transpose(transpose) if transpose is not None else out

  def from_hf(a):
    a = a.transpose(inverse) if inverse is not None else a
    return tuple(np.split(a, splits, axis=axis))

  return Entry(hf, paths, to_hf, from_hf)


def conv1d_depthwise(hf: str, path: str) -> Entry:
  """(K, C) taps ↔ torch depthwise Conv1d weight (C, 1, K)."""
  return Entry(hf, (path,), lambda a: a.T[:, None, :], lambda a: (a[:, 0, :].T,))


def expert_linear(hf: str, path: str, expert: int) -> Entry:
  """One expert's slice of a stacked (E, in, out) kernel ↔ its own torch Linear (out, in)."""
  return Entry(hf, (path,), lambda a: a[expert].T, lambda a: (a.T,), stack_index=expert)


# ---------------------------------------------------------------------------------------------
# Family specs.

@dataclasses.dataclass(frozen=True)
class FamilySpec:
  architecture: str
  model_type: str
  requires: dict[str, Any]  # ModelConfig field -> value the transformers class implies
  renames: tuple[tuple[str, str], ...]  # (ModelConfig field, config.json key)
  extra_config: Callable[[ModelConfig], dict]
  config_from_hf: Callable[[dict], dict]
  entries: Callable[[ModelConfig], list[Entry]]
  # Tensors some checkpoints of this class hold that are not parameters (buffers derived from
  # the config); import skips them by name. Any other tensor no entry maps is an error.
  buffers: tuple[str, ...] = ()


LLAMA_RENAMES = (
    ("vocab_size", "vocab_size"), ("d_model", "hidden_size"), ("num_layers", "num_hidden_layers"),
    ("num_heads", "num_attention_heads"), ("num_kv_heads", "num_key_value_heads"),
    ("mlp_dim", "intermediate_size"), ("max_seq_len", "max_position_embeddings"),
    ("norm_eps", "rms_norm_eps"), ("tie_embeddings", "tie_word_embeddings"),
    ("init_std", "initializer_range"),
)

ROPE_LLAMA_LIKE = {"norm": "rmsnorm", "norm_unit_offset": False, "position": "rope",
                   "attention": "causal", "sandwich_norm": False, "embed_scale": False,
                   "final_logit_softcap": 0.0, "query_scale_dim": 0}


def _rope(theta: float) -> dict:
  return {"rope_type": "default", "rope_theta": theta}


def _layer(i: int) -> str:
  return f"layers_{i}"


def _attention_entries(prefix: str, layer: str, cfg: ModelConfig, out_name: str = "o_proj",
                       qk_norm_names: tuple[str, str] = ("q_norm", "k_norm")) -> list[Entry]:
  entries = [linear(f"{prefix}.{n}_proj.weight", f"{layer}/attn/{n}/kernel") for n in "qkv"]
  entries.append(linear(f"{prefix}.{out_name}.weight", f"{layer}/attn/o/kernel"))
  if cfg.use_bias:
    entries += [same(f"{prefix}.{n}_proj.bias", f"{layer}/attn/{n}/bias") for n in "qkv"]
    entries.append(same(f"{prefix}.{out_name}.bias", f"{layer}/attn/o/bias"))
  if cfg.qk_norm:
    entries += [same(f"{prefix}.{hf}.weight", f"{layer}/attn/{ours}/scale")
                for hf, ours in zip(qk_norm_names, ("q_norm", "k_norm"))]
  return entries


def _gated_mlp_entries(prefix: str, layer: str, cfg: ModelConfig,
                       names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
                       ) -> list[Entry]:
  entries = [linear(f"{prefix}.{hf}.weight", f"{layer}/mlp/{ours}/kernel")
             for hf, ours in zip(names, ("gate", "up", "down"))]
  if cfg.use_bias:
    entries += [same(f"{prefix}.{hf}.bias", f"{layer}/mlp/{ours}/bias")
                for hf, ours in zip(names, ("gate", "up", "down"))]
  return entries


def _moe_entries(prefix: str, layer: str, cfg: ModelConfig) -> list[Entry]:
  """Qwen3-MoE in the Hub's per-expert layout (transformers fuses experts when loading)."""
  entries = [linear(f"{prefix}.gate.weight", f"{layer}/moe/router")]
  for e in range(cfg.num_experts):
    entries += [expert_linear(f"{prefix}.experts.{e}.{n}_proj.weight", f"{layer}/moe/{n}", e)
                for n in ("gate", "up", "down")]
  return entries


def _embedding_entries(cfg: ModelConfig, embed_name: str, final_norm: str,
                       norm_bias: bool = False) -> list[Entry]:
  entries = [same(embed_name, "embed/embedding"), same(f"{final_norm}.weight", "final_norm/scale")]
  if norm_bias:
    entries.append(same(f"{final_norm}.bias", "final_norm/bias"))
  if not cfg.tie_embeddings:
    entries.append(linear("lm_head.weight", "lm_head/kernel"))
  return entries


def _llama_like_entries(cfg: ModelConfig, sandwich_names: bool = False) -> list[Entry]:
  entries = _embedding_entries(cfg, "model.embed_tokens.weight", "model.norm")
  for i in range(cfg.num_layers):
    p, layer = f"model.layers.{i}", _layer(i)
    entries.append(same(f"{p}.input_layernorm.weight", f"{layer}/pre_mixer_norm/scale"))
    if sandwich_names:  # Gemma: four norms per layer
      entries += [same(f"{p}.post_attention_layernorm.weight", f"{layer}/post_mixer_norm/scale"),
                  same(f"{p}.pre_feedforward_layernorm.weight", f"{layer}/pre_mlp_norm/scale"),
                  same(f"{p}.post_feedforward_layernorm.weight", f"{layer}/post_mlp_norm/scale")]
    else:
      entries.append(same(f"{p}.post_attention_layernorm.weight", f"{layer}/pre_mlp_norm/scale"))
    entries += _attention_entries(f"{p}.self_attn", layer, cfg)
    if cfg.num_experts:
      entries += _moe_entries(f"{p}.mlp", layer, cfg)
    else:
      entries += _gated_mlp_entries(f"{p}.mlp", layer, cfg)
  return entries


def _gpt2_entries(cfg: ModelConfig) -> list[Entry]:
  d = cfg.d_model
  entries = _embedding_entries(cfg, "transformer.wte.weight", "transformer.ln_f", norm_bias=True)
  entries.append(same("transformer.wpe.weight", "pos_embed/embedding"))
  for i in range(cfg.num_layers):
    p, layer = f"transformer.h.{i}", _layer(i)
    qkv = tuple(f"{layer}/attn/{n}/" for n in "qkv")
    entries += [
        # GPT-2's Conv1D stores (in, out) like Flax, so kernels are not transposed.
        fused(f"{p}.attn.c_attn.weight", tuple(s + "kernel" for s in qkv), (d, d, d), axis=1),
        fused(f"{p}.attn.c_attn.bias", tuple(s + "bias" for s in qkv), (d, d, d), axis=0),
        same(f"{p}.attn.c_proj.weight", f"{layer}/attn/o/kernel"),
        same(f"{p}.attn.c_proj.bias", f"{layer}/attn/o/bias"),
        same(f"{p}.mlp.c_fc.weight", f"{layer}/mlp/up/kernel"),
        same(f"{p}.mlp.c_fc.bias", f"{layer}/mlp/up/bias"),
        same(f"{p}.mlp.c_proj.weight", f"{layer}/mlp/down/kernel"),
        same(f"{p}.mlp.c_proj.bias", f"{layer}/mlp/down/bias"),
    ]
    for hf_norm, ours in (("ln_1", "pre_mixer_norm"), ("ln_2", "pre_mlp_norm")):
      entries += [same(f"{p}.{hf_norm}.weight", f"{layer}/{ours}/scale"),
                  same(f"{p}.{hf_norm}.bias", f"{layer}/{ours}/bias")]
  return entries


def _lfm2_entries(cfg: ModelConfig) -> list[Entry]:
  entries = _embedding_entries(cfg, "model.embed_tokens.weight", "model.embedding_norm")
  for i, kind in enumerate(cfg.layer_kinds):
    p, layer = f"model.layers.{i}", _layer(i)
    entries += [same(f"{p}.operator_norm.weight", f"{layer}/pre_mixer_norm/scale"),
                same(f"{p}.ffn_norm.weight", f"{layer}/pre_mlp_norm/scale")]
    entries += _gated_mlp_entries(f"{p}.feed_forward", layer, cfg, ("w1", "w3", "w2"))
    if kind == "C":
      entries += [linear(f"{p}.conv.in_proj.weight", f"{layer}/conv/in_proj/kernel"),
                  linear(f"{p}.conv.out_proj.weight", f"{layer}/conv/out_proj/kernel"),
                  conv1d_depthwise(f"{p}.conv.conv.weight", f"{layer}/conv/conv")]
    else:
      entries += _attention_entries(f"{p}.self_attn", layer, cfg, out_name="out_proj",
                                    qk_norm_names=("q_layernorm", "k_layernorm"))
  return entries


def _gemma3_extra(cfg: ModelConfig) -> dict:
  return {
      "head_dim": cfg.resolved_head_dim,
      "hidden_activation": "gelu_pytorch_tanh",
      "query_pre_attn_scalar": cfg.query_scale_dim or cfg.resolved_head_dim,
      "sliding_window": cfg.sliding_window or None,
      "layer_types": ["sliding_attention" if k == "L" else "full_attention"
                      for k in cfg.layer_kinds],
      "rope_parameters": {"full_attention": _rope(cfg.rope_theta),
                          "sliding_attention": _rope(cfg.local_rope_theta)},
      "final_logit_softcapping": cfg.final_logit_softcap or None,
      "attn_logit_softcapping": None,
      "attention_bias": cfg.use_bias,
  }


def _gemma3_from_hf(hf: dict) -> dict:
  kinds = "".join("L" if t == "sliding_attention" else "A" for t in hf["layer_types"])
  rope = hf["rope_parameters"]
  scale_dim = hf["query_pre_attn_scalar"]
  return {"head_dim": hf["head_dim"],
          "query_scale_dim": 0 if scale_dim == hf["head_dim"] else scale_dim,
          "sliding_window": hf.get("sliding_window") or 0, "layer_pattern": compact_pattern(kinds),
          "rope_theta": rope["full_attention"]["rope_theta"],
          "rope_local_theta": rope["sliding_attention"]["rope_theta"],
          "final_logit_softcap": hf.get("final_logit_softcapping") or 0.0,
          "use_bias": hf.get("attention_bias", False)}


def _lfm2_extra(cfg: ModelConfig) -> dict:
  return {"norm_eps": cfg.norm_eps, "head_dim": cfg.resolved_head_dim,
          "rope_parameters": _rope(cfg.rope_theta), "conv_L_cache": cfg.conv_kernel,
          "conv_bias": False, "block_auto_adjust_ff_dim": False,
          "layer_types": ["conv" if k == "C" else "full_attention" for k in cfg.layer_kinds]}


def _lfm2_from_hf(hf: dict) -> dict:
  return {"norm_eps": hf["norm_eps"], "head_dim": hf.get("head_dim") or 0,
          "rope_theta": hf["rope_parameters"]["rope_theta"], "conv_kernel": hf["conv_L_cache"],
          "layer_pattern": compact_pattern("".join("C" if t == "conv" else "A"
                                                   for t in hf["layer_types"]))}


def _rope_extra(cfg: ModelConfig) -> dict:
  return {"head_dim": cfg.resolved_head_dim, "rope_parameters": _rope(cfg.rope_theta)}


def _rope_from_hf(hf: dict) -> dict:
  return {"head_dim": hf.get("head_dim") or 0, "rope_theta": hf["rope_parameters"]["rope_theta"]}


def _with(extra: Callable[[ModelConfig], dict], more: Callable[[ModelConfig], dict]):
  return lambda cfg: {**extra(cfg), **more(cfg)}


FAMILY_SPECS: dict[str, FamilySpec] = {
    "gpt2": FamilySpec(
        "GPT2LMHeadModel", "gpt2",
        requires={"norm": "layernorm", "position": "learned", "mlp": "gelu", "use_bias": True,
                  "qk_norm": False, "sandwich_norm": False, "layer_pattern": "A",
                  "embed_scale": False, "final_logit_softcap": 0.0,
                  "num_experts": 0, "attention": "causal", "query_scale_dim": 0},
        # GPT2LMHeadModel reads an untied lm_head.weight when tie_word_embeddings is false.
        renames=(("vocab_size", "vocab_size"), ("d_model", "n_embd"), ("num_layers", "n_layer"),
                 ("num_heads", "n_head"), ("mlp_dim", "n_inner"), ("max_seq_len", "n_positions"),
                 ("norm_eps", "layer_norm_epsilon"), ("tie_embeddings", "tie_word_embeddings"),
                 ("init_std", "initializer_range")),
        extra_config=lambda cfg: {"activation_function": "gelu_new", "resid_pdrop": 0.0,
                                  "embd_pdrop": 0.0, "attn_pdrop": 0.0},
        config_from_hf=lambda hf: {"num_kv_heads": hf["n_head"]},
        entries=_gpt2_entries,
        # The causal-mask buffers older transformers versions saved in every layer.
        buffers=(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)",)),
    "llama3": FamilySpec(
        "LlamaForCausalLM", "llama",
        requires={**ROPE_LLAMA_LIKE, "mlp": "swiglu", "qk_norm": False, "layer_pattern": "A",
                  "num_experts": 0},
        renames=LLAMA_RENAMES,
        extra_config=_with(_rope_extra, lambda cfg: {"attention_bias": cfg.use_bias,
                                                     "mlp_bias": cfg.use_bias}),
        config_from_hf=lambda hf: {**_rope_from_hf(hf),
                                   "use_bias": hf.get("attention_bias", False)},
        entries=_llama_like_entries,
        # Old LLaMA checkpoints saved each layer's RoPE frequencies, which rope_theta sets.
        buffers=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)),
    "qwen3": FamilySpec(
        "Qwen3ForCausalLM", "qwen3",
        requires={**ROPE_LLAMA_LIKE, "mlp": "swiglu", "qk_norm": True, "layer_pattern": "A",
                  "num_experts": 0, "use_bias": False},
        renames=LLAMA_RENAMES,
        extra_config=_with(_rope_extra, lambda cfg: {"use_sliding_window": False}),
        config_from_hf=_rope_from_hf,
        entries=_llama_like_entries),
    "moe": FamilySpec(
        "Qwen3MoeForCausalLM", "qwen3_moe",
        requires={**ROPE_LLAMA_LIKE, "mlp": "swiglu", "qk_norm": True, "layer_pattern": "A",
                  "use_bias": False},
        renames=LLAMA_RENAMES + (("num_experts", "num_experts"),
                                 ("experts_per_token", "num_experts_per_tok"),
                                 ("moe_mlp_dim", "moe_intermediate_size"),
                                 ("moe_norm_topk", "norm_topk_prob"),
                                 ("moe_aux_loss_weight", "router_aux_loss_coef")),
        extra_config=_with(_rope_extra, lambda cfg: {"decoder_sparse_step": 1,
                                                     "mlp_only_layers": [],
                                                     "use_sliding_window": False}),
        config_from_hf=_rope_from_hf,
        entries=_llama_like_entries),
    "gemma3": FamilySpec(
        "Gemma3ForCausalLM", "gemma3_text",
        requires={"norm": "rmsnorm", "norm_unit_offset": True, "position": "rope",
                  "mlp": "geglu", "qk_norm": True, "sandwich_norm": True, "embed_scale": True,
                  "num_experts": 0, "attention": "causal"},
        renames=LLAMA_RENAMES,
        extra_config=_gemma3_extra,
        config_from_hf=_gemma3_from_hf,
        entries=lambda cfg: _llama_like_entries(cfg, sandwich_names=True)),
    "lfm2": FamilySpec(
        "Lfm2ForCausalLM", "lfm2",
        requires={**ROPE_LLAMA_LIKE, "mlp": "swiglu", "qk_norm": True, "num_experts": 0,
                  "use_bias": False},
        renames=tuple(r for r in LLAMA_RENAMES if r[0] != "norm_eps"),
        extra_config=_lfm2_extra,
        config_from_hf=_lfm2_from_hf,
        entries=_lfm2_entries),
}

MODEL_TYPE_TO_FAMILY = {spec.model_type: name for name, spec in FAMILY_SPECS.items()}


def family_spec(cfg: ModelConfig) -> FamilySpec:
  """The family's spec, after checking that its transformers class can express `cfg`."""
  spec = FAMILY_SPECS[cfg.family]
  for field, want in {"canon_set": "", **spec.requires}.items():
    have = getattr(cfg, field)
    if have != want:
      raise DharaError(f"export: {spec.architecture} needs model.{field}={want!r}, got {have!r}")
  if cfg.family == "gpt2" and (cfg.num_kv_heads != cfg.num_heads
                               or cfg.resolved_head_dim * cfg.num_heads != cfg.d_model):
    raise DharaError("export: GPT2LMHeadModel needs num_kv_heads == num_heads and "
                     "head_dim · num_heads == d_model")
  if cfg.family == "lfm2" and "L" in cfg.layer_pattern:
    raise DharaError("export: Lfm2ForCausalLM has no sliding-window layers (model.layer_pattern)")
  if cfg.family == "gemma3" and "C" in cfg.layer_pattern:
    raise DharaError("export: Gemma3ForCausalLM has no short-conv layers (model.layer_pattern)")
  return spec


# ---------------------------------------------------------------------------------------------
# Export / import.

def hf_config(cfg: ModelConfig) -> dict:
  spec = family_spec(cfg)
  # Special-token ids belong to the tokenizer, which a bare model config does not know.
  out = {"architectures": [spec.architecture], "model_type": spec.model_type,
         "torch_dtype": "float32", "use_cache": True, "bos_token_id": None,
         "eos_token_id": None, "pad_token_id": None}
  out.update({hf: getattr(cfg, ours) for ours, hf in spec.renames})
  out.update(spec.extra_config(cfg))
  return out


def to_hf_state_dict(cfg: ModelConfig, params: Any) -> Arrays:
  """transformers tensor name -> numpy array (float32, contiguous)."""
  return apply_forward(family_spec(cfg).entries(cfg), params)


def config_from_hf(hf: dict) -> ModelConfig:
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPE_TO_FAMILY:
    raise DharaError(f"import: model_type {model_type!r} is not one of "
                     f"{', '.join(MODEL_TYPE_TO_FAMILY)}, dhara (our custom-code exports)")
  family = MODEL_TYPE_TO_FAMILY[model_type]
  spec = FAMILY_SPECS[family]
  fields = {"family": family, **spec.requires}
  for ours, key in spec.renames:
    if key in hf and hf[key] is not None:
      fields[ours] = hf[key]
  fields.update(spec.config_from_hf(hf))
  if family == "gpt2" and not fields.get("mlp_dim"):
    fields["mlp_dim"] = 4 * fields["d_model"]
  if fields.get("head_dim") and fields["head_dim"] * fields["num_heads"] == fields["d_model"]:
    fields["head_dim"] = 0  # the derived default, as the presets write it
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  return ModelConfig(**{k: v for k, v in fields.items() if k in known})


def apply_forward(entries: list[Entry], params: Any) -> Arrays:
  """dhara-jax params -> transformers tensors (float32, contiguous numpy)."""
  flat = {k: np.asarray(jax.device_get(v), np.float32)
          for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  used = {p for e in entries for p in e.paths}
  if used != set(flat):
    missing, extra = sorted(used - set(flat)), sorted(set(flat) - used)
    raise DharaError(f"export: params do not match model config "
                     f"(missing {missing[:3]}, unmapped {extra[:3]})")
  return {e.hf: np.ascontiguousarray(e.to_hf(*(flat[p] for p in e.paths))) for e in entries}


def apply_inverse(entries: list[Entry], tensors: Arrays) -> dict:
  """transformers tensors (as `check_checkpoint` accepted them) -> dhara-jax params (nested
  dict), undoing every entry exactly."""
  flat = {}
  slices: dict[str, dict[int, np.ndarray]] = {}
  for e in entries:
    for path, part in zip(e.paths, e.from_hf(tensors[e.hf])):
      if e.stack_index is None:
        flat[path] = np.ascontiguousarray(part)
      else:
        slices.setdefault(path, {})[e.stack_index] = part
  for path, by_index in slices.items():
    flat[path] = np.stack([by_index[i] for i in sorted(by_index)])
  return traverse_util.unflatten_dict(flat, sep="/")


# ---------------------------------------------------------------------------------------------
# Checking a checkpoint before it is imported.

# Weights may be stored as these (safetensors' names): each converts to float32, the parameters'
# dtype, exactly. Integer and bool tensors are not weights; F64 would lose bits unannounced.
WEIGHT_DTYPES = ("F32", "BF16", "F16")
# Some tools write a tied head's weight too, a copy of the embedding (checked equal on reading).
TIED_HEAD = "lm_head.weight"


def expected_shapes(cfg: ModelConfig, entries: list[Entry]) -> dict[str, tuple[int, ...]]:
  """The shape of every transformers tensor `entries` make from `cfg`'s parameters."""
  shapes = traverse_util.flatten_dict(param_shapes(cfg), sep="/")
  out = {}
  for e in entries:
    # Zero-stride stand-ins hold no memory; only a fused entry allocates (bools, 1 byte each).
    stand_ins = [np.broadcast_to(np.False_, shapes[p].shape) for p in e.paths]
    out[e.hf] = tuple(e.to_hf(*stand_ins).shape)
  return out


def embedding_name(entries: list[Entry]) -> str:
  return next(e.hf for e in entries if e.paths == ("embed/embedding",))


def check_checkpoint(cfg: ModelConfig, entries: list[Entry],
                     header: dict[str, tuple[str, tuple[int, ...]]], buffers: tuple[str, ...],
                     where: str) -> list[str]:
  """Refuses, in one line naming the tensor, a checkpoint (`header`: name -> (safetensors
  dtype, shape)) that lacks a tensor `entries` need, holds one they do not map (other than the
  family's known `buffers`), or holds one of a dtype or shape `cfg` does not give. Returns the
  names of the tensors to read."""
  expected = expected_shapes(cfg, entries)
  if cfg.tie_embeddings and TIED_HEAD in header:
    expected[TIED_HEAD] = expected[embedding_name(entries)]
  missing = [name for name in expected if name not in header]
  if missing:
    raise DharaError(f"import: {where} lacks tensor {missing[0]}{_more(missing)}")
  unclaimed = sorted(name for name in header if name not in expected
                     and not any(re.fullmatch(b, name) for b in buffers))
  if unclaimed:
    raise DharaError(f"import: {where} holds tensor {unclaimed[0]}{_more(unclaimed)}, which is "
                     "no parameter of the model its config.json describes")
  for name, shape in expected.items():
    dtype, have = header[name]
    if dtype not in WEIGHT_DTYPES:
      raise DharaError(f"import: {where}: tensor {name} is {dtype}, not a weight dtype "
                       f"({', '.join(WEIGHT_DTYPES)})")
    if tuple(have) != shape:
      raise DharaError(f"import: {where}: tensor {name} has shape {_dims(have)}; config.json "
                       f"makes it {_dims(shape)}")
  return list(expected)


def _more(names: list[str]) -> str:
  return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def _dims(shape: tuple[int, ...]) -> str:
  return "×".join(map(str, shape)) if shape else "a scalar"
