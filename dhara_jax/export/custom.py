"""Export with custom PyTorch code (`remote_code/`), for configs no transformers class expresses.

The PyTorch twin mirrors the JAX parameter tree, so the mapping is derived from the tree itself:
`layers_3/attn/q/kernel` → `model.layers.3.attn.q.weight` (transposed: Flax Dense kernels are
(in, out), torch Linear weights (out, in)); norm scales and embedding tables become `weight`;
Canon taps, short-conv taps and stacked MoE experts keep their JAX layout.

Models trained with a diffusion objective (`mdm`, `block`) export as `DharaForMaskedDiffusion`,
AR ones as `DharaForCausalLM`; both load with AutoModelForCausalLM, and AutoModel gives the bare
decoder. config.json carries the phase the run was trained with last (`objective`, `block_size`):
the twin runs the forward it names (block mode over [x_t ; x_0] for `block`), and an import
restores it, so the imported run is the run that was exported.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from flax import traverse_util

from dhara_jax.config import OBJECTIVE_ATTENTION, OBJECTIVES, RUNTIME_FIELDS, ModelConfig
from dhara_jax.errors import DharaError
from dhara_jax.export.hf import Entry, linear, same
from dhara_jax.model import param_shapes
from dhara_jax.phases import Phase

REMOTE_CODE = Path(__file__).parent / "remote_code"
CODE_FILES = ("configuration_dhara.py", "modeling_dhara.py")
# The PyTorch model computes in the dtype its weights are loaded in, with its own kernels.
ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig)
                    if f.name not in RUNTIME_FIELDS)
# The project's one label alignment (losses.py): logits at position i predict the token at
# i + 1, for AR and diffusion alike; a masked token at j is read from the logits at j - 1, and a
# document's first token is never masked. Written so a PyTorch user need not guess it.
LABEL_ALIGNMENT = "next_token"

log = logging.getLogger(__name__)


def torch_name(path: str) -> tuple[str, bool]:
  """(PyTorch parameter name, whether the tensor is transposed) for a JAX parameter path."""
  parts = path.split("/")
  if parts[0].startswith("layers_"):
    parts[:1] = ["layers", parts[0].removeprefix("layers_")]
  module, leaf = (parts[-2] if len(parts) > 1 else ""), parts[-1]
  transpose = leaf == "kernel" and not module.startswith("canon_")  # a Dense kernel
  if transpose or leaf in ("scale", "embedding"):
    parts[-1] = "weight"
  name = ".".join(parts)
  return (name if parts[0] == "lm_head" else f"model.{name}"), transpose


def entries(cfg: ModelConfig) -> list[Entry]:
  paths = traverse_util.flatten_dict(param_shapes(cfg), sep="/")
  out = []
  for path in sorted(paths):
    name, transpose = torch_name(path)
    out.append(linear(name, path) if transpose else same(name, path))
  return out


def default_phase(cfg: ModelConfig) -> Phase:
  """The phase a bare model config implies (exports that carry none were written so): AR for
  causal attention, full-sequence masked diffusion for bidirectional."""
  return Phase("ar") if cfg.attention == "causal" else Phase("mdm")


def hf_architecture(phase: Phase) -> str:
  return "DharaForMaskedDiffusion" if phase.diffusion else "DharaForCausalLM"


def config_json(cfg: ModelConfig, phase: Phase | None = None) -> dict:
  """config.json of a custom-code export trained with `phase` (default: as `cfg` implies)."""
  phase = phase or default_phase(cfg)
  fields = {name: getattr(cfg, name) for name in ARCH_FIELDS}  # mask_token_id, mask_epsilon too
  arch = hf_architecture(phase)
  if arch == "DharaForMaskedDiffusion" and cfg.mask_token_id < 0:
    log.warning("exporting a diffusion model with mask_token_id -1 (the tokenizer's <mask>, "
                "not resolved to an id): PyTorch users must find the mask token themselves")
  return {"architectures": [arch], "model_type": "dhara",
          "auto_map": {"AutoConfig": "configuration_dhara.DharaConfig",
                       "AutoModel": "modeling_dhara.DharaModel",
                       "AutoModelForCausalLM": f"modeling_dhara.{arch}"},
          "label_alignment": LABEL_ALIGNMENT,
          "objective": phase.objective, "block_size": phase.block_size,
          "dhara_fields": list(ARCH_FIELDS), **fields,
          "tie_word_embeddings": cfg.tie_embeddings, "dtype": "float32",
          "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def config_from_json(hf: dict) -> ModelConfig:
  # Older exports carry no label_alignment; they were written with the same one.
  alignment = hf.get("label_alignment", LABEL_ALIGNMENT)
  if alignment != LABEL_ALIGNMENT:
    raise DharaError(f"import: config.json has label_alignment {alignment!r}; dhara-jax models "
                     f"use {LABEL_ALIGNMENT!r} (logits at i predict the token at i + 1)")
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  return ModelConfig(**{k: hf[k] for k in hf.get("dhara_fields", ()) if k in known})


def phase_from_json(hf: dict, cfg: ModelConfig) -> Phase:
  """The phase config.json names (older exports name none: the one `cfg` implies), refused in
  one line when the model cannot be continued with it."""
  # null: a config saved by transformers from an export that named none
  objective = hf.get("objective") or default_phase(cfg).objective
  block_size = hf.get("block_size") or 0
  if objective not in OBJECTIVES:
    raise DharaError(f"import: config.json has objective {objective!r}, not one of "
                     f"{', '.join(OBJECTIVES)}")
  if not isinstance(block_size, int) or block_size < 0 or (objective == "block") != (
      block_size > 0):
    raise DharaError(f"import: config.json has objective {objective!r} with block_size "
                     f"{block_size!r}; the block objective needs a block size ≥ 1, the others 0")
  wanted = OBJECTIVE_ATTENTION.get(objective)
  if wanted and cfg.attention != wanted:
    raise DharaError(f"import: config.json has objective {objective!r} with attention "
                     f"{cfg.attention!r}; a model trained so needs attention {wanted!r}")
  if block_size > cfg.max_seq_len:  # no row of the model's context holds one block
    raise DharaError(f"import: config.json has block_size {block_size}, more than max_seq_len "
                     f"{cfg.max_seq_len}")
  return Phase(objective, block_size)


def write_code(out_dir: Path) -> None:
  for name in CODE_FILES:
    shutil.copyfile(REMOTE_CODE / name, out_dir / name)
