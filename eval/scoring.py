"""JAX scorers behind lm-eval's `loglikelihood`: log p(continuation | context) of an AR model,
and the Monte-Carlo ELBO of a masked-diffusion model (LLaDA's estimator).

Both take token pairs (context, continuation) and return (log-likelihood, is_greedy) per pair.
Rows are padded to a few bucket lengths (powers of two up to the model's context; whole blocks
for a block-diffusion model) and batched up to a token budget; a batch holds the rows its
bucket has, rounded up to a power of two (times the mesh's batch shards), so a whole
evaluation compiles a handful of programs and computes little padding. The batch is cut over
the mesh's batch axes when there are several devices. Truncation follows lm-eval's HFLM:
(context + continuation) keeps its last `max_seq_len + 1` tokens, so a too-long context loses
its beginning.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dhara_jax.config import MeshConfig, ModelConfig
from dhara_jax.errors import DharaError

Pair = tuple[Sequence[int], Sequence[int]]  # (context tokens, continuation tokens)
Score = tuple[float, bool]  # (log-likelihood, is_greedy)
MIN_BUCKET = 16
CANDIDATES = 8  # single-token continuations of one context scored from one row
READ_BUCKET = 8  # the smallest number of positions a row's head reads
DEFAULT_BATCH_TOKENS = 8192
HEAD_FLOATS = 2**26  # a batch's logits at its reads (rows × reads × vocabulary): 256 MB float32
DEFAULT_MC_SAMPLES = 128  # LLaDA's mc_num
log = logging.getLogger(__name__)


def buckets(max_len: int, smallest: int = MIN_BUCKET, factor: int = 2) -> list[int]:
  """Static lengths: `smallest` times powers of `factor`, and `max_len` itself."""
  sizes, size = [], smallest
  while size < max_len:
    sizes.append(size)
    size *= factor
  return sizes + [max_len]


def bucket_of(length: int, max_len: int, smallest: int = MIN_BUCKET, factor: int = 2) -> int:
  return next(b for b in buckets(max_len, smallest, factor) if b >= length)


def whole_blocks(length: int, block: int) -> int:
  """`length` rounded up to whole blocks (unchanged without blocks, `block` 0)."""
  return -(-length // block) * block if block else length


def batch_rows(rows: int, cap: int, shards: int) -> int:
  """Rows of a batch holding `rows` rows: shards × a power of two, at most `cap` (a multiple of
  `shards`). Few counts (few programs), and past one row per shard, less than half of a batch
  is padding rows."""
  per_shard = 1
  while per_shard * shards < rows:
    per_shard *= 2
  return min(per_shard * shards, cap)


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
  payload: Any = None  # scorer-specific: the reads (position, target) / mask draws
  shared: bool = False  # AR: single-token continuations of one input, one read each


@dataclasses.dataclass
class Batch:
  """Rows of one static shape, and the row count they are padded to."""

  length: int  # tokens per row
  width: int  # reads per row
  count: int  # rows of the padded batch (≥ len(rows))
  rows: list[Row]


class Batcher:
  """Rows grouped by static shape into batches on the mesh. A block-diffusion model (`block`
  > 0) gets rows of whole blocks, at most its context rounded down to whole blocks."""

  def __init__(self, cfg: ModelConfig, batch_tokens: int, mesh: Any, block: int = 0):
    from dhara_jax.sharding import batch_shards

    self.cfg, self.batch_tokens, self.mesh = cfg, batch_tokens, mesh
    self.shards = batch_shards(mesh)
    self.max_len = cfg.max_seq_len // block * block if block else cfg.max_seq_len
    if self.max_len < 1:
      raise DharaError(f"eval: the model's block size {block} is longer than its context "
                       f"{cfg.max_seq_len}")
    # The smallest bucket (max_len puts every row in the longest: the tests' reference).
    self.smallest = min(whole_blocks(MIN_BUCKET, block), self.max_len)

  def shape(self, length: int, reads: int) -> tuple[int, int]:
    """(row length, reads per row) buckets: the head runs on the reads only."""
    row = bucket_of(length, self.max_len, self.smallest)
    # Reads in steps of 4×: the head is cheap next to the trunk, a compile is not.
    return row, bucket_of(reads, row, READ_BUCKET, factor=4)

  def batches(self, rows: list[Row], shape: Callable[[Row], tuple[int, int]]
              ) -> Iterator[Batch]:
    """Batches of at most `rows_for` rows, longest first (a first batch that does not fit in
    memory fails at once)."""
    by_shape: dict[tuple[int, int], list[Row]] = {}
    for row in rows:
      by_shape.setdefault(shape(row), []).append(row)
    for key in sorted(by_shape, reverse=True):
      group, cap = by_shape[key], self.rows_for(key)
      for start in range(0, len(group), cap):
        chunk = group[start:start + cap]
        yield Batch(*key, batch_rows(len(chunk), cap, self.shards), chunk)

  def rows_for(self, shape: tuple[int, int]) -> int:
    """The most rows of a batch of (row length, reads) `shape`: the token budget's, halved
    while the head's logits would pass HEAD_FLOATS — with a real vocabulary (SmolLM2's 49,152)
    short rows at the token budget would hold GBs of logits."""
    length, reads = shape
    rows = rows_per_batch(length, self.batch_tokens, self.shards)
    while (rows * reads * self.cfg.vocab_size > HEAD_FLOATS and rows // 2 >= self.shards
           and rows // 2 % self.shards == 0):
      rows //= 2
    return rows

  def put(self, *arrays: np.ndarray) -> list[jax.Array]:
    from dhara_jax.sharding import batch_sharding

    return [jax.device_put(a, batch_sharding(self.mesh, a.ndim)) for a in arrays]


def eval_mesh(devices: Sequence[Any] | None = None) -> Any:
  """All devices on the batch axis: scoring is data parallel (a 70M model fits anywhere)."""
  from dhara_jax.sharding import make_mesh

  return make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1), devices)


def gathered(mesh: Any) -> Any:
  """Scores come back replicated: every process of a job reads all of them (each device
  scored its rows)."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def replicated(cfg: ModelConfig, params: Any, mesh: Any) -> Any:
  from dhara_jax.model import param_shardings

  return jax.device_put(params, param_shardings(cfg, mesh))


