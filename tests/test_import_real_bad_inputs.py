"""Bad inputs around real models are one line (`error: ...`, exit 2) that writes nothing: a GGUF
of an architecture dhara has no family for, a truncated or foreign GGUF, a tokenizer with more
ids than the model's embedding, a conversion whose tokenizer has no usable mask id. A
transformers directory without a tokenizer imports, and says how to add one."""

import logging

import numpy as np
from real import PROMPT, tiny_llama_dir

from dhara_jax import cli

RECIPE = "configs/runs/wsd.yaml"
DATA = ["--config", "data/mix", "data.seq_len=32", "data.batch_size=4"]
LADDER = ["convert.warmup_blocks=[1]", "convert.decay_blocks=[]", "convert.warmup_share=0.5",
          "convert.stable_share=0.5", "convert.decay_share=0", "convert.tokens=512"]


def _refused(capsys, *argv):
  """The command's exit status 2 and its single stderr line."""
  code = cli.main(list(argv))
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
  return err[0]


def _gguf(path, architecture):
  """A well-formed GGUF file of `architecture` with one small tensor."""
  import gguf

  writer = gguf.GGUFWriter(str(path), architecture)
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def test_a_gguf_of_an_unsupported_architecture_is_one_line(tmp_path, capsys):
  source = _gguf(tmp_path / "bert.gguf", "bert")
  line = _refused(capsys, "import", str(source), "--run-dir", str(tmp_path / "run"))
  assert line == (f"error: import: {source} holds a 'bert' model (general.architecture); dhara "
                  "imports GGUF files of llama, qwen3, qwen3moe, gemma3, gpt2, lfm2")
  assert not (tmp_path / "run").exists()


def test_a_truncated_or_foreign_gguf_is_one_line(smollm2_gguf, tmp_path, capsys):
  cut = tmp_path / "cut.gguf"
  with open(smollm2_gguf, "rb") as f:
    cut.write_bytes(f.read(5_000_000))  # the header and part of the first tensor
  line = _refused(capsys, "import", str(cut), "--run-dir", str(tmp_path / "run"))
  assert line.startswith(f"error: import: {cut} is not a readable GGUF file (truncated or "
                         "damaged: ")
  foreign = tmp_path / "notes.txt"
  foreign.write_text("not a model")
  line = _refused(capsys, "import", str(foreign), "--run-dir", str(tmp_path / "run"))
  assert line == (f"error: import: {foreign} is not a GGUF file (it does not start with GGUF); "
                  "import a GGUF file or a transformers directory")
  assert not (tmp_path / "run").exists()


def test_a_tokenizer_larger_than_the_embedding_is_one_line(hf_tokenizer_dir, tmp_path, capsys):
  source = tiny_llama_dir(tmp_path / "hf", hf_tokenizer_dir, vocab=512)
  line = _refused(capsys, "import", str(source), "--run-dir", str(tmp_path / "run"))
  assert line == (f"error: import: {source / 'tokenizer.json'} has 1024 tokens, more than "
                  "model.vocab_size=512 (the embedding rows)")
  assert not (tmp_path / "run").exists()


def test_a_directory_without_a_tokenizer_imports_and_says_how_to_add_one(
    hf_tokenizer_dir, tmp_path, capsys, caplog):
  source = tiny_llama_dir(tmp_path / "hf", None)
  run_dir = tmp_path / "run"
  with caplog.at_level(logging.WARNING, logger="dhara_jax.export.tokenizer"):
    assert cli.main(["import", str(source), "--run-dir", str(run_dir)]) == 0
  assert f"import: {source} has no tokenizer (tokenizer.json or tokenizer.model)" in caplog.text
  assert "set data.tokenizer in the run's config.yaml" in caplog.text
  capsys.readouterr()
  generate = ["generate", str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "4"]
  assert _refused(capsys, *generate).startswith("error: data.tokenizer: no tokenizer at ")
  # Adding one as the warning says makes the run usable.
  config = run_dir / "config.yaml"
  config.write_text(config.read_text().replace(
      "tokenizer: runs/tokenizer/mix_50k.model",
      f"tokenizer: {hf_tokenizer_dir / 'tokenizer.json'}"))
  assert cli.main(generate) == 0 and PROMPT in capsys.readouterr().out


def test_a_conversion_without_a_usable_mask_id_is_one_line(hf_tokenizer_dir, tmp_path, capsys):
  source = tiny_llama_dir(tmp_path / "hf", hf_tokenizer_dir)
  run_dir, out = tmp_path / "run", tmp_path / "diffusion"
  assert cli.main(["import", str(source), "--run-dir", str(run_dir), *DATA]) == 0
  convert = ["convert", str(run_dir), "--config", RECIPE, "--run-dir", str(out), *LADDER]
  line = _refused(capsys, *convert)  # the recipe's -1: the tokenizer's mask token
  assert line == (f"error: model.mask_token_id: -1 means the tokenizer's mask token, but "
                  f"{run_dir / 'checkpoints' / '0' / 'tokenizer'} has none; set "
                  "model.mask_token_id=0 (its EOS, Dhara's own choice for a mask)")
  line = _refused(capsys, *convert, "model.mask_token_id=7")
  assert line == ("error: model.mask_token_id: 7 is an ordinary token of the tokenizer; use "
                  "its EOS (0)")
  assert not out.exists()
