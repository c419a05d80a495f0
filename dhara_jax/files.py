"""Writes that never leave a half-written file behind: temp file in the same folder + rename."""

from __future__ import annotations

import contextlib
import errno
import os
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
