"""`powergrad-train reproduce TABLE --data DIR`: every row of one of the paper's tables, then the report.

Each row runs its bundled recipe once per seed, in its own folder (OUT/<recipe name> for seed 0,
OUT/<recipe name>-seed<N> for seed N), with `--resume auto`: a finished run is skipped, an
interrupted one continues where it stopped, and the command can simply be started again after a
preemption. A folder is reused only when the config it holds equals the one the command would
run; otherwise the command names the keys that differ and starts nothing. Rows run one after
another, each under torchrun with --nproc processes. A stop signal to the command (Ctrl-C, SIGTERM,
SIGUSR1, SIGHUP) is passed on to the row's trainer, which writes its checkpoint; the command waits
for it, says what it did and starts no further row. `--dry-run` prints the plan: recipe, seed,
command, global batch, steps, the LR of every epoch and the estimated GPU hours.
"""

from __future__ import annotations

import difflib
import math
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from powergrad_train.config.build import build_config
from powergrad_train.config.schema import KEYS, Config, get
from powergrad_train.reproduction import paper
from powergrad_train.reproduction.report import Run, read_epochs, read_run_config
from powergrad_train.system.errors import ConfigError, DataError, printable
from powergrad_train.system.preemption import STOP_SIGNALS

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
    launcher: list[str]  # python -m powergrad_train, under torchrun for several processes
    sets: list[str]  # the --set values given to the recipe
    train_images: int

    @property
    def train_args(self) -> list[str]:
        """What the trainer is given besides its run folder and --resume: the recipe and its --set values."""
        return ["--config", self.row.recipe, *[arg for s in self.sets for arg in ("--set", s)]]

    @property
    def command(self) -> list[str]:
        """The row's trainer as `reproduce` starts it: train_args with its run folder and --resume auto."""
        recipe, sets = self.train_args[:2], self.train_args[2:]
        return [*self.launcher, *recipe, "--output", str(self.output), "--resume", "auto", *sets]

    @property
    def steps_per_epoch(self) -> int:
        return self.train_images // self.cfg.data.batch_size

    def progress(self) -> Run:
        """Its run folder as it stands now, read as the report reads a run (Run.done, Run.finished)."""
        return Run(self.output, self.cfg, read_epochs(self.output))

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
    try:
        return sum(len([f for f in os.scandir(c.path) if f.is_file()]) for c in os.scandir(train) if c.is_dir())
    except OSError as e:
        raise DataError(f"reproduce --data: cannot list {printable(e.filename or train)} "
                        f"({e.strerror or type(e).__name__})") from None


def folder_name(row: paper.Row, seed: int, reading: str) -> str:
    """OUT/<recipe name>[-per-gpu][-seed<N>]: seed 0 keeps the recipe's name."""
    per_gpu = "-per-gpu" if paper.batch_overrides(row, reading) else ""
    return f"{Path(row.recipe).stem}{per_gpu}{f'-seed{seed}' if seed else ''}"


def chosen_rows(table: int, rows: Optional[list[int]]) -> list[paper.Row]:
    """The table's rows that --rows names (parse_rows), else all of them."""
    every = paper.table_rows(table)
    return [every[i - 1] for i in rows] if rows else every


def plan(table: int, data: Path, nproc: int, out: Path, overrides: list[str], rows: Optional[list[int]],
         seeds: Optional[list[int]] = None, reading: str = "global") -> list[PlannedRun]:
    counted = count_train_images(data)
    images = IMAGENET_TRAIN_IMAGES if counted is None else counted
    launcher = [sys.executable, "-m", "powergrad_train"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
         "powergrad_train"]
    planned = []
    for row in chosen_rows(table, rows):
        for seed in seeds if seeds is not None else [None]:
            sets = [f"data.root={data}", *paper.batch_overrides(row, reading), *overrides,
                    *([f"seed={seed}"] if seed is not None else [])]
            cfg = build_config(row.recipe, sets)
            if images < cfg.data.batch_size:  # an epoch of no step: nothing to plan, nothing to train
                raise DataError(f"reproduce --data {printable(data)}: {printable(data / 'train')} holds "
                                f"{images:,} file(s) in its class folders, fewer than one global batch of "
                                f"{row.recipe} ({cfg.data.batch_size}); give the ImageNet root (train/ and val/), "
                                "or a smaller data.batch_size with --set")
            planned.append(PlannedRun(row, cfg, out / folder_name(row, cfg.seed, reading), launcher, sets, images))
    return planned


