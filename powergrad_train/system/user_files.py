"""Opening a file that a user named or put in a folder: a regular file only, read with a bound.

A name can lead anywhere: a link to /dev/zero never ends, a FIFO blocks the open until someone
writes to it, a folder named x.jpg is no image. So a file is looked at (following links) before
it is opened, opened without blocking, and looked at again through the open descriptor (it may
have been swapped in between); what is not a regular file is an OSError saying what it is, which
every caller already reports as a file it cannot open. Reads stop at a limit the caller sets.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
         (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class NotAFile(OSError):
    """The path leads to something other than a regular file."""

    def __init__(self, kind: str):
        super().__init__(f"{kind}, not a regular file")
        self.kind = kind


class TooLarge(OSError):
    """A file holds more than its reader takes."""

    def __init__(self, limit: int):
        super().__init__(f"larger than the {_size(limit)} this file may hold")
        self.limit = limit


def what_is(mode: int) -> str:
    """'a folder', 'a FIFO (named pipe)', ...: what a st_mode that is not a regular file's is."""
    return next((kind for test, kind in KINDS if test(mode)), "not a regular file")


def check_regular(path) -> None:
    """Raise NotAFile unless `path` (links followed) is a regular file; FileNotFoundError and the
    like when it cannot be looked up."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotAFile(what_is(mode))


def open_regular_fd(path, flags: int = os.O_RDONLY) -> int:
    """A descriptor of `path` opened with `flags` (O_CREAT makes a new regular file), when it is a
    regular file: looked at before the open (opening a device can have effects of its own), opened
    without blocking (a FIFO swapped in does not block the open), looked at again through the descriptor."""
    if not flags & os.O_CREAT or os.path.lexists(path):
        check_regular(path)
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotAFile(what_is(mode))
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(path) -> BinaryIO:
    """`path` open for reading in binary, when it is a regular file."""
    return os.fdopen(open_regular_fd(path), "rb")


def read_bytes(path, limit: int) -> bytes:
    """The content of regular file `path`, or TooLarge when it holds more than `limit` bytes."""
    with open_regular(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(limit)
    return data


def _size(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit} bytes"
