"""Documents (token ids) -> fixed-length rows with segment ids and positions.

grain's `ConcatThenSplitIterDataset` concatenates the document stream and cuts it every
`row_len` tokens: no padding while the stream lasts, a document cut at a row end continues in
the next row (positions restart there). Segment ids count documents within a row from 1;
0 is padding, which only the last row of a finite stream has.
"""

from __future__ import annotations

import grain
import numpy as np

FEATURE = "tokens"


def with_eos(ids: np.ndarray, eos_id: int) -> dict[str, np.ndarray]:
  return {FEATURE: np.append(ids, np.int32(eos_id))}


def pack(docs: grain.IterDataset, row_len: int) -> grain.IterDataset:
  """`docs` yields {'tokens': ids + EOS}; the result yields tokens / segment_ids / positions."""
  packed = grain.experimental.ConcatThenSplitIterDataset(docs, length_struct={FEATURE: row_len})
  return packed.map(_rename)


def _rename(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {"tokens": row[FEATURE], "segment_ids": row[f"{FEATURE}_segment_ids"],
          "positions": row[f"{FEATURE}_positions"]}


def split_targets(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Rows of L + 1 tokens -> inputs and next-token targets of L tokens each.

  `target_mask` is true where the target continues the input's document: it drops padding and
  the step from a document's EOS into the next document.
  """
  seg_BxL1 = batch["segment_ids"]
  out = {k: v[:, :-1] for k, v in batch.items() if k in ("tokens", "segment_ids", "positions")}
  out["targets"] = batch["tokens"][:, 1:]
  out["target_mask"] = (seg_BxL1[:, 1:] == seg_BxL1[:, :-1]) & (seg_BxL1[:, :-1] > 0)
  return {**batch, **out}
