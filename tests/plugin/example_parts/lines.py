"""An output: one line per epoch in a text file of the run folder; on a resume the lines of epochs after
the checkpoint go."""

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from powergrad_train.config.declare import Part, opt
from powergrad_train.training.outputs import Output


@dataclass
class Keys:
    lines_file: str = opt("lines.txt", "the file in the run folder")


class Lines(Output):
    def __init__(self, section):
        self.name = section.lines_file
        self.path = None

    def resume_at(self, run_dir: Path, epoch: int, step: int):
        self.path = Path(run_dir) / self.name
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if int(line.split()[1]) <= epoch]
            self.path.write_text("".join(f"{line}\n" for line in kept))
        return None

    def epoch_end(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(f"epoch {row['epoch']} eval_top1 {row['eval_top1']:.2f}\n")
        # A test's way to stop a run between epochs, as a scheduler's SIGTERM would.
        if os.environ.get("EXAMPLE_PARTS_STOP_AFTER_EPOCH") == str(row["epoch"]):
            os.kill(os.getpid(), signal.SIGTERM)


PART = Part(Lines, "a line per epoch in a text file", keys=Keys)
