"""Hub datasets: downloaded once into `data.hub_cache` when a source names one (needs network).

Tests never call this; a source whose files are already in the cache never reaches it.
"""

from __future__ import annotations

from pathlib import Path

from dhara_jax.errors import DharaError

PATTERNS = ["*.parquet", "**/*.parquet", "*.jsonl", "**/*.jsonl", "*.jsonl.gz", "**/*.jsonl.gz"]


def download(repo_id: str, local_dir: Path) -> Path:
  """The data files of Hub dataset `repo_id`, fetched into `local_dir` (resumable)."""
  try:
    from huggingface_hub import snapshot_download
  except ImportError:
    raise DharaError(f"hub: {repo_id} is not in {local_dir} and huggingface_hub is not "
                     "installed (pip install 'dhara-jax[hub]')") from None
  try:
    snapshot_download(repo_id=repo_id, repo_type="dataset", local_dir=str(local_dir),
                      allow_patterns=PATTERNS)
  except Exception as e:  # network, auth, missing repo: all end the run the same way
    raise DharaError(f"hub: cannot download {repo_id} into {local_dir} "
                     f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
  return local_dir
