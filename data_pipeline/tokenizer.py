"""The tokenizer: one interface over two backends, wherever dhara tokenizes (the pipeline and
packing, the token cache, generate, eval, export, the study).

  - SentencePiece (`sentencepiece_backend.py`): a `.model` file; dhara's own tokenizers
    (`dhara tokenizer train`), or an imported `tokenizer.model`.
  - Hugging Face tokenizers (`hf_backend.py`): a `tokenizer.json` with the
    `tokenizer_config.json` beside it that names its special tokens.

A tokenizer is its files (`files`: name -> bytes), which is what a run carries in its
checkpoints and run dir; the special ids (pad, unk, bos, eos, mask; None for a role it lacks)
come from the tokenizer's own definitions, never from a config.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from data_pipeline.config import resolve_input
from data_pipeline.hf_backend import CONFIG_FILE, ROLES, HFTokenizersBackend
from data_pipeline.sentencepiece_backend import SentencePieceBackend
from dhara_jax.errors import ConfigError, DharaError
from dhara_jax.files import atomic_write

if TYPE_CHECKING:
  from dhara_jax.config import ModelConfig

HF_FILE = "tokenizer.json"  # the names a Hugging Face tokenizer's files take in a run
SENTENCEPIECE_FILE = "tokenizer.model"  # an HF directory's SentencePiece model


class Tokenizer:
  """A tokenizer's files and the backend that reads them; pickles as its files."""

  def __init__(self, files: dict[str, bytes], path: Path | None = None):
    """Raises ValueError (HF) or RuntimeError (SentencePiece) for files that are not a
    tokenizer; `read_tokenizer` turns those into one line."""
    self.files, self.path = dict(files), path
    if HF_FILE in files:
      config = json.loads(files[CONFIG_FILE]) if CONFIG_FILE in files else {}
      self.backend = HFTokenizersBackend(files[HF_FILE], config)
    else:
      (proto,) = files.values()
      self.backend = SentencePieceBackend(proto)
    self.kind = self.backend.kind
    self.sha256 = files_sha256(self.files)
    self.vocab_size = self.backend.vocab_size
    ids = self.backend.special_ids()
    self.pad_id, self.unk_id, self.bos_id, self.eos_id, self.mask_id = (ids.get(r) for r in ROLES)

  def __getstate__(self) -> dict:
    return {"files": self.files, "path": self.path}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["files"], state["path"])

  def encode(self, text: str, add_special_tokens: bool = False) -> np.ndarray:
    """Token ids of `text`; `add_special_tokens` adds what the tokenizer adds around a text
    (transformers' default: a BOS for some HF tokenizers; nothing for SentencePiece)."""
    return np.asarray(self.backend.encode(text, add_special_tokens), dtype=np.int32)

  def encode_batch(self, texts: list[str], threads: int = 0) -> list[np.ndarray]:
    return [np.asarray(x, dtype=np.int32) for x in self.backend.encode_batch(texts, threads)]

  def decode(self, ids: Iterable[int]) -> str:
    """The text of `ids`, special tokens dropped."""
    return self.backend.decode([int(i) for i in ids])

  def token_text(self, token_id: int) -> str:
    """One token as text, special tokens included (lm-eval's EOS stop string)."""
    return self.backend.token_text(int(token_id))

  def required_id(self, role: str, why: str) -> int:
    """The id of special token `role` ("eos", ...), or one line saying the tokenizer lacks it."""
    token_id = getattr(self, f"{role}_id")
    if token_id is None:
      raise DharaError(f"data.tokenizer: {self.path} defines no {role} token, which {why}"
                       + (f" (tokenizer_config.json's {role}_token)"
                          if self.kind == HFTokenizersBackend.kind else ""))
    return token_id

  def card(self) -> dict:
    return {"backend": self.kind, "vocab_size": self.vocab_size, "sha256": self.sha256,
            **{f"{role}_id": getattr(self, f"{role}_id") for role in ROLES},
            **self.backend.version()}

  def save_to(self, directory: str | Path) -> Path:
    """Writes the tokenizer's files into `directory` (a run dir); returns the path
    `load_tokenizer` reads it back from."""
    directory = Path(directory)
    for name, data in self.files.items():
      atomic_write(directory / name, data)
    return directory / self.main_file

  @property
  def main_file(self) -> str:
    """The file `data.tokenizer` names (the other, tokenizer_config.json, sits beside it)."""
    return HF_FILE if HF_FILE in self.files else next(iter(self.files))


def files_sha256(files: dict[str, bytes]) -> str:
  """sha256 of a one-file tokenizer's bytes (a SentencePiece model: as dhara has always
  computed it), else of every file, name and length included, in name order."""
  if len(files) == 1:
    return hashlib.sha256(next(iter(files.values()))).hexdigest()
  digest = hashlib.sha256()
  for name in sorted(files):
    digest.update(f"{name}\0{len(files[name])}\0".encode())
    digest.update(files[name])
  return digest.hexdigest()


def read_tokenizer(files: dict[str, bytes], where: str, path: Path | None = None) -> Tokenizer:
  """The tokenizer of `files`; files that are not one are one line starting with `where`."""
  try:
    return Tokenizer(files, path)
  except RuntimeError as e:  # sentencepiece
    raise DharaError(f"{where} is not a SentencePiece model "
                     f"({str(e).splitlines()[0]})") from None
  except (ValueError, UnicodeDecodeError) as e:  # tokenizers, json (a ValueError too)
    raise DharaError(f"{where} is not a Hugging Face tokenizer.json with a readable "
                     f"{CONFIG_FILE} ({e})") from None


def tokenizer_files(path: Path) -> dict[str, bytes]:
  """The files of the tokenizer at `path`: a `.json` is a Hugging Face tokenizer (with the
  tokenizer_config.json beside it, if any); a folder, its tokenizer.json or else its
  tokenizer.model; any other file, a SentencePiece model."""
  if path.is_dir():
    found = [path / name for name in (HF_FILE, SENTENCEPIECE_FILE) if (path / name).is_file()]
    if not found:
      raise DharaError(f"data.tokenizer: {path} holds no {HF_FILE} or {SENTENCEPIECE_FILE}")
    path = found[0]
  if path.suffix != ".json":
    return {path.name: path.read_bytes()}
  files = {HF_FILE: path.read_bytes()}
  if (path.parent / CONFIG_FILE).is_file():
    files[CONFIG_FILE] = (path.parent / CONFIG_FILE).read_bytes()
  return files


def load_tokenizer(path: str | Path) -> Tokenizer:
  """The tokenizer at `path` (as written in `data.tokenizer`: cwd first, then the repo)."""
  resolved = resolve_input(str(path))
  if not resolved.exists():
    raise DharaError(f"data.tokenizer: no tokenizer at {path}; train one with "
                     "`dhara tokenizer train --config <your config>`")
  files = tokenizer_files(resolved)
  return read_tokenizer(files, f"data.tokenizer: {resolved}", resolved)


def check_tokenizer_fits(tokenizer: Tokenizer, model_cfg: ModelConfig,
                         where: str = "data.tokenizer") -> None:
  """Every token id must have a row in the model's embedding (`model.vocab_size`)."""
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ConfigError(f"{where}: {tokenizer.path} has {tokenizer.vocab_size} tokens, more "
                      f"than model.vocab_size={model_cfg.vocab_size} (the embedding rows)")
