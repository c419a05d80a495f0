"""Export every family to its transformers class and compare logits in PyTorch (fp32, CPU)."""

import errno
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors import SafetensorError
from tiny import random_params, tiny_config

from dhara_jax.cli import main
from dhara_jax.config import FAMILIES
from dhara_jax.errors import DharaError
from dhara_jax.export import export_hf, hf_config, import_hf
from dhara_jax.export import io as export_io
from dhara_jax.export.parity import load_torch_model, torch_logits
from dhara_jax.export.place import RECORD
from dhara_jax.model import forward
from dhara_jax.runs import import_into_run


TOL = 1e-4
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama3": "LlamaForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM",
                 "moe": "Qwen3MoeForCausalLM", "lfm2": "Lfm2ForCausalLM"}


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
  family = request.param
  cfg = tiny_config(family)
  params = random_params(cfg, seed=3)
  out = export_hf(cfg, params, tmp_path_factory.mktemp(family))
  return family, cfg, params, out, load_torch_model(out)


def test_export_writes_loadable_transformers_checkpoint(exported):
  family, _, _, out, model = exported
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
  assert type(model).__name__ == ARCHITECTURES[family]
  assert json.loads((out / "config.json").read_text())["architectures"] == [ARCHITECTURES[family]]


def test_logits_match_pytorch(exported):
  _, cfg, params, _, model = exported
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (3, 17))
  ours, _ = forward(cfg, params, tokens)
  np.testing.assert_allclose(np.asarray(ours), torch_logits(model, tokens), atol=TOL, rtol=0)


def test_right_padding_matches_pytorch_attention_mask(exported):
  """Padding = segment id 0 here, attention_mask 0 in transformers; real tokens must agree."""
  _, cfg, params, _, model = exported
  tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 12))
  lengths = np.array([12, 7])
  valid = np.arange(12)[None] < lengths[:, None]
  ours, _ = forward(cfg, params, tokens, valid.astype(np.int32))
  theirs = torch_logits(model, tokens, valid.astype(np.int64))
  np.testing.assert_allclose(np.asarray(ours)[valid], theirs[valid], atol=TOL, rtol=0)


def test_packed_segments_match_separate_pytorch_runs(exported):
  _, cfg, params, _, model = exported
  rng = np.random.default_rng(4)
  docs = [rng.integers(0, cfg.vocab_size, n) for n in (6, 9, 4)]
  packed = np.concatenate(docs)[None]
  seg = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)])[None]
  ours = np.asarray(forward(cfg, params, packed, seg)[0])[0]
  start = 0
  for doc in docs:
    theirs = torch_logits(model, doc[None])[0]
    np.testing.assert_allclose(ours[start:start + len(doc)], theirs, atol=TOL, rtol=0)
    start += len(doc)


def test_import_of_export_is_bit_identical(exported):
  _, cfg, params, out, _ = exported
  cfg_back, params_back = import_hf(out)
  assert cfg_back == cfg
  assert jax.tree.structure(params_back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_back)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), b)


@pytest.mark.parametrize("family", ["llama3", "gpt2"])
def test_untied_head_exports_lm_head(tmp_path, family):
  """The stock class reads an untied lm_head.weight (GPT-2 once fell back to custom code)."""
  cfg = tiny_config(family, "model.tie_embeddings=false")
  params = random_params(cfg)
  out = export_hf(cfg, params, tmp_path)
  assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
  model = load_torch_model(out)
  assert type(model).__name__ == ARCHITECTURES[family]
  tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (1, 9))
  np.testing.assert_allclose(np.asarray(forward(cfg, params, tokens)[0]),
                             torch_logits(model, tokens), atol=TOL, rtol=0)
  cfg_back, params_back = import_hf(out)
  assert cfg_back == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_back), strict=True):
    assert np.array_equal(np.asarray(a), b)


def test_gemma_softcap_and_query_scale_export(tmp_path):
  cfg = tiny_config("gemma3", "model.final_logit_softcap=5.0", "model.query_scale_dim=20")
  params = random_params(cfg)
  model = load_torch_model(export_hf(cfg, params, tmp_path))
  tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 11))
  ours = np.asarray(forward(cfg, params, tokens)[0])
  assert np.max(np.abs(ours)) <= 5.0
  np.testing.assert_allclose(ours, torch_logits(model, tokens), atol=TOL, rtol=0)


@pytest.mark.parametrize("family,override,field", [
    ("llama3", "model.qk_norm=true", "qk_norm"),
    ("gpt2", "model.norm=rmsnorm", "norm"),
    ("qwen3", "model.attention=bidirectional", "attention"),
    ("lfm2", "model.layer_pattern=CLA", "layer_pattern"),
])
def test_export_refuses_what_the_class_cannot_express(tmp_path, family, override, field):
  extra = ["model.sliding_window=4"] if "L" in override else []
  cfg = tiny_config(family, override, *extra)
  with pytest.raises(DharaError, match=field):
    hf_config(cfg)


