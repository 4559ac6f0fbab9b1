"""`powergrad-train reproduce TABLE --data DIR`: every row of one of the paper's tables, then the report.

Each row runs its bundled recipe once per seed, in its own folder (OUT/<recipe name> for seed 0,
OUT/<recipe name>-seed<N> for seed N), with `--resume auto`: a finished run is skipped, an
interrupted one continues where it stopped, and the command can simply be started again after a
preemption. A folder is reused only when the config it holds equals the one the command would
run; otherwise the command names the keys that differ and starts nothing. Rows run one after
another, each under torchrun with --nproc processes. `--dry-run` prints the plan: recipe, seed,
command, global batch, steps, the LR of every epoch and the estimated GPU hours.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from powergrad_train import paper
from powergrad_train.config import KEYS, Config, build_config, get
from powergrad_train.errors import ConfigError

IMAGENET_TRAIN_IMAGES = 1_281_167
IMAGENET_VAL_IMAGES = 50_000
EVAL_SPEEDUP = 3.0  # assumed: evaluation (forward only) runs at 3x the training images/s
# Training images/s of one V100 (16 GB, SXM2) with fp16, channels_last and DALI: ESTIMATES, not
# measurements. ResNet-50 is NVIDIA's published figure for its ResNet-50 v1.5 PyTorch example
# (about 1,100 images/s per V100 with AMP); the others are scaled by their forward FLOPs, the
# SE models 20% slower for the squeeze-excitation's memory traffic.
V100_IMAGES_PER_SEC = {"resnet18": 2500, "resnet18_nobn": 2500, "seresnet18": 2000, "resnet50": 1100,
                       "seresnet50": 850, "resnet101": 600}
# Keys that may differ between a run folder's config and the command's without making it another
# run: where the data lives, loader processes and bookkeeping.
REUSE_IGNORES = ("data.root", "data.workers", "train.log_every_steps", "checkpoint.keep_last",
                 "checkpoint.every_steps", "log.outputs")


@dataclass
class Throughput:
    """Training images/s on --nproc GPUs: given per model, given for all, or the V100 estimate."""

    per_model: dict[str, float]
    default: Optional[float] = None

    def of(self, model: str, nproc: int) -> tuple[float, bool]:
        """(images/s on nproc GPUs, whether it was given rather than estimated)."""
        if model in self.per_model:
            return self.per_model[model], True
        if self.default is not None:
            return self.default, True
        return V100_IMAGES_PER_SEC.get(model, V100_IMAGES_PER_SEC["resnet50"]) * nproc, False


def parse_throughput(text: Optional[str]) -> Throughput:
    """`--images-per-sec 5600` (every model) or `resnet18=11000,resnet50=4400` (per model; a bare
    number among them covers the models not named)."""
    if text is None:
        return Throughput({})
    where = f"reproduce --images-per-sec {text}"
    models = sorted({r.model for r in paper.ROWS})
    per_model, default = {}, None
    for item in text.split(","):
        name, _, number = item.rpartition("=")
        name, number = name.strip(), number.strip()
        try:
            value = float(number)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{where}: '{number}' is not a positive number of images per second")
        if not name:
            if default is not None:
                raise ConfigError(f"{where}: more than one number without a model name")
            default = value
        elif name not in models:
            close = difflib.get_close_matches(name, models, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"{where}: '{name}' is no model of the paper's tables ({hint}models: {', '.join(models)})")
        else:
            per_model[name] = value
    return Throughput(per_model, default)


def parse_rows(text: Optional[str], table: int) -> Optional[list[int]]:
    """`--rows 13,14`: row numbers of the table, counted from 1; None for every row."""
    if text is None:
        return None
    count = len(paper.table_rows(table))
    where = f"reproduce --rows {text}" if text.strip() else "reproduce --rows"
    span = f"Table {table} has rows 1 to {count}"
    rows = []
    for item in text.split(","):
        item = item.strip()
        if not (item.isascii() and item.isdigit()):
            raise ConfigError(f"{where}: '{item}' is not a row number ({span})" if item else
                              f"{where}: give row numbers separated by commas, e.g. --rows 1,2 ({span})")
        if not 1 <= int(item) <= count:
            raise ConfigError(f"{where}: {span}")
        if int(item) in rows:
            raise ConfigError(f"{where}: row {item} is given twice")
        rows.append(int(item))
    return rows


def parse_seeds(text: Optional[str], overrides: list[str]) -> Optional[list[int]]:
    """`--seeds 0,1,2`: each row once per seed; None to run the recipes' seed (or --set seed=)."""
    if text is None:
        return None
    if any(s.split("=", 1)[0].strip() == "seed" for s in overrides):
        raise ConfigError("reproduce: give the seeds either with --seeds or with --set seed=N, not both")
    seeds = []
    for item in text.split(","):
        item = item.strip()
        if not (item.isascii() and item.isdigit()):
            raise ConfigError(f"reproduce --seeds {text}: '{item}' is not a seed (a whole number >= 0)")
        if int(item) in seeds:
            raise ConfigError(f"reproduce --seeds {text}: seed {item} is given twice")
        build_config(None, [f"seed={item}"])  # the schema's range for a seed
        seeds.append(int(item))
    return seeds


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
        from powergrad_train.report import read_summary
        summary = self.output / "summary.csv"
        rows = read_summary(summary) if summary.is_file() else []
        return int(rows[-1]["epoch"]) if rows else 0

    @property
    def finished(self) -> bool:
        return self.epochs_done >= self.cfg.schedule.epochs

    def gpu_hours(self, images_per_sec: float, nproc: int) -> float:
        """Training and validation of every epoch, at `images_per_sec` on `nproc` GPUs."""
        train = self.steps_per_epoch * self.cfg.data.batch_size / images_per_sec
        val = IMAGENET_VAL_IMAGES / (EVAL_SPEEDUP * images_per_sec)
        return self.cfg.schedule.epochs * (train + val) / 3600 * nproc


