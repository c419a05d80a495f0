import collections
import dataclasses
import json

import grain
import jax
import numpy as np
import pytest
from conftest import with_sources, write_jsonl
from jax.sharding import PartitionSpec as P

from data_pipeline.config import SourceConfig
from data_pipeline.iterator import make_train_iterator, source_documents, source_rows
from data_pipeline.mixture import tokens_per_source
from dhara_jax.config import MeshConfig
from dhara_jax.errors import ConfigError, DharaError
from dhara_jax.sharding import make_mesh


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same_batches(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]), err_msg=k)


def documents_of(rows, eos):
  """Splits a stream of packed rows back into documents (token tuples, EOS removed)."""
  stream = np.concatenate([r["tokens"][r["segment_ids"] > 0] for r in rows])
  ends = np.flatnonzero(stream == eos) + 1
  docs = np.split(stream, ends)
  return [tuple(d[:-1]) for d in docs[:-1]], docs[-1]


def rows_by_source(batches, index):
  """The rows of one source in a run's batches, in stream order (batched over the rows)."""
  return [{k: b[k][r] for k in ("tokens", "segment_ids")}
          for b in batches for r in np.flatnonzero(b["source"] == index)]


def epoch_rows(cfg, tokenizer, index, p=0, count=1):
  one = dataclasses.replace(cfg, num_epochs=1)
  docs = source_documents(one, tokenizer)[index]
  return list(source_rows(docs, one, index, tokenizer.eos_id, p, count))


def test_batch_layout(data_cfg, tokenizer):
  batch = next(make_train_iterator(data_cfg, tokenizer=tokenizer))
  assert set(batch) == {"tokens", "segment_ids", "positions", "source"}
  for k in ("tokens", "segment_ids", "positions"):
    assert batch[k].shape == (8, 256) and batch[k].dtype == np.int32
  assert batch["source"].shape == (8,)
  seg, pos = batch["segment_ids"], batch["positions"]
  assert (seg >= 1).all()  # an endless stream packs without padding
  new_doc = np.diff(seg, axis=1) != 0
  assert (pos[:, 0] == 0).all() and (pos[:, 1:][new_doc] == 0).all()
  assert (np.diff(pos, axis=1)[~new_doc] == 1).all()
  # Every document inside a row ends with EOS.
  assert (batch["tokens"][:, :-1][new_doc] == tokenizer.eos_id).all()


def test_packing_keeps_every_document_once_per_epoch(data_cfg, tokenizer):
  for index in range(3):
    rows = epoch_rows(data_cfg, tokenizer, index)
    packed, rest = documents_of(rows, tokenizer.eos_id)
    assert len(rest) == 0 and (rows[-1]["segment_ids"] == 0).any()  # only the end is padded
    source = source_documents(data_cfg, tokenizer)[index]
    expected = [tuple(source[i].tolist()) for i in range(len(source))]
    assert collections.Counter(packed) == collections.Counter(expected)
    assert packed != expected  # shuffled


def assert_rows_follow_source_streams(batches, cfg, tokenizer, p=0, count=1):
  """Each row tagged with source i is the next row of that source's own packed stream."""
  docs = source_documents(cfg, tokenizer)
  for index in range(3):
    stream = iter(source_rows(docs[index], cfg, index, tokenizer.eos_id, p, count))
    rows = rows_by_source(batches, index)
    assert rows
    for row in rows:
      np.testing.assert_array_equal(row["tokens"], next(stream)["tokens"])


def test_mixed_rows_are_the_source_streams_interleaved(data_cfg, tokenizer):
  batches = take(make_train_iterator(data_cfg, tokenizer=tokenizer), 20)
  assert_rows_follow_source_streams(batches, data_cfg, tokenizer)


@pytest.mark.parametrize("weights", [(0.5, 0.3, 0.2), (0.6, 0.25, 0.15)])
def test_token_shares_match_weights_over_a_million_tokens(cached_cfg, tokenizer, weights):
  sources = [dataclasses.replace(s, weight=w) for s, w in zip(cached_cfg.sources, weights)]
  cfg = with_sources(cached_cfg, *sources, seq_len=1024, batch_size=32)
  it = make_train_iterator(cfg, tokenizer=tokenizer)
  counts = np.zeros(3)
  while counts.sum() < 1_000_000:
    counts += tokens_per_source(next(it), 3)
  shares = counts / counts.sum()
  assert np.abs(shares - np.array(weights)).max() < 0.005, shares


