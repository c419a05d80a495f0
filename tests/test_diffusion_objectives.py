"""Masked-diffusion objectives: the masks, the mdm ELBO, block diffusion's limits, training."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import _step_losses
from tiny import random_params

from dhara_jax import config
from dhara_jax.config import MeshConfig
from dhara_jax.errors import ConfigError
from dhara_jax.loop import run
from dhara_jax.losses import MaskDraws, diffusion_loss, draw_masks, noisy_tokens, predictable
from dhara_jax.metrics import read_metrics
from dhara_jax.model import Head
from dhara_jax.objectives import add_draws, loss_sum
from dhara_jax.phases import Phase

SEGMENTS = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0, 0],
                     [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
TINY_RUN = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2",
            "model.num_kv_heads=1", "model.mlp_dim=64", "model.max_seq_len=32",
            "data.seq_len=32", "data.batch_size=8", "data.read_threads=1", "train.steps=4",
            "train.eval_every=2", "train.eval_batches=1", "train.checkpoint_every=2",
            "model.attention=bidirectional", "train.objective=mdm"]


def tiny_run(*overrides):
  return config.load("configs/runs/quickstart.yaml", TINY_RUN + list(overrides))


def test_masks_skip_each_documents_first_token_and_padding():
  draws = draw_masks(jax.random.key(0), jnp.asarray(SEGMENTS), epsilon=0.5)
  masked = np.asarray(draws.masked_BxL)
  can = np.asarray(predictable(jnp.asarray(SEGMENTS)))
  np.testing.assert_array_equal(can[0], [0, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0])
  assert not (masked & ~can).any()
  prob = np.asarray(draws.prob_BxL)
  assert (prob >= 0.5).all() and (prob <= 1).all() and (prob == prob[:, :1]).all()  # per row
  again = draw_masks(jax.random.key(0), jnp.asarray(SEGMENTS), epsilon=0.5)
  np.testing.assert_array_equal(np.asarray(again.masked_BxL), masked)  # a seed fixes them


def test_block_draws_have_one_noise_level_per_block():
  prob = np.asarray(draw_masks(jax.random.key(1), jnp.asarray(SEGMENTS), 1e-3, 4).prob_BxL)
  blocks = prob.reshape(2, 3, 4)
  assert (blocks == blocks[..., :1]).all() and len(np.unique(blocks[..., 0])) == 6
  # The row's draw is the draw of its one block: block size L gives mdm's masks.
  row = draw_masks(jax.random.key(1), jnp.asarray(SEGMENTS), 1e-3, 12)
  whole = draw_masks(jax.random.key(1), jnp.asarray(SEGMENTS), 1e-3)
  np.testing.assert_array_equal(np.asarray(row.masked_BxL), np.asarray(whole.masked_BxL))


def test_mdm_loss_equals_a_hand_computed_case():
  """Position i predicts token i + 1; only masked tokens count, each weighted by 1/p; the sum
  is over predictable tokens' count."""
  rng = np.random.default_rng(0)
  tokens = np.array([[3, 1, 4, 1, 5, 2]])
  segments = np.array([[1, 1, 1, 2, 2, 0]])
  masked = np.array([[False, True, False, False, True, False]])
  prob = np.full((1, 6), 0.25)
  hidden = rng.standard_normal((1, 6, 4)).astype(np.float32)
  table = rng.standard_normal((7, 4)).astype(np.float32)
  total, count = diffusion_loss(jnp.asarray(hidden), Head(jnp.asarray(table), True, 0.0),
                                jnp.asarray(tokens), jnp.asarray(segments),
                                MaskDraws(jnp.asarray(masked), jnp.asarray(prob)))
  logits = hidden[0] @ table.T
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  # Masked: token 1 at position 1 (from position 0) and token 5 at 4 (from 3).
  want = -(log_probs[0, 1] + log_probs[3, 5]) / 0.25
  np.testing.assert_allclose(float(total), want, rtol=1e-5)
  assert float(count) == 3  # positions 1, 2 (document 1) and 4 (document 2)


