"""`powergrad-train reproduce TABLE --data DIR`: every row of one of the paper's tables, then the report.

Each row runs its bundled recipe in its own folder (OUT/<recipe name>) with `--resume auto`:
a finished row is skipped, an interrupted one continues where it stopped, and the command can
simply be started again after a preemption. Rows run one after another, each under torchrun
with --nproc processes. `--dry-run` prints the plan: recipe, command, global batch, steps and
the estimated GPU hours from a measured images/s.
"""

from __future__ import annotations

import csv
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from powergrad_train import paper
from powergrad_train.config import Config, build_config

IMAGENET_TRAIN_IMAGES = 1_281_167


@dataclass
class PlannedRun:
    row: paper.Row
    cfg: Config
    output: Path
    command: list[str]
    train_images: int

    @property
    def steps_per_epoch(self) -> int:
        return self.train_images // self.cfg.data.batch_size

    @property
    def epochs_done(self) -> int:
        summary = self.output / "summary.csv"
        if not summary.is_file():
            return 0
        return max((int(r["epoch"]) for r in csv.DictReader(open(summary, newline=""))), default=0)

    @property
    def finished(self) -> bool:
        return self.epochs_done >= self.cfg.schedule.epochs

    def gpu_hours(self, images_per_sec: float, nproc: int) -> float:
        images = self.cfg.schedule.epochs * self.steps_per_epoch * self.cfg.data.batch_size
        return images / images_per_sec / 3600 * nproc


def count_train_images(data: Path) -> Optional[int]:
    """Files in DATA/train/<class>/ (no image check: a plan is an estimate), or None without that folder."""
    train = data / "train"
    if not train.is_dir():
        return None
    return sum(len([f for f in os.scandir(c.path) if f.is_file()]) for c in os.scandir(train) if c.is_dir())


def plan(table: int, data: Path, nproc: int, out: Path, overrides: list[str], rows: Optional[list[int]]) -> list[PlannedRun]:
    chosen = [r for r in paper.ROWS if r.table == table]
    if rows:
        chosen = [chosen[i - 1] for i in rows]
    images = count_train_images(data) or IMAGENET_TRAIN_IMAGES
    launcher = [sys.executable, "-m", "powergrad_train"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
         "powergrad_train"]
    planned = []
    for row in chosen:
        sets = [f"data.root={data}", *overrides]
        cfg = build_config(row.recipe, sets)
        output = out / Path(row.recipe).stem
        command = [*launcher, "--config", row.recipe, "--output", str(output), "--resume", "auto",
                   *[arg for s in sets for arg in ("--set", s)]]
        planned.append(PlannedRun(row, cfg, output, command, images))
    return planned


def describe(runs: list[PlannedRun], nproc: int, images_per_sec: Optional[float]) -> str:
    lines = []
    total = 0.0
    for run in runs:
        state = "finished: skipped" if run.finished else \
            f"continues after epoch {run.epochs_done}" if run.epochs_done else "to run"
        hours = ""
        if images_per_sec:
            h = run.gpu_hours(images_per_sec, nproc)
            total += 0 if run.finished else h
            hours = f", about {h:.0f} GPU hours"
        lines += [f"Table {run.row.table} {run.row.label} ({state}): {run.row.recipe}, global batch "
                  f"{run.cfg.data.batch_size}, {run.steps_per_epoch} steps per epoch x {run.cfg.schedule.epochs} "
                  f"epochs{hours}", f"  {shlex.join(run.command)}"]
    if images_per_sec:
        lines.append(f"left to run: about {total:.0f} GPU hours at {images_per_sec:.0f} images/s on {nproc} GPU(s)")
    else:
        lines.append("GPU hours: pass --images-per-sec with the figure `powergrad-train bench` prints for a recipe")
    return "\n".join(lines)


def execute(runs: list[PlannedRun]) -> tuple[int, str]:
    """Run the rows in turn; (0, "") when all finished, else the first failing row's exit status and why."""
    for run in runs:
        if run.finished:
            print(f"Table {run.row.table} {run.row.label}: finished, skipped ({run.output})", flush=True)
            continue
        print(f"Table {run.row.table} {run.row.label}: {shlex.join(run.command)}", flush=True)
        code = subprocess.call(run.command)
        if code:
            return code, (f"error: reproduce: {run.row.recipe} stopped with exit status {code}; its run folder is "
                          f"{run.output}: run the same reproduce command again to continue")
    return 0, ""
