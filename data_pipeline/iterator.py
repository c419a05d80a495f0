"""The training input: per-host shards of every source, packed, mixed, batched, on the mesh.

Per source (raw text or the cache; both give document i as the same token ids):

  documents ─► this process's contiguous slice ─► shuffle (new order every epoch) ─► repeat
  ─► drop empty ─► + EOS ─► ConcatThenSplit into rows ─┐
  other sources ... ───────────────────────────────────┴► mix by weight ─► batch ─► jax.Array

Everything before the batch is a grain dataset, so `get_state()` is small (indices and packer
remainders) and `set_state()` resumes mid-stream exactly. Process p of P reads only its 1/P of
each source's documents and makes batch_size / P rows of each global batch; with
`data.host_split: rows` it reads the whole stream instead and keeps rows p·B/P … (p+1)·B/P − 1
of each global batch, so the batches (and the state) are a one-process run's.
"""

from __future__ import annotations

import functools
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from data_pipeline.cache import open_cache
from data_pipeline.config import DataConfig
from data_pipeline.mixture import mix
from data_pipeline.packing import pack, split_targets, with_eos
from data_pipeline.sources import open_source
from data_pipeline.tokenizer import Tokenizer, load_tokenizer
from dhara_jax.errors import ConfigError, DharaError
from dhara_jax.sharding import batch_shards, batch_sharding, check_rows_per_process


def _source_seed(seed: int, index: int) -> int:
  return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _nonempty(ids: np.ndarray) -> bool:
  return len(ids) > 0


SPLITS = ("train", "eval")


def split_documents(docs: grain.MapDataset, fraction: float, split: str) -> grain.MapDataset:
  """The train or held-out part of one source: held-out = its last `fraction` of documents
  (at least one when fraction > 0, never all of them)."""
  n = len(docs)
  held = min(n - 1, max(1, round(n * fraction))) if fraction > 0 else 0
  return docs[:n - held] if split == "train" else docs[n - held:]


def source_documents(cfg: DataConfig, tokenizer: Tokenizer,
                     split: str = "train") -> dict[int, grain.MapDataset]:
  """Token ids (no EOS) of one split's documents of each weighted source, by source index."""
  cached = open_cache(cfg, tokenizer) if cfg.cache_dir else None
  out = {}
  for i, s in enumerate(cfg.sources):
    if s.weight > 0:
      docs = (grain.MapDataset.source(cached[s.name]) if cached is not None else
              grain.MapDataset.source(open_source(cfg, i)).map(tokenizer.encode))
      out[i] = split_documents(docs, cfg.eval_fraction, split)
  return out


def source_rows(docs: grain.MapDataset, cfg: DataConfig, index: int, eos_id: int,
                process_index: int = 0, process_count: int = 1,
                split: str = "train") -> grain.IterDataset:
  """Packed rows of this process's share of one source."""
  n = len(docs)
  start, stop = n * process_index // process_count, n * (process_index + 1) // process_count
  if start == stop:
    raise DharaError(f"data.sources[{index}]: {n} documents cannot be split over "
                     f"{process_count} processes")
  share = docs[start:stop]
  if not any(len(share[i]) for i in range(len(share))):
    # Packing would skip documents forever, waiting for a token that never comes.
    whose = (f"process {process_index} of {process_count}'s share ({stop - start} of {n}) of "
             if process_count > 1 else f"all {n} of ")
    raise DharaError(f"data.sources[{index}] ({cfg.sources[index].name}): {whose}its "
                     f"{'held-out' if split == 'eval' else 'training'} documents are empty (no "
                     "tokens); fix its path or give it weight 0")
  ds = share.shuffle(seed=_source_seed(cfg.seed, index))
  ds = ds.repeat(cfg.num_epochs or None).filter(_nonempty)
  ds = ds.map(functools.partial(with_eos, eos_id=eos_id))
  read = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch)
  return pack(ds.to_iter_dataset(read), cfg.seq_len + int(cfg.targets))


def host_dataset(cfg: DataConfig, tokenizer: Tokenizer, process_index: int = 0,
                 process_count: int = 1, split: str = "train") -> grain.IterDataset:
  """This process's batches (numpy, batch_size / process_count rows) of one split."""
  if not 0 <= process_index < process_count:
    raise ConfigError(f"process_index {process_index} is not in [0, {process_count})")
  if cfg.batch_size % process_count:
    raise ConfigError(f"data.batch_size: {cfg.batch_size} rows do not split over "
                      f"{process_count} processes")
  if split == "eval" and not cfg.eval_fraction:
    raise ConfigError("data.eval_fraction: 0 leaves no held-out documents to evaluate on")
  docs = source_documents(cfg, tokenizer, split)
  rows = cfg.batch_size // process_count
  # documents: this process reads its share of the documents into its own rows; rows: it
  # reads the whole stream, one process's, and keeps its slice of each global batch.
  readers = (process_index, process_count) if cfg.host_split == "documents" else (0, 1)
  streams = {i: source_rows(d, cfg, i, tokenizer.eos_id, *readers, split)
             for i, d in docs.items()}
  ds = mix(streams, {i: cfg.sources[i].weight for i in streams})
  if cfg.host_split == "documents":
    ds = ds.batch(rows, drop_remainder=True)
  else:
    ds = ds.batch(cfg.batch_size, drop_remainder=True).map(
        functools.partial(_rows_of, start=process_index * rows, stop=(process_index + 1) * rows))
  return ds.map(split_targets) if cfg.targets else ds


