"""`dhara plot RUN_DIR`: loss / held-out loss (and diffusion loss, conversion stages) and
learning-rate curves as PNG."""

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
  diffusion = [r for r in rows if "diffusion_loss" in r]
  if diffusion and any(r["diffusion_loss"] != r.get("eval_loss") for r in diffusion):
    ax_loss.plot([r["step"] for r in diffusion], [r["diffusion_loss"] for r in diffusion], "s-",
                 label="held-out diffusion (mdm ELBO)")
  for step, stage in _stage_starts(trained):  # a conversion's warmup / stable / decay blocks
    ax_loss.axvline(step - 0.5, color="grey", linewidth=0.5)
    ax_loss.annotate(stage, (step, 1.0), xycoords=("data", "axes fraction"), fontsize=7,
                     rotation=90, va="top")
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


def _stage_starts(rows: list[dict]) -> list[tuple[int, str]]:
  """(first step, `phase@block_size`) of each stage of a run whose rows name them."""
  starts, previous = [], None
  for r in rows:
    stage = f"{r['phase']}@{r['block_size']}" if "phase" in r else None
    if stage is not None and stage != previous:
      starts.append((r["step"], stage))
    previous = stage
  return starts
