"""Checkpoint failures are one line: a save that cannot write (full disk, refused writes), a
damaged checkpoint, an export of a run without checkpoints. What was saved before stays and
resumes exactly."""

import errno
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhara_jax.checkpoint import Checkpointer
from dhara_jax.errors import DharaError
from test_train import TINY_RUN, losses

TRAIN = ["train", "configs/runs/quickstart.yaml", *TINY_RUN, "train.keep_checkpoints=1",
         "--no-progress"]  # checkpoints at steps 2, 4, 6; one kept

# `python -c INJECT ARGS`: `dhara ARGS` whose save of step $FAIL_STEP fails with errno
# $FAIL_ERRNO writing item $FAIL_ITEM: "config" fails in the background (as tensorstore's writes
# of the state do), "tokenizer" while the save blocks, before the other items' writes started.
INJECT = """
import os, sys
from orbax.checkpoint._src.handlers import json_checkpoint_handler as json_handler
from dhara_jax import checkpoint
step, code, item = os.environ["FAIL_STEP"], int(os.environ["FAIL_ERRNO"]), os.environ["FAIL_ITEM"]
def refuse(directory):
  if f"/{step}.orbax-checkpoint-tmp" in str(directory):
    raise OSError(code, os.strerror(code), str(directory))
if item == "config":
  write = json_handler.JsonCheckpointHandler._save_fn
  async def failing_write(self, x, directory):
    refuse(directory)
    return await write(self, x, directory)
  json_handler.JsonCheckpointHandler._save_fn = failing_write
else:
  save = checkpoint.FileHandler.save
  def failing_save(self, directory, args):
    refuse(directory)
    return save(self, directory, args)
  checkpoint.FileHandler.save = failing_save
from dhara_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""

# Run in a private mount namespace (`unshare -rm sh -c SMALL_DISK sh CMD...`): a 5 MB tmpfs at
# $FS, 2 MB of it taken, holds one tiny checkpoint but not two; the namespace and its mount go
# when the script ends, however it ends. CMD runs twice, before and after freeing the 2 MB.
SMALL_DISK = """
mount -t tmpfs -o size=5m tmpfs "$FS" || exit 99
head -c 2000000 /dev/zero > "$FS/filler"
"$@" > "$OUT/1.out" 2> "$OUT/1.err"; echo $? > "$OUT/1.rc"
ls -A "$FS/ck" > "$OUT/1.ls"
rm "$FS/filler"
"$@" > "$OUT/2.out" 2> "$OUT/2.err"; echo $? > "$OUT/2.rc"
"""


@functools.cache
def private_tmpfs() -> bool:
  """Whether this machine lets `unshare -rm` mount a tmpfs (root, or user namespaces)."""
  if shutil.which("unshare") is None:
    return False
  with tempfile.TemporaryDirectory() as directory:
    proc = subprocess.run(["unshare", "-rm", "sh", "-c",
                           f"mount -t tmpfs -o size=1m tmpfs {directory}"], capture_output=True,
                          timeout=60)
  return proc.returncode == 0


def dhara(*args, inject: tuple[int, int, str] | None = None) -> subprocess.CompletedProcess:
  """`dhara ARGS`; with `inject=(step, errno, item)`, that step's save fails with that errno
  writing that item (see INJECT)."""
  env = dict(os.environ)
  command = [sys.executable, "-m", "dhara_jax.cli", *args]
  if inject is not None:
    env.update(FAIL_STEP=str(inject[0]), FAIL_ERRNO=str(inject[1]), FAIL_ITEM=inject[2])
    command = [sys.executable, "-c", INJECT, *args]
  return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def checkpoint_names(directory: Path) -> list[str]:
  return sorted(p.name for p in directory.iterdir())


def new_lines(stderr: str, baseline: list[str]) -> list[str]:
  """The lines of `stderr` that a normal run does not print (its mesh warning)."""
  return [line for line in stderr.strip().splitlines() if line not in baseline]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """An uninterrupted run: its losses, its stderr lines, its run dir (steps 2, 4, 6 saved)."""
  run_dir = tmp_path_factory.mktemp("straight")
  proc = dhara(*TRAIN, "train.keep_checkpoints=3", "--run-dir", str(run_dir))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert all(line.startswith("WARNING:") for line in proc.stderr.strip().splitlines())
  return losses(run_dir), proc.stderr.strip().splitlines(), run_dir


@pytest.mark.parametrize("async_save, every, saved, failed", [
    ("true", 2, 2, 4), ("true", 4, 4, 6), ("false", 2, 2, 4)],
    ids=["async-at-next-save", "async-at-final-wait", "sync"])
def test_full_disk_is_one_line_and_a_rerun_continues_exactly(tmp_path, straight, async_save,
                                                             every, saved, failed):
  """The checkpoint dir on a small disk holds one checkpoint, not two. One line, the partial
  step removed, the one before kept (although keep_checkpoints=1 would drop it after the next);
  after freeing space the same command continues bit-exactly. Async, the failure surfaces at
  the next save (of step 6) or at the final wait, and names the step that failed."""
  fs, run_dir = tmp_path / "fs", tmp_path / "run"
  fs.mkdir()
  args = [*TRAIN, f"train.async_checkpoint={async_save}", f"train.checkpoint_every={every}",
          f"train.checkpoint_dir={fs / 'ck'}", "--run-dir", str(run_dir)]
  if private_tmpfs():
    command = ["unshare", "-rm", "sh", "-c", SMALL_DISK, "sh", sys.executable, "-m",
               "dhara_jax.cli", *args]
    out = subprocess.run(command, env={**os.environ, "FS": str(fs), "OUT": str(tmp_path)},
                         timeout=600)
    assert out.returncode == 0, "could not mount the small tmpfs"
    rc, stderr = int((tmp_path / "1.rc").read_text()), (tmp_path / "1.err").read_text()
    left = (tmp_path / "1.ls").read_text().split()
    resumed_rc, resumed_err = int((tmp_path / "2.rc").read_text()), (tmp_path / "2.err").read_text()
    resumed_out = (tmp_path / "2.out").read_text()
    device = fs
  else:  # no tmpfs to fill here: the same failure, faked (never a silent pass)
    first = dhara(*args, inject=(failed, errno.ENOSPC, "config"))
    rc, stderr, left = first.returncode, first.stderr, checkpoint_names(fs / "ck")
    resumed = dhara(*args)
    resumed_rc, resumed_err, resumed_out = resumed.returncode, resumed.stderr, resumed.stdout
    device = fs
    while device.parent != device and device.parent.stat().st_dev == fs.stat().st_dev:
      device = device.parent
  _, baseline, _ = straight
  assert rc == 2
  assert new_lines(stderr, baseline) == [
      f"error: checkpoint: no space left on {device} writing step {failed}; steps ≤ {saved} are "
      "saved; free space and run the same command"]
  assert left == [str(saved)]  # no <failed>.orbax-checkpoint-tmp, the step before untouched
  assert resumed_rc == 0, resumed_err[-2000:]
  assert f"steps {saved}→6" in resumed_out and not new_lines(resumed_err, baseline)
  assert losses(run_dir) == straight[0]


def test_a_refused_write_is_one_line_and_a_rerun_continues_exactly(tmp_path, straight):
  """Any other write error of a save (permissions changed mid-run, a bucket refusing writes):
  one line with its cause, nothing else on stderr (such as the never-awaited writes of the
  other items), earlier steps kept and resumable."""
  args = [*TRAIN, "--run-dir", str(tmp_path)]
  proc = dhara(*args, inject=(4, errno.EACCES, "tokenizer"))
  assert proc.returncode == 2
  assert new_lines(proc.stderr, straight[1]) == [
      f"error: checkpoint: cannot write step 4 to {tmp_path / 'checkpoints'} (Permission "
      "denied); steps ≤ 2 are saved; fix that and run the same command"]
  assert checkpoint_names(tmp_path / "checkpoints") == ["2"]
  resumed = dhara(*args)
  assert resumed.returncode == 0 and "steps 2→6" in resumed.stdout, resumed.stderr[-2000:]
  assert losses(tmp_path) == straight[0]


def small_state(seed: int) -> dict:
  """Random weights: constant ones compress to a few bytes, which a test cannot truncate."""
  w = np.random.default_rng(seed).standard_normal((64, 64)).astype(np.float32)
  return {"w": jnp.asarray(w), "step": jnp.array(seed, jnp.int32)}


def small_abstract_state() -> dict:
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=one),
          "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=one)}


def fail_writes_of(monkeypatch, step: int, error: Exception) -> None:
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler

  write = handler.JsonCheckpointHandler._save_fn

  async def failing_write(self, item, directory):
    if f"/{step}.orbax-checkpoint-tmp" in str(directory):
      raise error
    return await write(self, item, directory)

  monkeypatch.setattr(handler.JsonCheckpointHandler, "_save_fn", failing_write)


def test_a_failed_save_names_its_own_step(tmp_path, monkeypatch, caplog):
  """Async: a failure surfaces at the next save or at the wait, naming the step that failed.
  Sync: at that save. The partial step goes, the earlier one is left byte for byte."""
  refused = RuntimeError("403 Forbidden: caller does not have storage.objects.create access")
  fail_writes_of(monkeypatch, 2, refused)
  checkpoints = Checkpointer(tmp_path, keep=1)
  checkpoints.save(1, small_state(1), None, {})
  checkpoints.wait()
  before = {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()}
  checkpoints.save(2, small_state(2), None, {})  # fails in the background
  expected = (f"checkpoint: cannot write step 2 to {tmp_path / 'checkpoints'} (403 Forbidden: "
              "caller does not have storage.objects.create access); steps ≤ 1 are saved; fix "
              "that and run the same command")
  with pytest.raises(DharaError) as raised:
    checkpoints.save(3, small_state(3), None, {})
  assert str(raised.value) == expected
  checkpoints.wait()  # reported once
  checkpoints.close()
  assert checkpoint_names(tmp_path / "checkpoints") == ["1"]
  assert {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*")
          if p.is_file()} == before
  checkpoints = Checkpointer(tmp_path, keep=1)
  restored = checkpoints.restore(1, small_abstract_state(), None)
  checkpoints.close()
  np.testing.assert_array_equal(restored["w"], small_state(1)["w"])

  full = OSError(errno.ENOSPC, "No space left on device")
  fail_writes_of(monkeypatch, 1, full)
  for async_save in (True, False):
    directory = tmp_path / f"first_{async_save}"
    checkpoints = Checkpointer(directory, keep=1, async_save=async_save)
    with pytest.raises(DharaError, match=r"^checkpoint: no space left on /\S* writing step 1; "
                                         r"no step is saved; free space and run the same "
                                         r"command$"):
      checkpoints.save(1, small_state(1), None, {})
      checkpoints.wait()  # async: the failure surfaces here
    checkpoints.close()
    assert checkpoint_names(directory / "checkpoints") == []
  # orbax logged none of its tracebacks (the CLI tests check stderr itself).
  assert not [r for r in caplog.records if r.exc_info], caplog.records


# In a fresh interpreter: Checkpointer calls leave the process's hooks as they found them, a
# pending async save keeps orbax's noise dropped until it is waited for, and a failed call keeps
# it dropped for good (its abandoned reads report themselves at exit). Inside, exactly orbax's
# leftovers are dropped; anything else reaches the hook that was there before.
QUIET = """
import logging, sys, types, warnings
from pathlib import Path
import jax, jax.numpy as jnp, numpy as np
from dhara_jax.checkpoint import Checkpointer
from dhara_jax.errors import DharaError
from dhara_jax.orbax_quiet import quiet

