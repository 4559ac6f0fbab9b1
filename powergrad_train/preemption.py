"""Stopping on SIGTERM / SIGINT (what schedulers send before preemption).

The handler only records the signal; the trainer asks `requested()` after each step,
finishes that step, writes a checkpoint with its exact position and exits. In a
distributed run rank 0's answer is broadcast over a small gloo group, so every rank
stops after the same step and none waits at a collective the others never reach.
"""

from __future__ import annotations

import signal
from typing import Optional

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


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
        # A CPU-side group, so the per-step check never touches the GPU stream.
        self._group = dist.new_group(backend="gloo") if dist.is_initialized() else None

    def _record(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self.signum = signum

    def requested(self) -> Optional[int]:
        """The signal every rank agrees to stop on (rank 0's), or None; also kept as `agreed`."""
        if self._group is None:
            self.agreed = self.signum
        else:
            flag = torch.tensor([self.signum or 0])
            dist.broadcast(flag, src=0, group=self._group)
            self.agreed = int(flag.item()) or None
        return self.agreed

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
