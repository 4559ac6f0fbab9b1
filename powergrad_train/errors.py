"""Errors the user can fix. The CLI prints them as one `error: ...` line and exits 2."""


class UserError(Exception):
    """Something the user can fix; the message says what, where, and how."""


class ConfigError(UserError):
    """A recipe, key or value is wrong."""


class DataError(UserError):
    """A data folder, split or file is missing or unusable."""


class ImageError(DataError):
    """One image file cannot be decoded; `path` names it (raised in the main process, never parsed)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: cannot read image ({reason})")
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
