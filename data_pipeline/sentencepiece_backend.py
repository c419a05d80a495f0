"""The SentencePiece backend of `data_pipeline.tokenizer.Tokenizer`: a `.model` file.

Dhara's own tokenizers (`dhara tokenizer train`) are SentencePiece models whose special pieces
are control symbols, so text never encodes to them, and nothing is added around a text: the
pipeline separates documents with EOS and never writes BOS.
"""

from __future__ import annotations

import os

import sentencepiece as spm

MASK_PIECE = "<mask>"  # the control symbol dhara's trainer reserves for diffusion's mask


class SentencePieceBackend:
  """A SentencePiece model; raises RuntimeError when `proto` is not one."""

  kind = "sentencepiece"

  def __init__(self, proto: bytes):
    self.sp = spm.SentencePieceProcessor(model_proto=proto)
    self.vocab_size = self.sp.vocab_size()

  def special_ids(self) -> dict[str, int]:
    """role (pad, unk, bos, eos, mask) -> id, for the roles this model defines."""
    ids = {"pad": self.sp.pad_id(), "unk": self.sp.unk_id(), "bos": self.sp.bos_id(),
           "eos": self.sp.eos_id()}
    mask = self.sp.piece_to_id(MASK_PIECE)
    if not self.sp.is_unknown(mask):
      ids["mask"] = mask
    return {role: i for role, i in ids.items() if 0 <= i < self.vocab_size}

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    # add_special_tokens adds nothing: dhara's documents carry no BOS (and its exports say so).
    return self.sp.encode(text)

  def encode_batch(self, texts: list[str], threads: int = 0) -> list[list[int]]:
    return self.sp.encode(texts, num_threads=threads or os.cpu_count() or 1)

  def decode(self, ids: list[int]) -> str:
    return self.sp.decode(ids)

  def token_text(self, token_id: int) -> str:
    return self.sp.id_to_piece(token_id)

  def version(self) -> dict[str, str]:
    return {"sentencepiece": spm.__version__}
