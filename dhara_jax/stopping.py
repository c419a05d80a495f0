"""Stopping a run cleanly: stop signals, and waits for data that are bounded and interruptible.

SIGTERM (a preemption notice, a scheduler's kill) and SIGINT (Ctrl-C) ask the loop to stop.
During a step the request is noted and the loop checkpoints that step when it ends; while the
loop waits for data (a pipeline that may be stuck) the wait ends at once. A second signal gets
the default action (SIGTERM kills, SIGINT raises KeyboardInterrupt). A wait for data that sees no
batch within its timeout ends too: every wait is bounded.

In a job of several processes a signal reaches one process (or each at another moment), but
all of them must stop after the same step to save it together: SIGTERM goes to JAX's
preemption notifier (installed by `jax.distributed.initialize`), SIGINT is passed to it as a
SIGTERM, and every process asks JAX's preemption sync point at every step whether the job
stops there. Waits for data are then cut by their timeout only (a wait cut on one process
alone would leave the others waiting for it in the next step).

Every other command (and train or convert outside their loop) ends at a stop signal by raising
`Stopped` (`stops_end_command`), which the CLI reports in one line; what it was writing is left
as it was, since every write is whole or nothing (files.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterator, NoReturn

from dhara_jax import distributed
from dhara_jax.errors import DharaError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class WaitEnded(BaseException):
  """Ends a wait for data. A BaseException, like KeyboardInterrupt, so that no `except
  Exception` inside the data pipeline can swallow it."""


class Stopped(BaseException):
  """A stop signal ends the command. A BaseException, like KeyboardInterrupt, so that no
  `except Exception` on the way up can swallow it."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum, self.signal = signum, signal.Signals(signum).name


# How long the main thread has to take a `Stopped` to the CLI before the process ends anyway.
STOP_GRACE_S = 3.0


@contextlib.contextmanager
def stops_end_command(end: Callable[[Stopped], NoReturn]) -> Iterator[None]:
  """Within the block SIGTERM and SIGINT raise `Stopped` in the main thread, for the caller to
  catch and pass to `end` (which reports it and ends the process); a second signal gets the
  previous action (SIGTERM kills). A run's loop installs `StopSignals` inside the block, to
  checkpoint its step first; JAX's preemption notifier, installed later by a job of several
  processes, takes SIGTERM over.

  Python drops an exception raised where it runs a garbage-collector callback or a __del__
  (after passing it to sys.unraisablehook, which then calls `end`), and runs no handler while
  the main thread is inside a long native call (an XLA compile): a watchdog thread calls `end`
  itself if the process still runs STOP_GRACE_S later."""
  if threading.current_thread() is not threading.main_thread():  # no signals reach others
    yield
    return
  # A signal ignored by whoever started us (nohup, a background job's SIGINT) stays ignored;
  # None: a handler installed outside Python, which has the default action when ours goes.
  previous = {s: signal.SIG_DFL if h is None else h
              for s in SIGNALS if (h := signal.getsignal(s)) != signal.SIG_IGN}

  def stop(signum: int, frame) -> None:
    for s, handler in previous.items():
      signal.signal(s, handler)
    stopped = Stopped(signum)
    watchdog = threading.Timer(STOP_GRACE_S, end, (stopped,))
    watchdog.daemon = True
    watchdog.start()
    raise stopped

  def dropped(unraisable) -> None:
    if isinstance(unraisable.exc_value, Stopped):
      end(unraisable.exc_value)
    hook(unraisable)

  hook, sys.unraisablehook = sys.unraisablehook, dropped
  for s in previous:
    signal.signal(s, stop)
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    if sys.unraisablehook is dropped:  # else a hook set over ours (orbax_quiet's) calls it
      sys.unraisablehook = hook


class DataStop(DharaError):
  """The loop cannot have its next batch: the data failed, ran out or stalled, or a stop
  signal came while it waited. `signal` names that signal, if one did; `stuck` says the wait
  was cut short, so the pipeline's reader threads may never end (the CLI exits without
  joining them)."""

  def __init__(self, message: str, signal_name: str | None = None, stuck: bool = False):
    super().__init__(message)
    self.signal, self.stuck = signal_name, stuck