def test_same_seed_same_batches(data_cfg, tokenizer):
  a = take(make_train_iterator(data_cfg, tokenizer=tokenizer), 6)
  b = take(make_train_iterator(data_cfg, tokenizer=tokenizer), 6)
  assert_same_batches(a, b)
  other = take(make_train_iterator(dataclasses.replace(data_cfg, seed=1), tokenizer=tokenizer), 1)
  assert not np.array_equal(a[0]["tokens"], other[0]["tokens"])


@pytest.mark.parametrize("stop_at", [1, 9])
def test_resume_mid_stream_is_exact(data_cfg, tokenizer, stop_at):
  full = take(make_train_iterator(data_cfg, tokenizer=tokenizer), stop_at + 4)
  run = make_train_iterator(data_cfg, tokenizer=tokenizer)
  take(run, stop_at)
  state = json.loads(json.dumps(run.get_state()))  # as a checkpoint stores it
  resumed = make_train_iterator(data_cfg, tokenizer=tokenizer)
  resumed.set_state(state)
  assert_same_batches(take(resumed, 4), full[stop_at:])


def test_resume_when_documents_end_exactly_at_row_ends(data_cfg, tokenizer, tmp_path):
  """JSON turns grain's empty packer remainder (-1, -1) into a list; restored as is, grain
  would invent a remainder and skip a document."""
  texts = [f"document number {i}" for i in range(300)]
  lengths = collections.Counter(len(tokenizer.encode(t)) for t in texts)
  length = lengths.most_common(1)[0][0]
  write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts
                                      if len(tokenizer.encode(t)) == length])
  cfg = with_sources(data_cfg, SourceConfig(name="d", path=str(tmp_path / "d.jsonl")),
                     seq_len=length + 1, batch_size=2)
  full = take(make_train_iterator(cfg, tokenizer=tokenizer), 8)
  run = make_train_iterator(cfg, tokenizer=tokenizer)
  take(run, 4)
  state = json.loads(json.dumps(run.get_state()))
  assert "[-1, -1]" in json.dumps(state)  # the case under test
  resumed = make_train_iterator(cfg, tokenizer=tokenizer)
  resumed.set_state(state)
  assert_same_batches(take(resumed, 4), full[4:])


def test_orbax_checkpoint_of_the_iterator(data_cfg, tokenizer, tmp_path):
  import orbax.checkpoint as ocp

  full = take(make_train_iterator(data_cfg, tokenizer=tokenizer), 6)
  run = make_train_iterator(data_cfg, tokenizer=tokenizer)
  take(run, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(run)))
    manager.wait_until_finished()
  resumed = make_train_iterator(data_cfg, tokenizer=tokenizer)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  assert_same_batches(take(resumed, 3), full[3:])


def test_state_of_another_pipeline_is_refused(data_cfg, tokenizer):
  state = make_train_iterator(data_cfg, tokenizer=tokenizer).get_state()
  other = make_train_iterator(dataclasses.replace(data_cfg, seq_len=128), tokenizer=tokenizer)
  with pytest.raises(DharaError, match=r"saved with data\.seq_len=256, this run has 128"):
    other.set_state(state)


def test_four_processes_get_disjoint_shards_that_cover_one_process(data_cfg, tokenizer):
  eos = tokenizer.eos_id
  for index in range(3):
    whole, _ = documents_of(epoch_rows(data_cfg, tokenizer, index), eos)
    shards = [set(documents_of(epoch_rows(data_cfg, tokenizer, index, p, 4), eos)[0])
              for p in range(4)]
    for p in range(4):
      for q in range(p + 1, 4):
        assert not shards[p] & shards[q], (index, p, q)
    assert set().union(*shards) == set(whole)
    assert sum(map(len, shards)) == len(whole)
  # The mixed iterators: each host makes batch_size / 4 rows of every global batch, all from
  # its own (disjoint) shard streams.
  for p in range(4):
    batches = take(make_train_iterator(data_cfg, tokenizer=tokenizer, process_index=p,
                                       process_count=4), 10)
    assert all(b["tokens"].shape == (2, 256) for b in batches)
    assert_rows_follow_source_streams(batches, data_cfg, tokenizer, p, 4)


def test_global_arrays_on_the_mesh(data_cfg, tokenizer):
  mesh = make_mesh(MeshConfig(data=4, fsdp=2, tensor=1))
  local = next(make_train_iterator(data_cfg, tokenizer=tokenizer))
  batch = next(make_train_iterator(data_cfg, mesh, tokenizer=tokenizer))
  for k, v in batch.items():
    assert isinstance(v, jax.Array) and v.shape == local[k].shape
    assert v.sharding.spec[0] == ("data", "fsdp") and len(v.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(v), local[k])
  with pytest.raises(ConfigError, match=r"data\.batch_size: 12 rows do not split over "
                                        r"data × fsdp = 8"):
    make_train_iterator(dataclasses.replace(data_cfg, batch_size=12), mesh, tokenizer=tokenizer)
  assert P(("data", "fsdp"), None) == batch["tokens"].sharding.spec


