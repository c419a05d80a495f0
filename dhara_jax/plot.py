"""`dhara plot RUN_DIR`: loss / held-out loss and learning-rate curves as PNG."""

from __future__ import annotations

from pathlib import Path

from dhara_jax.errors import DharaError
from dhara_jax.metrics import read_metrics


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  run_dir = Path(run_dir)
  if not (run_dir / "metrics.jsonl").is_file():
    raise DharaError(f"plot: {run_dir / 'metrics.jsonl'} not found")
  rows = read_metrics(run_dir)
  if not rows:
    raise DharaError(f"plot: {run_dir / 'metrics.jsonl'} has no rows yet")
  out = Path(out) if out else run_dir / "curves.png"
  fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
  trained = [r for r in rows if "loss" in r]  # step 0 holds only the held-out loss
  ax_loss.plot([r["step"] for r in trained], [r["loss"] for r in trained], label="train")
  evals = [r for r in rows if "eval_loss" in r]
  if evals:
    ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-",
                 label="held-out")
  ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title=run_dir.name)
  ax_loss.legend()
  ax_lr.plot([r["step"] for r in trained], [r["lr"] for r in trained])
  ax_lr.set(xlabel="step", ylabel="learning rate")
  fig.tight_layout()
  try:
    fig.savefig(out, dpi=100)
  except OSError as e:
    raise DharaError(f"plot: cannot write {out} ({e.strerror or e})") from None
  finally:
    plt.close(fig)
  return out
