"""The ELBO scorer on rows of every length: a request scores the same in its own bucket as inside
the longest row (same mask draws), for block-diffusion models — whose rows must be whole blocks
— and for mdm models (tiny LLaMA3-Canon, the quickstart's family). Padding is its own segment
(0); masks.block_diffusion_mask keeps every token of a row's segment from it, in its own block
and in later ones, and Canon's convolutions look back only."""

import jax
import numpy as np
import pytest

from dhara_jax.errors import DharaError
from dhara_jax.masks import block_diffusion_mask, block_diffusion_pattern
from dhara_jax.phases import Phase
from eval.elbo import ELBOScorer
from eval.scoring import MIN_BUCKET, Batcher, batch_rows, buckets, eval_mesh, whole_blocks
from tiny import random_params, tiny_config

CONTEXT = 128
BLOCK = 32  # the quickstart's converted model: blocks of 32 over a context of 128
TOLERANCE = 1e-5
MC_SAMPLES = 2  # the draws are the same in both rows; two are enough to compare them
PHASES = {"block": Phase("block", block_size=BLOCK), "mdm": Phase("mdm")}


@pytest.fixture(scope="module")
def model():
  cfg = tiny_config("llama3_canon", "model.attention=bidirectional", "model.mask_token_id=1",
                    f"model.max_seq_len={CONTEXT}", "model.num_layers=2", "model.d_model=32",
                    "model.num_heads=2", "model.num_kv_heads=1", "model.mlp_dim=64")
  return cfg, random_params(cfg)


def scorer(model, phase):
  cfg, params = model
  one = eval_mesh(jax.devices()[:1])  # a program per shape; the mesh is tested elsewhere
  return ELBOScorer(cfg, params, phase, mc_samples=MC_SAMPLES, mesh=one)


def edge_lengths(context: int, block: int) -> list[int]:
  """Row lengths 2..context around every bucket edge and every block edge."""
  edges = set(buckets(context, MIN_BUCKET))  # mdm's buckets, and the old ones of block models
  if block:
    edges |= set(range(block, context + 1, block)) | set(
        buckets(context, whole_blocks(MIN_BUCKET, block)))
  lengths = {2, 3} | {e + d for e in edges for d in (-1, 0, 1)}
  return sorted(n for n in lengths if 2 <= n <= context)


def requests(lengths: list[int], seed: int = 0) -> list[tuple[list[int], list[int]]]:
  """One request per row length, continuations of 1 to 3 tokens (across a block edge where the
  row ends just past one)."""
  rng = np.random.default_rng(seed)
  out = []
  for n in lengths:
    tokens = rng.integers(2, 128, n).tolist()
    cut = n - min(1 + n % 3, n - 1)
    out.append((tokens[:cut], tokens[cut:]))
  return out


@pytest.mark.parametrize("objective", sorted(PHASES))
def test_every_row_length_scores_as_inside_the_longest_row(model, objective):
  phase = PHASES[objective]
  elbo = scorer(model, phase)
  lengths = edge_lengths(CONTEXT, phase.draw_block())
  assert 15 in lengths and 16 in lengths and 17 in lengths  # the rows (≤ 16 tokens)
  pairs = requests(lengths)
  shapes = {elbo.batcher.shape(len(row.tokens), len(row.payload[0])) for row in elbo.rows(pairs)}
  assert {length for length, _ in shapes} == set(buckets(CONTEXT, elbo.batcher.smallest))
  got = elbo.score(pairs)
  elbo.batcher.smallest = elbo.batcher.max_len  # every row in the longest bucket
  want = elbo.score(pairs)
  np.testing.assert_allclose([s for s, _ in got], [s for s, _ in want], rtol=0, atol=TOLERANCE)
  assert [g for _, g in got] == [g for _, g in want]


def test_a_one_token_row_is_one_line(model):
  with pytest.raises(DharaError, match="no context token"):
    scorer(model, PHASES["block"]).score([([], [5])])


@pytest.mark.parametrize("block,context", [(32, 128), (8, 64), (3, 96), (24, 96), (64, 128),
                                           (32, 100), (128, 128)])
def test_block_rows_are_whole_blocks_within_the_context(block, context):
  cfg = tiny_config("llama3", f"model.max_seq_len={context}")
  batcher = Batcher(cfg, 4096, eval_mesh(jax.devices()[:1]), block)
  assert batcher.max_len == context // block * block  # 100 at blocks of 32: rows of 96
  for length in range(1, batcher.max_len + 1):
    row, _ = batcher.shape(length, 1)
    assert row >= length and row % block == 0 and row <= batcher.max_len


def test_padding_is_invisible_to_a_rows_tokens_in_the_block_mask():
  """What the scorer relies on, from the one mask builder: no query of segment 1 (the row)
  reads a key of segment 0 (its padding), in its own block or a later one; and an x_t block
  never reads a later block at all."""
  length, block = 64, 16
  for n in (1, 15, 16, 17, 40, 63):
    segments = np.zeros((1, length), np.int32)
    segments[0, :n] = 1
    mask = np.asarray(block_diffusion_mask(segments, block))[0, 0]
    row = np.concatenate([segments[0], segments[0]]) == 1
    assert not mask[np.ix_(row, ~row)].any()
  pattern = block_diffusion_pattern(length, block)
  blocks = np.arange(2 * length) % length // block
  later = blocks[None, :] > blocks[:, None]
  assert not (pattern & later).any()


def test_a_batch_holds_the_rows_its_bucket_has():
  assert [batch_rows(n, 64, 8) for n in (1, 8, 9, 17, 33, 64, 65)] == [8, 8, 16, 32, 64, 64, 64]
  assert [batch_rows(n, 512, 1) for n in (1, 3, 5, 300)] == [1, 4, 8, 512]
  assert batch_rows(7, 48, 6) == 12  # shards × a power of two, at most the cap