class StopSignals:
  """Installs the stop handlers for its lifetime (main thread only). `several`: the run is
  one process of several, which stop together at JAX's preemption sync point."""

  def __init__(self, enabled: bool = True, several: bool = False):
    # Python runs signal handlers in the main thread only: elsewhere waits cannot be bounded.
    self.main_thread = threading.current_thread() is threading.main_thread()
    self.enabled = enabled and self.main_thread
    self.several = several and distributed.preemption_sync_available()
    self.received: str | None = None  # the name of the first stop signal
    self._waiting = False
    self._previous: dict[int, object] = {}

  def __enter__(self) -> "StopSignals":
    if self.several:  # SIGTERM stays JAX's; SIGINT becomes one
      if self.enabled:
        self._previous = {signal.SIGINT: signal.signal(signal.SIGINT, self._to_jax)}
    elif self.enabled:
      self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def requested(self, step: int) -> bool:
    """Whether the run stops after `step` (asked once per step, by every process)."""
    if self.several:
      if distributed.stop_requested(step):
        self.received = "SIGTERM or SIGINT on one of the processes"
      return self.received is not None
    return self.received is not None

  def _to_jax(self, signum: int, frame) -> None:
    signal.signal(signum, self._previous[signum])  # a second Ctrl-C interrupts at once
    os.kill(os.getpid(), signal.SIGTERM)

  def _handle(self, signum: int, frame) -> None:
    self.received = signal.Signals(signum).name
    signal.signal(signum, self._previous[signum])  # a second signal is not ours to soften
    if self._waiting:
      raise WaitEnded(f"{self.received} came while waiting for data")

  @contextlib.contextmanager
  def waiting(self, timeout_s: float, what: str) -> Iterator[None]:
    """A wait for `what` that a stop signal, or `timeout_s` seconds without an end, ends by
    raising WaitEnded inside it."""
    if self.received is not None and not self.several:
      raise WaitEnded(f"{self.received} came while waiting for data")
    if not self.main_thread:
      yield
      return

    def expire(signum, frame):
      raise WaitEnded(f"no {what} came within data.wait_timeout_s={timeout_s:g} s; the data "
                      "pipeline is stuck (a slow or hung file system, or a source that yields "
                      "nothing)")

    previous_alarm = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    self._waiting = True
    try:
      yield
    finally:
      self._waiting = False
      signal.setitimer(signal.ITIMER_REAL, 0)
      signal.signal(signal.SIGALRM, previous_alarm)


def next_batch(batches: Iterator[dict], signals: StopSignals, timeout_s: float, what: str,
               ran_out: str) -> dict:
  """The next batch of `batches`, waiting at most `timeout_s`; every way the data can fail
  (a reader's error, the stream's end, a stall, a stop signal) is one DataStop."""
  try:
    with signals.waiting(timeout_s, what):
      return next(batches)
  except StopIteration:
    raise DataStop(f"data: {ran_out}") from None
  except WaitEnded as e:  # a stop signal's message names the signal, a stall's the data
    raise DataStop(str(e) if signals.received else f"data: {e}", signals.received,
                   stuck=True) from None
  except DharaError as e:  # a source's own one-line report (a bad record, a missing file)
    raise DataStop(str(e)) from None
  except Exception as e:  # a reader's unexpected error (a file that vanished, a bucket client)
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise DataStop(f"data: {type(e).__name__} while reading the {what}: {first}"[:500]) from None


class SavedPosition:
  """A data iterator's state taken earlier, saved by orbax in place of the live iterator's:
  after a failed read the live state may be past the batch that the saved train state needs
  next. (grain's checkpoint handler saves a non-grain iterator's `get_state()` bytes.)"""

  def __init__(self, state: Any):
    self._state = state

  def get_state(self) -> bytes:
    return json.dumps(self._state, indent=4).encode()
