"""The Trainer: wires model, data, loss, optimizer, checkpoints and metrics together.

fit() runs epochs and decides when to log, evaluate, checkpoint and stop; train_step()
is one optimizer step and nothing else.
"""

from __future__ import annotations

import contextlib
import random
import signal
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from powergrad_train import __version__, checkpoint, dist
from powergrad_train.config import Config, to_dict
from powergrad_train.data import build_train_loader, build_val_loader, check_classes
from powergrad_train.dist import DistEnv
from powergrad_train.errors import CheckpointError, TrainingError
from powergrad_train.metrics import EvalMeter, RunLog, TrainMeter
from powergrad_train.models import build_model, classifier_parameters
from powergrad_train.optim import build_grad_clipper, build_optimizer, lr_at_step, set_lr
from powergrad_train.pgt import power_grad_cross_entropy
from powergrad_train.preemption import Preempted, StopRequest

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_for(amp: str, device: torch.device):
    return lambda: torch.autocast(device.type, dtype=AMP_DTYPES.get(amp), enabled=amp != "off")


@torch.no_grad()
def evaluate(model, loader, device, autocast, memory_format=torch.contiguous_format) -> dict:
    """Top-1/top-5/loss over the whole val split; every image counted once across ranks."""
    model.eval()
    meter = EvalMeter(device)
    for images, targets in loader:
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        with autocast():
            logits = model(images)
        meter.update(logits, targets)
    return meter.read()


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, env: DistEnv, device: torch.device,
                 resume_from: Optional[Path] = None):
        self.cfg, self.run_dir, self.env, self.device = cfg, Path(run_dir), env, device
        seed_everything(cfg.seed)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # shapes are fixed: let cuDNN pick its fastest kernels
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

        self.model = build_model(cfg.model)
        if cfg.model.sync_bn and env.distributed:
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model.to(device, memory_format=self.memory_format)
        self.optimizer = build_optimizer(cfg.optim, self.model)
        self.clip_gradients = build_grad_clipper(cfg.grad_clip, self.model)
        self.head_parameters = classifier_parameters(self.model)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        self.autocast = autocast_for(cfg.amp, device)
        # DDP broadcasts rank 0's initial weights; evaluation uses the unwrapped self.model.
        self.train_model = DistributedDataParallel(
            self.model, device_ids=[device.index] if device.type == "cuda" else None,
        ) if env.distributed else self.model
        self.forward_loss = torch.compile(self._forward_loss) if cfg.model.compile else self._forward_loss

        with dist.main_process_first():  # rank 0 scans the files; the others then read its cache
            self.train_loader, self.classes = build_train_loader(cfg.data, cfg.seed, env.rank, env.world_size, device)
            self.val_loader, val_classes = build_val_loader(cfg.data, env.rank, env.world_size, device)
        check_classes(self.classes, val_classes, cfg.model.num_classes)
        self.steps_per_epoch = self.train_loader.batches_per_epoch
        self.meter = TrainMeter(device)
        self.checkpointer = checkpoint.Checkpointer(self.run_dir, cfg.checkpoint.keep_last)
        if env.is_main:
            self.checkpointer.remove_partial_files()

        self.epoch = 0  # epochs completed
        self.batch_in_epoch = 0  # global batches of the current epoch already trained
        self.step = 0  # optimizer steps completed, over the whole run
        self.best_top1, self.best_epoch = float("-inf"), 0
        self.epoch_elapsed = 0.0  # training seconds of the current epoch (kept across a resume)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        self.log = RunLog(self.run_dir, env.is_main, self.epoch, self.step)

    # ------------------------------------------------------------------ the training step

    def to_device(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (images.to(self.device, non_blocking=True, memory_format=self.memory_format),
                targets.to(self.device, non_blocking=True))

    def _forward_loss(self, images: torch.Tensor, targets: torch.Tensor):
        """Logits under autocast, and the loss stage: PGT and label smoothing (pgt.py)."""
        with self.autocast():
            logits = self.train_model(images)
        return logits, power_grad_cross_entropy(logits, targets, self.cfg.loss.pgt_alpha, self.cfg.loss.label_smoothing)

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        """One optimizer step over this process's share of one global batch. No host sync."""
        set_lr(self.optimizer, lr_at_step(self.cfg.schedule, self.cfg.optim.lr, self.step, self.steps_per_epoch))
        accumulate = self.cfg.train.accumulate_steps
        micro_batches = list(zip(images.chunk(accumulate), targets.chunk(accumulate)))
        loss_sum = 0.0
        for i, (x, y) in enumerate(micro_batches):
            # DDP all-reduces gradients only on the last micro-batch.
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not self.env.distributed else self.train_model.no_sync()
            with sync:
                logits, loss = self.forward_loss(x, y)
                # Dividing by the micro-batch count makes the gradient the mean over the whole batch.
                self.scaler.scale(loss / len(micro_batches)).backward()
            self.meter.update(loss, logits, y)
            loss_sum = loss_sum + loss.detach()
        self.scaler.unscale_(self.optimizer)  # clip true gradients, not scaled ones
        self.clip_gradients()
        if self.scaler.is_enabled():
            nonfinite = ~torch.isfinite(loss_sum)  # fp16 overflow skips are the scaler's business, a bad loss ours
        else:
            # A non-finite loss on any rank makes the classifier head's all-reduced gradient non-finite
            # on every rank, so every rank skips the same steps; checking the small head keeps this
            # cheap (a norm over all gradients would cost ~4% of a CPU step). The fused optimizer
            # reads found_inf on the device and skips the update without a host sync.
            nonfinite = ~torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in self.head_parameters]))
            self.optimizer.found_inf = nonfinite.float()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.meter.count_nonfinite(nonfinite)
        self.step += 1

    # ------------------------------------------------------------------ epochs

    def fit(self) -> None:
        cfg, log = self.cfg, self.log
        stop = StopRequest()
        try:
            while self.epoch < cfg.schedule.epochs:
                self._train_epoch(stop)
                val = self.evaluate()
                is_best = val["top1"] > self.best_top1
                if is_best:
                    self.best_top1, self.best_epoch = val["top1"], self.epoch
                train = self.meter.read()
                # Log before the checkpoint: a run killed in between resumes from the previous
                # checkpoint, which trims summary.csv and TensorBoard back to it.
                log.epoch_end({
                    "epoch": self.epoch, "step": self.step, "train_loss": train["loss"], "train_top1": train["top1"],
                    "eval_loss": val["loss"], "eval_top1": val["top1"], "eval_top5": val["top5"],
                    "lr": self.optimizer.param_groups[0]["lr"], "images_per_sec": train["images"] / self.epoch_elapsed,
                    "epoch_time_s": self.epoch_elapsed, "logit_norm": train["logit_norm"],
                })
                self.save_checkpoint(is_best=is_best)
            log.info(f"done: best val top1 {self.best_top1:.2f} at epoch {self.best_epoch}; run folder {self.run_dir}")
        finally:
            stop.close()

    def _train_epoch(self, stop: StopRequest) -> None:
        """Train the rest of the current epoch; afterwards self.epoch counts it as done."""
        cfg = self.cfg
        self.train_loader.set_epoch(self.epoch, start_batch=self.batch_in_epoch)
        if self.batch_in_epoch == 0:
            self.meter.reset()
            self.epoch_elapsed = 0.0
        self.train_model.train()
        start = time.perf_counter() - self.epoch_elapsed
        bar = self.log.progress(self.steps_per_epoch, self.epoch + 1, cfg.schedule.epochs, self.batch_in_epoch)
        for batch in self.train_loader:
            self.train_step(*self.to_device(*batch))
            self.batch_in_epoch += 1
            bar.update()
            if self.step % cfg.train.log_every_steps == 0:
                self._log_progress(bar)
            self.epoch_elapsed = time.perf_counter() - start
            signum = stop.requested()
            # Periodic saves skip the epoch's last step: the epoch-end checkpoint follows it.
            periodic = (cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0
                        and self.batch_in_epoch < self.steps_per_epoch)
            if signum or periodic:
                self.save_checkpoint(is_best=False)
            if signum:
                bar.close()
                raise Preempted(signum, f"stopped by {signal.Signals(signum).name} in epoch {self.epoch + 1} "
                                        f"after step {self.step}; checkpoint written to {self.checkpointer.last}; "
                                        "continue with --resume auto")
        bar.close()
        self.epoch_elapsed = time.perf_counter() - start
        self._check_finite()
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def _log_progress(self, bar) -> None:
        values = self.meter.read()
        self._check_finite(values)
        lr = self.optimizer.param_groups[0]["lr"]
        self.log.train_scalars(self.step, {"loss": values["loss"], "top1": values["top1"], "lr": lr})
        bar.set_postfix(loss=f"{values['loss']:.4f}", top1=f"{values['top1']:.1f}", lr=f"{lr:.4g}")

    def _check_finite(self, values: Optional[dict] = None) -> None:
        """Stop when the loss stayed non-finite too long (checked at log time: no per-step sync)."""
        values = values or self.meter.read()
        limit = self.cfg.train.max_nonfinite_steps
        if values["nonfinite_streak"] >= limit:
            last = self.checkpointer.last if self.checkpointer.last.exists() else "none yet"
            raise TrainingError(
                f"the loss stayed non-finite for {int(values['nonfinite_streak'])} steps in a row "
                f"(train.max_nonfinite_steps = {limit}) before step {self.step}; those steps were skipped. "
                f"Last good checkpoint: {last}; lower optim.lr or set grad_clip")

    def evaluate(self) -> dict:
        return evaluate(self.model, self.val_loader, self.device, self.autocast, self.memory_format)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        return {
            "format": checkpoint.FORMAT, "version": __version__,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            # The LR is a pure function of the global step: the step is the scheduler's state.
            "schedule": {"step": self.step, "steps_per_epoch": self.steps_per_epoch},
            "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
            "epoch_elapsed": self.epoch_elapsed, "train_meter": self.meter.reduced_sums(),
            "best_top1": self.best_top1, "best_epoch": self.best_epoch,
            "config": to_dict(self.cfg), "classes": list(self.classes),
        }

    def save_checkpoint(self, is_best: bool) -> None:
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise TrainingError(f"weights are not finite at step {self.step}: not saving a checkpoint; "
                                f"last good checkpoint: {self.checkpointer.last}")
        self.log.flush()  # every event up to this checkpoint is on disk before it
        state = self.state_dict()
        # One entry per rank: RNG states, and the data pipeline's position inside the epoch.
        state["rng"] = dist.all_gather_objects(checkpoint.rng_state())
        state["data"] = dist.all_gather_objects(self.train_loader.state() if self.batch_in_epoch else None)
        if self.env.is_main:
            self.checkpointer.save(state, self.epoch, is_best, numbered=self.batch_in_epoch == 0)
        dist.barrier()

    def load_checkpoint(self, path: Path) -> None:
        state = checkpoint.load(path)
        if state.get("classes") and list(state["classes"]) != list(self.classes):
            raise CheckpointError(f"{path}: trained on other classes than data.root holds")
        if state["schedule"]["steps_per_epoch"] != self.steps_per_epoch:
            raise CheckpointError(f"{path}: saved with {state['schedule']['steps_per_epoch']} steps per epoch, "
                                  f"this run has {self.steps_per_epoch} (another data set or batch size)")
        checkpoint.load_model_weights(self.model, state, path, self.cfg.model.name)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        self.epoch_elapsed = state["epoch_elapsed"]
        self.best_top1, self.best_epoch = state["best_top1"], state["best_epoch"]
        if self.env.is_main:  # the epoch's running sums (already reduced over ranks), counted once
            self.meter.load_sums(state["train_meter"])
        if len(state["rng"]) == self.env.world_size:
            checkpoint.set_rng_state(state["rng"][self.env.rank])
        if state["data"][0] is not None:
            if len(state["data"]) != self.env.world_size:
                raise CheckpointError(f"{path}: saved inside an epoch by {len(state['data'])} process(es); "
                                      f"resume it with the same number (this run has {self.env.world_size})")
            self.train_loader.restore(state["data"][self.env.rank])

    def close(self) -> None:
        self.log.close()
