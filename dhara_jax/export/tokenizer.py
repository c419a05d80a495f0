"""The run's SentencePiece tokenizer in a transformers export directory.

`AutoTokenizer.from_pretrained(dir)` loads it as transformers' `SentencePieceBackend`, which
encodes with the SentencePiece model itself: ids equal the pipeline's for every text. (The
tokenizers-backed converters, `LlamaTokenizer` among them, do not: they encode our model to [].)
With `trust_remote_code=True` the `auto_map` loads `DharaTokenizer` (tokenization_dhara.py), the
same class with SentencePiece's own decoding, which is exact too: the base class joins pieces,
strips the ends and leaves byte-fallback pieces as `<0xE2>`. The files are written without
importing transformers, so export needs neither torch nor transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm

from dhara_jax.errors import DharaError

MASK_PIECE = "<mask>"  # data_pipeline.tokenizer.MASK_PIECE (not imported: it loads grain)
CODE_FILE = "tokenization_dhara.py"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", CODE_FILE)

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


def special_pieces(proto: bytes) -> dict[str, tuple[str, int]]:
  """role (pad, unk, bos, eos, mask) -> (piece, id) for the roles the model has."""
  sp = _processor(proto)
  ids = {"pad": sp.pad_id(), "unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id()}
  mask = sp.piece_to_id(MASK_PIECE)
  if not sp.is_unknown(mask):
    ids["mask"] = mask
  return {role: (sp.id_to_piece(i), i) for role, i in ids.items() if 0 <= i < sp.vocab_size()}


def special_token_ids(proto: bytes) -> dict[str, int | None]:
  """config.json's bos/eos/pad_token_id for this tokenizer (None for a role it lacks)."""
  pieces = special_pieces(proto)
  return {f"{role}_token_id": pieces[role][1] if role in pieces else None
          for role in ("bos", "eos", "pad")}


def write_tokenizer(proto: bytes, out_dir: Path, max_length: int | None = None) -> None:
  """Writes tokenizer.model, tokenizer_config.json (what `SentencePieceBackend.save_pretrained`
  writes in transformers 5, plus the auto_map) and tokenization_dhara.py into `out_dir`.
  `max_length`: the model's context, so that callers (lm-eval) do not assume a longer one."""
  out = Path(out_dir)
  pieces = special_pieces(proto)
  config = {
      "added_tokens_decoder": {
          str(i): {"content": piece, "lstrip": False, "normalized": False, "rstrip": False,
                   "single_word": False, "special": True}
          for piece, i in sorted(pieces.values(), key=lambda p: p[1])},
      "auto_map": {"AutoTokenizer": [f"{CODE_FILE[:-3]}.DharaTokenizer", None]},
      "backend": "sentencepiece",
      # Pieces written in the text stay text, as in training (control symbols never match text).
      "clean_up_tokenization_spaces": False, "split_special_tokens": True,
      "model_max_length": max_length or 1_000_000_000_000_000_019_884_624_838_656,
      "sp_model_kwargs": {},
      "tokenizer_class": "SentencePieceBackend",
      **{f"{role}_token": piece for role, (piece, _) in pieces.items()},
  }
  try:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(proto)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / CODE_FILE).write_text(DECODER_CODE)
  except OSError as e:
    raise DharaError(f"export: cannot write the tokenizer into {out}: {e.strerror or e}") from None


def write_token_ids(out_dir: Path, proto: bytes) -> dict[str, int | None]:
  """Sets bos/eos/pad_token_id in `out_dir`/config.json from the tokenizer written with it
  (export_hf leaves them null: a bare model config does not know them) and writes the same ids
  as generation_config.json, so `generate()` stops at EOS and pads with <pad>."""
  out = Path(out_dir)
  ids = special_token_ids(proto)
  path = out / "config.json"
  try:
    config = json.loads(path.read_text())
    config.update(ids)
    path.write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")
  except OSError as e:
    raise DharaError(f"export: cannot update {path}: {e.strerror or e}") from None
  return ids


def _processor(proto: bytes) -> spm.SentencePieceProcessor:
  try:
    return spm.SentencePieceProcessor(model_proto=proto)
  except RuntimeError as e:
    raise DharaError(f"export: the tokenizer is not a SentencePiece model "
                     f"({str(e).splitlines()[0]})") from None