def count_train_images(data: Path) -> Optional[int]:
    """Files in DATA/train/<class>/ (no image check: a plan is an estimate), or None without that folder."""
    train = data / "train"
    if not train.is_dir():
        return None
    return sum(len([f for f in os.scandir(c.path) if f.is_file()]) for c in os.scandir(train) if c.is_dir())


def folder_name(row: paper.Row, seed: int, reading: str) -> str:
    """OUT/<recipe name>[-per-gpu][-seed<N>]: seed 0 keeps the recipe's name."""
    per_gpu = "-per-gpu" if paper.batch_overrides(row, reading) else ""
    return f"{Path(row.recipe).stem}{per_gpu}{f'-seed{seed}' if seed else ''}"


def plan(table: int, data: Path, nproc: int, out: Path, overrides: list[str], rows: Optional[list[int]],
         seeds: Optional[list[int]] = None, reading: str = "global") -> list[PlannedRun]:
    chosen = paper.table_rows(table)
    if rows:
        chosen = [chosen[i - 1] for i in rows]
    images = count_train_images(data) or IMAGENET_TRAIN_IMAGES
    launcher = [sys.executable, "-m", "powergrad_train"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
         "powergrad_train"]
    planned = []
    for row in chosen:
        for seed in seeds if seeds is not None else [None]:
            sets = [f"data.root={data}", *paper.batch_overrides(row, reading), *overrides,
                    *([f"seed={seed}"] if seed is not None else [])]
            cfg = build_config(row.recipe, sets)
            output = out / folder_name(row, cfg.seed, reading)
            command = [*launcher, "--config", row.recipe, "--output", str(output), "--resume", "auto",
                       *[arg for s in sets for arg in ("--set", s)]]
            planned.append(PlannedRun(row, cfg, output, command, images))
    return planned


def check_reuse(runs: list[PlannedRun]) -> None:
    """Refuse, before anything starts, a run folder that holds another run than the command's."""
    from powergrad_train.report import read_run_config
    for run in runs:
        stored_path = run.output / "config.yaml"
        if not stored_path.is_file():
            continue
        stored = read_run_config(stored_path)
        changed = [f"{k}: {get(stored, k)!r} -> {get(run.cfg, k)!r}" for k in KEYS
                   if k not in REUSE_IGNORES and get(stored, k) != get(run.cfg, k)]
        if changed:
            raise ConfigError(f"reproduce: {run.output} holds another run than this command trains "
                              f"({'; '.join(changed)}); nothing was started: give another --out, or the "
                              "settings that folder was started with")


