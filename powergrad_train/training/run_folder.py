"""The run folder: which checkpoint a command continues from, and who may write there.

Every check here only reads, so a refused command writes nothing. A folder is ours when it
holds the marker file this program writes when it creates a run (or, for runs made before
the marker existed, a powergrad-train checkpoint). A training holds an OS lock on the
folder for its whole life, so a second training into the same folder is refused; the lock
ends with the process that holds it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Optional

from powergrad_train.system.atomic import reason, remove_leftovers
from powergrad_train.system.errors import CheckpointError, RunFolderError, WriteError, printable
from powergrad_train.system.user_files import what_is
from powergrad_train.training import checkpoint
from powergrad_train.training.outputs import epoch_of, read_summary

MARKER = ".powergrad-train-run"
LOCK = ".lock"


def checkpoints_in(run_dir: Path) -> list[Path]:
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if checkpoint.CHECKPOINT_NAMES.fullmatch(p.name))


def check_output(run_dir: Path) -> None:
    """Refuse an --output that is a file, or a non-empty folder that is not a run of this program."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"--output: {printable(run_dir)} is a file, not a folder")
    if not run_dir.is_dir() or not any(run_dir.iterdir()) or (run_dir / MARKER).exists():
        return
    for path in checkpoints_in(run_dir):
        try:
            checkpoint.load(path)
            return  # a run written before the marker existed
        except CheckpointError:
            continue
    raise RunFolderError(f"--output: {printable(run_dir)} is not empty and is not a powergrad-train run folder; "
                         "choose a new or empty folder")


def _newest_valid(run_dir: Path) -> tuple[Optional[Path], list[str]]:
    """last.pt when it loads cleanly (it is the newest good state by construction); else the checkpoint
    (not nonfinite.pt) with the most steps that does; and why others did not."""
    try:
        checkpoint.load(run_dir / checkpoint.LAST)
        return run_dir / checkpoint.LAST, []
    except CheckpointError:
        pass
    best, best_step, refused = None, -1, []
    for path in checkpoints_in(run_dir):
        if path.name == checkpoint.NONFINITE:
            continue
        try:
            step = checkpoint.load(path)["train_state"]["step"]
        except CheckpointError as e:
            refused.append(str(e))
            continue
        if step > best_step or (step == best_step and best is not None and best.name == checkpoint.BEST):
            best, best_step = path, step
    return best, refused


def resume_point(run_dir: Path, resume: Optional[str]) -> tuple[Optional[Path], Optional[str]]:
    """(checkpoint to continue from or None for a fresh start, a note to print or None)."""
    check_output(run_dir)
    held = [p for p in checkpoints_in(run_dir) if p.name != checkpoint.NONFINITE]
    if resume == "auto":
        if not held:
            return None, None
        chosen, refused = _newest_valid(run_dir)
        if chosen is None:
            raise CheckpointError(f"--resume auto: {printable(run_dir)} holds checkpoints but none is usable "
                                  f"({refused[0] if refused else 'none readable'}); pass --resume PATH or "
                                  "choose another --output")
        note = None
        if chosen.name != checkpoint.LAST:
            why = "is missing" if not (run_dir / checkpoint.LAST).exists() else "is damaged"
            note = f"resuming from {printable(chosen)}: {printable(run_dir / checkpoint.LAST)} {why}"
        return chosen, note
    if resume:
        path = Path(resume)
        if path.is_dir():
            raise CheckpointError(f"--resume: {printable(path)} is a folder; pass a checkpoint file "
                                  f"({printable(path / checkpoint.LAST)}), or continue that run with --output "
                                  f"{printable(path)} --resume auto")
        if path.exists() and not path.is_file():  # (a folder is answered above)
            raise CheckpointError(f"--resume: {printable(path)} is {what_is(path.stat().st_mode)}, "
                                  "not a checkpoint file")
        if not path.is_file():
            raise CheckpointError(f"--resume: checkpoint not found: {printable(path)}")
        if held and path.resolve().parent != run_dir.resolve():
            raise RunFolderError(f"--output: {printable(run_dir)} already holds a run; a checkpoint from elsewhere "
                                 "would overwrite it: choose another --output (or --resume auto to continue this run)")
        if held:
            _refuse_rolling_back(run_dir, path)
        return path, None
    if held:
        raise RunFolderError(f"--output: {printable(run_dir)} already holds a run ({held[-1].name}); pass --resume "
                             "auto to continue it or choose another --output")
    return None, None


