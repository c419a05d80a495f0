"""Exports carry the phase and imports restore it: an imported run is the run it came from.
A block-diffusion run of odd sizes (tests/twin.py), trained a step, goes through `dhara export`
and `dhara import`; the import has the original's phase and weights, `dhara generate` gives the
original's tokens (and the PyTorch twin's), and `dhara train` and `dhara eval` go on with the
block objective. Each kind of run (ar, mdm, block) comes back as itself, and a config.json whose
model cannot be continued as it says is refused in one line, before anything is written."""

import json

import jax
import numpy as np
import pytest
import torch
from twin import BLOCK, LENGTH, ODD, PHASES, loud_params, odd_config

from dhara_jax import config
from dhara_jax.cli import main
from dhara_jax.export import export_hf
from dhara_jax.export.parity import load_torch_model
from dhara_jax.loop import run
from dhara_jax.metrics import read_metrics
from dhara_jax.runs import import_into_run, open_run

TOKENIZER_MASK = 4  # the shipped 4k tokenizer's <mask>
RUN = ["model.vocab_size=4099", *ODD[1:], "model.canon_set=ABCD", "model.canon_kernel=3",
       "model.attention=bidirectional", f"model.mask_token_id={TOKENIZER_MASK}",
       f"data.seq_len={LENGTH}", "data.batch_size=4", "data.read_threads=1",
       "train.objective=block", f"train.block_size={BLOCK}", "train.steps=1",
       "train.eval_every=0", "train.checkpoint_every=1"]
PROMPT = "The history of science"
GENERATE = ["--prompt", PROMPT, "--max-new-tokens", 12, "--json"]


def _dhara(capsys, *argv):
  code = main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def _leaves(params):
  return [np.asarray(x) for x in jax.tree.leaves(params)]


@pytest.fixture(scope="module")
def block_run(tmp_path_factory):
  """A block-diffusion run of one step, exported by `dhara export` and imported by `dhara
  import`: (original run, export, imported run)."""
  root = tmp_path_factory.mktemp("block_run")
  run(config.load("configs/runs/quickstart.yaml", RUN), root / "original", progress=False)
  assert main(["export", str(root / "original"), "--out", str(root / "hf")]) == 0
  assert main(["import", str(root / "hf"), "--run-dir", str(root / "imported")]) == 0
  return root / "original", root / "hf", root / "imported"


def test_the_import_is_the_exported_run(block_run):
  original, hf_dir, imported = block_run
  written = json.loads((hf_dir / "config.json").read_text())
  assert (written["objective"], written["block_size"]) == ("block", BLOCK)
  with open_run(original) as a, open_run(imported) as b:
    assert a.phase == b.phase == PHASES["block"]
    assert a.cfg.model == b.cfg.model and b.cfg.data.seq_len == LENGTH
    for x, y in zip(_leaves(a.params(1)), _leaves(b.params(0)), strict=True):
      np.testing.assert_array_equal(x, y)


def test_generate_continues_it(block_run, capsys):
  """`dhara generate` on the import gives the original's tokens, and so does the export's
  PyTorch generate (the block sampler, on the same prompt)."""
  original, hf_dir, imported = block_run
  code, out, err = _dhara(capsys, "generate", original, *GENERATE)
  assert code == 0, err
  want = json.loads(out)
  code, out, err = _dhara(capsys, "generate", imported, *GENERATE)
  assert code == 0, err
  got = json.loads(out)
  assert (got["objective"], got["block_size"]) == ("block", BLOCK)
  assert got["samples"] == want["samples"]
  sample = got["samples"][0]
  model = load_torch_model(hf_dir)  # config.json's EOS: the tokenizer's, as dhara's
  twin = model.generate(torch.tensor([sample["prompt_ids"]]), max_new_tokens=12)
  new = twin[0, len(sample["prompt_ids"]):].tolist()
  ids = sample["token_ids"]  # cut before EOS
  assert new[:len(ids)] == ids and new[len(ids):] == [model.config.eos_token_id] * (12 - len(ids))


def test_train_continues_it_with_the_block_objective(block_run, capsys):
  _, _, imported = block_run
  code, _, err = _dhara(capsys, "train", imported / "config.yaml", "--run-dir", imported,
                        "--no-progress", "train.steps=1", "data.batch_size=4",
                        "data.read_threads=1", "train.eval_every=0")
  assert code == 0, err
  rows = [r for r in read_metrics(imported) if "loss" in r]
  assert [(r["step"], r["block_size"]) for r in rows] == [(1, BLOCK)]


def test_eval_continues_it_with_its_sampler_and_elbo(block_run, capsys):
  _, _, imported = block_run
  code, out, err = _dhara(capsys, "eval", imported, "--tasks", "piqa", "--limit", 1,
                          "--mc-samples", 2, "--no-progress")
  assert code == 0, err
  summary = json.loads((imported / "eval" / "summary.json").read_text())
  assert (summary["kind"], summary["objective"]) == ("diffusion", "block")


@pytest.mark.parametrize("family, objective", [("llama3_canon", "ar"), ("lfm2", "mdm"),
                                               ("gemma3", "block")])
def test_each_kind_of_run_comes_back_as_itself(tmp_path, family, objective):
  cfg = odd_config(family, objective)
  hf_dir = export_hf(cfg, loud_params(cfg), tmp_path / "hf", code="custom",
                     phase=PHASES[objective])
  import_into_run(hf_dir, tmp_path / "run")
  with open_run(tmp_path / "run") as imported:
    assert imported.phase == PHASES[objective] and imported.cfg.model == cfg
    imported.cfg.check_objective_fits_model()


BAD = [({"objective": "ar", "block_size": 0}, "objective 'ar' with attention 'bidirectional'"),
       ({"objective": "block", "block_size": 0}, "block objective needs a block size ≥ 1"),
       ({"objective": "block", "block_size": 40}, "block_size 40, more than max_seq_len 36"),
       ({"objective": "mdm", "block_size": 6}, "'mdm' with block_size 6"),
       ({"objective": "ntp"}, "objective 'ntp', not one of ar, mdm, block")]


@pytest.mark.parametrize("change, match", BAD, ids=[json.dumps(c) for c, _ in BAD])
def test_a_phase_the_model_cannot_continue_is_refused(tmp_path, capsys, change, match):
  cfg = odd_config("llama3_canon", "block")
  hf_dir = export_hf(cfg, loud_params(cfg), tmp_path / "hf", phase=PHASES["block"])
  written = json.loads((hf_dir / "config.json").read_text())
  (hf_dir / "config.json").write_text(json.dumps({**written, **change}))
  code, _, err = _dhara(capsys, "import", hf_dir, "--run-dir", tmp_path / "run")
  lines = err.strip().splitlines()
  assert code == 2 and len(lines) == 1 and match in lines[0], err
  assert not (tmp_path / "run").exists()
