"""A run with either tokenizer backend — dhara's SentencePiece model, a Hugging Face
tokenizer.json — goes through train → generate → eval → export → import with the same tokens at
every stage: the pipeline's ids are the tokenizer's, the run carries it in its checkpoints, the
export's AutoTokenizer encodes as it does, and the imported run generates and scores exactly as
the trained one (and as transformers / lm-eval's HFLM on the export)."""

import lm_eval
import numpy as np
import pytest
from real import PROMPT, sample_texts
from test_train import tiny_run

from data_pipeline.tokenizer import load_tokenizer
from dhara_jax import loop, runs
from dhara_jax.checkpoint import Checkpointer
from dhara_jax.config import MeshConfig
from dhara_jax.generate import generate_from_run
from dhara_jax.sampling import Sampling
from dhara_jax.sharding import make_mesh
from eval import registry
from eval.harness import DharaLM, Options
from eval.peer import hflm

SHIPPED = "data/tokenizer/sample_4k.model"
pytestmark = pytest.mark.slow  # a trained, exported and imported run per backend (~1 min each)
NEW_TOKENS = 8
LIMIT = 5  # arc_challenge documents (four or five choices each)
LL_TOLERANCE = 1e-3


@pytest.fixture(scope="module", params=["sentencepiece", "tokenizers"])
def journey(request, hf_tokenizer_dir, tmp_path_factory):
  """(backend, tokenizer, trained run, its export, the export imported as a new run)."""
  root = tmp_path_factory.mktemp(request.param)
  path = SHIPPED if request.param == "sentencepiece" else hf_tokenizer_dir / "tokenizer.json"
  cfg = tiny_run(f"data.tokenizer={path}", "train.steps=2", "train.checkpoint_every=2")
  loop.run(cfg, root / "run", progress=False)
  export = runs.export_run(root / "run", root / "hf")
  imported = runs.import_into_run(export, root / "imported")
  return request.param, load_tokenizer(path), root / "run", export, imported


def test_the_pipeline_packs_the_tokenizers_ids_and_the_run_keeps_it(journey):
  backend, tokenizer, run_dir, _, imported = journey
  cfg = runs.load_run_config(run_dir)
  data = loop.pipeline_data(cfg, make_mesh(MeshConfig(1, 1, 1)))
  batches = [next(data.train) for _ in range(4)]
  tokens, segments = (np.concatenate([np.asarray(b[k]) for b in batches])
                      for k in ("tokens", "segment_ids"))
  assert tokens.max() < tokenizer.vocab_size  # 1,024 for the tokenizer.json, 4,096 for SP
  ends = (segments[:, :-1] != segments[:, 1:]) & (segments[:, 1:] > 0)  # a document ends
  assert ends.any() and (tokens[:, :-1][ends] == tokenizer.eos_id).all()
  checkpoints = Checkpointer(run_dir, keep=3, create=False)
  assert checkpoints.restore_tokenizer(checkpoints.latest_step()) == tokenizer.files
  checkpoints.close()
  for name, data_bytes in tokenizer.files.items():
    assert (run_dir / name).read_bytes() == data_bytes
  with runs.open_run(imported) as run:
    assert run.saved_tokenizer(0).sha256 == tokenizer.sha256
  assert load_tokenizer(runs.load_run_config(imported).data.tokenizer).sha256 == tokenizer.sha256


def test_the_exports_autotokenizer_encodes_as_the_pipeline(journey):
  from transformers import AutoTokenizer

  backend, tokenizer, _, export, _ = journey
  theirs = AutoTokenizer.from_pretrained(export)  # no custom code needed for encoding
  for text in sample_texts(20) + [PROMPT]:
    assert theirs(text)["input_ids"] == tokenizer.encode(text, True).tolist()
  assert (theirs.eos_token_id, theirs.pad_token_id) == (tokenizer.eos_id, tokenizer.pad_id)


def test_generation_is_the_same_after_export_and_import(journey):
  import torch

  from dhara_jax.export.parity import load_torch_model

  _, tokenizer, run_dir, export, imported = journey
  sampling = Sampling(max_new_tokens=NEW_TOKENS)
  before = generate_from_run(run_dir, [PROMPT], sampling)["samples"][0]
  after = generate_from_run(imported, [PROMPT], sampling)["samples"][0]
  assert before == after and before["prompt_ids"] == tokenizer.encode(PROMPT, True).tolist()
  assert before["continuation"] == tokenizer.decode(before["token_ids"])
  peer = load_torch_model(export)
  theirs = peer.generate(torch.tensor([before["prompt_ids"]]), do_sample=False,
                         max_new_tokens=NEW_TOKENS)[0, len(before["prompt_ids"]):].tolist()
  cut = theirs.index(tokenizer.eos_id) if tokenizer.eos_id in theirs else len(theirs)
  assert before["token_ids"] == theirs[:cut]


def _arc(model):
  return lm_eval.simple_evaluate(model=model, tasks=["arc_challenge"],
                                 task_manager=registry.task_manager(None), limit=LIMIT,
                                 log_samples=True, bootstrap_iters=0)


def _responses(results):
  return {(s["doc_id"], i): resp[0] for s in results["samples"]["arc_challenge"]
          for i, resp in enumerate(s["resps"])}


def test_eval_scores_the_same_before_and_after_and_as_hflm(journey):
  backend, _, run_dir, export, imported = journey
  options = Options(progress=False)
  ours = _arc(DharaLM.from_run(run_dir, options=options))
  again = _arc(DharaLM.from_run(imported, options=options))
  theirs = _arc(hflm(export, eos_prefix=backend == "sentencepiece"))
  mine, reimported, peer = map(_responses, (ours, again, theirs))
  assert mine == reimported and mine.keys() == peer.keys() and len(mine) >= 4 * LIMIT
  for key, (ll, greedy) in mine.items():
    assert abs(ll - peer[key][0]) <= LL_TOLERANCE and greedy == peer[key][1], key
  assert [s["arguments"] for s in ours["samples"]["arc_challenge"]] == [
      s["arguments"] for s in theirs["samples"]["arc_challenge"]]
  for metric in ("acc,none", "acc_norm,none"):
    assert ours["results"]["arc_challenge"][metric] == theirs["results"]["arc_challenge"][metric]