def _refuse_rolling_back(run_dir: Path, chosen: Path) -> None:
    """Continuing from an older checkpoint of the run in its own folder would overwrite what came
    after it (later checkpoints, best.pt, summary.csv rows, diagnostics): that history is kept, and
    the way to go on from the older state is a new run folder. The checkpoints' train states alone
    are read (unverified: a later file damaged in content is still history)."""
    try:
        state = checkpoint.load(chosen, verify=False)["train_state"]
    except CheckpointError:
        return  # the trainer reports it
    later = []
    for path in checkpoints_in(run_dir):
        if path.name == checkpoint.NONFINITE or path.resolve() == chosen.resolve():
            continue
        try:
            other = checkpoint.load(path, verify=False)["train_state"]
        except CheckpointError:
            continue  # unreadable: nothing to keep
        if other["step"] > state["step"]:
            later.append(f"{path.name} (epoch {other['epoch']}, step {other['step']})")
    rows = [e for e in _summary_epochs(run_dir) if e > state["epoch"]]
    if rows:
        later.append(f"summary.csv rows of epoch{'s' if len(rows) > 1 else ''} "
                     f"{rows[0]}{f'-{rows[-1]}' if len(rows) > 1 else ''}")
    if later:
        raise RunFolderError(
            f"--resume: {printable(chosen)} is at epoch {state['epoch']}, step {state['step']}, but "
            f"{printable(run_dir)} goes on beyond it ({', '.join(later)}), which continuing in this folder would "
            f"overwrite; to branch from it, pass a new --output (for example "
            f"{printable(run_dir)}-from-{printable(chosen.stem)})")


def _summary_epochs(run_dir: Path) -> list[int]:
    """The epochs of summary.csv's rows (an unreadable file has none: the start refuses it later)."""
    try:
        header, rows, _ = read_summary(run_dir)
    except RunFolderError:
        return []
    if not header or "epoch" not in header:
        return []
    column = header.index("epoch")
    return sorted(e for r in rows if (e := epoch_of(r, column)) is not None)


# (device, inode) of each lock file this process holds -> its pid, so that a forked child (another
# pid) holds none: see RunFolderLock.
_held: dict[tuple[int, int], int] = {}


class RunFolderLock:
    """Rank 0's claim on the run folder: creates it (with the marker) and holds an exclusive lock.

    The lock is a POSIX record lock (lockf), which belongs to the process that took it: the
    kernel drops it when that process ends, however it ends, and the processes forked from it
    (loader workers, which may outlive a killed parent by seconds) never hold it, so a run
    killed with kill -9 resumes at once. Such a lock also goes when its process closes any
    descriptor of the file, so this process opens the file once, and refuses a second lock of
    the same folder itself (the kernel would grant it).
    """

    def __init__(self, run_dir: Path):
        self._fd, self._key = None, None
        lock = run_dir / LOCK
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / MARKER).touch()
            held_here = lock.exists() and _held.get(_key(os.stat(lock))) == os.getpid()
            fd = None if held_here else os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunFolderError(f"--output: cannot create or write the run folder {printable(run_dir)} "
                                 f"({e.strerror or e})") from None
        if held_here:
            raise self._in_use(run_dir, os.getpid())
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise self._in_use(run_dir, holder) from None
        self._fd, self._key = fd, _key(os.fstat(fd))
        _held[self._key] = os.getpid()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)  # for the message of a refused second training
        except OSError as e:
            self.release()
            raise WriteError(lock, reason(e)) from None
        for folder in (run_dir, run_dir / "diagnostics"):  # what a killed run's writes left behind
            remove_leftovers(folder)

    @staticmethod
    def _in_use(run_dir: Path, holder) -> RunFolderError:
        return RunFolderError(f"--output: {printable(run_dir)} is in use by another training (pid {holder}); wait for "
                              "it to end or choose another --output")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            _held.pop(self._key, None)
            self._fd = None


def _key(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino
