"""Frozen, validated configuration loaded from YAML with `key=value` overrides.

A config file has sections (`model:`, `mesh:`) and may name a `base:` file whose sections it
overrides key by key; family and shape presets live in `configs/` and are composed that way.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from data_pipeline.config import DataConfig
from dhara_jax.errors import ConfigError
from dhara_jax.sections import build_section

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"

FAMILIES = ("gpt2", "llama3", "qwen3", "gemma3", "moe", "lfm2")
LAYER_KINDS = {"A": "global attention", "L": "sliding-window attention", "C": "short conv"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Every switch of the one decoder; a family is a preset of these values."""

  family: str = "llama3"
  vocab_size: int = 50304
  d_model: int = 384
  num_layers: int = 32
  num_heads: int = 8
  num_kv_heads: int = 4
  head_dim: int = 0  # 0: d_model // num_heads
  mlp_dim: int = 1024
  max_seq_len: int = 1024
  # Normalisation.
  norm: str = "rmsnorm"  # layernorm | rmsnorm
  norm_eps: float = 1e-6
  norm_unit_offset: bool = False  # Gemma: scale stored as w, applied as (1 + w)
  sandwich_norm: bool = False  # extra norm on each sub-layer output (Gemma)
  # Positions.
  position: str = "rope"  # rope | learned
  rope_theta: float = 10_000.0
  rope_local_theta: float = 0.0  # theta of sliding-window layers; 0: rope_theta
  # Attention.
  qk_norm: bool = False
  # Scores are scaled by 1/sqrt(this); 0: head_dim (Gemma's query_pre_attn_scalar).
  query_scale_dim: int = 0
  attention: str = "causal"  # causal | bidirectional
  layer_pattern: str = "A"  # cycled over layers: A global attn, L sliding-window attn, C short conv
  sliding_window: int = 0
  conv_kernel: int = 3  # LFM2 short-conv length
  # MLP.
  mlp: str = "swiglu"  # gelu | swiglu | geglu
  use_bias: bool = False  # bias on every projection (GPT-2)
  num_experts: int = 0  # 0: dense MLP
  experts_per_token: int = 2
  moe_mlp_dim: int = 0
  moe_norm_topk: bool = True
  moe_aux_loss_weight: float = 0.01
  # Canon layers (PhysicsLM4): any subset of positions "ABCD"; see dhara_jax/model/canon.py.
  canon_set: str = ""
  canon_kernel: int = 4
  canon_residual: bool = True
  canon_bias: bool = False
  canon_activation: bool = False  # SiLU on the conv output (not recommended for transformers)
  canon_impl: str = "auto"  # conv kernel: auto ($DHARA_CANON_IMPL, else by backend) | reference |
  #                           xla | pallas_tpu | pallas_gpu
  # Attention kernel: auto ($DHARA_ATTENTION_IMPL, else by backend) | xla | pallas_gpu |
  # pallas_tpu (flash kernels; sliding-window layers always run on xla). kernels/attention.py.
  attention_impl: str = "auto"
  # Embeddings and output.
  tie_embeddings: bool = True
  embed_scale: bool = False  # multiply token embeddings by sqrt(d_model) (Gemma)
  final_logit_softcap: float = 0.0  # 0: off
  init_std: float = 0.02
  # Masked diffusion (LLaDA, MDLM): the absorbing mask token (-1: the tokenizer's <mask>,
  # filled in when training starts) and the floor of the masking probability,
  # p = (1 - eps)·t + eps. Exported with the model (`mask_token_id`, `mask_epsilon`).
  mask_token_id: int = -1
  mask_epsilon: float = 1e-3
  dtype: str = "float32"  # activation/compute dtype; parameters stay float32

  def __post_init__(self) -> None:
    _validate_model(self)

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def layer_kinds(self) -> tuple[str, ...]:
    """One letter of `layer_pattern` per layer, the pattern repeated cyclically."""
    pattern = self.layer_pattern
    return tuple(pattern[i % len(pattern)] for i in range(self.num_layers))

  @property
  def local_rope_theta(self) -> float:
    return self.rope_local_theta or self.rope_theta


# ModelConfig fields that choose how the model is computed, not what it computes: a run may
# resume with other values, and exports do not carry them.
RUNTIME_FIELDS = ("dtype", "canon_impl", "attention_impl")


def architecture(cfg: ModelConfig) -> dict[str, Any]:
  """What the model computes: every field but RUNTIME_FIELDS, resolved, so that two spellings
  of one model compare equal (an import from transformers and the preset it came from):
  head_dim and query_scale_dim as used, layer_pattern as the per-layer kinds, None for a
  field that does not apply to this model (sliding_window without sliding-window layers...)."""
  out = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUNTIME_FIELDS}
  kinds, head_dim = set(cfg.layer_kinds), cfg.resolved_head_dim
  out.update(head_dim=head_dim, query_scale_dim=cfg.query_scale_dim or head_dim,
             layer_pattern="".join(cfg.layer_kinds), rope_local_theta=cfg.local_rope_theta)
  unused = {
      "sliding_window": "L" not in kinds,
      "rope_local_theta": "L" not in kinds or cfg.position != "rope",
      "rope_theta": cfg.position != "rope",
      "conv_kernel": "C" not in kinds,
      "mlp_dim": bool(cfg.num_experts),  # every MLP is the experts
      "experts_per_token": not cfg.num_experts, "moe_mlp_dim": not cfg.num_experts,
      "moe_norm_topk": not cfg.num_experts, "moe_aux_loss_weight": not cfg.num_experts,
      "canon_kernel": not cfg.canon_set, "canon_residual": not cfg.canon_set,
      "canon_bias": not cfg.canon_set, "canon_activation": not cfg.canon_set,
      # What masks a diffusion model's input; a causal (AR) model has no use for it.
      "mask_token_id": cfg.attention == "causal", "mask_epsilon": cfg.attention == "causal",
  }
  out.update({field: None for field, is_unused in unused.items() if is_unused})
  return out


def compact_pattern(kinds: str) -> str:
  """The shortest `layer_pattern` whose cyclic repetition gives these per-layer kinds."""
  for period in range(1, len(kinds) + 1):
    if all(kinds[i] == kinds[i % period] for i in range(len(kinds))):
      return kinds[:period]
  return kinds


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh shape; -1 on one axis takes every remaining device."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def __post_init__(self) -> None:
    sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
    for name, size in sizes.items():
      if size == 0 or size < -1:
        raise ConfigError(f"mesh.{name}: must be a positive size or -1, got {size}")
    if sum(size == -1 for size in sizes.values()) > 1:
      raise ConfigError("mesh: at most one axis may be -1")


