"""`dhara export` writes the run's tokenizer (exact SentencePiece encoding through
`AutoTokenizer`) and a README.md model card carrying `eval/summary.json`."""

import dataclasses
import json
import logging

import pytest
import sentencepiece as spm
import yaml

from dhara_jax.errors import DharaError
from dhara_jax.export.card import model_card, read_summary
from dhara_jax.export.tokenizer import TOKENIZER_FILES
from test_train import tiny_run

TASKS = [  # (task, name, metric, metric_name, value, stderr, chance, shots, dataset, config)
    ("hellaswag", "HellaSwag", "acc_norm", "normalized accuracy", 0.2703, 0.0044, 0.25, 0,
     "Rowan/hellaswag", None),
    ("piqa", "PIQA", "acc_norm", "normalized accuracy", 0.5811, 0.0115, 0.5, 0, "baber/piqa",
     None),
    ("winogrande", "WinoGrande", "acc", "accuracy", 0.5012, 0.0141, 0.5, 5, "winogrande",
     "winogrande_xl"),
    ("arc_challenge", "ARC-Challenge", "acc_norm", "normalized accuracy", 0.2321, 0.0123, 0.25,
     25, "allenai/ai2_arc", "ARC-Challenge"),
    ("mmlu", "MMLU", "acc", "accuracy", 0.2295, 0.0035, 0.25, 5, "cais/mmlu", "all"),
    ("truthfulqa_mc2", "TruthfulQA", "acc", "mc2", 0.4750, "N/A", None, 0, "truthful_qa",
     "multiple_choice"),
    ("gsm8k", "GSM8K", "exact_match", "exact match", 0.0, 0.0, 0.0, 5, "gsm8k", "main"),
]
SUMMARY = {"model": "tiny", "step": 2, "kind": "ar", "limit": 100, "data": "shipped slice",
           "lm_eval_version": "0.4.13", "average_6": 0.3815, "average_7": 0.3322,
           "tasks": [{"task": t, "name": n, "metric": m, "metric_name": mn, "value": v,
                      "stderr": s, "chance": c, "n": 100, "num_fewshot": k, "dataset": d,
                      "dataset_name": dn, "split": "validation"}
                     for t, n, m, mn, v, s, c, k, d, dn in TASKS]}
TEXTS = ["Hello world.", " leading space and trailing  ", "two  spaces\n\nnew\tlines\n",
         "naïve café — 東京 🙂 Ünïcödé", "digits 12345 3.14159", "", "   ", "\n",
         "literal </s> and <s> and <mask> stay text"]


def front_matter(text: str) -> dict:
  assert text.startswith("---\n")
  return yaml.safe_load(text.split("---\n")[1])


def test_card_from_a_summary_has_a_model_index_and_the_averages():
  text = model_card("tiny", SUMMARY, {"family": "llama3", "num_layers": 2, "d_model": 32,
                                      "canon_set": "ABCD", "num_params": 1_234_567})
  meta = front_matter(text)
  assert (meta["library_name"], meta["license"]) == ("transformers", "apache-2.0")
  assert "dhara-jax" in meta["tags"] and "canon" in meta["tags"]
  [entry] = meta["model-index"]
  assert entry["name"] == "tiny" and len(entry["results"]) == len(TASKS)
  first, arc = entry["results"][0], entry["results"][3]
  assert first["task"] == {"type": "text-generation", "name": "Text Generation"}
  assert first["dataset"] == {"name": "HellaSwag (0-Shot)", "type": "Rowan/hellaswag",
                              "split": "validation", "args": {"num_few_shot": 0}}
  assert first["metrics"] == [{"type": "acc_norm", "value": 27.03,
                               "name": "normalized accuracy"}]
  assert first["source"]["url"] == "https://github.com/EleutherAI/lm-evaluation-harness"
  assert arc["dataset"]["config"] == "ARC-Challenge"
  assert arc["dataset"]["args"]["num_few_shot"] == 25
  assert [r["metrics"][0]["value"] for r in entry["results"]] == [27.03, 58.11, 50.12, 23.21,
                                                                  22.95, 47.5, 0.0]
  body = text.split("---\n", 2)[2]
  assert "| Task | Metric | Score | ± stderr | Chance | n |" in body
  assert "| HellaSwag (0-shot) | normalized accuracy | 27.03 | ± 0.44 | 25.00 | 100 |" in body
  assert "| TruthfulQA (0-shot) | mc2 | 47.50 | — | — | 100 |" in body  # "N/A" stderr, no chance
  assert "6-task average (no GSM8K)**: 38.15" in body and "7-task average**: 33.22" in body
  assert "at most 100 examples per task" in body and "data: the shipped task slice" in body
  assert "not comparable to full-benchmark scores" in body
  assert "2 layers" in body and "1.23M parameters" in body
  try:
    import huggingface_hub
  except ImportError:
    return
  results = huggingface_hub.ModelCard(text).data.eval_results
  assert len(results) == len(TASKS) and results[0].metric_value == 27.03
  assert results[4].dataset_config == "all" and results[0].source_name.startswith("lm-eval")


