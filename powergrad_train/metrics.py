"""Metrics: device-side accumulators, and the rank-0 outputs (progress bar, console lines,
summary.csv, TensorBoard) behind one small interface, `Output`."""

from __future__ import annotations

import contextlib
import csv
import os
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

import torch

from powergrad_train import dist
from powergrad_train.atomic import reason
from powergrad_train.errors import WriteError

SUMMARY_COLUMNS = ("epoch", "step", "train_loss", "train_top1", "eval_loss", "eval_top1", "eval_top5", "lr",
                   "images_per_sec", "epoch_time_s", "logit_norm", "eval_logit_norm", "zeroed_filters",
                   "dead_features")


class TrainMeter:
    """Running sums of the epoch and counters of non-finite steps, kept on the device so the
    training step never waits for the host; read (and reduced over ranks) at log time.

    Its state for a checkpoint is the epoch's sums already reduced over ranks: restored on
    rank 0 only, so they are counted once.
    """

    SUMS = ("loss", "correct", "images", "logit_norm")
    LOSS, CORRECT, IMAGES, LOGIT_NORM = range(len(SUMS))

    def __init__(self, device: torch.device, is_main: bool):
        self.is_main = is_main
        self.sums = torch.zeros(len(self.SUMS), dtype=torch.float64, device=device)
        self.skip_streak = torch.zeros(1, dtype=torch.float64, device=device)  # skipped steps in a row, now
        self.longest_skip_streak = torch.zeros(1, dtype=torch.float64, device=device)
        self.bad_losses = torch.zeros(1, dtype=torch.float64, device=device)  # since the last checkpoint

    def reset(self) -> None:
        self.sums.zero_()

    @torch.no_grad()
    def update(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        # In-place adds of device values and Python numbers: no host-to-device copy, so no sync.
        logits = logits.detach().float()
        n = targets.shape[0]
        self.sums[self.LOSS] += loss.detach() * n
        self.sums[self.CORRECT] += (logits.argmax(1) == targets).sum()
        self.sums[self.IMAGES] += n
        self.sums[self.LOGIT_NORM] += logits.norm(dim=1).sum()

    @torch.no_grad()
    def count_step(self, skipped: torch.Tensor, bad_loss: torch.Tensor) -> None:
        """skipped: the step was not applied; bad_loss: its loss was not finite (device scalars)."""
        self.skip_streak.copy_((self.skip_streak + 1) * skipped)  # back to 0 on an applied step
        torch.maximum(self.longest_skip_streak, self.skip_streak, out=self.longest_skip_streak)
        self.bad_losses += bad_loss

    def bad_losses_since_checkpoint(self) -> int:
        """Steps with a non-finite loss on any rank since the last call (which resets the count)."""
        count = dist.all_reduce_sum(self.bad_losses.clone()).item()
        self.bad_losses.zero_()
        return int(count)

    def reduced_sums(self) -> torch.Tensor:
        return dist.all_reduce_sum(self.sums.clone()).cpu()

    def state_dict(self) -> torch.Tensor:
        return self.reduced_sums()

    def load_state_dict(self, sums: torch.Tensor) -> None:
        if self.is_main:
            self.sums.copy_(sums)

    def read(self) -> dict:
        values = dict(zip(self.SUMS, self.reduced_sums().tolist()))
        streak = dist.all_reduce_max(self.longest_skip_streak.clone()).item()
        count = max(values["images"], 1.0)
        return {"loss": values["loss"] / count, "top1": 100 * values["correct"] / count, "images": values["images"],
                "logit_norm": values["logit_norm"] / count, "longest_skip_streak": streak}


class EvalMeter:
    SUMS = ("loss", "top1", "top5", "images", "logit_norm")
    LOSS, TOP1, TOP5, IMAGES, LOGIT_NORM = range(len(SUMS))

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(self.SUMS), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == targets[:, None]
        self.sums[self.LOSS] += torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        self.sums[self.TOP1] += hits[:, 0].sum()
        self.sums[self.TOP5] += hits.any(1).sum()
        self.sums[self.IMAGES] += targets.shape[0]
        self.sums[self.LOGIT_NORM] += logits.norm(dim=1).sum()

    def read(self) -> dict:
        sums = dict(zip(self.SUMS, dist.all_reduce_sum(self.sums.clone()).tolist()))
        count = max(sums["images"], 1.0)
        return {"loss": sums["loss"] / count, "top1": 100 * sums["top1"] / count, "top5": 100 * sums["top5"] / count,
                "images": count, "logit_norm": sums["logit_norm"] / count}


class Output:
    """One place a run's numbers go, on rank 0. Every method does nothing unless overridden, so an
    output (a JSON-lines log, an experiment tracker) implements only what it needs and is handed
    to the Trainer in its `outputs` list.

    Per epoch: epoch_start, then step() after every optimizer step and progress(values) every
    train.log_every_steps, epoch_stop; then epoch_end(row) after evaluation, with the summary.csv
    columns. scalars() carries other series (zeroed filters per layer), message() start-up lines
    and warnings; flush() comes before every checkpoint, close() at the end.
    """

    def epoch_start(self, epoch: int, epochs: int, batches: int, batch: int) -> None:
        """Training of `epoch` (counted from 1) of `epochs` begins (or resumes) at `batch` of `batches`."""

    def step(self) -> None:
        """One optimizer step done."""

    def progress(self, values: dict) -> None:
        """step, epoch, epochs, batch, batches, loss, top1, lr, images_per_sec, eta_epoch_s, eta_run_s."""

    def epoch_stop(self) -> None:
        """Training of the epoch ended (completed or interrupted)."""

    def epoch_end(self, row: dict) -> None:
        """The epoch's summary row (SUMMARY_COLUMNS)."""

    def scalars(self, group: str, step: int, values: dict) -> None:
        """Named values of one group at a step."""

    def message(self, text: str) -> None:
        """A start-up line, a warning, the final line."""

    def flush(self) -> None:
        """Everything so far durable: a checkpoint is about to be written."""

    def close(self) -> None:
        pass


class ProgressBar(Output):
    """A tqdm bar per epoch, on a terminal."""

    def __init__(self):
        self.bar = None

    def epoch_start(self, epoch: int, epochs: int, batches: int, batch: int) -> None:
        from tqdm import tqdm
        self.bar = tqdm(total=batches, initial=batch, desc=f"epoch {epoch}/{epochs}", unit="step", leave=False,
                        dynamic_ncols=True)

    def step(self) -> None:
        self.bar.update()

    def progress(self, values: dict) -> None:
        self.bar.set_postfix(loss=f"{values['loss']:.4f}", top1=f"{values['top1']:.1f}", lr=f"{values['lr']:.4g}")

    def epoch_stop(self) -> None:
        self.bar.close()


class Console(Output):
    """Lines on stdout: messages, each epoch's summary, and (off a terminal, e.g. under SLURM or
    nohup, where no bar is drawn) a compact progress line every train.log_every_steps."""

    def __init__(self, progress_lines: bool):
        self.progress_lines = progress_lines

    def progress(self, p: dict) -> None:
        if self.progress_lines:
            print(f"epoch {p['epoch']}/{p['epochs']} step {p['batch']}/{p['batches']} | loss {p['loss']:.4f} "
                  f"top1 {p['top1']:.2f} | lr {p['lr']:.4g} | {p['images_per_sec']:.0f} img/s | "
                  f"ETA epoch {_duration(p['eta_epoch_s'])}, run {_duration(p['eta_run_s'])}", flush=True)

    def epoch_end(self, row: dict) -> None:
        print(f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} top1 {row['train_top1']:.2f} | "
              f"val loss {row['eval_loss']:.4f} top1 {row['eval_top1']:.2f} top5 {row['eval_top5']:.2f} | "
              f"lr {row['lr']:.4g} | {row['images_per_sec']:.0f} img/s | {row['epoch_time_s']:.1f}s", flush=True)

    def message(self, text: str) -> None:
        print(text, flush=True)


