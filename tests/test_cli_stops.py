"""Every `dhara` command ends on a stop signal with one line and a non-zero status (real signals
to real processes), and a usage error is one line with a hint to --help."""

import queue
import signal
import subprocess
import sys
import threading

import pytest

from dhara_jax.cli import main
from test_generate_cli import one_step_run

# `dhara` whose command says on stderr when it begins to read the run: it is working then (JAX
# imported, lm-eval's tasks or the checkpoint being read, the model compiled next).
MARKED = """
import contextlib, sys
from dhara_jax import runs

real = runs.open_run


@contextlib.contextmanager
def opening(*args, **kwargs):
  print("WORKING", file=sys.stderr, flush=True)
  with real(*args, **kwargs) as run:
    yield run


runs.open_run = opening
from dhara_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""
# Each far longer than the moment between the mark and the signal.
WORK = {"eval": ["--tasks", "piqa", "--limit", "200", "--no-progress"],
        "generate": ["--prompt", "The history of science", "--max-new-tokens", "16"],
        "bench throughput": ["--new-tokens", "8", "--runs", "1000"]}
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory):
  return one_step_run(tmp_path_factory.mktemp("ar"))


def _stop_once_working(argv: list[str], signum: int) -> tuple[int, list[str]]:
  """Runs `dhara *argv`, sends `signum` once it reports working: (exit status, stderr lines).
  Every wait is bounded; the process is killed if it outlives the test."""
  proc = subprocess.Popen([sys.executable, "-c", MARKED, *argv], stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  lines: queue.Queue = queue.Queue()
  reader = threading.Thread(target=lambda: [lines.put(line.rstrip("\n")) for line in proc.stderr],
                            daemon=True)
  reader.start()
  seen = []
  try:
    while not seen or seen[-1] != "WORKING":
      seen.append(lines.get(timeout=TIMEOUT_S))  # queue.Empty fails the test
    proc.send_signal(signum)
    code = proc.wait(timeout=TIMEOUT_S)
    reader.join(timeout=TIMEOUT_S)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  while not lines.empty():
    seen.append(lines.get())
  return code, seen


@pytest.mark.parametrize("command", WORK)
def test_sigterm_ends_a_command_in_one_line(ar_run, command):
  code, lines = _stop_once_working([*command.split(), str(ar_run), *WORK[command]],
                                   signal.SIGTERM)
  assert code == 128 + signal.SIGTERM, lines
  assert [line for line in lines if "error" in line.lower() or "Traceback" in line] == [
      f"error: {command}: stopped by SIGTERM; run the same command again"]
  assert not (ar_run / "eval").exists()  # the evaluation wrote nothing


@pytest.mark.parametrize("command,argv,message", [
    ("bench throughput", ["r", "--batch", "0"],
     "argument --batch: expected a positive integer, got '0'"),
    ("bench generate", ["r", "--runs", "0"],
     "argument --runs: expected a positive integer, got '0'"),
    ("eval", ["r", "--mc-samples", "0"],
     "argument --mc-samples: expected a positive integer, got '0'"),
    ("export", ["r"], "the following arguments are required: --out"),
    ("train", ["llama3", "--bogus"], "unrecognized arguments: --bogus")])
def test_a_usage_error_is_one_line_with_a_hint(command, argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    main([*command.split(), *argv])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == (
      f"dhara {command}: error: {message} (see dhara {command} --help)\n")


def test_help_loads_no_jax():
  """The command line, its stop handling included, loads JAX only when a command runs."""
  code = ("import sys\nfrom dhara_jax import cli\ntry:\n  cli.main(['eval', '--help'])\n"
          "except SystemExit:\n  pass\nassert 'jax' not in sys.modules, 'jax loaded'\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=TIMEOUT_S)
  assert proc.returncode == 0 and "usage: dhara eval" in proc.stdout, proc.stderr
