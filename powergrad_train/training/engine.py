"""The Trainer: the training loop over parts that build_run (run.py) assembled.

fit() runs epochs and decides when to log, evaluate, checkpoint and stop; train_step() is one
optimizer step and nothing else. The Trainer reads no config: it is handed its parts, a
LoopSettings of plain values and the LR as a function of the step.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from timm.utils import distribute_bn

from powergrad_train.data import Loaders
from powergrad_train.system import dist
from powergrad_train.system.dist import DistEnv
from powergrad_train.system.errors import CheckpointError, TrainingError
from powergrad_train.system.hardware import MemoryOutsideTorch
from powergrad_train.system.preemption import Preempted, StopRequest
from powergrad_train.training import checkpoint
from powergrad_train.training.batch_transforms import BatchTransform
from powergrad_train.training.checkpoint import Checkpointer, TrainState
from powergrad_train.training.diagnostics import PooledFeatureWatch, epoch_diagnostics
from powergrad_train.training.ema import WeightAverage
from powergrad_train.training.metrics import EvalMeter, TrainMeter
from powergrad_train.training.objectives import Objective
from powergrad_train.training.optim import set_lr
from powergrad_train.training.outputs import RunLog
from powergrad_train.training.run_folder import RunFolderLock
from powergrad_train.training.step_guard import BufferSnapshot, StepSkipper, nonfinite_gradients

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
DIVERGENCE_ADVICE = "lower optim.lr, lengthen schedule.warmup_epochs or set grad_clip"


def autocast_for(amp: str, device: torch.device):
    return lambda: torch.autocast(device.type, dtype=AMP_DTYPES.get(amp), enabled=amp != "off")


def memory_format_for(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


@dataclass(frozen=True)
class LoopSettings:
    """What the loop uses of the recipe, as plain values (run.loop_settings reads them from a config)."""

    epochs: int  # schedule.epochs
    batch_per_process: int  # this process's share of a global batch: a short batch is filled up to it
    accumulate_steps: int  # micro-batches per optimizer step
    log_every_steps: int  # progress (and the host's look at the device's metrics) every this many steps
    max_nonfinite_steps: int  # steps in a row with non-finite gradients that stop the run
    checkpoint_every_steps: int  # last.pt inside an epoch every this many steps (0: epoch ends only)
    amp: str  # off | fp16 | bf16
    channels_last: bool
    compile: bool  # torch.compile the forward and loss


@torch.no_grad()
def evaluate_model(model, loader, device, autocast, memory_format=torch.contiguous_format,
                   stop_requested=lambda: None) -> Optional[dict]:
    """Top-1/top-5/loss over the whole val split; every image counted once across ranks.

    None when `stop_requested()` answered a signal number after some batch: a preemption's grace
    period is too short to finish an ImageNet validation.
    """
    model.eval()
    meter = EvalMeter(device)
    for images, targets in loader:
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        with autocast():
            logits = model(images)
        meter.update(logits, targets)
        if stop_requested():
            return None
    return meter.read()


def full_batch(images: torch.Tensor, targets: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch filled up to `size` images with copies of its first ones, when it came out short (a file
    that failed when read was left out of it): the start-up checks' batch size, even batch (mixup) and
    micro-batches of more than one image (batch norm) then hold for every step, and the step count and
    every other image's augmentation stay what they were. No host sync: shapes are known on the host."""
    if images.shape[0] >= size:
        return images, targets
    rows = torch.arange(size, device=images.device) % images.shape[0]
    return images[rows], targets[rows]


