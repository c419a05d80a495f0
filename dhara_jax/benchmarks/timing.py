"""Timers shared by the benchmarks: a JAX call's mean time (compile once, warm up, block),
a call's first, warm-up and timed runs (medians are the caller's), the CPU share other processes
took meanwhile, and side-by-side timing of two sides in processes of their own.

A comparison runs each side in its own process and lets them take turns: in one process each
side's idle thread pools and heap slow the other down (torch's bf16 step measured 2.4 s alone
and 2.6–2.9 s after JAX steps in the same process here)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import resource
import time
import traceback
from typing import Any, Callable, NamedTuple

# Benchmark processes share one accelerator: JAX must not grab 75% of its memory when it
# starts a backend (which it does lazily, after these imports).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

# A first call slower than this (JAX's include compiles of up to ~15 s here): one timed call,
# no warm-up. On the quickstart models that is JAX's cache=none reference at B=64 (~60 s a
# call) and torch's diffusion peers at B=64; it keeps the default grid within ~15 minutes.
SLOW_CALL_SECONDS = 20.0


def in_own_process(fn: Callable[..., Any], *args: Any) -> Any:
  """fn(*args) in a spawned process (a fork would inherit JAX's threads)."""
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
    return pool.submit(fn, *args).result()


def seconds_per_call(fn: Callable[[], Any], steps: int, warmup: int = 1) -> float:
  """Mean wall time of fn() over `steps` calls after `warmup` calls; waits for JAX outputs."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  start = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def timed_calls(call: Callable[[], Any], runs: int, slow_seconds: float = SLOW_CALL_SECONDS
                ) -> tuple[Any, float, list[float], bool]:
  """(first result, seconds of the first call (it compiles), seconds of each timed call,
  whether a warm-up call preceded them). A call whose first run took over `slow_seconds`
  gets one timed call and no warm-up: at that length neither changes the time much, and the
  default grid must fit in its budget."""
  started = time.perf_counter()
  result = call()
  first = time.perf_counter() - started
  warmed = first <= slow_seconds
  if warmed:
    call()
  times = []
  for _ in range(runs if warmed else 1):
    started = time.perf_counter()
    call()
    times.append(time.perf_counter() - started)
  return result, first, times, warmed


class OtherCpu:
  """The share of the machine's CPU time that other processes (and, on a VM, the hypervisor:
  steal) took since construction, from /proc/stat less this process and its children."""

  def __init__(self):
    self.start = self._now()

  @staticmethod
  def _now() -> tuple[float, float, float] | None:
    try:
      with open("/proc/stat") as f:
        user, nice, system, _, _, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except (OSError, ValueError):  # not Linux
      return None
    own = [resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                resource.RUSAGE_CHILDREN)]
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return busy, sum(r.ru_utime + r.ru_stime for r in own), time.monotonic()

  def share(self) -> float | None:
    now = self._now()
    if self.start is None or now is None or now[2] <= self.start[2]:
      return None
    others = (now[0] - self.start[0]) - (now[1] - self.start[1])
    return round(max(0.0, others) / ((now[2] - self.start[2]) * (os.cpu_count() or 1)), 3)


class Round(NamedTuple):
  """One round of one side, per call: wall seconds, and its process's CPU seconds in user and
  kernel mode and page faults (kernel time on CPU is mostly zeroing freshly mapped pages)."""
  seconds: float
  user: float
  system: float
  page_faults: float


def interleaved_seconds(sides: dict[str, Callable[[], Callable[[], Any]]], steps: int,
                        rounds: int) -> dict[str, list[Round]]:
  """Per-call timings of each side, per round. Each side is built by its (picklable) maker in
  a process of its own and warmed up; then the sides take turns, `steps` calls each per round,
  so a burst of outside load on a shared machine slows both sides' rounds alike."""
  context = multiprocessing.get_context("spawn")  # a fork would inherit JAX's threads
  workers = {}
  for name, make in sides.items():
    pipe, child_pipe = context.Pipe()
    process = context.Process(target=_timing_worker, args=(make, steps, child_pipe), daemon=True)
    process.start()
    workers[name] = (process, pipe)
  try:
    for name in workers:
      _receive(name, workers[name])  # warmed up
    times = {name: [] for name in workers}
    for _ in range(rounds):
      for name, (_, pipe) in workers.items():
        pipe.send("time")
        times[name].append(_receive(name, workers[name]))
    return times
  finally:
    for process, pipe in workers.values():
      with contextlib.suppress(OSError):  # a side that already exited has closed its end
        pipe.send("stop")
      process.join(timeout=30)


def _receive(name: str, worker: tuple[Any, Any]) -> Any:
  process, pipe = worker
  while not pipe.poll(1.0):
    if not process.is_alive():
      raise RuntimeError(f"benchmark side {name!r} exited with code {process.exitcode}")
  status, value = pipe.recv()
  if status == "error":
    raise RuntimeError(f"benchmark side {name!r} failed: {value}")
  return value


def _timing_worker(make: Callable[[], Callable[[], Any]], steps: int, pipe: Any) -> None:
  try:
    fn = make()
    jax.block_until_ready(fn())
    pipe.send(("ready", None))
    while pipe.recv() == "time":
      before = resource.getrusage(resource.RUSAGE_SELF)
      seconds = seconds_per_call(fn, steps, warmup=0)
      after = resource.getrusage(resource.RUSAGE_SELF)
      pipe.send(("round", Round(seconds, (after.ru_utime - before.ru_utime) / steps,
                                (after.ru_stime - before.ru_stime) / steps,
                                (after.ru_minflt - before.ru_minflt) / steps)))
  except Exception:  # the parent reports it; the traceback's last line says what failed
    pipe.send(("error", traceback.format_exc().strip().splitlines()[-1]))
