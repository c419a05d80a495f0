"""The shortest and the longest requests of the study's 7 tasks in the full benchmark data,
tokenized by the shipped SentencePiece tokenizer and scored through `DharaLM` with a block model
(blocks of 32 over a context of 128, the quickstart's converted model) and an mdm model: each
scores as it does inside the longest row (same mask draws). Before rows were made whole blocks,
a block model stopped on requests of ≤ 16 tokens (issue 28: 13 PIQA documents, 1 ARC-Challenge).

Which documents: lm-eval's prompt of every document of the full data takes minutes to build, so
the candidates are the 8 smallest and 8 largest documents by text size (their string fields'
characters), and of those the requests with the fewest and the most tokens. GSM8K is generation:
its request here is its prompt with the reference answer as the continuation.
"""

import types

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from lm_eval.api.instance import Instance

from data_pipeline.config import REPO_ROOT
from data_pipeline.tokenizer import load_tokenizer
from dhara_jax.phases import Phase
from eval import registry
from eval.harness import DharaLM, Options
from eval.scoring import MIN_BUCKET
from tiny import random_params, tiny_config

FULL = REPO_ROOT.parent / "shared" / "data"  # the project's full copy (CI has it)
TOKENIZER = REPO_ROOT / "data" / "tokenizer" / "sample_4k.model"
CANDIDATES = 8
SEED = 1234  # simple_evaluate's default fewshot_random_seed
CONTEXT, BLOCK = 128, 32
TOLERANCE = 1e-5
STUDY = [t.task for t in registry.STUDY_TASKS]

pytestmark = pytest.mark.slow  # lm-eval's task index and the full data: 20–50 s to load


def doc_sizes(dataset) -> np.ndarray:
  """Characters of each document's strings (lists and structs of strings included)."""
  table = dataset.with_format("arrow")[:].flatten()
  sizes = np.zeros(len(table), np.int64)
  for column in table.columns:
    column = column.combine_chunks()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
      sizes += pc.fill_null(pc.utf8_length(column), 0).to_numpy()
    elif pa.types.is_list(column.type) and pa.types.is_string(column.type.value_type):
      lengths = pc.fill_null(pc.utf8_length(pc.list_flatten(column)), 0).to_numpy()
      np.add.at(sizes, pc.list_parent_indices(column).to_numpy(), lengths)
  return sizes


def built_requests(task, name: str, i: int, doc: dict) -> list[tuple[str, str]]:
  """(context, continuation) strings of document `i`, as lm-eval builds them."""
  ctx = task.fewshot_context(doc, num_fewshot=task.config.num_fewshot or 0)
  built = task.construct_requests(doc=doc, ctx=ctx, metadata=(name, i, 1))
  out = []
  for inst in built if isinstance(built, list) else [built]:  # generation: one instance
    if inst.request_type == "generate_until":
      out.append((inst.args[0], task.config.target_delimiter + task.doc_to_target(doc)))
    else:
      out.append(inst.args[:2])
  return out


@pytest.fixture(scope="module")
def requests():
  """{study task: (context, continuation) strings of its candidate documents}; MMLU's over
  its 57 subjects."""
  if not FULL.is_dir():
    pytest.skip(f"full eval data {FULL} not present")
  leaves = registry.task_manager(FULL).load([registry.STUDY])["tasks"]
  docs: dict[str, list[tuple[int, str, int]]] = {}  # study task: (size, leaf, index)
  evaluated = {}  # leaf: its documents (eval_docs processes them again on every call)
  for name, task in leaves.items():
    task.set_fewshot_seed(SEED)  # what simple_evaluate does
    study = "mmlu" if name.startswith("mmlu_") else name
    evaluated[name] = task.eval_docs
    docs.setdefault(study, []).extend(
        (int(size), name, i) for i, size in enumerate(doc_sizes(evaluated[name])))
  assert sorted(docs) == sorted(STUDY)
  out = {}
  for study, sized in docs.items():
    sized.sort()
    out[study] = [pair for _, name, i in {*sized[:CANDIDATES], *sized[-CANDIDATES:]}
                  for pair in built_requests(leaves[name], name, i, evaluated[name][i])]
  return out


@pytest.fixture(scope="module")
def model():
  tokenizer = load_tokenizer(TOKENIZER)
  cfg = tiny_config("llama3_canon", "model.attention=bidirectional",
                    f"model.mask_token_id={tokenizer.mask_id}",
                    f"model.vocab_size={tokenizer.vocab_size}", f"model.max_seq_len={CONTEXT}",
                    "model.num_layers=2", "model.d_model=32", "model.num_heads=2",
                    "model.num_kv_heads=1", "model.mlp_dim=64")
  return cfg, random_params(cfg), tokenizer


def _extremes(lm: DharaLM, pairs: list[tuple[str, str]]) -> list[Instance]:
  """The requests of the fewest and the most tokens (context and continuation)."""
  def tokens(pair):
    context, continuation = pair
    return len(lm.tok_encode(context + continuation))
  lengths = [tokens(p) for p in pairs]
  chosen = {pairs[int(np.argmin(lengths))], pairs[int(np.argmax(lengths))]}
  return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(sorted(chosen))]


@pytest.mark.parametrize("phase", [Phase("block", block_size=BLOCK), Phase("mdm")],
                         ids=["block", "mdm"])
def test_the_shortest_and_longest_requests_score_as_in_the_longest_row(requests, model, phase):
  cfg, params, tokenizer = model
  run = types.SimpleNamespace(cfg=types.SimpleNamespace(model=cfg), params=params,
                              tokenizer=tokenizer, phase=phase, run_dir=None)
  lm = DharaLM(run, Options(mc_samples=2, progress=False))
  chosen = [inst for task in STUDY for inst in _extremes(lm, requests[task])]
  rows = [len(lm.tok_encode(a + b)) for a, b in (inst.args for inst in chosen)]
  assert min(rows) <= MIN_BUCKET < BLOCK  # the rows issue 28's block model stopped on
  assert max(rows) > CONTEXT  # cut to the context from the left
  own = lm.loglikelihood(chosen, disable_tqdm=True)
  lm.scorer.batcher.smallest = lm.scorer.batcher.max_len  # every row in the longest bucket
  longest = lm.loglikelihood(chosen, disable_tqdm=True)
  np.testing.assert_allclose([s for s, _ in own], [s for s, _ in longest], rtol=0,
                             atol=TOLERANCE)
  assert [g for _, g in own] == [g for _, g in longest]
