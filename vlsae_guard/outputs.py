"""Writing outputs so that a kill or a bad path loses nothing.

Every results file, table, plot and checkpoint file is written to a temporary file beside its
target and renamed into place (``os.replace`` is atomic on POSIX and Windows), so a reader, or
the next run, sees the previous file or the new one, never a truncated one. Output folders are
checked writable before anything expensive (loading a model) starts, and writers that are not
resumable refuse a non-empty folder unless told to overwrite it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

_UMASK = os.umask(0)
os.umask(_UMASK)


class OutputError(OSError):
    """An output path cannot be written as asked; the message names the path and the flag."""


@contextmanager
def replacing(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it is synced and renamed to ``path``.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    with replacing_path(path) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def replacing_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix, so writers that infer the format from it
    work) for a writer that takes a file name; renamed to ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; a plain open() would not
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``Path.write_text``, atomically."""
    with replacing(path, encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def write_with(path: str | os.PathLike, writer: Callable[[Path], object]) -> Path:
    """Call ``writer(tmp_path)`` (``savefig``, ``save_file``, ...), then rename into place."""
    with replacing_path(path) as tmp:
        writer(tmp)
    return Path(path)


def check_writable(directory: str | os.PathLike, flag: str = "--out") -> Path:
    """Create ``directory`` if needed and prove a file can be written in it (then removed)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"{flag} {directory}: exists and is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise OutputError(f"{flag} {directory}: cannot write there ({e.strerror or e})") from e
    return directory


def refuse_non_empty(directory: str | os.PathLike, overwrite: bool, flag: str = "--out") -> None:
    """For writers that do not resume: a non-empty ``directory`` only with ``overwrite``.

    Nothing is created here, so a refusal, or a later error, leaves the disk as it was.
    """
    directory = Path(directory)
    if directory.is_dir() and not overwrite and any(directory.iterdir()):
        raise OutputError(
            f"{flag} {directory}: not empty; pass --overwrite to replace what is there, or "
            "choose another directory"
        )
