"""Run metrics: RUN_DIR/metrics.jsonl (one JSON object per step) and TensorBoard scalars."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax

from dhara_jax.errors import DharaError

# Dense bf16 peak FLOP/s per device, for MFU. CPUs have no entry: MFU is reported as null there.
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
)


def peak_flops(device: jax.Device) -> float | None:
  kind = getattr(device, "device_kind", "")
  return next((peak for name, peak in PEAK_FLOPS if name.lower() in kind.lower()), None)


def mfu(flops_per_token: float, tokens_per_second: float) -> float | None:
  peak = peak_flops(jax.devices()[0])
  if peak is None:
    return None
  return flops_per_token * tokens_per_second / (peak * jax.device_count())


class MetricsWriter:
  """Appends one line per step. On resume from checkpoint step k, rows after k (written before
  the run was killed, and about to be recomputed) are dropped first; a run that starts from no
  checkpoint (resume_step None) drops every old row."""

  def __init__(self, run_dir: Path, resume_step: int | None, tensorboard: bool = True):
    self.path = Path(run_dir) / "metrics.jsonl"
    self._file = self._tb = None
    if jax.process_index() != 0:  # one writer per run, also on a shared file system
      return
    self._truncate_after(-1 if resume_step is None else resume_step)
    self._file = self.path.open("a")
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

  def _truncate_after(self, step: int) -> None:
    if not self.path.exists():
      return
    rows = read_metrics(self.path.parent) if step >= 0 else []
    kept = [row for row in rows if row["step"] <= step]
    tmp = self.path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
    os.replace(tmp, self.path)

  def write(self, row: dict[str, Any]) -> None:
    if self._file is None:
      return
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
          self._tb.add_scalar(key, value, row["step"])

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
  """The rows written so far. A last line without its newline is a row being written now, or
  one a killed run left half-written: it is not a row (yet)."""
  path = Path(run_dir) / "metrics.jsonl"
  rows = []
  for number, line in enumerate(path.read_text().split("\n")[:-1], start=1):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise DharaError(f"metrics: line {number} of {path} is not JSON ({e.msg}); mend or delete "
                       "that line") from None
    if not isinstance(rows[-1], dict) or "step" not in rows[-1]:
      raise DharaError(f"metrics: line {number} of {path} is not a row with a step")
  return rows
