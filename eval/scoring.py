"""JAX scorers behind lm-eval's `loglikelihood`: log p(continuation | context) of an AR model,
and the Monte-Carlo ELBO of a masked-diffusion model (LLaDA's estimator).

Both take token pairs (context, continuation) and return (log-likelihood, is_greedy) per pair.
Rows are padded to a few bucket lengths (powers of two up to the model's context) and batched
to a token budget with a fixed number of rows per bucket, so a whole evaluation compiles a
handful of programs; the batch is cut over the mesh's batch axes when there are several
devices. Truncation follows lm-eval's HFLM: (context + continuation) keeps its last
`max_seq_len + 1` tokens, so a too-long context loses its beginning.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dhara_jax.config import MeshConfig, ModelConfig
from dhara_jax.errors import DharaError
from dhara_jax.phases import Phase

Pair = tuple[Sequence[int], Sequence[int]]  # (context tokens, continuation tokens)
Score = tuple[float, bool]  # (log-likelihood, is_greedy)
MIN_BUCKET = 16
CANDIDATES = 8  # single-token continuations of one context scored from one row
DEFAULT_BATCH_TOKENS = 8192
DEFAULT_MC_SAMPLES = 128  # LLaDA's mc_num


def buckets(max_len: int) -> list[int]:
  """Row lengths: powers of two from MIN_BUCKET, and the model's context itself."""
  sizes, size = [], MIN_BUCKET
  while size < max_len:
    sizes.append(size)
    size *= 2
  return sizes + [max_len]


def bucket_of(length: int, max_len: int) -> int:
  return next(b for b in buckets(max_len) if b >= length)


def rows_per_batch(length: int, batch_tokens: int, shards: int) -> int:
  """Rows of one batch of `length`-token rows: a power of two within the token budget, at
  least one per batch shard."""
  rows = 1
  while rows * 2 * length <= batch_tokens:
    rows *= 2
  return max(rows, shards) // shards * shards


@dataclasses.dataclass
class Row:
  """One model input row and what to read off it."""

  tokens: list[int]
  owners: list[int]  # request indices this row scores
  payload: Any = None  # scorer-specific: targets / candidates / mask weights
  shared: bool = False  # AR: single-token continuations of one input, one candidate each


class Batcher:
  """Rows grouped by bucket length into fixed-shape batches, on the mesh."""

  def __init__(self, cfg: ModelConfig, batch_tokens: int, mesh: Any):
    self.cfg, self.batch_tokens, self.mesh = cfg, batch_tokens, mesh
    from dhara_jax.sharding import batch_shards

    self.shards = batch_shards(mesh)

  def batches(self, rows: list[Row], width: Callable[[Row], int]
              ) -> Iterator[tuple[int, list[Row]]]:
    """(bucket length, rows) in batches of a fixed row count per bucket, longest first (a
    first batch that does not fit in memory fails at once)."""
    by_bucket: dict[int, list[Row]] = {}
    for row in rows:
      by_bucket.setdefault(bucket_of(width(row), self.cfg.max_seq_len), []).append(row)
    for length in sorted(by_bucket, reverse=True):
      group = by_bucket[length]
      count = rows_per_batch(length, self.batch_tokens, self.shards)
      for start in range(0, len(group), count):
        yield length, group[start:start + count]

  def rows_for(self, length: int) -> int:
    return rows_per_batch(length, self.batch_tokens, self.shards)

  def put(self, *arrays: np.ndarray) -> list[jax.Array]:
    from dhara_jax.sharding import batch_sharding

    return [jax.device_put(a, batch_sharding(self.mesh, a.ndim)) for a in arrays]


def eval_mesh(devices: Sequence[Any] | None = None) -> Any:
  """All devices on the batch axis: scoring is data parallel (a 70M model fits anywhere)."""
  from dhara_jax.sharding import make_mesh

  return make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1), devices)


def replicated(cfg: ModelConfig, params: Any, mesh: Any) -> Any:
  from dhara_jax.sharding import param_shardings

  return jax.device_put(params, param_shardings(cfg, mesh))


def truncated(context: Sequence[int], continuation: Sequence[int], max_len: int
              ) -> tuple[list[int], int]:
  """HFLM's input: (context + continuation)[-(max_len + 1):], and how many of its last tokens
  are the continuation's."""
  if not continuation:
    raise DharaError("eval: a request has an empty continuation")
  whole = [*context, *continuation][-(max_len + 1):]
  return whole, min(len(continuation), len(whole) - 1)


