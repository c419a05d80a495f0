"""Writes that never leave a half-written file or folder behind: a temp file (or folder) in the
same folder, renamed into place once complete."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from dhara_jax.errors import DharaError

_UMASK = os.umask(0)
os.umask(_UMASK)


def temp_beside(path: Path) -> tuple[int, str]:
  """An open temp file next to `path` with the permissions a plain `open` would give."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files
  return fd, tmp


def write_whole(path: str | Path, data: bytes | str, who: str) -> None:
  """`atomic_write`, a failure (a full disk, no permission) one line naming `who`: the
  previous file stays in place."""
  with _one_line(path, who):
    atomic_write(path, data)


def check_writable(path: str | Path, who: str) -> None:
  """Fails as `write_whole` would on `path` (a folder there, a file in the way of its folder,
  a read-only place), before the work whose result it is to hold; leaves nothing behind."""
  path = Path(path)
  with _one_line(path, who):
    if path.is_dir():  # a temp file beside it would be fine, the rename onto it would not
      raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
    # The nearest existing folder: write_whole makes the missing ones below it.
    folder = next(p for p in path.absolute().parents if p.exists())
    fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def _one_line(path: str | Path, who: str) -> Iterator[None]:
  try:
    yield
  except OSError as e:
    raise DharaError(f"{who}: cannot write {path}: {e.strerror or e}") from None


def atomic_write(path: str | Path, data: bytes | str) -> None:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = temp_beside(path)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


@contextlib.contextmanager
def whole_folder(path: str | Path, who: str) -> Iterator[Path]:
  """A new temp folder beside `path` to fill; once the block ends it takes `path`'s place (a
  folder there before is removed only then). A failure (a full disk, no permission) is one line
  naming `who` and `path`: the temp folder is removed and `path` stays as it was."""
  shown, path = path, Path(os.path.realpath(path))  # a link's target is replaced, not the link
  missing = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
  tmp = None
  try:
    with _one_line(shown, who):
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
      os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700 folders
      yield tmp
      _swap_in(tmp, path)
  except BaseException:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
    for folder in missing:  # the parents made above, children first; rmdir keeps non-empty ones
      with contextlib.suppress(OSError):
        folder.rmdir()
    raise


def _swap_in(new: Path, path: Path) -> None:
  """Renames folder `new` to `path`. A folder at `path` is first moved aside beside it (rename
  cannot replace a non-empty folder), put back if the second rename fails, removed after."""
  if not path.is_dir():
    os.rename(new, path)  # a file at `path` fails here: not a directory
    return
  old = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old")
  os.rename(path, old)  # onto an empty folder: allowed
  try:
    os.rename(new, path)
  except BaseException:
    os.rename(old, path)
    raise
  shutil.rmtree(old, ignore_errors=True)
