"""Export with custom PyTorch code (`remote_code/`), for configs no transformers class expresses.

The PyTorch twin mirrors the JAX parameter tree, so the mapping is derived from the tree itself:
`layers_3/attn/q/kernel` → `model.layers.3.attn.q.weight` (transposed: Flax Dense kernels are
(in, out), torch Linear weights (out, in)); norm scales and embedding tables become `weight`;
Canon taps, short-conv taps and stacked MoE experts keep their JAX layout.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from flax import traverse_util

from dhara_jax.config import RUNTIME_FIELDS, ModelConfig
from dhara_jax.export.hf import Entry, linear, same
from dhara_jax.model import param_shapes

REMOTE_CODE = Path(__file__).parent / "remote_code"
CODE_FILES = ("configuration_dhara.py", "modeling_dhara.py")
# The PyTorch model computes in the dtype its weights are loaded in, with its own kernels.
ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig)
                    if f.name not in RUNTIME_FIELDS)


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


def config_json(cfg: ModelConfig) -> dict:
  fields = {name: getattr(cfg, name) for name in ARCH_FIELDS}
  return {"architectures": ["DharaForCausalLM"], "model_type": "dhara",
          "auto_map": {"AutoConfig": "configuration_dhara.DharaConfig",
                       "AutoModelForCausalLM": "modeling_dhara.DharaForCausalLM"},
          "dhara_fields": list(ARCH_FIELDS), **fields,
          "tie_word_embeddings": cfg.tie_embeddings, "dtype": "float32",
          "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def config_from_json(hf: dict) -> ModelConfig:
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  return ModelConfig(**{k: hf[k] for k in hf.get("dhara_fields", ()) if k in known})


def write_code(out_dir: Path) -> None:
  for name in CODE_FILES:
    shutil.copyfile(REMOTE_CODE / name, out_dir / name)