class ARScorer:
  """log p(continuation | context) of a causal model: each request in one forward; requests
  whose continuation is one token and whose inputs are equal share a row (MMLU's " A".." D")."""

  def __init__(self, cfg: ModelConfig, params: Any, *, mesh: Any = None,
               batch_tokens: int = DEFAULT_BATCH_TOKENS, pad_id: int = 0,
               progress: Callable[[int], None] | None = None):
    self.cfg, self.pad_id, self.progress = cfg, pad_id, progress
    self.mesh = mesh if mesh is not None else eval_mesh()
    self.batcher = Batcher(cfg, batch_tokens, self.mesh)
    self.params = replicated(cfg, params, self.mesh)
    self._step = jax.jit(functools.partial(_ar_scores, cfg))

  def rows(self, pairs: Sequence[Pair]) -> list[Row]:
    rows, shared = [], {}
    for i, (context, continuation) in enumerate(pairs):
      whole, n = truncated(context, continuation, self.cfg.max_seq_len)
      inputs = whole[:-1]
      if n == 1:  # the row is the input alone; its last position is read for the target
        key = tuple(inputs)
        row = shared.get(key)
        if row is None or len(row.owners) == CANDIDATES:
          row = shared[key] = Row(inputs, [], [], shared=True)
          rows.append(row)
        row.owners.append(i)
        row.payload.append(whole[-1])
      else:
        rows.append(Row(inputs, [i], whole[-n:]))
    return rows

  def score(self, pairs: Sequence[Pair]) -> list[Score]:
    out: list[Score | None] = [None] * len(pairs)
    rows = self.rows(pairs)
    for length, batch in self.batcher.batches(rows, lambda r: len(r.tokens)):
      count = self.batcher.rows_for(length)
      tokens = np.full((count, length), self.pad_id, np.int32)
      targets = np.zeros((count, length), np.int32)
      last = np.zeros((count,), np.int32)
      candidates = np.zeros((count, CANDIDATES), np.int32)
      for r, row in enumerate(batch):
        tokens[r, :len(row.tokens)] = row.tokens
        last[r] = len(row.tokens) - 1
        if not row.shared:
          n = len(row.payload)
          targets[r, len(row.tokens) - n:len(row.tokens)] = row.payload
        else:
          candidates[r, :len(row.payload)] = row.payload
      from dhara_jax.sharding import axis_rules

      with jax.set_mesh(self.mesh), axis_rules():
        logp, greedy, cand_logp, cand_greedy = map(np.asarray, self._step(
            self.params, *self.batcher.put(tokens, targets, last, candidates)))
      for r, row in enumerate(batch):
        if not row.shared:
          n, end = len(row.payload), len(row.tokens)
          out[row.owners[0]] = (float(logp[r, end - n:end].sum()),
                                bool(greedy[r, end - n:end].all()))
        else:
          for k, owner in enumerate(row.owners):
            out[owner] = (float(cand_logp[r, k]), bool(cand_greedy[r, k]))
      if self.progress:
        self.progress(sum(len(row.owners) for row in batch))
    return out  # type: ignore[return-value]


def _ar_scores(cfg: ModelConfig, params: Any, tokens_BxL: jax.Array, targets_BxL: jax.Array,
               last_B: jax.Array, candidates_BxK: jax.Array):
  """Per position: log p(target at t | tokens ≤ t) and whether it is the argmax; at each row's
  `last` position the same for K candidate tokens."""
  from dhara_jax.model import forward

  logits_BxLxV, _ = forward(cfg, params, tokens_BxL)
  logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
  best_BxL = jnp.argmax(logp_BxLxV, axis=-1)
  logp_BxL = jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  at_last_BxV = jnp.take_along_axis(logp_BxLxV, last_B[:, None, None], axis=1)[:, 0]
  cand_logp_BxK = jnp.take_along_axis(at_last_BxV, candidates_BxK, axis=-1)
  best_B = jnp.take_along_axis(best_BxL, last_B[:, None], axis=1)
  return logp_BxL, best_BxL == targets_BxL, cand_logp_BxK, best_B == candidates_BxK
