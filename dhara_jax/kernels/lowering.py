"""How Pallas kernels run: compiled (if they lower on this backend; else callers fall back) or
interpreted (CPU tests)."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import jax

from dhara_jax.errors import ConfigError

INTERPRET_ENV_VAR = "DHARA_PALLAS_INTERPRET"

_log = logging.getLogger(__name__)
_warned: set[str] = set()


def interpret_requested(interpret: bool | None) -> bool:
  """`interpret` if given, else whether $DHARA_PALLAS_INTERPRET is "1"."""
  return os.environ.get(INTERPRET_ENV_VAR) == "1" if interpret is None else interpret


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
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    warn_once(kernel, "%s does not lower on %s (%s); using the %s path", kernel,
              jax.default_backend(), reason, fallback)
    return False


def warn_once(key: str, message: str, *args: Any) -> None:
  """Logs `message % args` as a warning the first time `key` is seen in this process: a
  fallback taken at every trace should say so once."""
  if key not in _warned:
    _warned.add(key)
    _log.warning(message, *args)
