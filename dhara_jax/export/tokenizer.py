"""A run's tokenizer in a transformers directory: written by `dhara export`, read by
`dhara import`.

SentencePiece: `AutoTokenizer.from_pretrained(dir)` loads it as transformers'
`SentencePieceBackend`, which encodes with the SentencePiece model itself: ids equal the
pipeline's for every text. (The tokenizers-backed converters, `LlamaTokenizer` among them, do
not: they encode our model to [].) With `trust_remote_code=True` the `auto_map` loads
`DharaTokenizer` (tokenization_dhara.py), the same class with SentencePiece's own decoding,
which is exact too: the base class joins pieces, strips the ends and leaves byte-fallback pieces
as `<0xE2>`.

Hugging Face tokenizers: tokenizer.json and tokenizer_config.json as the run holds them (the
files it was imported with), which `AutoTokenizer` loads as `TokenizersBackend` encoding as the
run does (data_pipeline/hf_backend.py); a run whose tokenizer came without a config gets one
naming the backend and the model's context.

The files are written without importing transformers, so export needs neither torch nor
transformers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from data_pipeline.hf_backend import CONFIG_FILE
from data_pipeline.tokenizer import (HF_FILE, SENTENCEPIECE_FILE, Tokenizer, check_tokenizer_fits,
                                     read_tokenizer, tokenizer_files)
from dhara_jax.config import ModelConfig
from dhara_jax.errors import DharaError

log = logging.getLogger(__name__)
CODE_FILE = "tokenization_dhara.py"
TOKENIZER_FILES = (SENTENCEPIECE_FILE, CONFIG_FILE, CODE_FILE)  # a SentencePiece export's
LONGEST = 1_000_000_000_000_000_019_884_624_838_656  # transformers' "no limit" model_max_length

# Copied next to the weights; transformers imports it only under trust_remote_code=True.
DECODER_CODE = '''"""dhara-jax: SentencePieceBackend with SentencePiece's lossless decoding."""

from transformers import SentencePieceBackend


class DharaTokenizer(SentencePieceBackend):
  """Encodes like SentencePieceBackend (the SentencePiece model itself); decodes runs of ordinary
  ids with SentencePiece, so decode(encode(text)) == text: byte-fallback pieces become their
  characters and leading/trailing spaces stay."""

  def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None,
              **kwargs):
    ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
    special = set(self.all_special_ids)
    parts, run = [], []
    for i in ids:
      if i in self._added_tokens_decoder:  # specials and added tokens: their text, or nothing
        parts.append(self.sp_model.decode(run))
        run = []
        if not (skip_special_tokens and i in special):
          parts.append(str(self._added_tokens_decoder[i]))
      else:
        run.append(i)
    parts.append(self.sp_model.decode(run))
    text = "".join(parts)
    if clean_up_tokenization_spaces is None:
      clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
    if clean_up_tokenization_spaces:
      text = self.clean_up_tokenization(text)
    return text
