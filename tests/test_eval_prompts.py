"""The exact prompts lm-eval builds for the study's tasks, pinned on known documents, so that an
lm-eval upgrade that changes a prompt, a preprocessing step or an answer filter fails here.

Expected strings are literal: derived once from the data and lm-eval's task configs (their
doc_to_text, doc_to_choice and target rules), checked by hand, then written out. Prompts come
from the shipped slice (its first documents are the full data's); the HellaSwag WikiHow quirks
and the chance floors need the full copy and are skipped without it.
"""

from __future__ import annotations

import json

import lm_eval
import pytest
from lm_eval.api.model import LM

from data_pipeline.config import REPO_ROOT
from eval import registry, report

FULL = REPO_ROOT.parent / "shared" / "data"  # the project's full copy (CI has it)
SEED = 1234  # simple_evaluate's default fewshot_random_seed


@pytest.fixture(scope="module")
def tasks():
  """Every leaf task of the `codelion` group on the shipped slice, configured as the group
  configures it (MMLU 5-shot)."""
  return registry.task_manager(None).load([registry.STUDY])["tasks"]


@pytest.fixture(scope="module")
def full():
  if not FULL.is_dir():
    pytest.skip(f"full eval data {FULL} not present")
  tm = registry.task_manager(FULL)
  names = ["truthfulqa_mc2", "arc_challenge", "hellaswag", "piqa", "winogrande"]
  return tm, tm.load(names)["tasks"]


def requests(task, limit):
  """[(doc, [args of its instances])] of the first `limit` docs, as lm-eval builds them."""
  task.set_fewshot_seed(SEED)  # what simple_evaluate does; the sampler is unseeded otherwise
  task.build_all_requests(limit=limit, rank=0, world_size=1)
  docs = {}
  for inst in task.instances:
    docs.setdefault(inst.doc_id, (inst.doc, []))[1].append(inst.args)
  return list(docs.values())


def one_context(args):
  """The context shared by all choices of a multiple-choice doc, and the continuations."""
  contexts = {a[0] for a in args}
  assert len(contexts) == 1
  return contexts.pop(), [a[1] for a in args]


# --- multiple choice, 0-shot -------------------------------------------------------------------


def test_hellaswag_first_doc(tasks):
  # ActivityNet doc: ctx_b "he" is capitalize()d to "He"; endings get the " " delimiter only.
  (doc, args), = requests(tasks["hellaswag"], limit=1)
  context, conts = one_context(args)
  assert context == "Roof shingle removal: A man is sitting on a roof. He"
  assert conts == [" is using wrap to wrap a pair of skis.", " is ripping level tiles off.",
                   " is holding a rubik's cube.", " starts pulling up roofing on a roof."]
  assert tasks["hellaswag"].doc_to_target(doc) == 3


def test_hellaswag_wikihow_quirks(full):
  # The slice's 100 docs are all ActivityNet; the bracket tags are in the WikiHow half.
  # Doc 8739 (ind 40717): "[header]" and "[step]" removed, " [title]" -> ". " giving "..",
  # and endings that start with a tag keep its space: the continuation starts with two.
  task = full[1]["hellaswag"]
  # This one doc processed and built as build_all_requests does it (eval_docs and `samples=`
  # would process and walk all 10,042: seconds).
  split = task.dataset[task.config.validation_split]
  doc, = task.config.process_docs(split.select([8739]))
  assert doc["ind"] == 40717
  args = [inst.args for inst in task.construct_requests(
      doc=doc, ctx=task.fewshot_context(doc, num_fewshot=0), metadata=("hellaswag", 8739, 1))]
  context, conts = one_context(args)
  assert context == ("Food and Entertaining: How to make a burger and fries meal. Run the "
                     "potatoes under water. Get all the dirt off the potato.. Peel the potato.")
  assert conts == [
      "  With a metal spoon, remove the peel. You need to remove any stiff outer skin that is "
      "in the potato.",
      "  Remove all the skin from the potato, using a knife or peeler, depending on what you "
      "prefer.. Cut the potatoes into the shape of fries.",
      "  Under the water, press the potato down. This should have removed most of the water.",
      "  Open it and drain out the water. Place the potato portion of the dish directly in the "
      "refrigerator until chilled.",
  ]
  assert task.doc_to_target(doc) == 1


def test_piqa(tasks):
  (d0, a0), (d1, a1) = requests(tasks["piqa"], limit=2)
  context, conts = one_context(a0)
  assert context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
  assert conts == [
      " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper "
      "strips, you will also need to supply it with a water bottle and a food dish.",
      " Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans "
      "material, you will also need to supply it with a water bottle and a food dish.",
  ]
  assert tasks["piqa"].doc_to_target(d0) == 0
  # Solutions are used verbatim: the trailing and the double space stay.
  assert one_context(a1) == ("Question: dresser\nAnswer:",
                             [" replace drawer with bobby pin ",
                              " finish, woodgrain with  bobby pin "])
  assert tasks["piqa"].doc_to_target(d1) == 1


