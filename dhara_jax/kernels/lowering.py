"""Whether a kernel compiles on this backend, so that callers can fall back instead of failing."""

from __future__ import annotations

import logging
from typing import Any, Callable

import jax

from dhara_jax.errors import ConfigError

_log = logging.getLogger(__name__)
_warned: set[str] = set()


def compiles(fn: Callable, specs: tuple[Any, ...], *, kernel: str, fallback: str) -> bool:
  """Whether jit(fn) lowers and compiles for these argument specs on the default backend.

  When it does not, logs one warning per `kernel` (e.g. "canon conv: pallas_gpu") saying that
  `fallback` runs instead. Callers cache the answer per shape: this compiles every time.
  """
  try:
    jax.jit(fn).lower(*specs).compile()
    return True
  except ConfigError:
    raise
  except Exception as err:  # Lowering errors come from Pallas, Mosaic, Triton or XLA alike.
    if kernel not in _warned:
      _warned.add(kernel)
      reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
      _log.warning("%s does not lower on %s (%s); using the %s path", kernel,
                   jax.default_backend(), reason, fallback)
    return False