def _rows_of(batch: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
  return {k: v[start:stop] for k, v in batch.items()}


def _restore_tuples(state: Any) -> Any:
  """JSON (orbax, grain.checkpoint) turns tuples into lists, but grain's ConcatThenSplit tests
  `slice != (-1, -1)`: a list there restores a phantom remainder and drops a document."""
  if isinstance(state, dict):
    return {k: ({f: tuple(v) for f, v in s.items()} if k == "remainder_slices" else
                _restore_tuples(s)) for k, s in state.items()}
  if isinstance(state, list):
    return [_restore_tuples(s) for s in state]
  return state


class TrainIterator(grain.DatasetIterator):
  """Batches of the mixture: dicts of global `jax.Array`s on `mesh`, or of this process's
  numpy rows when `mesh` is None. `get_state` / `set_state` (JSON-able) resume exactly."""

  def __init__(self, local: grain.DatasetIterator, cfg: DataConfig, tokenizer: Tokenizer,
               mesh: Mesh | None, process_count: int):
    super().__init__(local)
    self._mesh, self._global_rows = mesh, cfg.batch_size
    # What fixes the stream; raw text and the cache give the same one, so cache_dir is not here.
    self._pipeline = {"sources": [[s.name, s.weight] for s in cfg.sources], "seed": cfg.seed,
                      "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
                      "num_epochs": cfg.num_epochs, "targets": cfg.targets,
                      "eval_fraction": cfg.eval_fraction,
                      "process_count": process_count, "tokenizer_sha256": tokenizer.sha256}
    if cfg.host_split == "rows":  # one stream, whatever the process count
      self._pipeline.update(process_count=1, host_split="rows")

  def __next__(self) -> dict[str, Any]:
    batch = next(self._parent)
    if self._mesh is None:
      return batch
    return {k: jax.make_array_from_process_local_data(
        batch_sharding(self._mesh, v.ndim), v, (self._global_rows, *v.shape[1:]))
            for k, v in batch.items()}

  def get_state(self) -> dict[str, Any]:
    return {"pipeline": self._pipeline, "grain": self._parent.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    saved = state.get("pipeline", {})
    for key, value in self._pipeline.items():
      if _restore_tuples(saved.get(key)) != _restore_tuples(value):
        where = "data" if key != "process_count" else "processes"
        raise DharaError(f"data iterator state: saved with {where}.{key}={saved.get(key)!r}, "
                         f"this run has {value!r}; it cannot resume that stream exactly")
    self._parent.set_state(_restore_tuples(state["grain"]))


def make_train_iterator(cfg: DataConfig, mesh: Mesh | None = None, *,
                        tokenizer: Tokenizer | None = None, process_index: int | None = None,
                        process_count: int | None = None, split: str = "train") -> TrainIterator:
  """The training batches of `cfg` for this process.

  Each batch is {tokens, segment_ids, positions: [B, L] int32, source: [B] int32 (index into
  cfg.sources)}, plus {targets: [B, L] int32, target_mask: [B, L] bool} with `data.targets`.
  With a mesh, every value is a global jax.Array (batch over data × fsdp); process_index and
  process_count then default to JAX's. Without one, the values are this process's numpy rows
  (process_index / process_count may simulate other hosts). `split="eval"` reads the held-out
  documents instead (see `make_eval_iterator`).
  """
  if split not in SPLITS:
    raise ConfigError(f"split {split!r} is not one of {', '.join(SPLITS)}")
  tokenizer = tokenizer or load_tokenizer(cfg.tokenizer)
  if mesh is not None:
    if (process_index, process_count) not in ((None, None),
                                              (jax.process_index(), jax.process_count())):
      raise ConfigError("make_train_iterator: with a mesh, process_index/process_count must be "
                        "JAX's own")
    process_index, process_count = jax.process_index(), jax.process_count()
    check_rows_per_process(mesh)
    dp = batch_shards(mesh)
    if cfg.batch_size % dp:
      raise ConfigError(f"data.batch_size: {cfg.batch_size} rows do not split over "
                        f"data × fsdp = {dp} devices")
  process_index = 0 if process_index is None else process_index
  process_count = 1 if process_count is None else process_count
  local = iter(host_dataset(cfg, tokenizer, process_index, process_count, split))
  return TrainIterator(local, cfg, tokenizer, mesh, process_count)


def make_eval_iterator(cfg: DataConfig, mesh: Mesh | None = None, *,
                       tokenizer: Tokenizer | None = None) -> TrainIterator:
  """Batches of the held-out documents, mixed like training. Every call starts the same
  stream, so each evaluation sees the same batches."""
  return make_train_iterator(cfg, mesh, tokenizer=tokenizer, split="eval")
