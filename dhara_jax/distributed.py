"""A job of several processes (a TPU pod slice, GPU nodes, hosts on a network): the one
start-up path every JAX command takes before anything can touch a JAX backend.

Every process runs the same command. Where the others are comes from, in order:
  --coordinator HOST:PORT --num-processes N --process-id I   (flags of every JAX command)
  DHARA_COORDINATOR, DHARA_NUM_PROCESSES, DHARA_PROCESS_ID   (the same, from the environment)
  --multihost, DHARA_MULTIHOST=1 or `train.multihost: true`  (JAX finds them: TPU pod slice
                                                             metadata, SLURM, Open MPI)
Nothing set: one process, and jax.distributed stays off.

A lost process (its host died, hung or was preempted) or one that never joins is found by
JAX's own coordination service within `--host-timeout` seconds (DHARA_HOST_TIMEOUT_S), which
then aborts every other process from a C++ thread with a screenful of log. Its Python hook for
that moment (`missed_heartbeat_callback`) fails in jaxlib 0.10.2 (std::bad_cast), so a small
child process reads this process's stderr instead and replaces that screenful with one line
naming the lost process (`fatal_lines.py`); the exit status is the abort's (134).
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
from typing import Mapping

from dhara_jax.errors import ConfigError, DharaError

ENV = {"coordinator": "DHARA_COORDINATOR", "num_processes": "DHARA_NUM_PROCESSES",
       "process_id": "DHARA_PROCESS_ID", "detect": "DHARA_MULTIHOST",
       "host_timeout_s": "DHARA_HOST_TIMEOUT_S"}
DEFAULT_HOST_TIMEOUT_S = 120
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process finds the others of its job (none of it set: a one-process job)."""

  coordinator: str | None = None  # HOST:PORT of process 0's coordination service
  num_processes: int | None = None
  process_id: int | None = None
  detect: bool = False  # let JAX find the job: TPU pod slice metadata, SLURM, Open MPI
  host_timeout_s: int = DEFAULT_HOST_TIMEOUT_S  # joining, heartbeats, the exit barrier

  @property
  def several(self) -> bool:
    return self.detect or self.coordinator is not None or self.num_processes is not None

  def check(self) -> "Launch":
    """Itself, or a one-line error for settings that cannot start a job."""
    if self.coordinator is not None and not _ADDRESS.match(self.coordinator):
      raise ConfigError(f"distributed: coordinator {self.coordinator!r} is not HOST:PORT "
                        "(process 0's address and a free port, the same on every host)")
    if self.num_processes is not None and self.num_processes < 1:
      raise ConfigError(f"distributed: the process count must be positive, got "
                        f"{self.num_processes}")
    if (self.process_id is not None and self.num_processes is not None
        and not 0 <= self.process_id < self.num_processes):
      raise ConfigError(f"distributed: process id {self.process_id} is not in [0, "
                        f"{self.num_processes}) (ids count from 0 to the process count - 1)")
    if self.host_timeout_s < 1:
      raise ConfigError(f"distributed: the host timeout must be at least 1 s, got "
                        f"{self.host_timeout_s}")
    explicit = {"--coordinator / DHARA_COORDINATOR": self.coordinator,
                "--num-processes / DHARA_NUM_PROCESSES": self.num_processes,
                "--process-id / DHARA_PROCESS_ID": self.process_id}
    missing = [name for name, value in explicit.items() if value is None]
    if not self.detect and 0 < len(missing) < 3:
      raise ConfigError(f"distributed: {', '.join(missing)} not set; give all three on every "
                        "host (or --multihost on a TPU pod slice, under SLURM or Open MPI, "
                        "where JAX finds them)")
    return self


