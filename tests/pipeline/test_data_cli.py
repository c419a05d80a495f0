import subprocess
import sys

import pytest
from conftest import write_jsonl, write_parquet

from dhara_jax.cli import main


def run(capsys, *args):
  code = main(list(args))
  out = capsys.readouterr()
  return code, out.out, out.err


def one_source(path, fmt="auto", column="text"):
  return f"data.sources=[{{name: s, path: '{path}', format: {fmt}, text_column: {column}}}]"


BAD_INPUTS = {
    "missing path": (lambda d: [one_source(d / "nope")], r"data.sources[0].path: no such file"),
    "corrupt parquet": (
        lambda d: (d / "c.parquet").write_bytes(
            write_parquet(d / "ok.parquet", ["a"] * 50).read_bytes()[:-30])
        and [one_source(d / "c.parquet")],
        "is not a readable Parquet file"),
    "not parquet": (lambda d: (d / "t.txt").write_text("hello") and
                    [one_source(d / "t.txt", fmt="parquet")], "is not a readable Parquet file"),
    "missing text column": (lambda d: [one_source(write_parquet(d / "b.parquet", ["a"], "body"))],
                            "data.sources[0].text_column: no column 'text'"),
    "negative weight": (lambda d: ["data.weights=[1, -1, 1]"],
                        "data.sources[1].weight: must be >= 0"),
    "all weights zero": (lambda d: ["data.weights=[0, 0, 0]"],
                         "data.sources: all weights are zero"),
    "weights do not match": (lambda d: ["data.weights=[1, 1]"], "data.weights: 2 weights for 3"),
    "vocab over embedding": (lambda d: ["model.vocab_size=1000"],
                             "4096 tokens, more than model.vocab_size=1000"),
    "no tokenizer": (lambda d: [f"data.tokenizer={d / 'none.model'}"], "no tokenizer at"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_prepare_bad_inputs_are_one_line_and_exit_2(capsys, tmp_path, case):
  make, message = BAD_INPUTS[case]
  overrides = make(tmp_path)
  code, out, err = run(capsys, "data", "prepare", "--no-progress", *overrides,
                       f"data.cache_dir={tmp_path / 'cache'}")
  assert code == 2
  assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
  assert not (tmp_path / "cache" / "manifest.json").exists()


def test_tokenizer_train_refuses_vocab_over_embedding(capsys, tmp_path):
  code, _, err = run(capsys, "tokenizer", "train", "data.tokenizer_vocab_size=8192",
                     "model.vocab_size=4096", f"data.tokenizer={tmp_path / 't.model'}")
  assert code == 2 and err == ("error: data.tokenizer_vocab_size: 8192 is larger than "
                               "model.vocab_size=4096 (the embedding rows)\n")


def test_commands_end_to_end_with_counts(capsys, tmp_path):
  write_jsonl(tmp_path / "in.jsonl", [{"text": "some text"}, {"text": ""}, {"text": "more"}])
  (tmp_path / "raw.jsonl").write_bytes(b'{"text": "bytes \xff here"}\n')
  sources = (f"data.sources=[{{name: web, path: '{tmp_path}/*.jsonl', weight: 1}},"
             f" {{name: pdf, path: data/sample/finepdfs, weight: 1}}]")
  common = [sources, f"data.tokenizer={tmp_path / 'tok.model'}", "data.tokenizer_vocab_size=512"]
  # A 3-document source would shrink a mix-proportional sample to nothing: train on pdf only.
  code, out, _ = run(capsys, "tokenizer", "train", *common, "data.weights=[0, 1]")
  assert code == 0 and "tokenizer: " in out and (tmp_path / "tok.model").is_file()
  code, out, _ = run(capsys, "data", "prepare", "--no-progress", *common,
                     f"data.cache_dir={tmp_path / 'cache'}")
  assert code == 0, out
  assert "web" in out and "empty skipped 1  invalid UTF-8 replaced 1" in out
  assert (tmp_path / "cache" / "manifest.json").is_file()
  code, out, _ = run(capsys, "data", "tfds", "--out", str(tmp_path / "tfds"), *common)
  assert code == 0 and "format: tfds" in out


def test_entry_point_prints_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "dhara_jax.cli", "data", "prepare",
                         one_source(tmp_path / "missing"), f"data.cache_dir={tmp_path}"],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr == ("error: data.sources[0].path: no such file or folder: "
                         f"{tmp_path / 'missing'}\n")