def test_noisy_tokens_replace_exactly_the_masked():
  tokens = jnp.arange(12).reshape(1, 12) + 10
  draws = draw_masks(jax.random.key(3), jnp.ones((1, 12), jnp.int32), 0.5)
  x_t = np.asarray(noisy_tokens(tokens, draws, 7))
  masked = np.asarray(draws.masked_BxL)
  assert (x_t[masked] == 7).all() and (x_t[~masked] == np.asarray(tokens)[~masked]).all()


def test_mdm_is_bidirectional_and_ar_is_causal():
  with pytest.raises(ConfigError, match="train.objective: mdm needs model.attention="
                                        "bidirectional, got causal"):
    tiny_run("model.attention=causal").check_objective_fits_model()
  with pytest.raises(ConfigError, match="train.objective: ar needs model.attention=causal"):
    tiny_run("train.objective=ar").check_objective_fits_model()


def _ids(mask, eos):
  """What Config.with_mask_token reads of a tokenizer."""
  return types.SimpleNamespace(mask_id=mask, eos_id=eos, path="runs/x/tokenizer.json")


def test_mask_token_resolves_to_the_tokenizers_and_refuses_ordinary_tokens():
  cfg = tiny_run()
  assert cfg.model.mask_token_id == -1
  assert cfg.with_mask_token(_ids(4, 3)).model.mask_token_id == 4
  assert tiny_run("model.mask_token_id=3").with_mask_token(_ids(4, 3)).model.mask_token_id == 3
  with pytest.raises(ConfigError, match=r"model.mask_token_id: 57 is an ordinary token of the "
                                        r"tokenizer; use its <mask> \(4\), its EOS \(3\)"):
    tiny_run("model.mask_token_id=57").with_mask_token(_ids(4, 3))
  with pytest.raises(ConfigError, match=r"model.mask_token_id: 5000 is outside the vocabulary "
                                        r"\[0, 4096\)"):
    tiny_run("model.mask_token_id=5000")


def test_a_tokenizer_without_a_mask_token_masks_with_its_eos_when_told():
  assert tiny_run("model.mask_token_id=3").with_mask_token(_ids(None, 3)).model.mask_token_id == 3
  with pytest.raises(ConfigError, match=r"model.mask_token_id: -1 means the tokenizer's mask "
                                        r"token, but runs/x/tokenizer.json has none; set "
                                        r"model.mask_token_id=3 \(its EOS, Dhara's own choice"):
    tiny_run().with_mask_token(_ids(None, 3))
  with pytest.raises(ConfigError, match=r"57 is an ordinary token of the tokenizer; use its EOS "
                                        r"\(3\)$"):
    tiny_run("model.mask_token_id=57").with_mask_token(_ids(None, 3))
  with pytest.raises(ConfigError, match=r"has neither a mask token nor an EOS"):
    tiny_run("model.mask_token_id=3").with_mask_token(_ids(None, None))


def _batches(cfg, count):
  rng = np.random.default_rng(0)
  return [{"tokens": rng.integers(5, cfg.model.vocab_size, (8, 32)).astype(np.int32),
           "segment_ids": np.repeat([[1] * 20 + [2] * 12], 8, 0).astype(np.int32)}
          for _ in range(count)]


def test_mdm_steps_agree_on_one_and_eight_devices_and_with_accumulation():
  """The masks are drawn for the global batch, so neither sharding nor microbatching changes
  what is trained on."""
  cfg = tiny_run("model.mask_token_id=4")
  batches = _batches(cfg, 3)
  one = _step_losses(cfg, MeshConfig(1, 1, 1), batches)
  eight = _step_losses(cfg, MeshConfig(4, 2, 1), batches)
  accum = _step_losses(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                          grad_accum=2)),
                       MeshConfig(1, 1, 1), batches)
  np.testing.assert_allclose(eight, one, rtol=2e-5)
  np.testing.assert_allclose(accum, one, rtol=2e-5)
  assert len(set(one)) == 3  # each step drew other masks