def test_import_errors_are_clear(tmp_path):
  with pytest.raises(DharaError, match="config.json not found"):
    import_hf(tmp_path)
  cfg = tiny_config("llama3")
  export_hf(cfg, random_params(cfg), tmp_path)
  (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(DharaError, match="not a readable safetensors"):
    import_hf(tmp_path)
  (tmp_path / "config.json").write_text('{"model_type": "bert"}')
  with pytest.raises(DharaError, match="model_type 'bert'"):
    import_hf(tmp_path)


def test_export_does_not_import_torch(tmp_path):
  """Export writes safetensors with numpy only; torch must not even be imported."""
  code = (
      "import sys; sys.path.insert(0, 'tests')\n"
      "from tiny import tiny_config, random_params\n"
      "from dhara_jax.export import export_hf\n"
      "cfg = tiny_config('gpt2')\n"
      f"export_hf(cfg, random_params(cfg), {str(tmp_path)!r})\n"
      "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
  assert (tmp_path / "model.safetensors").is_file()


def test_export_to_unwritable_place_is_one_clear_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  cfg = tiny_config("llama3")
  with pytest.raises(DharaError, match="cannot write"):
    export_hf(cfg, random_params(cfg), blocker / "sub")


# --- `dhara export` onto what a folder already holds -------------------------------------------


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
  """A run (a tiny random llama3, imported at step 0) and a copy of it elsewhere: another run."""
  root = tmp_path_factory.mktemp("runs")
  cfg = tiny_config("llama3")
  import_into_run(export_hf(cfg, random_params(cfg), root / "source"), root / "run")
  shutil.copytree(root / "run", root / "other")
  return root / "run", root / "other"


def _export(capsys, run_dir, out, *options):
  """`dhara export`: (exit status, its error lines)."""
  code = main(["export", str(run_dir), "--out", str(out), *options])
  err = capsys.readouterr().err
  assert "Traceback" not in err
  return code, [line for line in err.splitlines() if line.startswith("error")]


def _contents(folder):
  return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    # what safetensors' writer raises on a full disk
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")])
def test_export_onto_a_full_disk_is_one_line_and_keeps_the_previous_export(
    two_runs, tmp_path, capsys, monkeypatch, failure):
  run, _ = two_runs
  out = tmp_path / "hf"
  assert _export(capsys, run, out) == (0, [])
  before = _contents(out)

  def full_disk(*args, **kwargs):
    raise failure

  monkeypatch.setattr(export_io, "save_file", full_disk)
  assert _export(capsys, run, out) == (
      2, [f"error: export: cannot write {out}: No space left on device"])
  assert _contents(out) == before
  assert os.listdir(tmp_path) == ["hf"]  # no temp folder left beside it


def test_export_replaces_only_an_export_of_the_same_run_unless_forced(two_runs, tmp_path,
                                                                      capsys):
  run, other = two_runs
  out = tmp_path / "hf"
  assert _export(capsys, run, out) == (0, [])
  assert json.loads((out / RECORD).read_text())["run"] == str(run.resolve())
  before = _contents(out)
  assert _export(capsys, other, out) == (2, [
      f"error: export: {out} holds the export of {run.resolve()} step 0 as LlamaForCausalLM "
      "(another run); choose another --out, or add --force to replace it"])
  assert _export(capsys, run, out, "--code", "custom") == (2, [
      f"error: export: {out} holds the export of {run.resolve()} step 0 as LlamaForCausalLM "
      "(not DharaForCausalLM); choose another --out, or add --force to replace it"])
  assert _contents(out) == before
  assert _export(capsys, run, out) == (0, [])  # the same run's export is replaced
  assert _export(capsys, other, out, "--force") == (0, [])
  assert json.loads((out / RECORD).read_text())["run"] == str(other.resolve())
  assert os.listdir(tmp_path) == ["hf"]  # the replaced export is gone, no temp folder left


def test_export_refuses_a_folder_of_other_files_and_never_replaces_the_run(two_runs, tmp_path,
                                                                           capsys):
  run, _ = two_runs
  (tmp_path / "notes.txt").write_text("mine")
  assert _export(capsys, run, tmp_path) == (2, [
      f"error: export: {tmp_path} holds files that are not an export (notes.txt); choose "
      "another --out, or add --force to replace it"])
  assert _export(capsys, run, run.parent, "--force") == (2, [
      f"error: export: --out {run.parent} holds {run.resolve()}, part of the run it exports; "
      "choose another --out"])
  assert _export(capsys, run, run / "checkpoints", "--force")[0] == 2
  assert (tmp_path / "notes.txt").read_text() == "mine" and (run / "checkpoints").is_dir()
