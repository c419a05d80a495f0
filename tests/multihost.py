"""A job of several `dhara` processes on this machine: N processes × M fake CPU devices with a
coordinator on 127.0.0.1 (a free port each job), every process bounded by a timeout and the
whole job killed when one fails to end in time, so a hang is a failed test, never a stuck CI.

JAX 0.10.2's CPU backend runs cross-process collectives over gloo (its default), so these are
real multi-host runs: global arrays, orbax's per-process checkpoint writes, the coordination
service's heartbeats and JAX's preemption sync point.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Ended:
  """How one process of a job ended."""

  returncode: int
  stdout: str
  stderr: str

  def error_lines(self) -> list[str]:
    return [line for line in self.stderr.splitlines() if line.startswith("error:")]


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env_for(devices: int, extra: dict[str, str] | None = None) -> dict[str, str]:
  # No job settings from outside (JAX or SLURM would find a job there); the compilation cache
  # stays.
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("DHARA_", "JAX_", "SLURM")) or k.startswith("JAX_COMPILATION")}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="1")
  env.update(extra or {})
  return env


class Job:
  """`dhara ARGS` as `processes` processes of one job (started at once, each with its
  DHARA_PROCESS_ID). `processes=1` with `launch=False` is the plain one-process command."""

  def __init__(self, args: Sequence[str], processes: int = 2, devices: int = 4,
               cwd: Path = REPO, launch: bool = True, host_timeout_s: int = 30,
               env: dict[str, str] | None = None):
    port = free_port()
    self.procs: list[subprocess.Popen] = []
    for index in range(processes):
      extra = {"DHARA_COORDINATOR": f"127.0.0.1:{port}", "DHARA_NUM_PROCESSES": str(processes),
               "DHARA_PROCESS_ID": str(index), "DHARA_HOST_TIMEOUT_S": str(host_timeout_s)
               } if launch else {}
      self.procs.append(subprocess.Popen(
          [sys.executable, "-m", "dhara_jax.cli", *args], cwd=cwd,
          env=env_for(devices, {**extra, **(env or {})}), stdout=subprocess.PIPE,
          stderr=subprocess.PIPE, text=True, start_new_session=True))
    self.started = time.monotonic()

  def signal(self, index: int, signum: int) -> None:
    self.procs[index].send_signal(signum)

  def wait(self, timeout_s: float) -> list[Ended]:
    """Every process's end; all are killed (and the test fails) past `timeout_s`."""
    deadline = self.started + timeout_s
    outs = []
    try:
      for proc in self.procs:
        out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        outs.append(Ended(proc.returncode, out, err))
    except subprocess.TimeoutExpired:
      self.kill()
      logs = [p.communicate() for p in self.procs]
      raise AssertionError(f"the job did not end within {timeout_s} s:\n" + "\n".join(
          f"--- process {i} stderr ---\n{err[-3000:]}" for i, (_, err) in enumerate(logs)))
    return outs

  def kill(self) -> None:
    for proc in self.procs:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)

  def __enter__(self) -> "Job":
    return self

  def __exit__(self, *exc) -> None:
    self.kill()


def run_job(args: Sequence[str], timeout_s: float = 240, **kwargs) -> list[Ended]:
  with Job(args, **kwargs) as job:
    return job.wait(timeout_s)


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
  deadline = time.monotonic() + timeout_s
  while not predicate():
    if time.monotonic() > deadline:
      raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
    time.sleep(0.2)
