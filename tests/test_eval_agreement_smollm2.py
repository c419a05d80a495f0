"""`dhara eval` on the imported SmolLM2 agrees with lm-eval's own HFLM on its export, request by
request: DharaLM tokenizes with the model's Hugging Face tokenizer by lm-eval's rules (its
special tokens, BOS — else EOS — before an empty context, as HFLM does for that model).

The peer's head and log-softmax compute in float64: HFLM's float32 log-softmax over SmolLM2's
49,152 tokens alone moves a 50-token PIQA continuation's score by ~1e-3, about ten times dhara's
float32 error there, so a float32 peer would measure its own rounding, not the agreement. Its
body stays float32 (measured on these requests: within 3e-5 of an all-float64 peer, at 40% of
its time)."""

import json

import lm_eval
import pytest

from dhara_jax import cli, runs
from eval import registry
from eval.peer import hflm

TASKS = ("arc_challenge", "piqa", "winogrande")  # the shortest requests of the 7
LIMIT = 20  # documents per task, from the shipped slices
LL_TOLERANCE = 1e-3  # float32 on both sides
pytestmark = pytest.mark.slow  # SmolLM2 scores ~160 requests on each side


@pytest.fixture(scope="module")
def evaluated(smollm2_run, tmp_path_factory):
  """The samples `dhara eval` stored per task, and HFLM's results dict on the export."""
  assert cli.main(["eval", str(smollm2_run), "--tasks", ",".join(TASKS), "--limit", str(LIMIT),
                   "--no-progress"]) == 0
  ours = {task: [json.loads(line) for line in
                 (smollm2_run / "eval" / "samples" / f"{task}.jsonl").read_text().splitlines()]
          for task in TASKS}
  export = runs.export_run(smollm2_run, tmp_path_factory.mktemp("smollm2_hf") / "hf")
  peer = hflm(export, batch_size=4, eos_prefix=False, head_dtype="float64")  # ~1 GB of logits
  theirs = lm_eval.simple_evaluate(model=peer, tasks=list(TASKS),
                                   task_manager=registry.task_manager(None), limit=LIMIT,
                                   log_samples=True, bootstrap_iters=0)
  return ours, theirs["samples"]


@pytest.mark.parametrize("task", TASKS)
def test_every_request_and_every_documents_acc_agree(evaluated, task):
  ours, theirs = evaluated
  mine = {s["doc_id"]: s for s in ours[task]}
  peer = {s["doc_id"]: s for s in theirs[task]}
  assert mine.keys() == peer.keys() and len(mine) >= LIMIT
  worst = 0.0
  for doc, sample in mine.items():
    same_prompts = json.loads(json.dumps(peer[doc]["arguments"], default=str))
    assert sample["arguments"] == same_prompts, (task, doc)
    for (ll, greedy), (ll_hf, greedy_hf) in zip((r[0] for r in sample["resps"]),
                                               (r[0] for r in peer[doc]["resps"])):
      worst = max(worst, abs(ll - ll_hf))
      assert abs(ll - ll_hf) <= LL_TOLERANCE and bool(greedy) == bool(greedy_hf), (task, doc)
    metrics = [m for m in ("acc", "acc_norm") if m in peer[doc]]  # WinoGrande: acc only
    assert "acc" in metrics
    for metric in metrics:
      assert sample[metric] == peer[doc][metric], (task, doc, metric)
  print(f"{task}: {len(mine)} documents, largest |Δ log-likelihood| {worst:.1e}")
