"""Orbax's noise around a failed save or restore, dropped only while dhara's own orbax calls run.

A failed save or restore reaches dhara as one exception, which checkpoint.py reports in one line.
Orbax meanwhile logs the failure's traceback several times (from its writer threads too), warns
at every save without metrics when checkpoints are ranked by one, and leaves work behind that
reports itself when it ends or is collected: tensorstore's callbacks into a closed event loop
('Event loop is closed'), futures never retrieved, read and write coroutines that raise when
closed, writes created but never awaited. `quiet()` drops exactly those while it is entered
(nested, from any thread) and puts the process's logging filters, warnings filters and
unraisable hook back as they were when the last one leaves. After a call that failed,
`quiet_from_now()` keeps them dropped until the process ends: what the call abandoned reports
itself whenever tensorstore finishes it or the interpreter collects it, often at exit, after
the one-line error. Orbax has no option for any of it: it logs through absl's one logger and
reports leftovers through the interpreter's hooks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import warnings
from typing import Any, Iterator

# Where orbax logs a failed save's traceback before storing the exception for the caller (our
# save or wait), which reports it in one line: (module, function).
_SAVE_ERROR_LOG_SITES = {("future", "run"), ("async_checkpointer", "_thread_func"),
                         ("checkpoint_manager", "wait_until_finished"),
                         ("checkpoint_manager", "_finalize_checkpoint"),
                         ("checkpoint", "_write_and_log"), ("checkpoint", "_update_and_log")}
_NEVER_AWAITED = r"coroutine '\w*CheckpointHandler\.async_save' was never awaited"

_lock = threading.Lock()
_depth = 0  # how many quiet() are entered now
_previous_hook: Any = None  # the unraisable hook ours passes the rest to
_chained = False  # a hook set over ours while it was installed calls it: ours stays there
_never_awaited: tuple | None = None  # our entry in warnings.filters while installed
_failed = False  # an orbax call failed: quiet until the process ends


@contextlib.contextmanager
def quiet() -> Iterator[None]:
  """Orbax's noise (see the module doc) is dropped until this is left."""
  _enter()
  try:
    yield
  finally:
    _leave()


def quiet_from_now() -> None:
  """Orbax's noise is dropped until the process ends (once an orbax call failed)."""
  global _failed
  with _lock:
    first, _failed = not _failed, True
  if first:
    _enter()  # and never left


def _enter() -> None:
  global _depth
  with _lock:
    if _depth == 0:
      _install()
    _depth += 1


def _leave() -> None:
  global _depth
  with _lock:
    _depth -= 1
    if _depth == 0:
      _uninstall()


def _orbax_noise(record: logging.LogRecord) -> bool:
  return "orbax" in record.pathname and (
      (record.exc_info and (record.module, record.funcName) in _SAVE_ERROR_LOG_SITES)
      or "did not provide metrics" in record.getMessage())


def _keep_absl(record: logging.LogRecord) -> bool:
  return not _orbax_noise(record)


def _keep_asyncio(record: logging.LogRecord) -> bool:
  return "exception was never retrieved" not in record.getMessage()


def _hook(unraisable: Any) -> None:
  error, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
  abandoned = ((isinstance(error, RuntimeError) and str(error) == "Event loop is closed")
               or (code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename))
  if not (_depth and abandoned):  # after _uninstall, a hook installed over ours still calls it
    (_previous_hook or sys.__unraisablehook__)(unraisable)


def _install() -> None:
  global _previous_hook, _never_awaited
  logging.getLogger("absl").addFilter(_keep_absl)
  logging.getLogger("asyncio").addFilter(_keep_asyncio)
  if not _chained:  # (left in a chain, ours runs already; set again, it would call itself)
    _previous_hook, sys.unraisablehook = sys.unraisablehook, _hook
  warnings.filterwarnings("ignore", _NEVER_AWAITED, RuntimeWarning)
  _never_awaited = warnings.filters[0]


def _uninstall() -> None:
  global _never_awaited, _chained
  logging.getLogger("absl").removeFilter(_keep_absl)
  logging.getLogger("asyncio").removeFilter(_keep_asyncio)
  if sys.unraisablehook is _hook:
    sys.unraisablehook = _previous_hook
  else:  # inactive, ours passes everything on to the hook it replaced
    _chained = True
  with contextlib.suppress(ValueError):  # someone reset the filters meanwhile
    warnings.filters.remove(_never_awaited)
  _never_awaited = None