'''


def special_pieces(tokenizer: Tokenizer) -> dict[str, tuple[str, int]]:
  """role (pad, unk, bos, eos, mask) -> (token text, id) for the roles the tokenizer has."""
  ids = {role: getattr(tokenizer, f"{role}_id") for role in ("pad", "unk", "bos", "eos", "mask")}
  return {role: (tokenizer.token_text(i), i) for role, i in ids.items() if i is not None}


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int | None]:
  """config.json's bos/eos/pad_token_id for this tokenizer (None for a role it lacks)."""
  return {f"{role}_token_id": getattr(tokenizer, f"{role}_id") for role in ("bos", "eos", "pad")}


def write_tokenizer(tokenizer: Tokenizer, out_dir: Path, max_length: int | None = None) -> None:
  """Writes the tokenizer's files for transformers into `out_dir`. `max_length`: the model's
  context, so that callers (lm-eval) do not assume a longer one."""
  out = Path(out_dir)
  if tokenizer.kind == "sentencepiece":
    files = _sentencepiece_files(tokenizer, max_length)
  else:
    files = {HF_FILE: tokenizer.files[HF_FILE],
             CONFIG_FILE: tokenizer.files.get(CONFIG_FILE) or _json(_hf_config(max_length))}
  try:
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
      (out / name).write_bytes(data)
  except OSError as e:
    raise DharaError(f"export: cannot write the tokenizer into {out}: {e.strerror or e}") from None


def _sentencepiece_files(tokenizer: Tokenizer, max_length: int | None) -> dict[str, bytes]:
  """tokenizer.model, tokenizer_config.json (what `SentencePieceBackend.save_pretrained`
  writes in transformers 5, plus the auto_map) and tokenization_dhara.py."""
  pieces = special_pieces(tokenizer)
  config = {
      "added_tokens_decoder": {
          str(i): {"content": piece, "lstrip": False, "normalized": False, "rstrip": False,
                   "single_word": False, "special": True}
          for piece, i in sorted(pieces.values(), key=lambda p: p[1])},
      "auto_map": {"AutoTokenizer": [f"{CODE_FILE[:-3]}.DharaTokenizer", None]},
      "backend": "sentencepiece",
      # Pieces written in the text stay text, as in training (control symbols never match text).
      "clean_up_tokenization_spaces": False, "split_special_tokens": True,
      "model_max_length": max_length or LONGEST,
      "sp_model_kwargs": {},
      "tokenizer_class": "SentencePieceBackend",
      **{f"{role}_token": piece for role, (piece, _) in pieces.items()},
  }
  (proto,) = tokenizer.files.values()
  return {SENTENCEPIECE_FILE: proto, CONFIG_FILE: _json(config),
          CODE_FILE: DECODER_CODE.encode()}


def _hf_config(max_length: int | None) -> dict:
  """The tokenizer_config.json of a tokenizer.json that came without one: no special roles
  (it defines none), the model's context."""
  return {"backend": "tokenizers", "clean_up_tokenization_spaces": False,
          "model_max_length": max_length or LONGEST, "tokenizer_class": "TokenizersBackend"}


def _json(value: dict) -> bytes:
  return (json.dumps(value, indent=2) + "\n").encode()


def write_token_ids(out_dir: Path, tokenizer: Tokenizer) -> dict[str, int | None]:
  """Sets bos/eos/pad_token_id in `out_dir`/config.json from the tokenizer written with it
  (export_hf leaves them null: a bare model config does not know them) and writes the same ids
  as generation_config.json, so `generate()` stops at EOS and pads with the pad token."""
  out = Path(out_dir)
  ids = special_token_ids(tokenizer)
  path = out / "config.json"
  try:
    config = json.loads(path.read_text())
    config.update(ids)
    path.write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")
  except OSError as e:
    raise DharaError(f"export: cannot update {path}: {e.strerror or e}") from None
  return ids


def import_tokenizer(hf_dir: Path, model: ModelConfig) -> Tokenizer | None:
  """The tokenizer of a transformers directory: its tokenizer.json (with the
  tokenizer_config.json beside it), else its SentencePiece tokenizer.model; checked against
  the model's embedding. None, with a warning saying how to add one, when it has neither."""
  hf_dir = Path(hf_dir)
  if not any((hf_dir / name).is_file() for name in (HF_FILE, SENTENCEPIECE_FILE)):
    log.warning("import: %s has no tokenizer (%s or %s), so the run has none: set "
                "data.tokenizer in the run's config.yaml to one (a tokenizer.json or a "
                "SentencePiece model), or put it into %s and import again into an empty "
                "--run-dir", hf_dir, HF_FILE, SENTENCEPIECE_FILE, hf_dir)
    return None
  files = tokenizer_files(hf_dir)
  main = HF_FILE if HF_FILE in files else SENTENCEPIECE_FILE
  tokenizer = read_tokenizer(files, f"import: {hf_dir / main}", hf_dir / main)
  check_tokenizer_fits(tokenizer, model, where="import")
  return tokenizer