def check_out(out: Path, runs: list[PlannedRun], writing: bool) -> None:
    """--out and every run folder in it are folders or can be made (`writing`: and written to), before
    anything starts: a trainer would otherwise find out alone, after the rows before it ran."""
    for path, what in [(out, "--out"), *((run.output, f"the run folder of {run.row.recipe}") for run in runs)]:
        if os.path.lexists(path) and not path.is_dir():
            raise ConfigError(f"reproduce --out: {printable(path)} ({what}) is a file, not a folder")
    existing = next(p for p in (out, *out.parents) if os.path.lexists(p))
    why = "is a file" if not existing.is_dir() else \
        "is not writable" if writing and not os.access(existing, os.W_OK | os.X_OK) else None
    if why:
        raise ConfigError(f"reproduce --out: cannot create or write {printable(out)} ({printable(existing)} {why})")


def check_reuse(runs: list[PlannedRun]) -> None:
    """Refuse, before anything starts, a run folder that holds another run than the command's."""
    for run in runs:
        stored_path = run.output / "config.yaml"
        if not stored_path.is_file():
            continue
        changed = changed_keys(read_run_config(stored_path), run.cfg)
        if changed:
            raise ConfigError(f"reproduce: {run.output} holds another run than this command trains "
                              f"({'; '.join(changed)}); nothing was started: give another --out, or the "
                              "settings that folder was started with")


def changed_keys(stored: Config, cfg: Config) -> list[str]:
    """'key: stored -> cfg' for each key that makes `cfg` another run than `stored` (REUSE_IGNORES aside)."""
    return [f"{k}: {get(stored, k)!r} -> {get(cfg, k)!r}" for k in KEYS
            if k not in REUSE_IGNORES and get(stored, k) != get(cfg, k)]


def describe(runs: list[PlannedRun], nproc: int, throughput: Throughput, data: Path) -> str:
    lines, total, estimated = [], 0.0, False
    for run in runs:
        progress = run.progress()
        state = "finished: skipped" if progress.finished else \
            f"continues after epoch {progress.done}" if progress.done else "to run"
        speed, given = throughput.of(run.cfg.model.name, nproc)
        estimated |= not given
        hours = run.gpu_hours(speed, nproc)
        total += 0 if progress.finished else hours
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
        lines.append("GPU hours marked (estimate) use stated V100 fp16 throughputs, not measurements (docs/reproducing.md); pass "
                     "--images-per-sec MODEL=X,... with the figures `powergrad-train bench` prints on your GPUs")
    return "\n".join(lines)


def lr_table(runs: list[PlannedRun]) -> list[str]:
    """The LR at the first step of every epoch, one column per distinct schedule among the runs."""
    from powergrad_train.training.optim import lr_at_step
    columns = {}
    for run in runs:
        key = (repr(run.cfg.schedule), run.cfg.optim.lr, run.steps_per_epoch)  # repr: milestones is a list
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
    """Run the rows in turn; (0, "") when all finished, else the exit status and what happened, in a line.

    Each row's trainer runs in a session of its own, so a Ctrl-C at the terminal reaches this process
    alone, which passes each stop signal on to the trainer once, as it came (SIGINT, SIGTERM, SIGUSR1,
    SIGHUP: the trainer writes a checkpoint and stops; a second SIGINT stops it at once), and waits
    for it to end. No row starts after a stop signal.
    """
    with StopsPassedOn() as stops:
        for run in runs:
            name = f"{run.row.recipe} (seed {run.cfg.seed})"
            if stops.received:
                return 128 + stops.received[0], (f"reproduce: stopped by {signal.Signals(stops.received[0]).name} "
                                                 f"before {name} started; run the same reproduce command again "
                                                 "to run the rows left")
            if run.progress().finished:
                print(f"{run.row.title}, seed {run.cfg.seed}: finished, skipped ({run.output})", flush=True)
                continue
            print(f"{run.row.title}, seed {run.cfg.seed}: {shlex.join(run.command)}", flush=True)
            last = run.output / "last.pt"
            before = _file_identity(last)
            code = stops.run(run.command)
            if code == 0 and not stops.received:
                continue
            return (128 + stops.received[0] if stops.received else code,
                    outcome(name, run.output, code, stops.received[0] if stops.received else None,
                            wrote=_file_identity(last) not in (None, before)))
    return 0, ""


