"""`dhara generate` and `dhara bench generate` on tiny runs: texts and stats, one-line errors,
and the benchmark's rows and headline (their structure and the relations that must hold between
their fields; wall-clock numbers are not test material)."""

import json
import math

import numpy as np
import pytest

from dhara_jax.benchmarks import generate as bench
from dhara_jax.benchmarks import quality
from dhara_jax.benchmarks import report as bench_report
from dhara_jax.cli import main
from dhara_jax.convert import RECORD, convert
from dhara_jax.errors import DharaError
from dhara_jax.loop import run
from dhara_jax.phases import Phase
from dhara_jax.runs import load_run, open_run
from test_train import tiny_run

# One step of 8 × 32 tokens: enough weights to sample from; nothing here needs a trained model.
ONE_STEP = ["train.steps=1", "train.eval_every=0", "train.checkpoint_every=1"]
# The shortest conversion: warmup at block 8, stable mdm, decay at block 8, one step each.
CONVERSION = ["convert.warmup_blocks=[8]", "convert.decay_blocks=[8]", "convert.tokens=768",
              "convert.warmup_share=0.34", "convert.stable_share=0.33",
              "convert.decay_share=0.33", "convert.average_top_k=0", "convert.mask_noise=0",
              "train.eval_every=0", "train.checkpoint_every=3"]
PROMPT = "The history of science"


def one_step_run(run_dir, *overrides):
  """A tiny AR run of one step (other test modules make theirs with it too)."""
  run(tiny_run(*ONE_STEP, *overrides), run_dir, progress=False)
  return run_dir


def shortest_conversion(ar_run, run_dir):
  """A conversion of `ar_run` (its record names it), ending with block diffusion at 8."""
  convert(ar_run, "configs/runs/wsd.yaml", CONVERSION, run_dir, progress=False)
  return run_dir


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory):
  return one_step_run(tmp_path_factory.mktemp("ar"))


@pytest.fixture(scope="module")
def diffusion_run(ar_run, tmp_path_factory):
  return shortest_conversion(ar_run, tmp_path_factory.mktemp("diffusion"))


def _dhara(capsys, *argv):
  code = main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def test_the_conversion_fixture_is_block_diffusion_at_8(diffusion_run, ar_run):
  with open_run(diffusion_run) as run:
    assert run.phase == Phase("block", 8)
  assert bench.ar_run_of(diffusion_run, None) == ar_run.resolve()


@pytest.mark.parametrize("which", ["ar", "diffusion"])
def test_generate_prints_the_prompt_and_its_continuation(which, ar_run, diffusion_run, capsys):
  run_dir = ar_run if which == "ar" else diffusion_run
  code, out, err = _dhara(capsys, "generate", run_dir, "--prompt", PROMPT, "--max-new-tokens",
                          8, "--stats")
  assert code == 0, err
  assert out.startswith(PROMPT)
  stats = out.strip().splitlines()[-1]
  assert stats.startswith("stats: ") and "tok/s" in stats and "forward passes" in stats

  code, out, err = _dhara(capsys, "generate", run_dir, "--prompt", PROMPT, "--max-new-tokens",
                          8, "--json", "--stats")
  assert code == 0, err
  report = json.loads(out)
  assert report["objective"] == ("ar" if which == "ar" else "block")
  [sample] = report["samples"]
  assert sample["prompt"] == PROMPT and sample["text"] == PROMPT + sample["continuation"]
  assert len(sample["prompt_ids"]) > 0 and len(sample["token_ids"]) <= 8
  s = report["stats"]
  assert s["new_tokens"] == len(sample["token_ids"]) and s["batch"] == 1
  assert s["forwards"] >= 1
  assert math.isclose(s["tokens_per_forward"], s["new_tokens"] / s["forwards"])
  assert s["seconds"] > 0 and math.isclose(s["tokens_per_second"],
                                           s["new_tokens"] / s["seconds"])
  if which == "ar":  # one forward per token, EOS included (the prefill gives the first)
    assert s["forwards"] == s["new_tokens"] + sample["finished"]
  # Greedy is a function of the prompt: the JSON gives the text the plain output printed.
  code, out, _ = _dhara(capsys, "generate", run_dir, "--prompt", PROMPT, "--max-new-tokens", 8)
  assert code == 0 and out.rstrip("\n") == sample["text"]


