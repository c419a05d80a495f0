"""The stderr of a process of a multi-process job (see distributed.py), passed on line by line,
except:
- gloo's connection chatter ("[Gloo] Rank 3 is connected to 7 peer ranks ...") is dropped;
- once JAX's distributed runtime logs a failure, what follows — its log, the abort's stack
  trace, Python's traceback of the call it interrupted — is held back; if the abort comes
  (the runtime's "Terminating process" line), it is replaced at the end by one line saying
  what was lost; if it does not come within a few seconds, the held lines go out as they were.

Run as `python -m dhara_jax.fatal_lines HOST_TIMEOUT_S COORDINATOR`; standard library only,
so it starts in milliseconds.
"""

from __future__ import annotations

import os
import re
import select
import sys
import time

# glog lines of the runtime's parts: coordination service, its agent, the client, preemption.
RUNTIME = re.compile(rb"^[WEF]\d{4} [\d:.]+\s+\d+ (coordination_service\w*|client|"
                     rb"preemption_sync_manager)\.\w+:\d+\] ")
HARMLESS = (b"SIGTERM caught",)
ABORT = b"Terminating process because the JAX distributed service"
CHATTER = b"[Gloo] Rank"
GRACE_S = 10.0  # a runtime failure line not followed by the abort within this is let through


def summary(text: str, timeout: str, coordinator: str) -> str:
  """The one line for the runtime's failure log `text`."""
  rerun = "run the same command on every host to resume from the last checkpoint"
  lost = re.search(r"stopped sending heartbeats\):(.*?)(The tasks|\[type|$)", text, re.S)
  if lost:
    ids = sorted(set(re.findall(r"(?:task:)?(\d+)", lost.group(1))), key=int)
    return (f"error: lost process {', '.join(ids) or '?'} (no heartbeat for {timeout} s: its "
            f"host died, hung or was preempted); the job stops. Then {rerun}")
  ended = re.search(r"Shutdown barrier.*?first task at the barrier: (\d+)", text, re.S)
  if ended:
    return (f"error: process {ended.group(1)} ended while the others went on (its own log "
            f"says why); after {timeout} s the job stops. Mend that, then {rerun}")
  if "RegisterTask" in text:
    return (f"error: distributed: not every process of the job reached "
            f"{coordinator or 'the coordinator'} within {timeout} s; start the same command on "
            "every host (same coordinator and process count, ids 0 … N-1)")
  if "coordination service" in text or "leader task" in text or "Socket closed" in text:
    return (f"error: lost process 0, the coordinator ({coordinator or 'its address'}: its "
            f"host died or was preempted); the job stops. Then {rerun}")
  status = re.search(r"absl::Status: (.*)", text)
  return ("error: the distributed runtime stopped this process: "
          f"{status.group(1).strip() if status else 'see DHARA_RAW_STDERR=1'}")


def relay(source: int, sink: int, timeout: str, coordinator: str) -> None:
  pending = b""
  held: list[bytes] | None = None  # lines held back since a runtime failure line
  held_since = 0.0
  aborting = False

  def emit(line: bytes) -> None:
    os.write(sink, line)

  while True:
    wait = (None if held is None or aborting else
            max(0.0, GRACE_S - (time.monotonic() - held_since)))
    ready, _, _ = select.select([source], [], [], wait)
    if not ready:  # no abort came: the failure line was not fatal after all
      for line in held or ():
        emit(line)
      held = None
      continue
    chunk = os.read(source, 65536)
    if not chunk:
      break
    pending += chunk
    *lines, pending = pending.split(b"\n")
    for line in (line + b"\n" for line in lines):
      if CHATTER in line:
        continue
      if held is None and RUNTIME.match(line) and not any(h in line for h in HARMLESS):
        held, held_since = [], time.monotonic()
      if held is None:
        emit(line)
      else:
        held.append(line)
        aborting = aborting or ABORT in line
  if pending:
    (held.append(pending) if held is not None else emit(pending))
  if held is not None:
    if aborting:
      text = b"".join(held).decode("utf-8", "replace")
      emit((summary(text, timeout, coordinator) + "\n").encode())
    else:
      for line in held:
        emit(line)


if __name__ == "__main__":
  relay(sys.stdin.fileno(), sys.stdout.fileno(), sys.argv[1], sys.argv[2])