def launch_from(coordinator: str | None = None, num_processes: int | None = None,
                process_id: int | None = None, detect: bool = False,
                host_timeout_s: int | None = None,
                env: Mapping[str, str] = os.environ) -> Launch:
  """The launch settings: flags first, then the DHARA_* environment."""
  def number(key: str, given: int | None) -> int | None:
    if given is not None or not env.get(ENV[key]):
      return given
    text = env[ENV[key]]
    if not text.strip().isdigit():
      raise ConfigError(f"distributed: {ENV[key]}={text!r} is not a whole number")
    return int(text)

  flag = env.get(ENV["detect"], "").strip().lower()
  if flag not in ("", "0", "1", "true", "false"):
    raise ConfigError(f"distributed: {ENV['detect']}={flag!r} is not 1 or 0")
  return Launch(coordinator=coordinator or env.get(ENV["coordinator"]) or None,
                num_processes=number("num_processes", num_processes),
                process_id=number("process_id", process_id),
                detect=detect or flag in ("1", "true"),
                host_timeout_s=number("host_timeout_s", host_timeout_s)
                or DEFAULT_HOST_TIMEOUT_S).check()


def start(launch: Launch, preemption: bool = False) -> None:
  """Joins the job `launch` describes (no-op for one process, or when already joined).

  `preemption`: SIGTERM on any process is taken by JAX's preemption notifier, and every
  process learns of it at the same step (`stop_requested`); the commands that save state
  (train, convert) ask for it. Otherwise SIGTERM keeps its default action."""
  import jax
  from jax._src import xla_bridge

  if not launch.several or jax.distributed.is_initialized():
    return
  if xla_bridge.backends_are_initialized():
    raise DharaError("distributed: JAX was already running in this process before it could "
                     "join the other processes (start the job before anything touches JAX)")
  jax.config.update("jax_enable_preemption_service", preemption)
  _route_fatal_lines(launch)
  timeout = launch.host_timeout_s
  try:
    jax.distributed.initialize(launch.coordinator, launch.num_processes, launch.process_id,
                               initialization_timeout=timeout,
                               heartbeat_timeout_seconds=timeout,
                               shutdown_timeout_seconds=timeout)
  except (ValueError, TypeError) as e:  # JAX's own checks, after its cluster detection
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if launch.detect and launch.num_processes is None:
      raise ConfigError(f"distributed: no TPU pod slice, SLURM or Open MPI job found to take "
                        f"the process count and index from ({first}); set --coordinator, "
                        "--num-processes and --process-id (or DHARA_COORDINATOR, "
                        "DHARA_NUM_PROCESSES, DHARA_PROCESS_ID) on every host") from None
    raise ConfigError(f"distributed: {first}") from None


def speaks_for_job() -> bool:
  """Whether this process prints and writes the job's results (process 0; every process of a
  one-process job)."""
  import jax

  return jax.process_index() == 0


def stop_requested(step: int) -> bool:
  """Whether every process of the job stops after `step`: JAX's preemption sync point, reached
  by all processes at the same step once any of them got SIGTERM. Call it at every step."""
  from jax.experimental import multihost_utils

  return multihost_utils.reached_preemption_sync_point(step)


def preemption_sync_available() -> bool:
  """Whether JAX's preemption sync point runs in this process (a job started with
  `preemption=True`)."""
  from jax._src import distributed as jax_distributed  # the state multihost_utils reads

  return jax_distributed.global_state.preemption_sync_manager is not None


def _route_fatal_lines(launch: Launch) -> None:
  """This process's stderr through `fatal_lines` (a child that outlives an abort)."""
  if os.environ.get("DHARA_RAW_STDERR"):  # debugging the runtime itself: its whole log
    return
  sys.stderr.flush()
  original = os.dup(2)
  child = subprocess.Popen(
      [sys.executable, "-m", "dhara_jax.fatal_lines", str(launch.host_timeout_s),
       launch.coordinator or ""],
      stdin=subprocess.PIPE, stdout=original, stderr=original, close_fds=True,
      # Signals meant for the job (Ctrl-C on a terminal) must not end the reader first.
      preexec_fn=_ignore_stop_signals)
  os.dup2(child.stdin.fileno(), 2)
  child.stdin.close()  # fd 2 is now our only writer: EOF comes when this process ends
  os.close(original)
  _READERS.append(child)  # never waited for: it ends after us


_READERS: list[subprocess.Popen] = []


def _ignore_stop_signals() -> None:
  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, signal.SIG_IGN)
