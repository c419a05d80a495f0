"""What the `dhara tokenizer ...` and `dhara data ...` commands do, given a loaded config."""

from __future__ import annotations

from pathlib import Path

from data_pipeline import cache
from data_pipeline.tokenizer import check_tokenizer_fits, load_tokenizer
from data_pipeline.tokenizer_training import train_tokenizer
from dhara_jax.config import Config


def tokenizer_train(cfg: Config) -> None:
  train_tokenizer(cfg.data, cfg.model)


def data_prepare(cfg: Config, progress: bool = True) -> dict:
  tokenizer = load_tokenizer(cfg.data.tokenizer)
  check_tokenizer_fits(tokenizer, cfg.model)
  return cache.prepare(cfg.data, tokenizer, progress=progress)


def data_tfds(cfg: Config, out_dir: str) -> list[Path]:
  from data_pipeline.tfds_text import build_tfds  # imports TFDS: slow, so only here

  built = []
  for i, s in enumerate(cfg.data.sources):
    built.append(build_tfds(cfg.data, i, out_dir))
    print(f"{s.name}: {built[-1]}  (use it as: path: {built[-1]}, format: tfds)")
  return built