def test_a_prompt_file_is_one_batch(ar_run, tmp_path, capsys):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("The history of science\nA short\nIn 1905,\n")
  code, out, err = _dhara(capsys, "generate", ar_run, "--prompt-file", prompts,
                          "--max-new-tokens", 4, "--json")
  assert code == 0, err
  report = json.loads(out)
  assert [s["prompt"] for s in report["samples"]] == ["The history of science", "A short",
                                                      "In 1905,"]
  assert report["stats"]["batch"] == 3
  assert report["stats"]["new_tokens"] == sum(len(s["token_ids"]) for s in report["samples"])
  code, out, _ = _dhara(capsys, "generate", ar_run, "--prompt-file", prompts,
                        "--max-new-tokens", 4)
  assert code == 0 and out.startswith("--- 0 ---\nThe history of science")


def test_bad_inputs_are_one_line(ar_run, diffusion_run, tmp_path, capsys):
  (tmp_path / "blank.txt").write_text("one\n\nthree\n")
  long_prompt = " ".join(["science"] * 40)  # > 32 tokens, the tiny model's context
  cases = [
      ([ar_run, "--prompt", ""], "error: generate: prompt 0 is empty"),
      ([diffusion_run, "--prompt", ""], "error: generate: prompt 0 is empty"),
      ([ar_run, "--prompt", long_prompt], "error: generate: a prompt of "),
      ([diffusion_run, "--prompt", long_prompt], "error: generate: a prompt of "),
      ([ar_run, "--prompt", PROMPT, "--max-new-tokens", 40], "error: generate: prompt ("),
      ([diffusion_run, "--prompt", PROMPT, "--max-new-tokens", 40], "error: generate: prompt ("),
      ([tmp_path / "nowhere", "--prompt", PROMPT], "error: run: "),
      ([ar_run, "--prompt-file", tmp_path / "none.txt"], "error: generate: no prompt file "),
      ([ar_run, "--prompt-file", tmp_path / "blank.txt"], "error: generate: "),
      ([ar_run, "--prompt", PROMPT, "--prompt-file", tmp_path / "blank.txt"],
       "error: generate: give either --prompt TEXT or --prompt-file FILE, not both"),
      ([ar_run], "error: generate: give either --prompt TEXT or --prompt-file FILE"),
      ([ar_run, "--prompt", PROMPT, "--step", 7], "error: run: "),
      ([ar_run, "--prompt", PROMPT, "--cache", "sometimes"], "error: generate: cache must be"),
      ([ar_run, "--prompt", PROMPT, "--max-new-tokens", 0], "error: generate: max_new_tokens"),
      ([ar_run, "--prompt", PROMPT, "--temperature", -1], "error: generate: temperature"),
  ]
  for argv, message in cases:
    code, out, err = _dhara(capsys, "generate", *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(message), (argv, err)
    assert not out


def test_non_finite_temperatures_bad_seeds_and_nul_prompts_are_one_line(ar_run, tmp_path,
                                                                        capsys):
  nul = tmp_path / "nul.txt"
  nul.write_text("one\nt\0wo\n")
  cases = [
      (["--prompt", PROMPT, "--temperature", "nan"],
       "generate: temperature must be a finite number ≥ 0, got nan"),
      (["--prompt", PROMPT, "--temperature", "inf"],
       "generate: temperature must be a finite number ≥ 0, got inf"),
      (["--prompt", PROMPT, "--seed", -1], "generate: seed must be in [0, 2³²), got -1"),
      (["--prompt", PROMPT, "--seed", 2**32],
       "generate: seed must be in [0, 2³²), got 4294967296"),
      (["--prompt", "t\0wo"], "generate: --prompt holds a NUL character; prompts are text"),
      (["--prompt-file", nul], f"generate: {nul} line 2 holds a NUL character; prompts are text"),
  ]
  for argv, message in cases:  # 4 new tokens fit the tiny model's context: only argv is wrong
    code, out, err = _dhara(capsys, "generate", ar_run, "--max-new-tokens", 4, *argv)
    assert (code, out, err) == (2, "", f"error: {message}\n"), argv


def test_bench_settings_follow_the_block_size_and_say_what_they_skip():
  from dhara_jax.sampling import Sampling

  assert bench.block_length_for(Phase("block", 32), 128) == 32
  # 25 is the largest divisor of 100 ≤ 32, but 50, 25 and 10 steps split evenly over 5 blocks
  assert bench.block_length_for(Phase("block", 32), 100) == 20
  assert bench.block_length_for(Phase("block", 32), 96) == 32  # 96, 48, 24 over 3 blocks
  assert bench.block_length_for(Phase("mdm"), 100) == 100  # one block: trained over whole rows
  settings = {s.label: s for s in bench.grid_settings(Phase("block", 32), 100)}
  assert settings["jax-ar kv-cache"].sampling == Sampling(max_new_tokens=100)
  assert not any(s.skip for s in settings.values())
  assert settings["jax-diffusion steps=G (100) cache=none"].sampling.cache == "none"
  assert settings["jax-diffusion τ=0.7"].sampling.threshold == 0.7
  assert all(s.sampling.block_length == 20 for s in settings.values() if s.family != "ar")
  # G = 40, trained 8: no block ≤ 8 splits 4 steps (G/10) evenly; the default 8 skips them
  uneven = {s.label: s for s in bench.grid_settings(Phase("block", 8), 40)}
  assert uneven["jax-diffusion steps=G/10 (4)"].skip == ("4 steps do not split evenly over 5 "
                                                         "blocks of 8")
  assert not uneven["jax-diffusion steps=G/4 (10)"].skip
  mdm = {s.label: s for s in bench.grid_settings(Phase("mdm"), 16)}
  assert mdm["jax-diffusion steps=G/10"].skip == "G/10 = 1.6 is not a whole number of steps"
  assert mdm["jax-diffusion steps=G (16) cache=approx"].sampling.cache == "approx"
  assert not mdm["jax-diffusion steps=G/4 (4)"].skip


def test_judge_perplexity_scores_only_the_generated_tokens(ar_run):
  from dhara_jax.model import forward
  loaded = load_run(ar_run)
  cfg, params = loaded.cfg, loaded.params
  prompts, outputs = [[5, 6, 7], [8, 9, 10, 11]], [[12, 13], [14]]
  logp = []
  for prompt, out in zip(prompts, outputs):
    row = np.asarray([prompt + out])
    logits = np.asarray(forward(cfg.model, params, row)[0][0], np.float64)
    logits -= logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits).sum(-1))
    logp += [logits[t - 1, row[0, t]] - logz[t - 1] for t in range(len(prompt), row.shape[1])]
  expected = float(np.exp(-np.mean(logp)))
  got = quality.judge_perplexity(cfg.model, params, prompts, outputs, width=8)
  assert math.isclose(got, expected, rel_tol=1e-4)
  assert quality.judge_perplexity(cfg.model, params, prompts, [[], []], width=8) is None


