"""JAX's persistent compilation cache for every `dhara` command: a program compiled once on
this machine is read back from disk by later commands (a resumed run, each `dhara eval`, a
study's cells, every process of a multi-host job) instead of being compiled again.

Set through JAX's own environment variables, which JAX reads when it is imported; a value
the user set wins. The size bound also makes JAX lock the cache while it reads or writes an
entry, so two processes never see a half-written one. DHARA_COMPILE_CACHE=0 turns it off.
"""

from __future__ import annotations

import os
from typing import MutableMapping

DEFAULT_DIR = "~/.cache/dhara/jax"
DEFAULT_MAX_BYTES = 4 * 2**30


def enable(env: MutableMapping[str, str] = os.environ) -> None:
  """Points JAX at the cache (call before JAX is imported)."""
  if env.get("DHARA_COMPILE_CACHE", "1").strip().lower() in ("0", "false", "off"):
    return
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser(DEFAULT_DIR))
  env.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(DEFAULT_MAX_BYTES))
