"""Interop with PyTorch / transformers."""

from dhara_jax.export.hf import hf_config, to_hf_state_dict
from dhara_jax.export.io import export_hf, import_hf, import_with_phase, uses_custom_code

__all__ = ["export_hf", "hf_config", "import_hf", "import_with_phase", "to_hf_state_dict",
           "uses_custom_code"]
