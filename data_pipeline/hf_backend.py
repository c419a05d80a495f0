"""The Hugging Face `tokenizers` backend of `data_pipeline.tokenizer.Tokenizer`: a
`tokenizer.json` (fast, Rust) with the `tokenizer_config.json` beside it.

It encodes and decodes as transformers' `TokenizersBackend` (what `AutoTokenizer` gives for such
a directory) does: the special-token roles are tokenizer_config.json's `bos_token`,
`eos_token`, ... (transformers' own definitions; tokenizer.json has no roles); what is added
around a text (a BOS) is what tokenizer.json's post-processor adds; `split_special_tokens` and
the BPE exception of `clean_up_tokenization_spaces` are honoured; no truncation or padding
applies.
"""

from __future__ import annotations

from typing import Any

import tokenizers

ROLES = ("pad", "unk", "bos", "eos", "mask")
CONFIG_FILE = "tokenizer_config.json"


class HFTokenizersBackend:
  """A `tokenizers` model; raises ValueError for a file it cannot read or roles it lacks."""

  kind = "tokenizers"

  def __init__(self, tokenizer_json: bytes, config: dict[str, Any]):
    try:
      self.tk = tokenizers.Tokenizer.from_str(tokenizer_json.decode("utf-8"))
    except Exception as e:  # tokenizers raises plain Exceptions for bad JSON or models
      raise ValueError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    self.config = config
    self.tk.no_truncation()
    self.tk.no_padding()
    self.tk.encode_special_tokens = bool(config.get("split_special_tokens", False))
    vocab = self.tk.get_vocab(with_added_tokens=True)
    self.vocab_size = max(vocab.values()) + 1  # ids may be sparse: the embedding needs them all
    self._ids = {}
    for role in ROLES:
      text = _token_content(config.get(f"{role}_token"))
      if text is None:
        continue
      token_id = self.tk.token_to_id(text)
      if token_id is None:
        raise ValueError(f"{CONFIG_FILE} names {role}_token {text!r}, which is not in the "
                         "vocabulary")
      self._ids[role] = token_id
    # transformers skips the clean-up for BPE models: it strips real spaces before punctuation.
    self.clean_up = (bool(config.get("clean_up_tokenization_spaces", False))
                     and type(self.tk.model).__name__ != "BPE")

  def special_ids(self) -> dict[str, int]:
    return dict(self._ids)

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_batch(self, texts: list[str], threads: int = 0) -> list[list[int]]:
    # tokenizers parallelises over its own (Rayon) thread pool.
    return [e.ids for e in self.tk.encode_batch_fast(texts, add_special_tokens=False)]

  def decode(self, ids: list[int]) -> str:
    text = self.tk.decode(ids, skip_special_tokens=True)
    return clean_up_tokenization(text) if self.clean_up else text

  def token_text(self, token_id: int) -> str:
    return self.tk.decode([token_id], skip_special_tokens=False)

  def version(self) -> dict[str, str]:
    return {"tokenizers": tokenizers.__version__}


def _token_content(value: Any) -> str | None:
  """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) and value else None


def clean_up_tokenization(text: str) -> str:
  """transformers' `clean_up_tokenization` (for WordPiece-style models)."""
  for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                         (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                         (" 're", "'re")):
    text = text.replace(spaced, joined)
  return text
