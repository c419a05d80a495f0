"""Logits of an exported checkpoint in transformers/PyTorch, to check export parity.

torch and transformers are imported only here, and only when called: export itself never needs
them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dhara_jax.errors import DharaError


def load_torch_model(hf_dir: str | Path):
  """AutoModelForCausalLM in float32 on CPU; every tensor must come from the checkpoint.

  Custom-code exports (model_type "dhara") load with trust_remote_code: the code is ours,
  written next to the weights by `export_hf`.
  """
  try:
    import torch
    import transformers
  except ImportError as e:
    raise DharaError(f"parity: needs torch and transformers ({e.name} is missing); "
                     "install with pip install -e '.[torch]'") from None
  transformers.utils.logging.disable_progress_bar()
  transformers.utils.logging.set_verbosity_error()  # e.g. "optional CUDA kernel not installed"
  custom = json.loads((Path(hf_dir) / "config.json").read_text()).get("model_type") == "dhara"
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      str(hf_dir), dtype=torch.float32, output_loading_info=True, trust_remote_code=custom)
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
