"""Write / read transformers checkpoint directories: `model.safetensors` + `config.json`
(+ custom code for models no transformers class expresses)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from dhara_jax.config import ModelConfig
from dhara_jax.errors import DharaError
from dhara_jax.export import custom, hf
from dhara_jax.phases import Phase

log = logging.getLogger(__name__)
CODE_CHOICES = ("auto", "transformers", "custom")


def uses_custom_code(cfg: ModelConfig, code: str = "auto", phase: Phase | None = None) -> bool:
  """Whether `cfg` (trained with `phase`, default the one its attention implies) exports with
  custom code. "auto" picks the family's transformers class when it can express the config
  and the phase is AR (raises nothing), custom code otherwise."""
  if code not in CODE_CHOICES:
    raise DharaError(f"export: code {code!r} is not one of {', '.join(CODE_CHOICES)}")
  phase = phase or custom.default_phase(cfg)
  if code != "auto":
    if code == "transformers":
      hf.family_spec(cfg)  # a one-line error naming what the class cannot express
      if phase.diffusion:  # no transformers class has the diffusion forward and sampler
        raise DharaError(f"export: a model trained with objective {phase.objective} needs "
                         f"custom code (DharaForMaskedDiffusion), not code=transformers")
    return code == "custom"
  if phase.diffusion:
    return True
  try:
    hf.family_spec(cfg)
    return False
  except DharaError as why:
    log.info("exporting with custom code: %s", why)
    return True


def architecture(cfg: ModelConfig, code: str = "auto", phase: Phase | None = None) -> str:
  """The class config.json names (`architectures`), e.g. LlamaForCausalLM."""
  phase = phase or custom.default_phase(cfg)
  if uses_custom_code(cfg, code, phase):
    return custom.hf_architecture(phase)
  return hf.family_spec(cfg).architecture


def export_hf(cfg: ModelConfig, params: Any, out_dir: str | Path, code: str = "auto",
              phase: Phase | None = None) -> Path:
  """Writes a directory `AutoModelForCausalLM.from_pretrained` loads (with
  `trust_remote_code=True` when custom code is used). `phase`: what the parameters were trained
  with last (default: the phase the attention implies, AR or mdm); a diffusion one goes into
  config.json. torch is never imported here."""
  out = Path(out_dir)
  tensors, config = _contents(cfg, params, code, phase)  # a config no class expresses: nothing
  try:
    out.mkdir(parents=True, exist_ok=True)
    _write(out, tensors, config)
  except OSError as e:
    raise DharaError(f"export: cannot write {out}: {e.strerror or e}") from None
  return out


def write_hf(cfg: ModelConfig, params: Any, folder: Path, code: str = "auto",
             phase: Phase | None = None) -> None:
  """`export_hf`'s files into the existing `folder`; a failed write is an OSError, for the
  caller to name the place (`dhara export` writes into a temp folder)."""
  _write(Path(folder), *_contents(cfg, params, code, phase))


def _contents(cfg: ModelConfig, params: Any, code: str,
              phase: Phase | None) -> tuple[hf.Arrays, dict]:
  phase = phase or custom.default_phase(cfg)
  if uses_custom_code(cfg, code, phase):
    return hf.apply_forward(custom.entries(cfg), params), custom.config_json(cfg, phase)
  return hf.to_hf_state_dict(cfg, params), hf.hf_config(cfg)


def _write(out: Path, tensors: hf.Arrays, config: dict) -> None:
  try:
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  except SafetensorError as e:  # the writer's error type for its I/O errors too
    raise _os_error(e) from None
  if config["model_type"] == "dhara":
    custom.write_code(out)
  (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _os_error(e: SafetensorError) -> OSError:
  """The OSError inside safetensors' message (`... I/O error: No space left on device (os
  error 28)`), or one carrying its first line."""
  found = re.search(r"I/O error: (.+) \(os error (\d+)\)", str(e))
  if found:
    return OSError(int(found[2]), found[1])
  return OSError(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)


def import_hf(hf_dir: str | Path) -> tuple[ModelConfig, dict]:
  """Reads a directory written by `export_hf` (or a compatible transformers checkpoint). Every
  tensor is checked against config.json before any is used: callers write nothing for a
  directory that does not describe one model exactly."""
  cfg, params, _ = import_with_phase(hf_dir)
  return cfg, params


def import_with_phase(hf_dir: str | Path) -> tuple[ModelConfig, dict, Phase]:
  """`import_hf`, and what the model was trained with last (config.json's `objective` and
  `block_size`; AR for transformers-class checkpoints): one reading of config.json for both. A
  phase the model cannot continue is refused in one line."""
  hf_dir = Path(hf_dir)
  weights_path = hf_dir / "model.safetensors"
  config, cfg = _read_config(hf_dir)
  if not weights_path.is_file():
    raise DharaError(f"import: {weights_path} not found")
  if config.get("model_type") == "dhara":
    phase = custom.phase_from_json(config, cfg)
    entries, buffers = custom.entries(cfg), ()
  else:
    spec = hf.family_spec(cfg)
    phase, entries, buffers = Phase(), spec.entries(cfg), spec.buffers
  tensors = _read_weights(weights_path, cfg, entries, buffers)
  return cfg, hf.apply_inverse(entries, tensors), phase


def _read_config(hf_dir: Path) -> tuple[dict, ModelConfig]:
  """config.json as written, and the model config it describes."""
  config_path = hf_dir / "config.json"
  if not config_path.is_file():
    raise DharaError(f"import: {config_path} not found")
  try:
    config = json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise DharaError(f"import: {config_path} is not valid JSON ({e.msg})") from None
  custom_code = config.get("model_type") == "dhara"
  try:
    cfg = custom.config_from_json(config) if custom_code else hf.config_from_hf(config)
  except KeyError as e:  # a key the family's mapping reads (other transformers versions differ)
    raise DharaError(f"import: {config_path} has no {e.args[0]!r}") from None
  return config, cfg


def _read_weights(path: Path, cfg: ModelConfig, entries: list[hf.Entry],
                  buffers: tuple[str, ...]) -> hf.Arrays:
  """The tensors `entries` map, as float32, once the file's header (names, dtypes, shapes)
  has passed `hf.check_checkpoint`: a file that does not fit is refused before it is read."""
  try:
    with safe_open(str(path), framework="numpy") as f:
      header = {}
      for name in f.keys():
        view = f.get_slice(name)
        header[name] = (view.get_dtype(), tuple(view.get_shape()))
      names = hf.check_checkpoint(cfg, entries, header, buffers, str(path))
      tensors = {name: f.get_tensor(name).astype(np.float32, copy=False) for name in names}
  except (SafetensorError, OSError) as e:
    raise DharaError(f"import: {path} is not a readable safetensors file ({e})") from None
  if cfg.tie_embeddings and hf.TIED_HEAD in tensors:  # a tied head written out as well
    embedding = hf.embedding_name(entries)
    if not np.array_equal(tensors.pop(hf.TIED_HEAD), tensors[embedding]):
      raise DharaError(f"import: {path}: tensor {hf.TIED_HEAD} differs from {embedding}, but "
                       "config.json ties them (tie_word_embeddings is not false)")
  return tensors
