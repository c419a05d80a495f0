"""Logits of an exported checkpoint in transformers/PyTorch, to check export parity.

torch and transformers are imported only here, and only when called: export itself never needs
them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dhara_jax.errors import DharaError


def load_torch_model(hf_dir: str | Path, dtype: str = "float32"):
  """AutoModelForCausalLM in `dtype` on CPU; every tensor must come from the checkpoint.

  Custom-code exports (model_type "dhara") load with trust_remote_code: the code is ours,
  written next to the weights by `export_hf`.
  """
  try:
    import torch
    import transformers
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
  except ImportError as e:
    raise DharaError(f"parity: needs torch and transformers ({e.name} is missing); "
                     "install with pip install -e '.[torch]'") from None
  transformers.utils.logging.disable_progress_bar()
  transformers.utils.logging.set_verbosity_error()  # e.g. "optional CUDA kernel not installed"
  written = json.loads((Path(hf_dir) / "config.json").read_text())
  if written.get("model_type") == "dhara":
    # The class named by this export's auto_map, resolved here: once one export's remote class
    # is registered for DharaConfig, AutoModelForCausalLM reuses it for every later export of
    # the same code in this process (a causal export would load as a diffusion one).
    model_class = get_class_from_dynamic_module(written["auto_map"]["AutoModelForCausalLM"],
                                                str(hf_dir))
  else:
    model_class = transformers.AutoModelForCausalLM
  model, info = model_class.from_pretrained(str(hf_dir), dtype=getattr(torch, dtype),
                                            output_loading_info=True)
  problems = {k: v for k, v in info.items() if v}
  if problems:
    raise DharaError(f"parity: transformers did not load {hf_dir} cleanly: {problems}")
  return model.eval()


def torch_logits(model, tokens_BxL: np.ndarray,
                 attention_mask_BxL: np.ndarray | None = None) -> np.ndarray:
  import torch

  with torch.no_grad():
    mask = None if attention_mask_BxL is None else torch.tensor(np.asarray(attention_mask_BxL))
    out = model(input_ids=torch.tensor(np.asarray(tokens_BxL)), attention_mask=mask)
  return out.logits.float().numpy()