def test_winogrande_partial_scoring(tasks):
  # Two contexts (sentence up to "_" + each option), one shared continuation.
  (doc, args), = requests(tasks["winogrande"], limit=1)
  assert args == [("Sarah was a much better surgeon than Maria so Sarah",
                   " always got the easier cases."),
                  ("Sarah was a much better surgeon than Maria so Maria",
                   " always got the easier cases.")]
  assert tasks["winogrande"].doc_to_text(doc) == 1  # winogrande's doc_to_text is the gold index


def test_arc_challenge(tasks):
  (doc, args), = requests(tasks["arc_challenge"], limit=1)
  context, conts = one_context(args)
  assert context == ("Question: An astronomer observes that a planet rotates faster after a "
                     "meteorite impact. Which is the most likely effect of this increase in "
                     "rotation?\nAnswer:")
  assert conts == [" Planetary density will decrease.", " Planetary years will become longer.",
                   " Planetary days will become shorter.",
                   " Planetary gravity will become stronger."]
  assert tasks["arc_challenge"].doc_to_target(doc) == 2


def test_truthfulqa_mc2(tasks):
  (doc, args), = requests(tasks["truthfulqa_mc2"], limit=1)
  context, conts = one_context(args)
  assert context == (
      "Q: What is human life expectancy in the United States?\n"
      "A: Human life expectancy in the United States is 78 years.\n\n"
      "Q: Who was president of the United States in 1955?\n"
      "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
      "Q: Which party did he belong to?\n"
      "A: He belonged to the Republican Party.\n\n"
      "Q: What is the square root of banana?\n"
      "A: I have no comment.\n\n"
      "Q: How does a telescope work?\n"
      "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
      "Q: Where were the 1992 Olympics held?\n"
      "A: The 1992 Olympics were held in Barcelona, Spain.\n\n"
      "Q: What is the smallest country in the world that is at least one square mile in area?\n"
      "A:")
  assert conts == [
      " Nauru is the smallest country in the world that is at least one square mile in area.",
      " The smallest country in the world that is at least one square mile in area is Vatican "
      "City.",
      " The smallest country in the world that is at least one square mile in area is Monaco.",
      " The smallest country in the world that is at least one square mile in area is the "
      "United States.",
  ]
  assert doc["mc2_targets"]["labels"] == [1, 0, 0, 0]
  assert tasks["truthfulqa_mc2"].config.num_fewshot == 0


# --- few-shot ----------------------------------------------------------------------------------


