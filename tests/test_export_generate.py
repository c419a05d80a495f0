"""DharaForMaskedDiffusion.generate, the exported PyTorch diffusion sampler (LLaDA blocks,
low-confidence / random remasking, Fast-dLLM threshold): step counts, the commit schedule, EOS,
padding, seeds and the refusals."""

import jax
import numpy as np
import pytest
import torch
from test_export_diffusion import DIFFUSION, MASK
from tiny import random_params, tiny_config

from dhara_jax.export import export_hf
from dhara_jax.export.parity import load_torch_model

EOS = 7
PROMPTS = [[11, 12, 13], [21, 22, 23, 24, 25], [31]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  """A tiny bidirectional export with louder weights than random_params alone: its greedy
  tokens vary and its confidences spread over (0, 1), so schedules and thresholds matter."""
  cfg = tiny_config("llama3", *DIFFUSION)
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda a: a + 0.3 * rng.standard_normal(a.shape).astype(np.float32),
                        random_params(cfg, seed=11))
  return load_torch_model(export_hf(cfg, params, tmp_path_factory.mktemp("generate")))


def gen(model, ids, **kw):
  return model.generate(torch.tensor(ids), return_stats=True, **kw)


def canvases(model, run):
  """run() under a hook that records the canvas each forward is given; the returned canvas
  comes last, so canvases[i] -> canvases[i + 1] is what forward i's step committed."""
  seen = []
  hook = model.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
  try:
    x, stats = run()
  finally:
    hook.remove()
  assert stats["forwards"] == len(seen)
  return x, stats, seen + [x]


def masks_by_block(x, prompt_len, block):
  """(B, blocks): mask tokens left in each row's blocks."""
  return (x[:, prompt_len:] == MASK).reshape(x.shape[0], -1, block).sum(-1)


def boost_eos(model, position, rows=slice(None)):
  """Makes the logits at `position` (so the slot after it) all but certain to be EOS."""
  def hook(_, args, out):
    out.logits[rows, position, EOS] += 1e4
    return out
  return model.register_forward_hook(hook)


def test_greedy_is_deterministic_keeps_the_prompt_and_fills_every_slot(model):
  x, stats = gen(model, [PROMPTS[0], [1, 2, 3]], max_new_tokens=8, block_length=4)
  again, _ = gen(model, [PROMPTS[0], [1, 2, 3]], max_new_tokens=8, block_length=4)
  assert torch.equal(x, again) and x.dtype == torch.long and x.shape == (2, 11)
  assert x[:, :3].tolist() == [PROMPTS[0], [1, 2, 3]]
  assert not (x == MASK).any()
  assert stats == {"forwards": 8}
  assert len(set(x[:, 3:].flatten().tolist())) > 2  # the model says something, not one token