seen = []
sys.unraisablehook = lambda unraisable: seen.append(str(unraisable.exc_value))

def hooks():
  return (sys.unraisablehook, logging.getLogger("absl").filters[:],
          logging.getLogger("asyncio").filters[:], warnings.filters[:])

def leftovers():
  code = compile("async def read(): pass", "/site-packages/orbax/read.py", "exec")
  namespace = {}
  exec(code, namespace)
  read = namespace["read"]()
  sys.unraisablehook(types.SimpleNamespace(exc_value=Exception("read abandoned"), object=read))
  read.close()
  sys.unraisablehook(types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"),
                                           object=None))
  sys.unraisablehook(types.SimpleNamespace(exc_value=ValueError("ours"), object=None))

before = hooks()
leftovers()
assert seen == ["read abandoned", "Event loop is closed", "ours"], seen
with quiet(), quiet():
  seen.clear()
  leftovers()
  assert seen == ["ours"], seen
assert hooks() == before

state = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((64, 64)), jnp.float32)}
one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
abstract = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=one)}
run_dir = sys.argv[1]
checkpoints = Checkpointer(run_dir, keep=3)
checkpoints.save(1, state, None, {"a": 1})
assert hooks() != before  # the save goes on in the background
checkpoints.wait()
assert hooks() == before
checkpoints.restore(1, abstract, None)
assert checkpoints.saved_config(1) == {"a": 1}
assert hooks() == before
sync = Checkpointer(run_dir + "/sync", keep=1, async_save=False)
sync.save(1, state, None, {})
sync.close()
checkpoints.close()
assert hooks() == before

