"""A TFDS builder that stores one configured source as an `array_record` dataset.

`dhara data tfds` writes it; a source with `format: tfds` reads it back through
`tfds.builder_from_directory(...).as_data_source()`. Neither step needs TensorFlow. TFDS orders
records by a hash of their key, so record order differs from the input's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import tensorflow_datasets as tfds

from data_pipeline.config import DataConfig
from data_pipeline.sources import open_source
from dhara_jax.errors import DharaError


class DharaText(tfds.core.GeneratorBasedBuilder):
  """Documents as records with one `text` feature, split `train`."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, documents: Callable[[], Iterable[str]] | None = None, **kwargs):
    self._documents = documents
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description="Documents of one dhara-jax data source.",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for key, text in enumerate(self._documents()):
      yield key, {"text": text}


def build_tfds(cfg: DataConfig, index: int, out_dir: str | Path) -> Path:
  """Writes source `index` under out_dir/<name>/; returns the dataset's version folder
  (an existing complete dataset there is kept: delete it to rebuild)."""
  src = open_source(cfg, index)

  def documents() -> Iterable[str]:
    for k in range(len(src.units)):
      for text, _ in src.read_unit(k):
        yield text

  data_dir = Path(out_dir) / cfg.sources[index].name
  try:
    data_dir.mkdir(parents=True, exist_ok=True)  # TFDS's own failure here is a traceback
  except OSError as e:
    raise DharaError(f"data tfds: cannot create {data_dir} ({e.strerror or e})") from None
  builder = DharaText(documents=documents, data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return Path(builder.data_dir)