class SummaryCsv(Output):
    """summary.csv: one row per epoch. On resume, rows of epochs after the checkpoint are dropped."""

    def __init__(self, run_dir: Path, start_epoch: int):
        self.path = Path(run_dir) / "summary.csv"
        if self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("epoch", "").isdigit() and int(r["epoch"]) <= start_epoch]
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, SUMMARY_COLUMNS, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
            os.replace(tmp, self.path)  # a kill now leaves the old file or the new one

    def epoch_end(self, row: dict) -> None:
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, SUMMARY_COLUMNS)
            if new:
                w.writeheader()
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


class TensorBoard(Output):
    """Event files in the run folder: train/* every log interval, epoch/* per epoch, other groups.

    An event file cannot be written atomically (it is a log, appended to); a failed write is a
    WriteError naming it."""

    def __init__(self, run_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        _leave_writer_thread_errors_to_the_writer()
        earlier = sorted(Path(run_dir).glob(f"{EVENT_FILES}*"))
        self.path = Path(run_dir) / f"{EVENT_FILES}*"  # until the writer has made its file
        with self._writing():
            if not start_step:  # a fresh start: events of an earlier try that left no checkpoint are stale
                for stale in earlier:
                    stale.unlink()
            else:
                _sort_before_this_second(earlier)
            # Events up to a checkpoint's step are written before it; purge_step drops those a killed
            # run wrote after its last checkpoint.
            self.writer = SummaryWriter(str(run_dir), purge_step=start_step + 1 if start_step else None)
        self.path = next(iter(set(Path(run_dir).glob(f"{EVENT_FILES}*")) - set(earlier)), self.path)

    @contextlib.contextmanager
    def _writing(self):
        try:
            yield
        except OSError as e:  # raised here, or by the writer's thread and handed on at the next call
            raise WriteError(self.path, reason(e)) from None

    def progress(self, values: dict) -> None:
        self.scalars("train", values["step"], {k: values[k] for k in ("loss", "top1", "lr")})

    def epoch_end(self, row: dict) -> None:
        self.scalars("epoch", row["step"], {k: v for k, v in row.items() if k not in ("epoch", "step")})
        self.flush()

    def scalars(self, group: str, step: int, values: dict) -> None:
        with self._writing():
            for name, value in values.items():
                self.writer.add_scalar(f"{group}/{name}", value, step)

    def flush(self) -> None:
        with self._writing():
            self.writer.flush()

    def close(self) -> None:
        if sys.exc_info()[1] is not None:  # closing on the way out of another error: that one is reported
            with contextlib.suppress(OSError):
                self.writer.close()
            return
        with self._writing():
            self.writer.close()


def default_outputs(run_dir: Path, start_epoch: int, start_step: int) -> list[Output]:
    terminal = sys.stderr.isatty()
    return ([ProgressBar()] if terminal else []) + [Console(progress_lines=not terminal),
                                                    SummaryCsv(run_dir, start_epoch), TensorBoard(run_dir, start_step)]


class RunLog(Output):
    """Hands every call to each of its outputs, in order (it has none on ranks other than 0)."""

    def __init__(self, outputs: Sequence[Output]):
        self.outputs = list(outputs)

    def _each(self, method: str, *args) -> None:
        for output in self.outputs:
            getattr(output, method)(*args)

    def epoch_start(self, epoch: int, epochs: int, batches: int, batch: int) -> None:
        self._each("epoch_start", epoch, epochs, batches, batch)

    def step(self) -> None:
        self._each("step")

    def progress(self, values: dict) -> None:
        self._each("progress", values)

    def epoch_stop(self) -> None:
        self._each("epoch_stop")

    def epoch_end(self, row: dict) -> None:
        self._each("epoch_end", row)

    def scalars(self, group: str, step: int, values: dict) -> None:
        self._each("scalars", group, step, values)

    def message(self, text: str) -> None:
        self._each("message", text)

    def flush(self) -> None:
        self._each("flush")

    def close(self) -> None:
        self._each("close")


def format_eval(values: dict) -> str:
    return (f"val loss {values['loss']:.4f} top1 {values['top1']:.2f} top5 {values['top5']:.2f} "
            f"({int(values['images'])} images)")


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _leave_writer_thread_errors_to_the_writer() -> None:
    """TensorBoard writes from a thread of its own; a failed write there is raised again by the
    writer's next call (then one line, see TensorBoard._writing), so the thread's traceback is not
    printed as well."""
    if getattr(threading.excepthook, "leaves_tensorboard_alone", False):
        return
    previous = threading.excepthook

    def hook(args):
        if not (issubclass(args.exc_type, OSError) and type(args.thread).__module__.startswith("tensorboard.")):
            previous(args)

    hook.leaves_tensorboard_alone = True
    threading.excepthook = hook


EVENT_FILES = "events.out.tfevents."  # then the second the file was made in, host, pid, a counter


def _sort_before_this_second(event_files: list[Path]) -> None:
    """TensorBoard reads event files in name order, and a name starts with the second it was made
    in. A file named with this second or a later one (made by a killed try a moment ago, or on a
    machine whose clock runs ahead) would sort after the one we are about to make and, read
    last, purge our events. Such files are renamed into the past, keeping their order."""
    limit = int(time.time()) - 1
    for path in sorted(event_files, reverse=True):
        second, _, rest = path.name[len(EVENT_FILES):].partition(".")
        if not second.isdigit() or int(second) <= limit:
            break
        while (target := path.with_name(f"{EVENT_FILES}{limit:010d}.{rest}")).exists():
            limit -= 1
        path.rename(target)
        limit -= 1