for f in Path(run_dir, "checkpoints", "1").glob("state/ocdbt.process_0/d/*"):
  f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
try:
  Checkpointer(run_dir, keep=3).restore(1, abstract, None)
except DharaError:
  pass
seen.clear()
leftovers()
assert seen == ["ours"], seen
print("ok")
"""


def test_orbax_noise_is_dropped_only_within_dhara_calls(tmp_path):
  proc = subprocess.run([sys.executable, "-c", QUIET, str(tmp_path)], capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr[-3000:]


def damage_arrays(step_dir: Path) -> None:
  """Truncates the array data of the state's per-process store: orbax then wraps the read's
  error in one whose text quotes a bound method instead of the store's spec."""
  files = list(step_dir.glob("state/ocdbt.process_0/d/*"))
  assert files
  for f in files:
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])


def test_damaged_checkpoint_gives_its_cause_and_only_real_advice(tmp_path):
  checkpoints = Checkpointer(tmp_path, keep=3, async_save=False)
  wanted = small_abstract_state()
  checkpoints.save(1, small_state(1), None, {})
  damage_arrays(tmp_path / "checkpoints" / "1")
  with pytest.raises(DharaError) as raised:
    checkpoints.restore(1, wanted, None)
  message = str(raised.value)
  assert re.fullmatch(rf"checkpoint: {tmp_path / 'checkpoints' / '1'} is unreadable \(\w+: .+\); "
                      rf"there is no earlier checkpoint in {tmp_path / 'checkpoints'} to use "
                      r"instead", message), message
  assert "bound method" not in message and "\n" not in message
  checkpoints.save(2, small_state(2), None, {})
  damage_arrays(tmp_path / "checkpoints" / "2")
  with pytest.raises(DharaError, match=r"; move it aside to use an earlier checkpoint \(step 1\)$"):
    checkpoints.restore(2, wanted, None)
  checkpoints.close()