def test_cache_and_raw_text_give_the_same_batches(data_cfg, cached_cfg, tokenizer):
  raw = make_train_iterator(data_cfg, tokenizer=tokenizer)
  cached = make_train_iterator(cached_cfg, tokenizer=tokenizer)
  assert_same_batches(take(raw, 8), take(cached, 8))
  cached.set_state(raw.get_state())  # a run may switch to the cache when it resumes
  assert_same_batches(take(raw, 2), take(cached, 2))


def test_targets_are_the_next_tokens(data_cfg, tokenizer):
  plain = next(make_train_iterator(dataclasses.replace(data_cfg, seq_len=257),
                                   tokenizer=tokenizer))
  batch = next(make_train_iterator(dataclasses.replace(data_cfg, targets=True),
                                   tokenizer=tokenizer))
  np.testing.assert_array_equal(batch["tokens"], plain["tokens"][:, :-1])
  np.testing.assert_array_equal(batch["targets"], plain["tokens"][:, 1:])
  seg = plain["segment_ids"]
  np.testing.assert_array_equal(batch["target_mask"], seg[:, 1:] == seg[:, :-1])
  assert not batch["target_mask"][batch["tokens"] == tokenizer.eos_id].any()


def test_empty_documents_are_skipped(data_cfg, tokenizer, tmp_path):
  write_jsonl(tmp_path / "e.jsonl", [{"text": t} for t in ["one", "", "two", None, "three"]])
  cfg = with_sources(data_cfg, SourceConfig(name="e", path=str(tmp_path / "e.jsonl")),
                     batch_size=1, seq_len=64, num_epochs=1, eval_fraction=0.0)
  docs, _ = documents_of(take(make_train_iterator(cfg, tokenizer=tokenizer), 1), tokenizer.eos_id)
  assert sorted(tokenizer.decode(d) for d in docs) == ["one", "three", "two"]


def test_process_split_errors(data_cfg, tokenizer, tmp_path):
  with pytest.raises(ConfigError, match=r"data\.batch_size: 8 rows do not split over 3"):
    make_train_iterator(data_cfg, tokenizer=tokenizer, process_index=0, process_count=3)
  write_jsonl(tmp_path / "two.jsonl", [{"text": "a"}, {"text": "b"}])
  cfg = with_sources(data_cfg, SourceConfig(name="two", path=str(tmp_path / "two.jsonl")),
                     eval_fraction=0.0)
  with pytest.raises(DharaError, match=r"data\.sources\[0\]: 2 documents cannot be split over 4"):
    make_train_iterator(cfg, tokenizer=tokenizer, process_index=0, process_count=4)


def test_hub_source_is_downloaded_once(data_cfg, tokenizer, tmp_path, monkeypatch):
  from data_pipeline import hub
  from conftest import SAMPLE
  import shutil

  calls = []

  def fake_download(repo_id, local_dir):  # stands in for the network
    calls.append(repo_id)
    shutil.copytree(SAMPLE / "dclm", local_dir)
    return local_dir

  monkeypatch.setattr(hub, "download", fake_download)
  cfg = with_sources(data_cfg, SourceConfig(name="dclm", hub="codelion/dclm-baseline-1B"),
                     hub_cache=str(tmp_path / "hub"))
  for _ in range(2):
    next(make_train_iterator(cfg, tokenizer=tokenizer))
  assert calls == ["codelion/dclm-baseline-1B"]
  assert list((tmp_path / "hub" / "codelion" / "dclm-baseline-1B").glob("*.parquet"))


def test_held_out_documents_are_never_trained_on(data_cfg, tokenizer):
  from data_pipeline.iterator import make_eval_iterator

  for index, train_docs in source_documents(data_cfg, tokenizer, "train").items():
    held = source_documents(data_cfg, tokenizer, "eval")[index]
    n = len(train_docs) + len(held)
    assert len(held) == max(1, round(n * data_cfg.eval_fraction))
    train_set = {tuple(train_docs[i].tolist()) for i in range(len(train_docs))}
    assert not train_set & {tuple(held[i].tolist()) for i in range(len(held))}
  a = take(make_eval_iterator(data_cfg, tokenizer=tokenizer), 3)
  b = take(make_eval_iterator(data_cfg, tokenizer=tokenizer), 3)
  assert_same_batches(a, b)  # every evaluation sees the same batches
  assert set(np.unique(np.concatenate([x["source"] for x in a]))) == {0, 1, 2}