def test_card_of_a_full_evaluation_has_no_caveat_and_missing_averages_say_so():
  for data, says in (("hub", "data: the Hub datasets"),
                     ("/data/eval", "data: the local copy `/data/eval`")):
    summary = {**SUMMARY, "limit": None, "data": data, "average_7": None}
    body = model_card("tiny", summary).split("---\n", 2)[2]
    assert says in body and "not comparable" not in body
    assert "7-task average**: — (not every task ran)" in body
  body = model_card("tiny", {**SUMMARY, "limit": None, "data": "data/eval"})
  assert "data: the shipped task slice" in body and "not comparable" in body


def test_card_without_a_summary_says_how_to_add_one():
  text = model_card("tiny", None)
  meta = front_matter(text)
  assert "model-index" not in meta and meta["library_name"] == "transformers"
  assert "No evaluation is stored" in text and "`dhara eval RUN_DIR`" in text
  assert "| Task |" not in text


def test_a_damaged_summary_is_one_line_naming_the_file(tmp_path):
  path = tmp_path / "summary.json"
  assert read_summary(path) is None
  path.write_text('{"tasks": [')
  with pytest.raises(DharaError, match=f"^export: {path} is not valid JSON"):
    read_summary(path)
  path.write_text('{"tasks": 3}')
  with pytest.raises(DharaError, match=f"^export: {path} is not an evaluation summary"):
    read_summary(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  from dhara_jax.loop import run

  run_dir = tmp_path_factory.mktemp("run")
  run(tiny_run("train.steps=2"), run_dir, progress=False)
  return run_dir


def test_export_writes_the_tokenizer_and_the_card(trained, tmp_path):
  from transformers import AutoTokenizer, GenerationConfig

  from dhara_jax.export import import_hf
  from dhara_jax.runs import export_run, open_run

  (trained / "eval").mkdir(exist_ok=True)
  (trained / "eval" / "summary.json").write_text(json.dumps(SUMMARY))
  try:
    out = export_run(trained, tmp_path / "hf")
  finally:
    (trained / "eval" / "summary.json").unlink()
  with open_run(trained) as run:
    saved = run.saved_tokenizer(2)
  sp = spm.SentencePieceProcessor(model_proto=saved.files[saved.main_file])
  assert all((out / name).is_file() for name in ("README.md", *TOKENIZER_FILES))
  meta = front_matter((out / "README.md").read_text())
  assert meta["model-index"][0]["name"] == trained.name
  assert len(meta["model-index"][0]["results"]) == len(TASKS)
  ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}
  config = json.loads((out / "config.json").read_text())
  assert {k: config[k] for k in ids} == ids == {"bos_token_id": 2, "eos_token_id": 3,
                                                "pad_token_id": 0}
  assert GenerationConfig.from_pretrained(out).eos_token_id == sp.eos_id()
  for trust in (False, True):  # SentencePieceBackend; DharaTokenizer (exact decoding too)
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=trust)
    for text in TEXTS:
      assert tok(text)["input_ids"] == sp.encode(text), (trust, text)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 3, 0)
    assert tok.mask_token_id == sp.piece_to_id("<mask>") and tok.model_max_length == 32
  assert type(tok).__name__ == "DharaTokenizer"
  for text in TEXTS:
    assert tok.decode(sp.encode(text)) == text
  assert tok.decode([*sp.encode("a b"), 3], skip_special_tokens=True) == "a b"
  import_hf(out)  # the ids in config.json do not disturb import


def test_export_of_a_run_without_a_saved_tokenizer(trained, tmp_path, monkeypatch, caplog):
  from data_pipeline.config import resolve_input
  from dhara_jax import runs

  monkeypatch.setattr(runs.RunDir, "saved_tokenizer", lambda *_: None)  # as for an import
  cfg = runs.load_run_config(trained)
  out = runs.export_run(trained, tmp_path / "config_tokenizer")  # falls back to data.tokenizer
  assert (out / "tokenizer.model").read_bytes() == resolve_input(cfg.data.tokenizer).read_bytes()
  assert "No evaluation is stored" in (out / "README.md").read_text()
  missing = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer="no/such.model"))
  monkeypatch.setattr(runs, "load_run_config", lambda _: missing)
  with caplog.at_level(logging.WARNING, logger="dhara_jax.runs"):
    out = runs.export_run(trained, tmp_path / "none")
  assert "no tokenizer written" in caplog.text and not (out / "tokenizer.model").exists()
  assert json.loads((out / "config.json").read_text())["eos_token_id"] is None
  assert (out / "README.md").is_file()


def test_export_with_a_damaged_summary_writes_nothing(trained, tmp_path):
  from dhara_jax.runs import export_run

  path = trained / "eval" / "summary.json"
  path.parent.mkdir(exist_ok=True)
  path.write_text("{not json")
  try:
    with pytest.raises(DharaError, match=f"^export: {path} is not valid JSON"):
      export_run(trained, tmp_path / "hf")
  finally:
    path.unlink()
  assert not (tmp_path / "hf").exists()
