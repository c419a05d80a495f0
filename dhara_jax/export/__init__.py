"""Interop with PyTorch / transformers."""

from dhara_jax.export.hf import export_hf, hf_config, import_hf, to_hf_state_dict

__all__ = ["export_hf", "hf_config", "import_hf", "to_hf_state_dict"]
