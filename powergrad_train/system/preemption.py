"""Stopping on a signal: SIGTERM, SIGINT, SIGUSR1 or SIGHUP.

SIGTERM is what schedulers send before preemption or at a time limit; SIGUSR1 is what
several of them send ahead of it when asked (SLURM's --signal, Lightning's requeue
convention); SIGHUP comes when the terminal or ssh session of an interactive run closes.
Each would end the process at once by default, with no checkpoint and orphaned loader
workers; here each one stops the run cleanly. After a SIGHUP the terminal is gone, so
output meant for it goes to /dev/null (as under nohup) instead of failing the run.

The handler only records the signal; the trainer asks `requested()` after each step,
finishes that step, writes a checkpoint with its exact position and exits. In a
distributed run rank 0's answer is broadcast over a small gloo group, so every rank
stops after the same step and none waits at a collective the others never reach.
"""

from __future__ import annotations

import os
import signal
from typing import Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)


def _leave_the_terminal(fds: list[int]) -> None:
    """Point `fds` (stdout and stderr where they went to a terminal) at /dev/null: after a hangup,
    writing to the terminal fails (EIO), and the progress bar or a message would stop the run
    before its checkpoint."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in fds:
            os.dup2(devnull, fd)
    finally:
        os.close(devnull)


class Preempted(Exception):
    """The run stopped on a signal after writing a checkpoint."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    def __init__(self):
        self.signum: Optional[int] = None  # received by this process
        self.agreed: Optional[int] = None  # rank 0's, as the last requested() answered
        self._previous = {s: signal.signal(s, self._record) for s in STOP_SIGNALS}
        self._terminal = [fd for fd in (1, 2) if os.isatty(fd)]  # asked now: after a hangup it may fail
        # A CPU-side group, so the per-step check never touches the GPU stream.
        import torch.distributed as dist  # (here: the data backends' declarations import STOP_SIGNALS)
        self._group = dist.new_group(backend="gloo") if dist.is_initialized() else None

    def _record(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        if signum == signal.SIGHUP:
            _leave_the_terminal(self._terminal)
        self.signum = signum

    def requested(self) -> Optional[int]:
        """The signal every rank agrees to stop on (rank 0's), or None; also kept as `agreed`."""
        if self._group is None:
            self.agreed = self.signum
        else:
            import torch
            flag = torch.tensor([self.signum or 0])
            torch.distributed.broadcast(flag, src=0, group=self._group)
            self.agreed = int(flag.item()) or None
        return self.agreed

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