def test_mask_noise_moves_only_the_mask_tokens_input():
  cfg = tiny_run("model.mask_token_id=4")
  params = random_params(cfg.model)
  batch = add_draws(cfg.model, Phase("mdm"), jax.random.key(0), {
      "tokens": jnp.asarray(_batches(cfg, 1)[0]["tokens"][:2]),
      "segment_ids": jnp.ones((2, 32), jnp.int32)})
  plain = loss_sum(cfg, Phase("mdm"), params, batch)[0]
  same = loss_sum(cfg, Phase("mdm", mask_noise=0.5), params, batch)[0]  # no key: no noise
  noisy = loss_sum(cfg, Phase("mdm", mask_noise=0.5), params, batch,
                   noise_rng=jax.random.key(1))[0]
  assert float(same) == float(plain) and float(noisy) != float(plain)
  unmasked = {**batch, "masked": jnp.zeros_like(batch["masked"])}
  assert float(loss_sum(cfg, Phase("mdm", mask_noise=0.5), params, unmasked,
                        noise_rng=jax.random.key(1))[0]) == 0.0  # nothing masked, nothing scored


def test_an_mdm_run_resumes_to_the_same_losses(tmp_path):
  straight = run(tiny_run(), tmp_path / "straight", progress=False)
  run(tiny_run(), tmp_path / "resumed", stop_at=2, progress=False)
  resumed = run(tiny_run(), tmp_path / "resumed", progress=False)
  assert resumed["start_step"] == 2
  rows = lambda d: [(r["step"], r.get("loss"), r.get("eval_loss")) for r in read_metrics(d)]
  assert rows(tmp_path / "resumed") == rows(tmp_path / "straight")
  assert straight["final_loss"] == resumed["final_loss"]


def _packed_batch(cfg, rows=2, length=32):
  rng = np.random.default_rng(5)
  segments = np.ones((rows, length), np.int32)
  segments[0, 12:] = 2
  segments[0, 28:] = 0  # padding
  return {"tokens": jnp.asarray(rng.integers(5, cfg.vocab_size, (rows, length)), jnp.int32),
          "segment_ids": jnp.asarray(segments)}


@pytest.mark.parametrize("canon", ["", "AC"])
def test_block_size_l_is_mdm_on_the_same_draws(canon):
  cfg = tiny_run("model.mask_token_id=4", f"model.canon_set='{canon}'")
  params = random_params(cfg.model, seed=2)
  batch = _packed_batch(cfg.model)
  block = add_draws(cfg.model, Phase("block", 32), jax.random.key(7), batch)
  mdm = add_draws(cfg.model, Phase("mdm"), jax.random.key(7), batch)
  np.testing.assert_array_equal(np.asarray(block["masked"]), np.asarray(mdm["masked"]))
  got = loss_sum(cfg, Phase("block", 32), params, block)
  want = loss_sum(cfg, Phase("mdm"), params, mdm)
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
  assert float(got[1]) == float(want[1])


@pytest.mark.parametrize("canon", ["", "AC"])
def test_block_size_1_is_ar_conditioning(canon):
  """Every predictable token masked with p = 1: each is predicted from the clean prefix alone,
  which is the AR loss of the same weights."""
  cfg = tiny_run("model.mask_token_id=4", f"model.canon_set='{canon}'")
  params = random_params(cfg.model, seed=3)
  batch = _packed_batch(cfg.model)
  everything = {**batch, "masked": predictable(batch["segment_ids"]),
                "mask_prob": jnp.ones(batch["tokens"].shape, jnp.float32)}
  got = loss_sum(cfg, Phase("block", 1), params, everything)
  causal = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention="causal"))
  want = loss_sum(causal, Phase("ar"), params, batch)
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
  assert float(got[1]) == float(want[1])


def test_dllm_presets_train_mdm_on_the_llama3_body():
  from dhara_jax.params import count_params

  for name, canon in [("dllm", ""), ("dllm_canon", "AC")]:
    cfg = config.load(name)
    cfg.check_objective_fits_model()
    assert cfg.train.objective == "mdm" and cfg.model.attention == "bidirectional"
    assert cfg.model.canon_set == canon and cfg.model.mask_token_id == -1
    body = config.load("llama3_canon" if canon else "llama3").model
    assert config.architecture(dataclasses.replace(cfg.model, attention="causal")) == (
        config.architecture(body))
  assert count_params(config.load("dllm_canon").model)["total"] == 71_344_512  # as Dhara-70M