def test_damaged_checkpoint_at_resume_is_one_line(tmp_path, straight):
  """The abandoned reads of a failed restore print nothing at exit (they were 41 tracebacks)."""
  _, baseline, straight_dir = straight
  shutil.copytree(straight_dir, tmp_path, dirs_exist_ok=True)
  damage_arrays(tmp_path / "checkpoints" / "6")
  proc = dhara(*TRAIN, "train.steps=8", "--run-dir", str(tmp_path))
  assert proc.returncode == 2
  lines = new_lines(proc.stderr, baseline)
  assert len(lines) == 1 and "bound method" not in lines[0], proc.stderr[-3000:]
  assert lines[0].startswith(f"error: checkpoint: {tmp_path / 'checkpoints' / '6'} is unreadable (")
  assert lines[0].endswith("; move it aside to use an earlier checkpoint (step 4)")


def test_export_without_a_checkpoint_leaves_the_run_dir_as_it_was(tmp_path, straight, capsys):
  from dhara_jax.cli import main

  shutil.copy(straight[2] / "config.yaml", tmp_path)
  assert main(["export", str(tmp_path), "--out", str(tmp_path / "hf")]) == 2
  assert capsys.readouterr().err == f"error: run: {tmp_path} has no checkpoint yet\n"
  assert checkpoint_names(tmp_path) == ["config.yaml"]


def test_a_full_disk_outside_checkpoints_is_one_line(tmp_path, capsys, monkeypatch):
  """A write the run makes itself (metrics.jsonl, config.yaml) failing: one line, exit 2."""
  from dhara_jax import cli, metrics

  def full(self, row):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "metrics.jsonl"))

  monkeypatch.setattr(metrics.MetricsWriter, "write", full)
  assert cli.main(TRAIN + ["--run-dir", str(tmp_path)]) == 2
  assert capsys.readouterr().err == (
      f"error: No space left on device ({tmp_path / 'metrics.jsonl'})\n")
