"""`dhara eval` agrees with lm-eval itself: a small trained AR run, evaluated by our `DharaLM`
and by lm-eval's `HFLM` on its export, offline on the same local documents, gives the same
per-request log-likelihoods, the same acc / acc_norm / mc2 and the same greedy GSM8K text."""

import math

import lm_eval
import pytest

from dhara_jax import loop, runs
from eval import registry
from eval.harness import DharaLM, Options
from eval.peer import hflm
from test_train import tiny_run

LIMIT = 50  # documents per task (MMLU: every subject's 2 in the shipped slice, 114 in all)
GEN_KWARGS = "max_gen_toks=32"
LL_TOLERANCE = 1e-3  # float32 on both sides


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
  """lm-eval's results dicts (with samples) of both models on the study's 7 tasks."""
  root = tmp_path_factory.mktemp("agreement")
  # Stock LlamaForCausalLM on the PyTorch side: no Canon. Context 256 leaves GSM8K's 5-shot
  # prompts 224 tokens (both sides cut them from the left alike).
  cfg = tiny_run("model.canon_set=''", "model.d_model=64", "model.num_heads=4",
                 "model.num_kv_heads=2", "model.mlp_dim=128", "model.max_seq_len=256",
                 "data.seq_len=128", "train.steps=40", "train.eval_every=40",
                 "train.checkpoint_every=40")
  loop.run(cfg, root / "run", progress=False)
  export = runs.export_run(root / "run", root / "hf")
  tm = registry.task_manager(None)  # the shipped slice

  def run(model):
    return lm_eval.simple_evaluate(model=model, tasks=[registry.STUDY], task_manager=tm,
                                   limit=LIMIT, log_samples=True, gen_kwargs=GEN_KWARGS,
                                   bootstrap_iters=0)

  ours = run(DharaLM.from_run(root / "run", options=Options(progress=False)))
  theirs = run(hflm(export, batch_size=16))
  return ours, theirs


def _by_doc(results, task):
  return {(s["doc_id"], s["filter"]): s for s in results["samples"][task]}


def _leaf_tasks(results):
  return sorted(results["samples"])


pytestmark = pytest.mark.slow


def test_every_request_has_the_same_loglikelihood_and_greediness(evaluated):
  ours, theirs = evaluated
  assert _leaf_tasks(ours) == _leaf_tasks(theirs)
  compared, worst = 0, 0.0
  for task in _leaf_tasks(ours):
    if ours["configs"][task]["output_type"] == "generate_until":
      continue
    mine, peer = _by_doc(ours, task), _by_doc(theirs, task)
    assert mine.keys() == peer.keys(), task
    for key, sample in mine.items():
      assert sample["arguments"] == peer[key]["arguments"], (task, key)  # same prompts
      for (ll, greedy), (ll_hf, greedy_hf) in zip((r[0] for r in sample["resps"]),
                                                 (r[0] for r in peer[key]["resps"])):
        worst = max(worst, abs(float(ll) - float(ll_hf)))
        assert abs(float(ll) - float(ll_hf)) <= LL_TOLERANCE, (task, key, ll, ll_hf)
        assert bool(greedy) == bool(greedy_hf), (task, key)
        compared += 1
  assert compared > 1000  # six tasks' requests (~1,440), not an empty comparison
  print(f"{compared} requests, largest |Δ log-likelihood| {worst:.2e}")


@pytest.mark.parametrize("task, metrics", [
    ("hellaswag", ("acc", "acc_norm")), ("piqa", ("acc", "acc_norm")),
    ("winogrande", ("acc",)), ("arc_challenge", ("acc", "acc_norm")),
    ("truthfulqa_mc2", ("acc",)),
])
def test_multiple_choice_scores_are_identical(evaluated, task, metrics):
  ours, theirs = evaluated
  mine, peer = _by_doc(ours, task), _by_doc(theirs, task)
  assert len(mine) >= LIMIT
  for metric in metrics:
    for key, sample in mine.items():
      if task == "truthfulqa_mc2":  # a probability share: as close as the log-likelihoods
        assert sample[metric] == pytest.approx(peer[key][metric], abs=1e-3)
      else:
        assert sample[metric] == peer[key][metric], (task, metric, key)
    assert ours["results"][task][f"{metric},none"] == pytest.approx(
        theirs["results"][task][f"{metric},none"], abs=1e-3 if task == "truthfulqa_mc2" else 0)


def test_mmlu_five_shot_scores_are_identical(evaluated):
  ours, theirs = evaluated
  subjects = [t for t in _leaf_tasks(ours) if t.startswith("mmlu_")]
  assert len(subjects) == 57 and ours["n-shot"][subjects[0]] == 5
  docs = 0
  for task in subjects:
    mine, peer = _by_doc(ours, task), _by_doc(theirs, task)
    docs += len(mine)
    assert all(s["acc"] == peer[k]["acc"] for k, s in mine.items()), task
  assert docs >= 50
  assert ours["groups"]["mmlu"]["acc,none"] == theirs["groups"]["mmlu"]["acc,none"]


def test_greedy_gsm8k_generations_are_identical(evaluated):
  ours, theirs = evaluated
  mine, peer = _by_doc(ours, "gsm8k"), _by_doc(theirs, "gsm8k")
  generated = {k: s["resps"][0][0] for k, s in mine.items()}
  assert len({doc for doc, _ in generated}) >= 10
  assert sum(bool(text.strip()) for text in generated.values()) >= 10  # not empty strings
  for key, text in generated.items():
    assert text == peer[key]["resps"][0][0], key
    assert mine[key]["filtered_resps"] == peer[key]["filtered_resps"], key
  for name in ("exact_match,strict-match", "exact_match,flexible-extract"):
    assert math.isclose(ours["results"]["gsm8k"][name], theirs["results"]["gsm8k"][name])
