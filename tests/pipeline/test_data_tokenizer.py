import pickle

import pytest
from conftest import SLOTS, sample_texts

from data_pipeline.config import DataConfig
from data_pipeline.tokenizer import check_tokenizer_fits, load_tokenizer
from data_pipeline.tokenizer_training import BOS, EOS, MASK, PAD, draw_sample, train_tokenizer
from dhara_jax import config
from dhara_jax.errors import ConfigError, DharaError

TRICKY = ["", " ", "  two leading spaces", "trailing  \n", "\t\ttabs\r\nCRLF\n\n\n",
          "ﬁ ligature, ｆｕｌｌ width, e\u0301 combining, Å", "😀 emoji \u200b zero width",
          "<mask> <s> </s> <pad> <unk> literal specials", "\x00\x01 control \x7f", "数学 العربية"]


def test_shipped_tokenizer_round_trips_every_shipped_document():
  tok = load_tokenizer(config.load("data/mix").data.tokenizer)
  assert tok.vocab_size == 4096
  for slot in SLOTS:
    texts = sample_texts(slot)
    assert len(texts) > 100
    for text, ids in zip(texts, tok.encode_batch(texts)):
      assert tok.decode(ids) == text


def test_trained_tokenizer_is_lossless_with_specials(tokenizer):
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.mask_id) == (
      PAD, BOS, EOS, MASK)
  assert tokenizer.vocab_size == 1024
  for text in TRICKY + sample_texts("dclm"):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert not set(ids.tolist()) & {PAD, BOS, EOS, MASK}  # text never encodes to a special


def test_sample_keeps_the_mix_proportions():
  cfg = DataConfig(tokenizer_sample_chars=1_000_000)
  texts, report = draw_sample(cfg)
  assert report.budget_chars == {"finepdfs": 500_000, "dclm": 300_000, "fineweb_edu": 200_000}
  for name, stats in report.per_source.items():  # within one document of the budget
    assert abs(stats.chars - report.budget_chars[name]) < 0.1 * report.budget_chars[name] + 60_000
  assert sum(s.docs for s in report.per_source.values()) == len(texts)
  assert draw_sample(cfg)[0] == texts  # seeded


def test_save_load_pickle_keep_the_model(tokenizer, tmp_path):
  path = tokenizer.save_to(tmp_path / "run")
  again = load_tokenizer(path)
  assert again.sha256 == tokenizer.sha256 and again.files == tokenizer.files
  assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [tokenizer.path.name]
  assert pickle.loads(pickle.dumps(tokenizer)).encode("a b").tolist() == tokenizer.encode(
      "a b").tolist()


def test_vocab_larger_than_the_model_embedding_is_refused(tokenizer):
  small = config.load("llama3", ["model.vocab_size=512"]).model
  with pytest.raises(ConfigError, match=r"data\.tokenizer: .* 1024 tokens, more than "
                                        r"model\.vocab_size=512"):
    check_tokenizer_fits(tokenizer, small)
  check_tokenizer_fits(tokenizer, config.load("llama3").model)
  with pytest.raises(ConfigError, match=r"data\.tokenizer_vocab_size: 50304 is larger than "
                                        r"model\.vocab_size=512"):
    train_tokenizer(DataConfig(), small)


def test_vocab_the_sample_cannot_support_is_a_clear_error(tmp_path):
  cfg = DataConfig(tokenizer=str(tmp_path / "t.model"), tokenizer_sample_chars=2_000,
                   tokenizer_vocab_size=8000)
  with pytest.raises(ConfigError, match=r"data\.tokenizer_vocab_size: 8000 is more than the "
                                        r"sample supports \(at most \d+ on [\d,]+ chars\)"):
    train_tokenizer(cfg, log=lambda _: None)
  assert not (tmp_path / "t.model").exists()


def test_missing_or_bad_tokenizer_file(tmp_path):
  with pytest.raises(DharaError, match=r"no tokenizer at .*; train one with `dhara tokenizer"):
    load_tokenizer(tmp_path / "none.model")
  (tmp_path / "bad.model").write_text("nope")
  with pytest.raises(DharaError, match=r"is not a SentencePiece model"):
    load_tokenizer(tmp_path / "bad.model")

