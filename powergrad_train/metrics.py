"""Metrics: device-side accumulators, and the rank-0 outputs (progress bar, summary line,
summary.csv, TensorBoard)."""

from __future__ import annotations

import csv
import os
import sys
import time
from pathlib import Path

import torch

from powergrad_train import dist

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

    def __init__(self, device: torch.device, is_main: bool):
        self.is_main = is_main
        self.sums = torch.zeros(len(self.SUMS), dtype=torch.float64, device=device)
        self.skip_streak = torch.zeros(2, dtype=torch.float64, device=device)  # current, longest
        self.bad_losses = torch.zeros(1, dtype=torch.float64, device=device)  # since the last checkpoint

    def reset(self) -> None:
        self.sums.zero_()

    @torch.no_grad()
    def update(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        # In-place adds of device values and Python numbers: no host-to-device copy, so no sync.
        logits = logits.detach().float()
        n = targets.shape[0]
        self.sums[0] += loss.detach() * n
        self.sums[1] += (logits.argmax(1) == targets).sum()
        self.sums[2] += n
        self.sums[3] += logits.norm(dim=1).sum()

    @torch.no_grad()
    def count_step(self, skipped: torch.Tensor, bad_loss: torch.Tensor) -> None:
        """skipped: the step was not applied; bad_loss: its loss was not finite (device scalars)."""
        self.skip_streak[0] = (self.skip_streak[0] + 1) * skipped  # back to 0 on an applied step
        self.skip_streak[1] = torch.maximum(self.skip_streak[1], self.skip_streak[0])
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
        streak = self.skip_streak[1:].clone()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(streak, op=torch.distributed.ReduceOp.MAX)
        count = max(values["images"], 1.0)
        return {"loss": values["loss"] / count, "top1": 100 * values["correct"] / count, "images": values["images"],
                "logit_norm": values["logit_norm"] / count, "skip_streak": streak.item()}


class EvalMeter:
    def __init__(self, device: torch.device):
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == targets[:, None]
        self.sums[0] += torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        self.sums[1] += hits[:, 0].sum()
        self.sums[2] += hits.any(1).sum()
        self.sums[3] += targets.shape[0]
        self.sums[4] += logits.norm(dim=1).sum()

    def read(self) -> dict:
        loss, top1, top5, count, norm = dist.all_reduce_sum(self.sums.clone()).tolist()
        count = max(count, 1.0)
        return {"loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count, "images": count,
                "logit_norm": norm / count}


class RunLog:
    """What rank 0 shows and writes; on other ranks every method does nothing."""

    def __init__(self, run_dir: Path, enabled: bool, start_epoch: int, start_step: int):
        self.enabled = enabled
        self.csv_path = Path(run_dir) / "summary.csv"
        self.tb = None
        self.terminal = False
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        earlier = list(Path(run_dir).glob("events.out.tfevents.*"))
        if not start_step:  # a fresh start: events of an earlier try that left no checkpoint are stale
            for stale in earlier:
                stale.unlink()
        else:
            _wait_for_a_later_second(earlier)
        # Events up to a checkpoint's step are written before it; purge_step drops those a killed
        # run wrote after its last checkpoint.
        self.tb = SummaryWriter(str(run_dir), purge_step=start_step + 1 if start_step else None)
        self._trim_csv(start_epoch)
        self.terminal = sys.stderr.isatty()

    def _trim_csv(self, start_epoch: int) -> None:
        """Keep the rows of epochs already in the checkpoint, so a resumed run appends cleanly."""
        if not self.csv_path.exists():
            return
        with open(self.csv_path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("epoch", "").isdigit() and int(r["epoch"]) <= start_epoch]
        tmp = self.csv_path.with_name(f".{self.csv_path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, SUMMARY_COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.csv_path)  # a kill now leaves the old file or the new one

    def progress(self, total: int, epoch: int, epochs: int, initial: int = 0):
        """A progress bar on a terminal; elsewhere (SLURM, nohup) progress_line() speaks instead."""
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, desc=f"epoch {epoch}/{epochs}", unit="step", leave=False,
                    disable=not (self.enabled and self.terminal), dynamic_ncols=True)

    def progress_line(self, p: dict) -> None:
        """One compact line every train.log_every_steps when stdout is a log file, not a terminal."""
        if self.enabled and not self.terminal:
            print(f"epoch {p['epoch']}/{p['epochs']} step {p['batch']}/{p['batches']} | loss {p['loss']:.4f} "
                  f"top1 {p['top1']:.2f} | lr {p['lr']:.4g} | {p['images_per_sec']:.0f} img/s | "
                  f"ETA epoch {_duration(p['eta_epoch_s'])}, run {_duration(p['eta_run_s'])}", flush=True)

    def train_scalars(self, step: int, values: dict) -> None:
        self.scalars("train", step, values)

    def scalars(self, group: str, step: int, values: dict) -> None:
        """TensorBoard only: `group/name` for each value."""
        if self.tb:
            for name, value in values.items():
                self.tb.add_scalar(f"{group}/{name}", value, step)

    def epoch_end(self, row: dict) -> None:
        if not self.enabled:
            return
        new = not self.csv_path.exists()
        with open(self.csv_path, "a", newline="") as f:
            w = csv.DictWriter(f, SUMMARY_COLUMNS)
            if new:
                w.writeheader()
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        for name, value in row.items():
            if name not in ("epoch", "step"):
                self.tb.add_scalar(f"epoch/{name}", value, row["step"])
        self.tb.flush()
        print(f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} top1 {row['train_top1']:.2f} | "
              f"val loss {row['eval_loss']:.4f} top1 {row['eval_top1']:.2f} top5 {row['eval_top5']:.2f} | "
              f"lr {row['lr']:.4g} | {row['images_per_sec']:.0f} img/s | {row['epoch_time_s']:.1f}s", flush=True)

    def flush(self) -> None:
        if self.tb:
            self.tb.flush()

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if self.tb:
            self.tb.close()


def format_eval(values: dict) -> str:
    return (f"val loss {values['loss']:.4f} top1 {values['top1']:.2f} top5 {values['top5']:.2f} "
            f"({int(values['images'])} images)")


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _wait_for_a_later_second(event_files: list[Path]) -> None:
    """TensorBoard reads event files in name order, and a name starts with the second it was made in.
    A file made by a killed try in this same second could sort after ours and, read last, purge our
    events: start ours in a later second than every file already there."""
    seconds = [int(part) for part in (p.name.split(".")[3] for p in event_files) if part.isdigit()]
    while seconds and int(time.time()) <= max(seconds):
        time.sleep(0.05)