OBJECTIVES = ("ar", "mdm", "block")
# The attention an objective needs (AR must not see ahead, mdm must; block runs its own mask).
OBJECTIVE_ATTENTION = {"ar": "causal", "mdm": "bidirectional"}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation and run control. Defaults follow codelion/gpt-2-70m's card:
  AdamW, 5e-4 → 5e-5 cosine with 2% warmup."""

  # ar: next-token loss, causal. mdm: masked diffusion (LLaDA/MDLM) over the whole row,
  # bidirectional. block: block diffusion (BD3LM) over [x_t ; x_0] with blocks of block_size.
  objective: str = "ar"
  block_size: int = 0  # block objective only; must divide data.seq_len
  steps: int = 1000
  grad_accum: int = 1  # microbatches per step; must divide data.batch_size (the global batch)
  lr: float = 5e-4
  min_lr: float = 5e-5
  schedule: str = "cosine"  # cosine | wsd | constant
  warmup_fraction: float = 0.02
  decay_fraction: float = 0.2  # wsd: the final fraction of steps decays to min_lr
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0  # global-norm gradient clipping; 0: off
  seed: int = 0
  log_every: int = 10
  eval_every: int = 100  # held-out loss; 0: off
  eval_batches: int = 4
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  async_checkpoint: bool = True
  multihost: bool = False  # call jax.distributed.initialize() (TPU pods, multi-node GPU)
  checkpoint_dir: str = ""  # "": RUN_DIR/checkpoints; may be a bucket path (gs://...)
  # The loss computes the output head's logits a piece of the sequence at a time, at most this
  # many tokens per device at once (memory: tokens × vocab × 4 bytes).
  logit_chunk_tokens: int = 512

  def __post_init__(self) -> None:
    def fail(field: str, why: str) -> typing.NoReturn:
      raise ConfigError(f"train.{field}: {why}")

    if self.objective not in OBJECTIVES:
      fail("objective", f"{self.objective!r} is not one of {', '.join(OBJECTIVES)}")
    if self.objective == "block" and self.block_size <= 0:
      fail("block_size", f"must be positive with objective: block, got {self.block_size}")
    if self.block_size < 0:
      fail("block_size", f"must be >= 0, got {self.block_size}")
    if self.schedule not in ("cosine", "wsd", "constant"):
      fail("schedule", f"{self.schedule!r} is not one of cosine, wsd, constant")
    for field in ("steps", "grad_accum", "eval_batches", "keep_checkpoints", "logit_chunk_tokens"):
      if getattr(self, field) <= 0:
        fail(field, f"must be positive, got {getattr(self, field)}")
    for field in ("log_every", "eval_every", "checkpoint_every"):
      if getattr(self, field) < 0:
        fail(field, f"must be >= 0, got {getattr(self, field)}")
    for field in ("lr", "min_lr", "weight_decay", "eps", "clip_norm"):
      value = getattr(self, field)
      if not (math.isfinite(value) and value >= 0):
        fail(field, f"must be a finite number >= 0, got {value}")
    if self.min_lr > self.lr:
      fail("min_lr", f"{self.min_lr} exceeds lr={self.lr}")
    for field in ("warmup_fraction", "decay_fraction", "b1", "b2"):
      if not 0 <= getattr(self, field) < 1:
        fail(field, f"must be in [0, 1), got {getattr(self, field)}")
    if self.warmup_fraction + (self.decay_fraction if self.schedule == "wsd" else 0) > 1:
      fail("decay_fraction", "warmup_fraction + decay_fraction exceed 1")


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
  """`dhara convert`: AR → masked diffusion by Warmup-Stable-Decay over the block size
  (LLaDA 2.0's recipe). Warmup climbs the block ladder from the AR model (block 1),
  stable trains `mdm` over the whole row, decay steps back down; each stage's share of the
  token budget is split evenly over its block sizes."""

  warmup_blocks: tuple[int, ...] = (1, 4, 32, 64)
  decay_blocks: tuple[int, ...] = (512, 256, 128, 64, 32)  # each must divide data.seq_len
  warmup_share: float = 0.1
  stable_share: float = 0.7
  decay_share: float = 0.2
  tokens: int = 0  # the conversion's token budget; 0: token_fraction × the AR run's tokens
  token_fraction: float = 0.1
  mask_noise: float = 0.0  # std of noise on the mask token's input embedding, first stage
  average_top_k: int = 3  # the final model: mean of the k best decay checkpoints (0: last)

  def __post_init__(self) -> None:
    def fail(field: str, why: str) -> typing.NoReturn:
      raise ConfigError(f"convert.{field}: {why}")

    if not self.warmup_blocks:
      fail("warmup_blocks", "is empty; the ladder starts from the AR model, e.g. [1, 4, 32]")
    for field in ("warmup_blocks", "decay_blocks"):
      if any(b <= 0 for b in getattr(self, field)):
        fail(field, f"block sizes must be positive, got {list(getattr(self, field))}")
    shares = ("warmup_share", "stable_share", "decay_share")
    if any(not 0 <= getattr(self, f) <= 1 for f in shares):
      fail("warmup_share", "warmup_share, stable_share and decay_share must be in [0, 1]")
    if abs(sum(getattr(self, f) for f in shares) - 1) > 1e-6:
      fail("stable_share", "warmup_share + stable_share + decay_share must be 1, got "
           f"{sum(getattr(self, f) for f in shares):g}")
    if not self.decay_blocks and self.decay_share:
      fail("decay_share", "must be 0 without decay_blocks")
    if self.tokens < 0 or not 0 < self.token_fraction:
      fail("tokens" if self.tokens < 0 else "token_fraction", "must be positive")
    if not (math.isfinite(self.mask_noise) and self.mask_noise >= 0):
      fail("mask_noise", f"must be a finite number >= 0, got {self.mask_noise}")
    if self.average_top_k < 0:
      fail("average_top_k", f"must be >= 0, got {self.average_top_k}")


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  convert: ConvertConfig = dataclasses.field(default_factory=ConvertConfig)

  def __post_init__(self) -> None:
    if self.data.batch_size % self.train.grad_accum:
      raise ConfigError(f"train.grad_accum: {self.train.grad_accum} does not divide "
                        f"data.batch_size={self.data.batch_size}")
    if self.train.objective == "block" and self.data.seq_len % self.train.block_size:
      raise ConfigError(f"train.block_size: {self.train.block_size} does not divide "
                        f"data.seq_len={self.data.seq_len}")

  def check_objective_fits_model(self) -> None:
    """Refuses an objective the model's attention contradicts: AR must not see ahead, mdm
    must. Not checked at load: model presets are loaded with the default (AR) train section."""
    wanted = OBJECTIVE_ATTENTION.get(self.train.objective)
    if wanted and self.model.attention != wanted:
      raise ConfigError(f"train.objective: {self.train.objective} needs model.attention="
                        f"{wanted}, got {self.model.attention}")

  def with_mask_token(self, tokenizer: Any = None) -> "Config":
    """This config with the diffusion mask token resolved: `model.mask_token_id`, or the
    tokenizer's mask token when it is -1. `tokenizer` (a data_pipeline Tokenizer; None when
    none is known) keeps two ids a mask may be: its mask token, and its EOS (Dhara's own
    choice: Dhara-70M reuses GPT-2's end-of-text); any other id would mask with an ordinary
    token. A tokenizer without a mask token needs the EOS id set explicitly."""
    wanted = self.model.mask_token_id
    if self.train.objective == "ar":
      return self
    if tokenizer is None:
      if wanted == -1:
        raise ConfigError("model.mask_token_id: -1 means the tokenizer's <mask>, but there is "
                          "no tokenizer; set the id")
      return self
    mask, eos = tokenizer.mask_id, tokenizer.eos_id
    if wanted != -1 and wanted in (mask, eos):
      return self
    if wanted == -1 and mask is not None:
      return dataclasses.replace(self, model=dataclasses.replace(self.model, mask_token_id=mask))
    if mask is None and eos is None:
      raise ConfigError(f"model.mask_token_id: {tokenizer.path} has neither a mask token nor an "
                        "EOS, so no id of it can mask a diffusion model's input; use a "
                        "tokenizer that defines one")
    if wanted == -1:
      raise ConfigError(f"model.mask_token_id: -1 means the tokenizer's mask token, but "
                        f"{tokenizer.path} has none; set model.mask_token_id={eos} (its EOS, "
                        "Dhara's own choice for a mask)")
    usable = ", ".join(f"its {name} ({i})" for name, i in (("<mask>", mask), ("EOS", eos))
                       if i is not None)
    raise ConfigError(f"model.mask_token_id: {wanted} is an ordinary token of the tokenizer; "
                      f"use {usable}" + (", or -1" if mask is not None else ""))

  def check_rows_fit_model(self) -> None:
    """Refuses data rows longer than the model's positions: past them, learned positions are
    NaN and RoPE goes beyond what an export declares. Not checked at load: model-only presets
    carry the data section's 1024-token default."""
    if self.data.seq_len > self.model.max_seq_len:
      raise ConfigError(f"data.seq_len: {self.data.seq_len} is longer than model.max_seq_len="
                        f"{self.model.max_seq_len}, the longest sequence the model takes")


_CHOICES = {
    "family": FAMILIES,
    "norm": ("layernorm", "rmsnorm"),
    "position": ("rope", "learned"),
    "attention": ("causal", "bidirectional"),
    "mlp": ("gelu", "swiglu", "geglu"),
    "dtype": ("float32", "bfloat16"),
    "canon_impl": ("auto", "reference", "xla", "pallas_tpu", "pallas_gpu"),
    "attention_impl": ("auto", "xla", "pallas_gpu", "pallas_tpu"),
}


def _validate_model(c: ModelConfig) -> None:
  def fail(field: str, why: str) -> typing.NoReturn:
    raise ConfigError(f"model.{field}: {why}")

  for field, choices in _CHOICES.items():
    value = getattr(c, field)
    if value not in choices:
      fail(field, f"{value!r} is not one of {', '.join(choices)}")
  for field in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim",
                "max_seq_len", "conv_kernel", "experts_per_token"):
    if getattr(c, field) <= 0:
      fail(field, f"must be positive, got {getattr(c, field)}")
  for field in ("head_dim", "num_experts", "moe_mlp_dim", "sliding_window", "query_scale_dim"):
    if getattr(c, field) < 0:
      fail(field, f"must be >= 0, got {getattr(c, field)}")
  for field in ("norm_eps", "init_std"):
    if not getattr(c, field) > 0:
      fail(field, f"must be positive, got {getattr(c, field)}")
  for field in ("rope_theta", "rope_local_theta", "final_logit_softcap",
                "moe_aux_loss_weight"):
    value = getattr(c, field)
    if not (math.isfinite(value) and value >= 0):
      fail(field, f"must be a finite number >= 0, got {value}")
  if c.rope_theta <= 0 and c.position == "rope":
    fail("rope_theta", "must be positive with position: rope")
  if c.head_dim == 0 and c.d_model % c.num_heads:
    fail("num_heads", f"{c.num_heads} heads do not divide d_model={c.d_model} (or set head_dim)")
  if c.num_heads % c.num_kv_heads:
    fail("num_kv_heads", f"{c.num_kv_heads} KV heads do not divide num_heads={c.num_heads}")
  if c.position == "rope" and c.resolved_head_dim % 2:
    fail("head_dim", f"RoPE needs an even head_dim, got {c.resolved_head_dim}")
  if not c.layer_pattern or set(c.layer_pattern) - set(LAYER_KINDS):
    fail("layer_pattern", f"{c.layer_pattern!r} must be letters from "
         + ", ".join(f"{k} ({v})" for k, v in LAYER_KINDS.items()))
  if "L" in c.layer_pattern and c.sliding_window <= 0:
    fail("sliding_window", "must be positive when layer_pattern has sliding-window layers (L)")
  if not -1 <= c.mask_token_id < c.vocab_size:
    fail("mask_token_id", f"{c.mask_token_id} is outside the vocabulary [0, {c.vocab_size}) "
         "(-1: the tokenizer's <mask>)")
  if not 0 < c.mask_epsilon < 1:
    fail("mask_epsilon", f"must be in (0, 1), got {c.mask_epsilon}")
  if c.norm_unit_offset and c.norm != "rmsnorm":
    fail("norm_unit_offset", "only applies to norm: rmsnorm")
  if set(c.canon_set) - set("ABCD") or len(set(c.canon_set)) != len(c.canon_set):
    fail("canon_set", f"{c.canon_set!r} must be distinct letters from ABCD")
  if c.canon_kernel < 1:
    fail("canon_kernel", f"must be >= 1, got {c.canon_kernel}")
  if "D" in c.canon_set and c.num_experts:
    fail("canon_set", "Canon D needs a dense MLP: MoE experts see tokens out of time order")
  if c.num_experts:
    if c.experts_per_token > c.num_experts:
      fail("experts_per_token", f"{c.experts_per_token} exceeds num_experts={c.num_experts}")
    if c.moe_mlp_dim <= 0:
      fail("moe_mlp_dim", "must be positive when num_experts > 0")
    if c.mlp == "gelu":
      fail("mlp", "MoE experts are gated (swiglu or geglu)")


