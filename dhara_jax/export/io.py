"""Write / read transformers checkpoint directories: `model.safetensors` + `config.json`
(+ custom code for models no transformers class expresses)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from dhara_jax.config import ModelConfig
from dhara_jax.errors import DharaError
from dhara_jax.export import custom, hf

log = logging.getLogger(__name__)
CODE_CHOICES = ("auto", "transformers", "custom")


def uses_custom_code(cfg: ModelConfig, code: str = "auto") -> bool:
  """Whether `cfg` exports with custom code. "auto" picks the family's transformers class when
  it can express the config (raises nothing), custom code otherwise."""
  if code not in CODE_CHOICES:
    raise DharaError(f"export: code {code!r} is not one of {', '.join(CODE_CHOICES)}")
  if code != "auto":
    if code == "transformers":
      hf.family_spec(cfg)  # a one-line error naming what the class cannot express
    return code == "custom"
  try:
    hf.family_spec(cfg)
    return False
  except DharaError as why:
    log.info("exporting with custom code: %s", why)
    return True


def export_hf(cfg: ModelConfig, params: Any, out_dir: str | Path, code: str = "auto") -> Path:
  """Writes a directory `AutoModelForCausalLM.from_pretrained` loads (with
  `trust_remote_code=True` when custom code is used). torch is never imported here."""
  out = Path(out_dir)
  if uses_custom_code(cfg, code):
    tensors = hf.apply_forward(custom.entries(cfg), params)
    config = custom.config_json(cfg)
  else:
    tensors = hf.to_hf_state_dict(cfg, params)
    config = hf.hf_config(cfg)
  try:
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if config["model_type"] == "dhara":
      custom.write_code(out)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  except OSError as e:
    raise DharaError(f"export: cannot write {out}: {e.strerror or e}") from None
  return out


def import_hf(hf_dir: str | Path) -> tuple[ModelConfig, dict]:
  """Reads a directory written by `export_hf` (or a compatible transformers checkpoint)."""
  hf_dir = Path(hf_dir)
  config_path, weights_path = hf_dir / "config.json", hf_dir / "model.safetensors"
  for path in (config_path, weights_path):
    if not path.is_file():
      raise DharaError(f"import: {path} not found")
  try:
    config = json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise DharaError(f"import: {config_path} is not valid JSON ({e.msg})") from None
  if config.get("model_type") == "dhara":
    cfg = custom.config_from_json(config)
    entries = custom.entries(cfg)
  else:
    cfg = hf.config_from_hf(config)
    entries = hf.family_spec(cfg).entries(cfg)
  try:
    tensors = load_file(str(weights_path))
  except (SafetensorError, OSError) as e:
    raise DharaError(f"import: {weights_path} is not a readable safetensors file ({e})") from None
  return cfg, hf.apply_inverse(entries, tensors)