@pytest.mark.parametrize("new, block, steps", [(8, 8, 8), (8, 4, 4), (12, 4, 6), (12, 6, 4)])
def test_fixed_schedule_runs_exactly_steps_forwards_with_an_even_split(model, new, block, steps):
  x, stats, seen = canvases(
      model, lambda: gen(model, [PROMPTS[0]], max_new_tokens=new, block_length=block,
                         steps=steps))
  assert stats["forwards"] == steps
  left = [(c == MASK).sum().item() for c in seen]
  per_block = steps // (new // block)
  base, rem = divmod(block, per_block)
  want = ([base + 1] * rem + [base] * (per_block - rem)) * (new // block)
  assert [a - b for a, b in zip(left, left[1:])] == want
  assert not (x == MASK).any()


def test_blocks_are_decoded_left_to_right(model):
  """While block k is decoded, the earlier blocks are done and the later ones all masks."""
  _, _, seen = canvases(model, lambda: gen(model, [PROMPTS[0]], max_new_tokens=12,
                                           block_length=4, steps=6))
  left = [masks_by_block(c, 3, 4)[0].tolist() for c in seen]
  assert left == [[4, 4, 4], [2, 4, 4], [0, 4, 4], [0, 2, 4], [0, 0, 4], [0, 0, 2], [0, 0, 0]]


def naive_generate(model, prompt, new, block, steps=None, threshold=None):
  """The greedy sampler for one prompt, slot by slot in Python, as the spec reads."""
  x, p = list(prompt) + [MASK] * new, len(prompt)
  for lo in range(p, p + new, block):
    per_block = (steps or new) // (new // block)
    for t in range(block if threshold else per_block):
      with torch.no_grad():
        logits = model(torch.tensor([x])).logits[0].float()
      logits[:, MASK] = -float("inf")  # the mask token is never a prediction
      probs = logits.softmax(-1)
      masked = [j for j in range(lo, lo + block) if x[j] == MASK]
      if not masked:
        break
      best = {j: probs[j - 1].max(-1) for j in masked}  # slot j is read at j - 1
      order = sorted(masked, key=lambda j: -best[j].values.item())  # stable: ties by slot
      if threshold:
        take = [j for j in order if best[j].values.item() >= threshold] or order[:1]
      else:
        take = order[:block // per_block + (t < block % per_block)]
      for j in take:
        x[j] = best[j].indices.item()
  return x


@pytest.mark.parametrize("kw", [{"steps": 6}, {"steps": 12}, {"threshold": 0.3}],
                         ids=["steps6", "steps12", "threshold"])
def test_matches_a_naive_slot_by_slot_loop(model, kw):
  for prompt in PROMPTS:
    x = model.generate(torch.tensor([prompt]), max_new_tokens=12, block_length=4, **kw)
    assert x[0].tolist() == naive_generate(model, prompt, 12, 4, **kw)


def test_random_remasking_with_a_seeded_generator_is_reproducible(model):
  def run(seed, **kw):
    return gen(model, [PROMPTS[1]], max_new_tokens=8, remasking="random",
               generator=torch.Generator().manual_seed(seed), **kw)[0]
  assert torch.equal(run(0), run(0))
  assert any(not torch.equal(run(0), run(seed)) for seed in range(1, 5))
  greedy, _ = gen(model, [PROMPTS[1]], max_new_tokens=8)
  assert any(not torch.equal(greedy, run(seed)) for seed in range(4))
  assert not (run(0) == MASK).any()


def test_temperature_samples_from_the_generator(model):
  def run(seed):
    return gen(model, [PROMPTS[1]], max_new_tokens=8, temperature=1.0,
               generator=torch.Generator().manual_seed(seed))[0]
  assert torch.equal(run(5), run(5))
  assert any(not torch.equal(run(5), run(seed)) for seed in range(6, 10))


def test_threshold_commits_at_least_one_token_a_step_and_fewer_steps(model):
  x, stats, seen = canvases(
      model, lambda: gen(model, [PROMPTS[0], PROMPTS[2] * 3], max_new_tokens=12, block_length=4,
                         threshold=0.2))
  assert 3 <= stats["forwards"] < 12
  for before, after in zip(seen, seen[1:]):
    left, then = masks_by_block(before, 3, 4), masks_by_block(after, 3, 4)
    block = int(torch.nonzero(left.sum(0))[0])  # the first block with a mask in any row
    busy = left[:, block] > 0
    assert (then[busy, block] < left[busy, block]).all()  # each such row commits ≥ 1
    assert torch.equal(then[:, block + 1:], left[:, block + 1:])  # later blocks wait
  assert not (x == MASK).any()


def test_threshold_above_every_confidence_is_one_token_a_step(model):
  """τ = 1 is never reached: only the best slot is committed, as with steps = G."""
  x, stats = gen(model, [PROMPTS[1]], max_new_tokens=8, block_length=4, threshold=1.0)
  fixed, _ = gen(model, [PROMPTS[1]], max_new_tokens=8, block_length=4, steps=8)
  assert stats["forwards"] == 8 and torch.equal(x, fixed)


def test_threshold_below_every_confidence_is_one_step_a_block(model):
  """A greedy confidence is a max of a softmax, so ≥ 1 / vocab: τ below it takes the block."""
  x, stats = gen(model, [PROMPTS[1]], max_new_tokens=8, block_length=4, threshold=0.5 / 128)
  assert stats["forwards"] == 2 and not (x == MASK).any()


def test_eos_ends_every_row_and_skips_the_blocks_left(model):
  hook = boost_eos(model, 3 + 1)  # EOS at new slot 2 (canvas slot 5), in block 0
  try:
    x, stats = gen(model, [PROMPTS[0], [1, 2, 3]], max_new_tokens=12, block_length=4,
                   eos_token_id=EOS)
  finally:
    hook.remove()
  assert stats["forwards"] == 4  # block 0 only
  assert (x[:, 5:] == EOS).all()
  assert not (x[:, 3:5] == EOS).any() and not (x == MASK).any()


def test_eos_in_one_row_fills_it_and_the_other_row_decodes_on(model):
  ids = [PROMPTS[0], [1, 2, 3]]
  plain, _ = gen(model, ids, max_new_tokens=12, block_length=4, eos_token_id=EOS)
  hook = boost_eos(model, 3 + 5, rows=0)  # row 0's EOS at canvas slot 9, in block 1
  try:
    x, stats = gen(model, ids, max_new_tokens=12, block_length=4, eos_token_id=EOS)
  finally:
    hook.remove()
  assert stats["forwards"] == 12
  first = x[0].tolist().index(EOS)
  assert first <= 9 and (x[0, first:] == EOS).all()
  assert torch.equal(x[1], plain[1])


def test_eos_comes_from_the_config_and_none_means_no_eos(model, monkeypatch):
  hook = boost_eos(model, 3)
  try:
    no_eos, stats = gen(model, [PROMPTS[0]], max_new_tokens=8, block_length=4)
    assert stats["forwards"] == 8 and (no_eos[0] == EOS).sum() >= 1
    monkeypatch.setattr(model.config, "eos_token_id", EOS)
    x, stats = gen(model, [PROMPTS[0]], max_new_tokens=8, block_length=4)
  finally:
    hook.remove()
  assert stats["forwards"] == 4 and (x[0, 4:] == EOS).all()


def padded(prompts, side):
  width = max(map(len, prompts))
  ids, mask = [], []
  for p in prompts:
    pad = [0] * (width - len(p))
    ids.append(pad + p if side == "left" else p + pad)
    mask.append([0] * len(pad) + [1] * len(p) if side == "left" else [1] * len(p) + [0] * len(pad))
  return torch.tensor(ids), torch.tensor(mask)


@pytest.mark.parametrize("kw", [{}, {"threshold": 0.6}], ids=["fixed", "threshold"])
def test_padded_batches_give_each_row_its_own_tokens(model, kw):
  settings = dict(max_new_tokens=8, block_length=4, steps=4, **kw)
  left = model.generate(*padded(PROMPTS, "left"), **settings)
  right = model.generate(*padded(PROMPTS, "right"), **settings)
  assert torch.equal(left, right)  # right padding is left-aligned first: the same canvas
  width = max(map(len, PROMPTS))
  for row, p in enumerate(PROMPTS):
    alone = model.generate(torch.tensor([p]), **settings)
    assert left[row, width - len(p):].tolist() == alone[0].tolist()


BAD = [
    ({"max_new_tokens": 0}, "max_new_tokens must be ≥ 1"),
    ({"max_new_tokens": 8, "block_length": 3}, r"multiple of block_length \(3\)"),
    ({"max_new_tokens": 8, "block_length": 4, "steps": 3}, r"number of blocks \(2"),
    ({"max_new_tokens": 8, "steps": 16}, "16 steps per block is more than block_length"),
    ({"threshold": 0.0}, r"threshold must be None or in \(0, 1\]"),
    ({"threshold": 1.5}, r"threshold must be None or in \(0, 1\]"),
    ({"remasking": "topk"}, "remasking must be 'low_confidence' or 'random', got 'topk'"),
    ({"temperature": -1.0}, "temperature must be ≥ 0"),
    ({"max_new_tokens": 62}, r"prompt \(3\) \+ max_new_tokens \(62\) is more than max_seq_len"),
    ({"mask_token_id": -1}, "pass mask_token_id="),
    ({"eos_token_id": [1, 2]}, "one token id or None"),
]


@pytest.mark.parametrize("kw, match", BAD, ids=[",".join(kw) for kw, _ in BAD])
def test_bad_settings_are_value_errors(model, kw, match):
  with pytest.raises(ValueError, match=match):
    model.generate(torch.tensor([[1, 2, 3]]), **{"max_new_tokens": 4, **kw})


def test_bad_inputs_are_value_errors(model, monkeypatch):
  ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
  with pytest.raises(ValueError, match=r"empty prompt in rows \[1\]"):
    model.generate(ids, attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]), max_new_tokens=4)
  with pytest.raises(ValueError, match=r"attention_mask shape \(2, 2\)"):
    model.generate(ids, attention_mask=torch.ones(2, 2), max_new_tokens=4)
  with pytest.raises(ValueError, match=r"got shape \(3,\)"):
    model.generate(ids[0], max_new_tokens=4)
  with pytest.raises(ValueError, match=r"got shape \(2, 0\)"):
    model.generate(ids[:, :0], max_new_tokens=4)
  monkeypatch.setattr(model.config, "mask_token_id", -1)
  with pytest.raises(ValueError, match="mask token id -1 .* pass mask_token_id="):
    model.generate(ids, max_new_tokens=4)
  x = model.generate(ids, max_new_tokens=4, mask_token_id=MASK)  # given: the config's is unused
  assert x.shape == (2, 7)


def test_hf_generation_options_are_refused_by_name(model):
  with pytest.raises(TypeError, match="unexpected arguments do_sample, num_beams"):
    model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, num_beams=2, do_sample=True)