def test_distinct_2_pools_the_rows():
  assert quality.distinct_2([[1, 2, 1, 2], [1, 2]]) == 2 / 4  # (1,2) ×3, (2,1) ×1
  assert quality.distinct_2([[1], []]) is None


def test_the_ar_run_comes_from_the_conversion_record(tmp_path):
  with pytest.raises(DharaError, match="no conversion.json.*pass --ar-run"):
    bench.ar_run_of(tmp_path, None)
  assert bench.ar_run_of(tmp_path, "elsewhere").name == "elsewhere"
  (tmp_path / RECORD).write_text(json.dumps({"ar_run": "/runs/ar"}))
  assert str(bench.ar_run_of(tmp_path, None)) == "/runs/ar"
  (tmp_path / RECORD).write_text("{")
  with pytest.raises(DharaError, match="unreadable"):
    bench.ar_run_of(tmp_path, None)


def _row(B, setting, tps, family="diffusion", ppl=10.0, steps=100, threshold=0.0,
         cache="block"):
  row = {"B": B, "G": 100, "setting": setting, "engine": "jax", "family": family,
         "status": "ok", "tokens_per_second": tps, "judge_ppl": ppl}
  if family == "diffusion":
    row.update(steps=steps, threshold=threshold, cache=cache)
  return row


def test_speedups_quality_and_where_ar_overtakes():
  rows = [_row(1, "jax-ar kv-cache", 100.0, "ar"), _row(1, "one per step", 50.0),
          _row(1, "fast but bad", 900.0, ppl=11.5, steps=10),
          _row(1, "fast", 600.0, ppl=10.9, steps=25),
          _row(8, "jax-ar kv-cache", 800.0, "ar"), _row(8, "one per step", 300.0),
          _row(8, "fast", 790.0, ppl=10.0, steps=25),
          _row(8, "fast but bad", 2000.0, ppl=12.0, steps=10)]
  bench_report.compare(rows)
  assert rows[2]["within_quality"] is False and rows[3]["within_quality"] is True
  assert rows[3]["speedup_vs_ar"] == 6.0 and rows[3]["ref_judge_ppl"] == 10.0
  # the bad setting is faster, but does not count
  assert bench_report.ar_overtakes(rows) == {"100": 8}
  h = bench_report.headline(rows)
  assert (h["B"], h["G"], h["diffusion_setting"], h["speedup_vs_ar"]) == (1, 100, "fast", 6.0)
  assert h["speedup_met"] and h["ar_vs_hf"] is None and not h["note"]
  assert bench_report.ar_overtakes(rows[:4]) == {"100": "not within the measured batches"}


