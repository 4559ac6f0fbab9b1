"""Writing a file completely or not at all: into a temporary name beside it, fsynced, renamed.

A kill, a full disk or a quota at any moment leaves the previous file (or none), never a
half-written one; a failure is a WriteError naming the file, and leaves no temporary file.
(Checkpoints have their own writer in checkpoint.py, which also reports the size they need.)
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import BinaryIO, Callable

from powergrad_train.system.errors import WriteError


def reason(error: OSError) -> str:
    """'No space left on device', 'Read-only file system', ...: what the system says."""
    if error.errno:
        return error.strerror or os.strerror(error.errno)
    return str(error) or type(error).__name__


def make_folder(folder: Path) -> None:
    """`folder` and its parents, or a WriteError naming it."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(folder, reason(e)) from None


def write_file(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """`write(f)` fills a temporary file that then replaces `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except BaseException as e:  # an OSError, or an interrupt during the write
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise WriteError(path, reason(e)) from None
        raise


def write_text(path: Path, text: str) -> None:
    write_file(path, lambda f: f.write(text.encode()))


def remove_leftovers(folder: Path) -> None:
    """The temporary files that writes cut short by a kill left in `folder` (only those of
    write_file's naming; the files they were for are intact)."""
    for tmp in Path(folder).glob(".*.tmp*"):
        if re.fullmatch(r"\..+\.tmp\d+", tmp.name):
            with contextlib.suppress(OSError):
                tmp.unlink()


def fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
