"""Data pipeline: sources -> tokenizer -> packing -> mixture by token share -> global batches.

The training loop needs only:

  from data_pipeline import make_train_iterator, load_tokenizer, check_tokenizer_fits

Names are imported on first use, so `import data_pipeline` (done by `dhara_jax.config` for the
`data:` section) stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DataConfig": "data_pipeline.config", "SourceConfig": "data_pipeline.config",
    "make_train_iterator": "data_pipeline.iterator", "TrainIterator": "data_pipeline.iterator",
    "make_eval_iterator": "data_pipeline.iterator",
    "host_dataset": "data_pipeline.iterator",
    "Tokenizer": "data_pipeline.tokenizer", "load_tokenizer": "data_pipeline.tokenizer",
    "train_tokenizer": "data_pipeline.tokenizer_training",
    "check_tokenizer_fits": "data_pipeline.tokenizer",
    "prepare": "data_pipeline.cache", "open_source": "data_pipeline.sources",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