def describe(runs: list[PlannedRun], nproc: int, throughput: Throughput, data: Path) -> str:
    lines, total, estimated = [], 0.0, False
    for run in runs:
        state = "finished: skipped" if run.finished else \
            f"continues after epoch {run.epochs_done}" if run.epochs_done else "to run"
        speed, given = throughput.of(run.cfg.model.name, nproc)
        estimated |= not given
        hours = run.gpu_hours(speed, nproc)
        total += 0 if run.finished else hours
        lines += [f"{run.row.title}, seed {run.cfg.seed} ({state}): "
                  f"{run.row.recipe}, global batch {run.cfg.data.batch_size}, {run.steps_per_epoch} steps per epoch "
                  f"x {run.cfg.schedule.epochs} epochs, about {hours:.0f} GPU hours at {speed:.0f} images/s"
                  f"{'' if given else ' (estimate)'}", f"  {shlex.join(run.command)}"]
    images = runs[0].train_images if runs else IMAGENET_TRAIN_IMAGES
    lines.append(f"steps per epoch: from the {images:,} files in {data / 'train'}" if (data / "train").is_dir()
                 else f"steps per epoch: from ImageNet's {IMAGENET_TRAIN_IMAGES:,} train images ({data / 'train'} "
                      "not found)")
    lines += lr_table(runs)
    seeds = sorted({r.cfg.seed for r in runs})
    lines.append(f"left to run: about {total:.0f} GPU hours on {nproc} GPU(s), {len(runs)} run(s) "
                 f"(seeds {', '.join(map(str, seeds))}); each epoch includes validating {IMAGENET_VAL_IMAGES:,} images "
                 f"at an assumed {EVAL_SPEEDUP:g}x the training images/s")
    if estimated:
        lines.append("GPU hours marked (estimate) use stated V100 fp16 throughputs, not measurements (README); pass "
                     "--images-per-sec MODEL=X,... with the figures `powergrad-train bench` prints on your GPUs")
    return "\n".join(lines)


def lr_table(runs: list[PlannedRun]) -> list[str]:
    """The LR at the first step of every epoch, one column per distinct schedule among the runs."""
    from powergrad_train.optim import lr_at_step
    columns = {}
    for run in runs:
        key = (dataclasses.astuple(run.cfg.schedule), run.cfg.optim.lr, run.steps_per_epoch)
        columns.setdefault(key, (run, []))[1].append(Path(run.row.recipe).stem)
    heads = [f"({chr(97 + i)}) {run.cfg.schedule.name}, {run.cfg.schedule.mode}: {', '.join(dict.fromkeys(names))}"
             for i, (run, names) in enumerate(columns.values())]
    lines = ["LR at the first step of each epoch: " + " | ".join(heads)]
    longest = max((run.cfg.schedule.epochs for run, _ in columns.values()), default=0)
    for epoch in range(longest):
        cells = [f"{lr_at_step(r.cfg.schedule, r.cfg.optim.lr, epoch * r.steps_per_epoch, r.steps_per_epoch):.6g}"
                 if epoch < r.cfg.schedule.epochs else "-" for r, _ in columns.values()]
        lines.append(f"  epoch {epoch + 1:4d}: " + " | ".join(cells))
    return lines


def execute(runs: list[PlannedRun]) -> tuple[int, str]:
    """Run the rows in turn; (0, "") when all finished, else the first failing row's exit status and why."""
    for run in runs:
        name = f"{run.row.title}, seed {run.cfg.seed}"
        if run.finished:
            print(f"{name}: finished, skipped ({run.output})", flush=True)
            continue
        print(f"{name}: {shlex.join(run.command)}", flush=True)
        code = subprocess.call(run.command)
        if code:
            return code, (f"error: reproduce: {run.row.recipe} (seed {run.cfg.seed}) stopped with exit status {code}; "
                          f"its run folder is {run.output}: run the same reproduce command again to continue")
    return 0, ""


def run_folders(out: Path) -> list[Path]:
    """Every run folder in OUT (of any table), for the report."""
    return sorted(p for p in out.iterdir() if (p / "config.yaml").is_file()) if out.is_dir() else []