@dataclass(eq=False)
class Trainer:
    """The loop, handed every part it uses (run.build_run assembles them from a config)."""

    settings: LoopSettings
    lr_at: Callable[[int], float]  # the schedule's LR at a global optimizer step (0-based)
    startup_lines: tuple[str, ...]  # what announce() says of the model, data, device and loss
    run_dir: Path
    env: DistEnv
    device: torch.device
    model: torch.nn.Module  # the unwrapped model: evaluation, checkpoints, diagnostics
    train_model: torch.nn.Module  # what the training step calls: the model, DDP-wrapped when distributed
    data: Loaders
    objective: Objective
    batch_transform: BatchTransform
    optimizer: torch.optim.Optimizer
    skipper: StepSkipper  # how the optimizer leaves out a step whose gradients are not finite
    clip_gradients: Callable[[], None]
    scaler: torch.amp.GradScaler
    weight_average: Optional[WeightAverage]
    buffers: BufferSnapshot
    feature_watch: PooledFeatureWatch
    state: TrainState
    meter: TrainMeter
    checkpointer: Checkpointer
    log: RunLog
    folder_lock: Optional[RunFolderLock] = None
    init_note: Optional[str] = None  # where the initial weights came from (model.init_from)
    gpu_memory: Optional[MemoryOutsideTorch] = None  # on a GPU: memory outside torch since before the data

    def __post_init__(self):
        self.autocast = autocast_for(self.settings.amp, self.device)
        self.memory_format = memory_format_for(self.settings.channels_last)
        self.forward_loss = torch.compile(self._forward_loss) if self.settings.compile else self._forward_loss

    @property
    def steps_per_epoch(self) -> int:
        return self.data.train.batches_per_epoch

    def lr(self) -> float:
        """The schedule's LR at the current step (groups may scale it: optim.set_lr)."""
        return self.lr_at(self.state.step)

    # ------------------------------------------------------------------ the training step

    def to_device(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (images.to(self.device, non_blocking=True, memory_format=self.memory_format),
                targets.to(self.device, non_blocking=True))

    def _forward_loss(self, images: torch.Tensor, targets: torch.Tensor):
        """Logits under autocast, and the objective (cross-entropy with PGT: pgt.py)."""
        with self.autocast():
            logits = self.train_model(images)
        return logits, self.objective(logits, targets)

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        """One optimizer step over this process's share of one global batch. No host sync (unless the
        optimizer can only skip a bad step on the host: step_guard.py)."""
        images, targets = full_batch(images, targets, self.settings.batch_per_process)
        set_lr(self.optimizer, self.lr())
        self.buffers.take()  # the forward updates batch-norm statistics; a skipped step puts them back
        images, targets = self.batch_transform(images, targets)
        accumulate = self.settings.accumulate_steps
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
        # Decide before the gradient stage: clipping by value would make an inf gradient finite.
        # A bad loss on any rank reaches every rank's gradients through the all-reduce, so all
        # ranks skip alike. Under fp16 the GradScaler's unscale_ below makes the same decision.
        skipped = nonfinite_gradients(self.model.parameters())
        self.scaler.unscale_(self.optimizer)  # clip true gradients, not scaled ones
        self.clip_gradients()
        self.skipper.step(self.optimizer, self.scaler, skipped)  # optimizer and scaler step, or neither
        self.optimizer.zero_grad(set_to_none=True)
        self.buffers.restore_if(skipped)
        if self.weight_average is not None:
            self.weight_average.update(self.model, skipped)
        self.meter.count_step(skipped, ~torch.isfinite(loss_sum))
        self.state.step += 1

    # ------------------------------------------------------------------ epochs

    def fit(self) -> None:
        log, s = self.log, self.state
        stop = StopRequest()
        try:
            while s.epoch < self.settings.epochs or s.eval_pending:
                if not s.eval_pending:
                    self._train_epoch(stop)
                val = self.evaluate(stop.requested)
                if val is None:
                    path = self.save_checkpoint()
                    raise Preempted(stop.agreed, f"stopped by {signal.Signals(stop.agreed).name} while validating "
                                                f"epoch {s.epoch}; checkpoint written to {path} (training of the "
                                                "epoch complete, validation runs again); continue with --resume auto")
                s.eval_pending = False
                train = self.meter.read()
                # The paper's diagnostics: filter norms (saved per epoch), zeroed filters, dead features.
                zeroed = epoch_diagnostics(self.model, self.run_dir, s.epoch, self.env.is_main, val["feature_rms"])
                # Log before the checkpoint: a run killed in between resumes from the previous
                # checkpoint, which trims summary.csv and TensorBoard back to it.
                row = {
                    "epoch": s.epoch, "step": s.step, "train_loss": train["loss"], "train_top1": train["top1"],
                    "eval_loss": val["loss"], "eval_top1": val["top1"], "eval_top5": val["top5"],
                    "lr": self.lr_at(s.step - 1),
                    "images_per_sec": train["images"] / s.epoch_elapsed, "epoch_time_s": s.epoch_elapsed,
                    "logit_norm": train["logit_norm"], "eval_logit_norm": val["logit_norm"],
                    "zeroed_filters": sum(zeroed.values()), "dead_features": val["dead_features"],
                }
                if self.weight_average is not None:  # a column of its own: eval_ema_top1 for the EMA
                    row[f"eval_{self.weight_average.name}_top1"] = val["weight_average_top1"]
                log.epoch_end(row)
                log.scalars("zeroed_filters", s.step, zeroed)
                self.save_checkpoint(val_top1=val["top1"])
            log.message(f"done: best val top1 {s.best_top1:.2f} at epoch {s.best_epoch}; run folder {self.run_dir}")
        finally:
            stop.close()
            if self.env.distributed and dist.lost_a_peer(sys.exc_info()[1]):
                dist.outlast_the_stop()  # torchrun's SIGTERM must not cut short what this process says of it

    def _train_epoch(self, stop: StopRequest) -> None:
        """Train the rest of the current epoch; afterwards the state counts it as done."""
        settings, s = self.settings, self.state
        if s.batch_in_epoch == 0:
            self.meter.reset()
            s.epoch_elapsed = 0.0
        self.train_model.train()
        start = time.perf_counter() - s.epoch_elapsed  # training time only: checkpoint writes are taken out
        self.log.epoch_start(s.epoch + 1, settings.epochs, self.steps_per_epoch, s.batch_in_epoch)
        try:
            for images, targets in self.device_batches(s.epoch, s.batch_in_epoch):
                self.train_step(images, targets)
                s.batch_in_epoch += 1
                s.epoch_elapsed = time.perf_counter() - start
                self.log.step()
                if s.step % settings.log_every_steps == 0:
                    self._log_progress()
                signum = stop.requested()
                # Periodic saves skip the epoch's last step: the epoch-end checkpoint follows it.
                periodic = (settings.checkpoint_every_steps and s.step % settings.checkpoint_every_steps == 0
                            and s.batch_in_epoch < self.steps_per_epoch)
                if signum or periodic:
                    saved = self.save_checkpoint()
                    start = time.perf_counter() - s.epoch_elapsed
                if signum:
                    raise Preempted(signum, f"stopped by {signal.Signals(signum).name} in epoch {s.epoch + 1} "
                                            f"after step {s.step}; checkpoint written to {saved}; "
                                            f"continue with --resume auto (from {self.checkpointer.last})")
        finally:
            self.log.epoch_stop()
        s.epoch_elapsed = time.perf_counter() - start
        self._check_finite()
        s.epoch, s.batch_in_epoch, s.eval_pending = s.epoch + 1, 0, True

    def device_batches(self, epoch: int, start_batch: int = 0):
        """This process's training batches of `epoch` from `start_batch` on, on the device."""
        self.data.train.set_epoch(epoch, start_batch)
        return (self.to_device(*batch) for batch in self.data.train)

    def _log_progress(self) -> None:
        s, values = self.state, self.meter.read()
        self._check_finite(values)
        per_step = s.epoch_elapsed / max(s.batch_in_epoch, 1)
        self.log.progress({
            "step": s.step, "epoch": s.epoch + 1, "epochs": self.settings.epochs, "batch": s.batch_in_epoch,
            "batches": self.steps_per_epoch, "loss": values["loss"], "top1": values["top1"],
            "lr": self.lr_at(s.step - 1),
            "images_per_sec": values["images"] / max(s.epoch_elapsed, 1e-9),
            "eta_epoch_s": per_step * (self.steps_per_epoch - s.batch_in_epoch),
            "eta_run_s": per_step * (self.settings.epochs * self.steps_per_epoch - s.step),
        })
        if self.gpu_memory is not None:  # once, when training has reached its steady state
            self.log.message(self.describe_gpu_memory())
            self.gpu_memory = None

    def describe_gpu_memory(self) -> str:
        """Measured GPU memory: torch's peak and what lies outside torch's allocator (DALI's pools, queues
        and decoded images, NCCL's buffers), which torch's statistics cannot see."""
        gib, device = 2 ** 30, self.device
        outside, total = self.gpu_memory.taken(), torch.cuda.get_device_properties(device).total_memory
        return (f"gpu memory after {self.state.batch_in_epoch} steps: torch {torch.cuda.max_memory_allocated(device) / gib:.1f}"
                f" GiB peak allocated ({torch.cuda.max_memory_reserved(device) / gib:.1f} GiB reserved), outside torch "
                f"{outside / gib:.1f} GiB (DALI's pools and queues, NCCL), of {total / gib:.1f} GiB on the device")

    def _check_finite(self, values: Optional[dict] = None) -> None:
        """Stop when steps kept being skipped (checked at log time: no per-step sync)."""
        values = values or self.meter.read()
        limit = self.settings.max_nonfinite_steps
        streak = int(values["longest_skip_streak"])
        if streak >= limit:
            raise TrainingError(
                f"{streak} steps in a row had non-finite gradients (train.max_nonfinite_steps = {limit}) before "
                f"step {self.state.step}; those steps were skipped. Last good checkpoint: "
                f"{checkpoint.describe(self.checkpointer.last)}; {DIVERGENCE_ADVICE}")

    def evaluate(self, stop_requested=lambda: None) -> Optional[dict]:
        """The val metrics, with `dead_features` (pooled-feature channels zero on every val image),
        `feature_rms` (each channel's root-mean-square) and, with a weight average, `weight_average_top1`;
        None when a stop was requested during it."""
        average = self.weight_average
        models = [self.model] + ([average.module] if average is not None else [])
        if self.env.distributed:
            # Each rank's running statistics saw only its own batches: average them, so every rank
            # evaluates, and rank 0 saves, the same model.
            for model in models:
                distribute_bn(model, self.env.world_size, reduce=True)
        self.feature_watch.start()
        values = evaluate_model(self.model, self.data.val, self.device, self.autocast, self.memory_format,
                                stop_requested)
        dead, rms = self.feature_watch.dead_channels(), self.feature_watch.channel_rms()
        if values is None:
            return None
        values["dead_features"], values["feature_rms"] = dead, rms
        if average is not None:
            averaged = evaluate_model(average.module, self.data.val, self.device, self.autocast, self.memory_format,
                                      stop_requested)
            if averaged is None:
                return None
            values["weight_average_top1"] = averaged["top1"]
        return values

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, val_top1: Optional[float] = None) -> Path:
        """Save the state (every rank takes part) and return the file written.

        A state whose steps since the last checkpoint had non-finite losses goes to nonfinite.pt,
        never to last.pt or best.pt; a state with a non-finite tensor in any part is not saved at all.
        """
        s, ckpt = self.state, self.checkpointer
        bad_losses = self.meter.bad_losses_on_any_rank()
        self.meter.clear_bad_losses()  # the next save counts from here
        is_best = not bad_losses and val_top1 is not None and val_top1 > s.best_top1
        if is_best:
            s.best_top1, s.best_epoch = val_top1, s.epoch
        self.log.flush()  # every event up to this checkpoint is on disk before it
        state = ckpt.state_dict(dist.all_gather_objects)
        broken = dist.broadcast_object(ckpt.nonfinite_parts(state) if self.env.is_main else None)
        if broken:
            raise TrainingError(f"{broken[0]} is not finite at step {s.step}: not saving a checkpoint. Last good "
                                f"checkpoint: {checkpoint.describe(ckpt.last)}; {DIVERGENCE_ADVICE}")
        path, failure = ckpt.nonfinite if bad_losses else ckpt.last, None
        if self.env.is_main:
            try:
                if bad_losses:
                    ckpt.write_nonfinite(state)
                    self.log.message(f"warning: {bad_losses} step(s) since the last checkpoint had non-finite losses "
                                     f"(skipped); this state went to {path}, not last.pt, which stays at "
                                     f"{checkpoint.describe(ckpt.last)}")
                else:
                    ckpt.write(state, s.epoch, is_best, numbered=s.batch_in_epoch == 0 and not s.eval_pending)
            except CheckpointError as e:  # a full disk, a quota, a vanished mount
                failure = f"{e}; last good checkpoint: {checkpoint.describe(ckpt.last)}"
        failure = dist.broadcast_object(failure)  # every rank stops alike, none waits at a barrier
        if failure:
            raise CheckpointError(failure)
        return path

    def announce(self, resumed_from: Optional[Path]) -> None:
        """The start-up block: what is being trained, on what (startup_lines), where, and from where."""
        s = self.state
        start = (f"resumed from {resumed_from} at epoch {s.epoch}, step {s.step}" if resumed_from
                 else f"fresh start from {self.init_note}" if self.init_note else "fresh start")
        lines = [*self.startup_lines, f"run folder: {self.run_dir}; {start}"]
        self.log.message("\n".join(lines))
        size = checkpoint.state_bytes(self.model.state_dict()) + checkpoint.state_bytes(self.optimizer.state_dict())
        warning = self.checkpointer.space_warning(size)
        if warning:
            self.log.message(warning)

    def close(self) -> None:
        self.feature_watch.close()
        self.data.close()
        self.log.close()
        if self.folder_lock:
            self.folder_lock.release()