# ---------------------------------------------------------------------------------------------
# Loading.

_SECTIONS = {"model": ModelConfig, "mesh": MeshConfig, "data": DataConfig,
             "train": TrainConfig, "convert": ConvertConfig}


def merge(base: dict, override: Mapping) -> dict:
  """`override` over `base`, mapping by mapping (lists and scalars replace)."""
  out = dict(base)
  for key, value in override.items():
    if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
      out[key] = merge(out[key], value)
    else:
      out[key] = value
  return out


def resolve_path(spec: str | Path) -> Path:
  """A config path, or a preset name such as `llama3` / `families/llama3` / `shapes/gpt2_32l`."""
  path = Path(spec)
  if path.exists():
    return path
  for candidate in (CONFIG_ROOT / f"{spec}.yaml", CONFIG_ROOT / "families" / f"{spec}.yaml",
                    CONFIG_ROOT / "shapes" / f"{spec}.yaml", CONFIG_ROOT / str(spec)):
    if candidate.is_file():
      return candidate
  raise ConfigError(f"config: no such file or preset: {spec}")


def load_raw(spec: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
  """The merged mapping of a config file and its chain of `base:` files."""
  path = resolve_path(spec).resolve()
  if path in _seen:
    raise ConfigError(f"config: base cycle through {path}")
  raw = read_yaml(path)
  raw = {} if raw is None else raw
  if not isinstance(raw, Mapping):
    raise ConfigError(f"config: {path} must hold a mapping of sections")
  raw = dict(raw)
  bases = raw.pop("base", None)
  merged: dict = {}
  # `base:` names one file or a list (merged in order, later ones win, this file last).
  for base in ([] if bases is None else bases if isinstance(bases, list) else [bases]):
    if not isinstance(base, str):
      raise ConfigError(f"config: {path}: base must be a file/preset name or a list of them, "
                        f"got {base!r}")
    base_path = (path.parent / base) if (path.parent / base).exists() else base
    merged = merge(merged, load_raw(base_path, _seen + (path,)))
  return merge(merged, raw)


def read_yaml(path: Path) -> Any:
  """A YAML file's content; a syntax error, a binary file or an unreadable path is one line."""
  try:
    return yaml.safe_load(path.read_text())
  except yaml.YAMLError as e:
    raise ConfigError(f"config: {_yaml_error(path, e)}") from None
  except UnicodeDecodeError:
    raise ConfigError(f"config: {path} is not a text file") from None
  except OSError as e:  # a directory, an unreadable file
    raise ConfigError(f"config: cannot read {path} ({e.strerror or e})") from None


def _yaml_error(path: Path, e: yaml.YAMLError) -> str:
  """`FILE:LINE:COLUMN: not valid YAML (problem)`, where PyYAML knows the place (1-based)."""
  mark = getattr(e, "problem_mark", None)
  problem = (getattr(e, "problem", None) or str(e) or type(e).__name__).splitlines()[0]
  where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
  return f"{where}: not valid YAML ({problem})"


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
  """Applies `section.key=value` strings; values are parsed as YAML scalars."""
  raw = dict(raw)
  for item in overrides:
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
      raise ConfigError(f"override {item!r}: expected section.key=value, e.g. model.d_model=512")
    section, field = parts
    try:
      value = yaml.safe_load(text)
    except yaml.YAMLError:
      value = text
    raw[section] = {**raw.get(section, {}), field: value}
  return raw


def from_dict(raw: Mapping[str, Any]) -> Config:
  unknown = sorted(set(raw) - set(_SECTIONS))
  if unknown:
    raise ConfigError(f"{unknown[0]}: unknown config section (known: {', '.join(_SECTIONS)})")
  # A section with nested values (data.sources) parses itself through `from_raw`.
  sections = {name: cls.from_raw(raw.get(name) or {}) if hasattr(cls, "from_raw")
              else build_section(cls, raw.get(name) or {}, name) for name, cls in _SECTIONS.items()}
  return Config(**sections)


def load(spec: str | Path, overrides: Iterable[str] = ()) -> Config:
  return from_dict(apply_overrides(load_raw(spec), overrides))


def to_dict(config: Config) -> dict:
  return dataclasses.asdict(config)
