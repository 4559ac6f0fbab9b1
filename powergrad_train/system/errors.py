"""Errors the user can fix. The CLI prints them as one `error: ...` line and exits 2.

`shown()` and `printable()` put what a user or the disk gave into such a line: bounded, on one
line, whatever bytes it holds.
"""

import reprlib

SHOWN_CHARS = 80  # the most of a given value an error line quotes

_short = reprlib.Repr()
_short.maxlevel, _short.maxlist, _short.maxtuple, _short.maxdict = 2, 4, 4, 4
_short.maxstring = _short.maxother = SHOWN_CHARS


def shown(value) -> str:
    """A value as an error line quotes it: its repr, at most SHOWN_CHARS characters (a longer one ends
    with '...'), built without ever forming the whole repr of a huge value."""
    text = _short.repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


def printable(text) -> str:
    """A name from the disk or the command line, printable on one line: control characters (a newline,
    a terminal escape) and bytes that are not UTF-8 (held as surrogates) appear as their escapes."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(char: str) -> str:
    if "\udc80" <= char <= "\udcff":  # a byte that is not UTF-8, as os.fsdecode holds it
        return f"\\x{ord(char) - 0xDC00:02x}"
    return repr(char)[1:-1]


class UserError(Exception):
    """Something the user can fix; the message says what, where, and how."""


class ConfigError(UserError):
    """A recipe, key or value is wrong. `key` (dotted) and `source` (the recipe file or --set) name
    it as data where they are known."""

    def __init__(self, message: str, key: "str | None" = None, source: "str | None" = None):
        super().__init__(message)
        self.key, self.source = key, source

    def __reduce__(self):  # pickled whole, as ranks pass errors on
        return ConfigError, (str(self), self.key, self.source)


class DataError(UserError):
    """A data folder, split or file is missing or unusable."""


class ImageError(DataError):
    """One image file cannot be decoded; `path` names it (raised in the main process, never parsed)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{printable(path)}: cannot read image ({reason})")
        self.path, self.reason = path, reason

    def __reduce__(self):  # pickled with its two arguments (an exception pickles its message only)
        return ImageError, (self.path, self.reason)


class WriteError(UserError):
    """A file cannot be written (disk full, quota, read-only, permission); `path` names it."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: cannot write ({reason})")
        self.path, self.reason = str(path), reason

    def __reduce__(self):
        return WriteError, (self.path, self.reason)


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or does not fit the run."""


class TrainingError(UserError):
    """The run cannot go on (for example the loss stays non-finite)."""


class InstallError(UserError):
    """The installed torch or DALI build cannot drive this machine's GPUs."""


class RunFolderError(UserError):
    """The run folder cannot be used: not ours, in use, or not writable."""
