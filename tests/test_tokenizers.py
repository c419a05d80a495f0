"""One tokenizer interface, two backends: SentencePiece exactly as sentencepiece itself encodes
(dhara's behaviour, unchanged), Hugging Face tokenizers exactly as transformers' AutoTokenizer
does for the same files."""

import hashlib
import json
import pickle

import numpy as np
import pytest
import sentencepiece as spm
from real import EOS, sample_texts, train_hf_tokenizer

from data_pipeline.config import resolve_input
from data_pipeline.tokenizer import load_tokenizer
from dhara_jax import config
from dhara_jax.errors import DharaError

TRICKY = ["", " ", "  two leading spaces", "trailing  \n", "\t\ttabs\r\nCRLF\n\n\n",
          "ﬁ ligature, ｆｕｌｌ width, e\u0301 combining, Å", "😀 emoji \u200b zero width",
          f"<mask> <s> </s> <pad> {EOS} literal specials", "\x00\x01 control \x7f", "数学 العربية"]
SHIPPED = config.load("data/mix").data.tokenizer


def test_sentencepiece_encodes_decodes_and_identifies_exactly_as_sentencepiece():
  path = resolve_input(SHIPPED)
  tokenizer, sp = load_tokenizer(SHIPPED), spm.SentencePieceProcessor(model_file=str(path))
  texts = sample_texts(100) + TRICKY
  assert tokenizer.kind == "sentencepiece" and tokenizer.files == {path.name: path.read_bytes()}
  assert tokenizer.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
  assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id,
          tokenizer.mask_id) == (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id(),
                                 sp.piece_to_id("<mask>"))
  for text, batched in zip(texts, tokenizer.encode_batch(texts)):
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32 and ids.tolist() == batched.tolist() == sp.encode(text)
    assert tokenizer.encode(text, add_special_tokens=True).tolist() == sp.encode(text)
    assert tokenizer.decode(ids) == sp.decode(sp.encode(text)) == text
  assert tokenizer.token_text(tokenizer.eos_id) == sp.id_to_piece(sp.eos_id())


@pytest.fixture(scope="module")
def with_bos(tmp_path_factory):
  """A tokenizer whose post-processor puts a BOS before every text (LLaMA 3's way)."""
  out = tmp_path_factory.mktemp("with_bos")
  train_hf_tokenizer(out, bos_first=True)
  return out


@pytest.mark.parametrize("which", ["plain", "with_bos"])
def test_hf_tokenizer_encodes_and_decodes_as_transformers(which, hf_tokenizer_dir, with_bos):
  from transformers import AutoTokenizer

  folder = hf_tokenizer_dir if which == "plain" else with_bos
  ours, theirs = load_tokenizer(folder / "tokenizer.json"), AutoTokenizer.from_pretrained(folder)
  assert ours.kind == "tokenizers" and ours.vocab_size == len(theirs)
  assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id, ours.mask_id) == (
      theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id, theirs.unk_token_id,
      theirs.mask_token_id)
  texts = sample_texts(30) + TRICKY
  for text, batched in zip(texts, ours.encode_batch(texts)):
    assert ours.encode(text, add_special_tokens=True).tolist() == theirs(text)["input_ids"]
    plain = theirs(text, add_special_tokens=False)["input_ids"]
    assert ours.encode(text).tolist() == batched.tolist() == plain
    assert ours.decode(plain) == theirs.decode(plain, skip_special_tokens=True)
  assert ours.token_text(ours.eos_id) == theirs.decode([theirs.eos_token_id]) == EOS
  if which == "with_bos":  # the template transformers builds is the one we build
    assert ours.encode("a").tolist()[0] != ours.bos_id == ours.encode("a", True).tolist()[0]


def test_hf_tokenizer_files_travel_whole(hf_tokenizer_dir, tmp_path):
  tokenizer = load_tokenizer(hf_tokenizer_dir)  # a folder: its tokenizer.json
  assert sorted(tokenizer.files) == ["tokenizer.json", "tokenizer_config.json"]
  path = tokenizer.save_to(tmp_path / "run")
  again = load_tokenizer(path)
  assert again.files == tokenizer.files and again.sha256 == tokenizer.sha256
  copy = pickle.loads(pickle.dumps(tokenizer))
  assert copy.encode("a b").tolist() == tokenizer.encode("a b").tolist()
  card = tokenizer.card()
  assert card["backend"] == "tokenizers" and card["eos_id"] == tokenizer.eos_id
  assert card["mask_id"] is None  # it defines no mask token: None, never a guess


def test_bad_hf_tokenizer_files_are_one_line(hf_tokenizer_dir, tmp_path):
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(DharaError, match=r"^data\.tokenizer: .*tokenizer\.json is not a Hugging "
                                       r"Face tokenizer\.json"):
    load_tokenizer(tmp_path / "tokenizer.json")
  (tmp_path / "tokenizer.json").write_bytes((hf_tokenizer_dir / "tokenizer.json").read_bytes())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nowhere>"}))
  with pytest.raises(DharaError, match=r"tokenizer_config\.json names eos_token '<nowhere>', "
                                       r"which is not in the vocabulary"):
    load_tokenizer(tmp_path)
  (tmp_path / "tokenizer_config.json").unlink()
  bare = load_tokenizer(tmp_path)  # no config: no roles (the pipeline then asks for an EOS)
  assert bare.eos_id is None
  with pytest.raises(DharaError, match=r"defines no eos token, which separates documents"):
    bare.required_id("eos", "separates documents in packed rows")
  (tmp_path / "empty").mkdir()
  with pytest.raises(DharaError, match=r"holds no tokenizer\.json or tokenizer\.model"):
    load_tokenizer(tmp_path / "empty")