def truncated(context: Sequence[int], continuation: Sequence[int], max_len: int
              ) -> tuple[list[int], int]:
  """HFLM's input: (context + continuation)[-(max_len + 1):], and how many of its last tokens
  are the continuation's."""
  if not continuation:
    raise DharaError("eval: a request has an empty continuation")
  whole = [*context, *continuation][-(max_len + 1):]
  return whole, min(len(continuation), len(whole) - 1)


def warn_cut(cut: int, total: int, max_len: int) -> None:
  """Continuations longer than the context are scored on their last tokens only (lm-eval's
  HFLM stops with an AssertionError on them); say how many."""
  if cut:
    log.warning("eval: %d of %d continuations are longer than the model's context (%d "
                "tokens); each is scored on its last tokens only", cut, total, max_len)


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
    self._step = jax.jit(functools.partial(_ar_scores, cfg),
                         out_shardings=gathered(self.mesh))

  def rows(self, pairs: Sequence[Pair]) -> list[Row]:
    """Rows with their reads (position, target): a continuation's positions, or one read at
    the last position per request sharing the row."""
    rows, shared, cut = [], {}, 0
    for i, (context, continuation) in enumerate(pairs):
      whole, n = truncated(context, continuation, self.cfg.max_seq_len)
      cut += n < len(continuation)
      inputs = whole[:-1]
      end = len(inputs)
      if n == 1:  # the row is the input alone; its last position is read for the target
        key = tuple(inputs)
        row = shared.get(key)
        if row is None or len(row.owners) == CANDIDATES:
          row = shared[key] = Row(inputs, [], [], shared=True)
          rows.append(row)
        row.owners.append(i)
        row.payload.append((end - 1, whole[-1]))
      else:
        rows.append(Row(inputs, [i], [(t, whole[t + 1]) for t in range(end - n, end)]))
    warn_cut(cut, len(pairs), self.cfg.max_seq_len)
    return rows

  def score(self, pairs: Sequence[Pair]) -> list[Score]:
    from dhara_jax.sharding import axis_rules

    out: list[Score | None] = [None] * len(pairs)
    rows = self.rows(pairs)
    shape = lambda row: self.batcher.shape(len(row.tokens), len(row.payload))  # noqa: E731
    for batch in self.batcher.batches(rows, shape):
      tokens = np.full((batch.count, batch.length), self.pad_id, np.int32)
      where = np.zeros((batch.count, batch.width), np.int32)
      targets = np.zeros((batch.count, batch.width), np.int32)
      for r, row in enumerate(batch.rows):
        tokens[r, :len(row.tokens)] = row.tokens
        where[r, :len(row.payload)], targets[r, :len(row.payload)] = zip(*row.payload)
      with jax.set_mesh(self.mesh), axis_rules():
        logp, greedy = map(np.asarray, self._step(
            self.params, *self.batcher.put(tokens, where, targets)))
      for r, row in enumerate(batch.rows):
        n = len(row.payload)
        if row.shared:
          for k, owner in enumerate(row.owners):
            out[owner] = (float(logp[r, k]), bool(greedy[r, k]))
        else:
          out[row.owners[0]] = (float(logp[r, :n].sum()), bool(greedy[r, :n].all()))
      if self.progress:
        self.progress(sum(len(row.owners) for row in batch.rows))
    return out  # type: ignore[return-value]


def _ar_scores(cfg: ModelConfig, params: Any, tokens_BxL: jax.Array, where_BxW: jax.Array,
               targets_BxW: jax.Array) -> tuple[jax.Array, jax.Array]:
  """At W positions per row: log p(target | tokens up to that position) and whether the
  target is the argmax. The head runs on those positions only: on a small model it costs as
  much as the trunk."""
  from dhara_jax.model import forward_hidden

  hidden_BxLxD, _ = forward_hidden(cfg, params, tokens_BxL)
  return read_log_probs(cfg, params, hidden_BxLxD, where_BxW, targets_BxW)


def read_log_probs(cfg: ModelConfig, params: Any, hidden_BxLxD: jax.Array,
                   where_BxW: jax.Array, targets_BxW: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """log-softmax of the head at `where`, at `targets`, and whether each target is the argmax."""
  from dhara_jax.model import apply_head

  read_BxWxD = jnp.take_along_axis(hidden_BxLxD, where_BxW[..., None], axis=1)
  logp_BxWxV = jax.nn.log_softmax(apply_head(cfg, params, read_BxWxD), axis=-1)
  logp_BxW = jnp.take_along_axis(logp_BxWxV, targets_BxW[..., None], axis=-1)[..., 0]
  # The target is the argmax iff nothing beats it (XLA:CPU's argmax is several times slower).
  return logp_BxW, logp_BxW >= jnp.max(logp_BxWxV, axis=-1)