@pytest.mark.slow
def test_bench_quick_gives_rows_and_a_headline(diffusion_run, capsys):
  code, out, err = _dhara(capsys, "bench", "generate", diffusion_run, "--quick", "--json")
  assert code == 0, err
  report = json.loads(out)
  assert report["quick"] and report["runs"] == 1 and report["objective"] == "block"
  rows = report["rows"]
  assert {(r["B"], r["G"]) for r in rows} == {(1, 16)}  # 16-token prompts, 32-token context
  labels = [r["setting"] for r in rows]
  assert labels[0] == "jax-ar kv-cache" and "jax-diffusion steps=G (16) cache=none" in labels
  assert any(label.startswith("hf-generate") for label in labels)
  assert any(label.startswith("torch-diffusion") for label in labels)
  skipped = {r["setting"]: r["reason"] for r in rows if r["status"] == "skipped"}
  assert skipped == {"jax-diffusion steps=G/10": "G/10 = 1.6 is not a whole number of steps"}
  ar = rows[0]
  for r in rows:
    if r["status"] != "ok":
      continue
    assert r["new_tokens"] <= r["B"] * r["G"] and r["forwards"] >= 1
    assert math.isclose(r["tokens_per_forward"], r["new_tokens"] / r["B"] / r["forwards"])
    assert math.isclose(r["tokens_per_second"], r["new_tokens"] / r["seconds"])
    assert r["seconds"] == sorted(r["seconds_all"])[len(r["seconds_all"]) // 2]
    assert math.isclose(r["speedup_vs_ar"], r["tokens_per_second"] / ar["tokens_per_second"])
    assert r["judge_ppl"] is None or r["judge_ppl"] >= 1
    if r["family"] == "diffusion" and r["engine"] == "jax":
      assert r["block_length"] == 8 and r["steps"] in (16, 8, 4)
      ref = next(q for q in rows if q["engine"] == "jax" and q.get("cache") == r["cache"]
                 and q.get("steps") == 16 and not q.get("threshold"))
      assert r["ref_judge_ppl"] == ref["judge_ppl"]
      # Steps (a threshold: at most one per token), + the block cache's prefill and commits.
      blocks = r["G"] // r["block_length"]
      assert r["forwards"] <= (r["G"] if r["threshold"] else r["steps"]) + blocks + 1
  assert ar["forwards"] <= 16 and ar["speedup_vs_ar"] == 1.0
  h = report["headline"]
  assert (h["B"], h["G"]) == (1, 16) and "was not measured" in h["note"]
  assert h["diffusion_setting"] in labels and h["speedup_met"] == (h["speedup_vs_ar"] >= 5)
  assert math.isclose(h["ar_vs_hf"], h["ar_tokens_per_second"] / h["hf_tokens_per_second"])
  assert set(report["ar_overtakes"]) == {"16"}
  assert report["cut"] and "--quick" in report["cut"][0]
  # The table (what the command prints without --json): one line per row, then the
  # overtaking batch and the headline.
  lines = bench_report.format_bench(report).splitlines()
  assert sum(line.startswith("  1   16  ") for line in lines) == len(rows)
  assert any(line.startswith("AR overtakes diffusion at G=16: ") for line in lines)
  assert sum(line.startswith("headline (B=1, G=16") for line in lines) == 2


def test_bench_refuses_an_ar_run_as_the_diffusion_run(ar_run, capsys):
  code, _, err = _dhara(capsys, "bench", "generate", ar_run, "--ar-run", ar_run, "--quick")
  assert code == 2 and err.strip().splitlines() == [
      f"error: bench: {ar_run} is not a diffusion run (it was trained with ar); pass the "
      "diffusion run first"]
  code, _, err = _dhara(capsys, "bench", "generate", ar_run, "--quick")
  assert code == 2 and err.strip().splitlines()[-1].startswith(f"error: bench: {ar_run} is not "
                                                               "a conversion")