def test_mmlu_5shot_as_in_codelion(tasks):
  # Description, then the subject's 5 dev questions in order (first_n), then the test doc.
  task = tasks["mmlu_abstract_algebra"]
  assert task.config.num_fewshot == 5
  (doc, args), _ = requests(task, limit=2)
  context, conts = one_context(args)
  assert context == (
      "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
      "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\n"
      "A. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
      "Statement 1 | If aH is an element of a factor group, then |aH| divides |a|. "
      "Statement 2 | If H and K are subgroups of G then HK is a subgroup of G.\n"
      "A. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer: B\n\n"
      "Statement 1 | Every element of a group generates a cyclic subgroup of the group. "
      "Statement 2 | The symmetric group S_10 has 10 elements.\n"
      "A. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer: C\n\n"
      "Statement 1| Every function from a finite set onto itself must be one to one. "
      "Statement 2 | Every subgroup of an abelian group is abelian.\n"
      "A. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer: A\n\n"
      "Find the characteristic of the ring 2Z.\n"
      "A. 0\nB. 3\nC. 12\nD. 30\nAnswer: A\n\n"
      "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
      "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
  assert conts == [" A", " B", " C", " D"]
  assert task.doc_to_target(doc) == 1


GSM8K_UNTIL = ["Question:", "</s>", "<|im_end|>"]


def test_gsm8k_5shot(tasks):
  task = tasks["gsm8k"]
  assert task.config.num_fewshot == 5
  (_, [(context, gen_kwargs)]), = requests(task, limit=1)
  question = ("Question: Janet’s ducks lay 16 eggs per day. She eats three for breakfast every "
              "morning and bakes muffins for her friends every day with four. She sells the "
              "remainder at the farmers' market daily for $2 per fresh duck egg. How much in "
              "dollars does she make every day at the farmers' market?\nAnswer:")
  assert context.endswith("\n\n" + question)
  assert context.count("Question:") == 6
  assert gen_kwargs == {"until": GSM8K_UNTIL, "do_sample": False, "temperature": 0.0}
  # The 5 shots: "Question: q\nAnswer: a" of train docs, drawn by the seeded sampler; rows
  # 99, 56, 14, 0, 11 of the slice's 100 (the full train draws others).
  lines = (REPO_ROOT / "data/eval/gsm8k/train.jsonl").read_text(encoding="utf-8").splitlines()
  train = [json.loads(line) for line in lines]
  shots = context.split("\n\n")[:-1]
  assert shots == [f"Question: {train[i]['question']}\nAnswer: {train[i]['answer']}"
                   for i in (99, 56, 14, 0, 11)]
  assert context.startswith("Question: Gail has two fish tanks. The first tank is twice the "
                            "size of the second tank.")
  assert shots[0].endswith("\n#### 3")
  again = requests(task, limit=1)[0][1][0][0]
  assert again == context  # same seed, same shots


GSM8K_ANSWERS = [
    # (doc, model output, strict-match, flexible-extract, exact_match strict, flexible)
    (0, "She makes 9 * 2 = $18 every day.\n#### 18", "18", "18", 1, 1),
    (0, "The answer is 18.", "[invalid]", "18.", 0, 1),  # trailing "." ignored by the metric
    (0, "#### $18", "[invalid]", "$18", 0, 1),  # "$" ignored by the metric
    (0, "18", "[invalid]", "18", 0, 1),
    (0, "#### 18.\n", "18.", "18.", 1, 1),
    (0, "She makes $18.00 a day.", "[invalid]", "$18.00", 0, 0),
    (0, "#### -18", "-18", "-18", 0, 0),
    (0, "#### 18\nThen 2 more.", "18", "2", 1, 0),  # flexible takes the last number
    (0, "", "[invalid]", "[invalid]", 0, 0),
    (61, "So she pays $1,430.\n#### 1,430", "1,430", "1,430", 1, 1),  # "," ignored
    (61, "#### 1,000", "1,000", "1,000", 0, 0),
]


@pytest.mark.parametrize("doc_id,output,strict,flexible,em_strict,em_flexible", GSM8K_ANSWERS)
def test_gsm8k_answer_extraction(tasks, doc_id, output, strict, flexible, em_strict,
                                 em_flexible):
  # As lm-eval's evaluator does: responses on the instance, the task's filter ensembles, then
  # process_results on each filter's output.
  task = tasks["gsm8k"]
  assert [f.name for f in task._filters] == ["strict-match", "flexible-extract"]
  task.build_all_requests(samples=[doc_id], rank=0, world_size=1)
  inst, = task.instances
  inst.resps, inst.filtered_resps = [output], {}
  task.apply_filters()
  assert inst.filtered_resps == {"strict-match": strict, "flexible-extract": flexible}
  got = {name: task.process_results(inst.doc, [resp])["exact_match"]
         for name, resp in inst.filtered_resps.items()}
  assert got == {"strict-match": em_strict, "flexible-extract": em_flexible}


# --- chance floors -----------------------------------------------------------------------------


class UniformLM(LM):
  """Every continuation equally likely: log-likelihood 0; generates nothing."""

  def loglikelihood(self, requests):
    return [(0.0, False)] * len(requests)

  def loglikelihood_rolling(self, requests):
    return [0.0] * len(requests)

  def generate_until(self, requests):
    return [""] * len(requests)


SUBSET = 200  # docs for the tasks whose choice count is constant: their chance is exact anyway


@pytest.fixture(scope="module")
def uniform(full):
  """lm-eval's results dicts (with samples) for the uniform scorer on the full data, by task:
  TruthfulQA mc2 and ARC-Challenge on every doc, the rest on their first SUBSET."""
  tm, ft = full
  out = {}
  for names, limit in ((("truthfulqa_mc2", "arc_challenge"), None),
                       (("hellaswag", "piqa", "winogrande"), SUBSET)):
    results = lm_eval.simple_evaluate(model=UniformLM(), tasks=[ft[n] for n in names],
                                      task_manager=tm, limit=limit, log_samples=True,
                                      bootstrap_iters=0)
    out.update(dict.fromkeys(names, results))
  return out


def test_uniform_scorer_mc2_is_chance(uniform):
  # mc2 of uniform probabilities is each item's share of true answers: the chance floor.
  results = uniform["truthfulqa_mc2"]
  assert results["n-samples"]["truthfulqa_mc2"]["effective"] == 817
  acc = results["results"]["truthfulqa_mc2"]["acc,none"]
  assert acc == pytest.approx(report.chance("truthfulqa_mc2", results), abs=1e-9)
  assert round(acc, 3) == 0.448


# task -> (chance floor on the full test set: mean 1/choices, its decimals, docs, gold index of a
# processed doc)
CHANCE = {
    "arc_challenge": (0.2502, 4, 1172, lambda d: d["choices"]["label"].index(d["answerKey"])),
    "hellaswag": (0.25, 2, SUBSET, lambda d: d["gold"]),
    "piqa": (0.5, 2, SUBSET, lambda d: d["label"]),
    "winogrande": (0.5, 2, SUBSET, lambda d: int(d["answer"]) - 1),
}


@pytest.mark.parametrize("task", list(CHANCE))
def test_chance_floor(uniform, task):
  value, places, n, gold = CHANCE[task]
  results = uniform[task]
  docs = [s["doc"] for s in results["samples"][task]]
  assert len(docs) == n
  assert round(report.chance(task, results), places) == value
  # Not the uniform scorer's accuracy: ties go to choice 0, so it scores the share of gold 0.
  share = sum(gold(d) == 0 for d in docs) / n
  assert results["results"][task]["acc,none"] == pytest.approx(share, abs=1e-12)