def outcome(name: str, output: Path, code: int, signum: Optional[int], wrote: bool) -> str:
    """What a row's trainer that ended with exit status `code` did, as one line: whether it wrote a
    checkpoint, and what running the command again does. `signum`: the stop signal passed on to it."""
    from powergrad_train.training import checkpoint
    last = output / "last.pt"
    if signum is None and code - 128 in STOP_SIGNALS:  # a stop signal sent to it directly (by a scheduler)
        signum = code - 128
    if signum is not None:
        how = f"reproduce: stopped by {signal.Signals(signum).name}"
        if code == 0:
            return f"{how} after {name} finished; run the same reproduce command again to run the rows left"
        if wrote:
            return (f"{how}: {name} wrote its checkpoint {checkpoint.describe(last)}; run the same reproduce "
                    "command again to continue from it")
        held = (f"its last checkpoint is still {checkpoint.describe(last)}: run the same reproduce command again "
                "to continue from it") if last.exists() else \
            f"{output} holds no checkpoint of it: the same reproduce command starts it again"
        return f"{how} before {name} wrote a checkpoint; {held}"
    held = f"its run folder holds {checkpoint.describe(last)}; once the cause is fixed, the same reproduce command " \
           "continues from it" if last.exists() else \
        f"{output} holds no checkpoint of it; once the cause is fixed, the same reproduce command starts it again"
    cause = f"was killed by {signal.Signals(-code).name}" if code < 0 else \
        f"stopped on an error (exit status {code}; its message is above)"
    return f"error: reproduce: {name} {cause}; {held}"


def _file_identity(path: Path) -> Optional[tuple[int, int, int]]:
    """What changes when a checkpoint is written over `path` (a new file renamed or linked there), or None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class StopsPassedOn:
    """While the rows run: every stop signal this process gets is recorded and passed on, once, to the
    trainer running (one that comes while none runs stops the next from starting)."""

    def __init__(self):
        self.received: list[int] = []
        self.child: Optional[subprocess.Popen] = None
        self._pending: list[int] = []  # arrived while a trainer was being started
        self._previous = {}
        self._terminal = [fd for fd in (1, 2) if os.isatty(fd)]

    def __enter__(self) -> "StopsPassedOn":
        self._previous = {s: signal.signal(s, self._record) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _record(self, signum, frame) -> None:
        # (a handler runs in the main thread between two of its bytecodes, never beside them)
        self.received.append(signum)
        if signum == signal.SIGHUP:  # the terminal is gone: what is left to print goes nowhere, as under nohup
            devnull = os.open(os.devnull, os.O_WRONLY)
            for fd in self._terminal:
                os.dup2(devnull, fd)
            os.close(devnull)
        if self.child is None:
            self._pending.append(signum)
        else:
            self.child.send_signal(signum)

    def run(self, command: list[str]) -> int:
        """Run `command` in a session of its own, with the stop signals passed on; its exit status."""
        child = subprocess.Popen(command, start_new_session=True)
        self.child = child
        while self._pending:
            child.send_signal(self._pending.pop(0))
        try:
            return child.wait()
        finally:
            self.child = None


def run_folders(out: Path) -> list[Path]:
    """Every run folder in OUT (of any table), for the report."""
    return sorted(p for p in out.iterdir() if (p / "config.yaml").is_file()) if out.is_dir() else []
