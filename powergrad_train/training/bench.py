"""`powergrad-train bench`: images/s of the full training step and of data loading alone.

Warm-up steps are excluded; the device is synchronised before each clock read. It uses the
Trainer's public parts only: its batches, its training step, its device and process count.
"""

from __future__ import annotations

import itertools
import os
import time

import torch

from powergrad_train.config.sections import Config
from powergrad_train.training.engine import Trainer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches_forever(trainer: Trainer):
    """Training batches on the device, epoch after epoch."""
    for epoch in itertools.count():
        yield from trainer.device_batches(epoch)


def _images_per_sec(trainer: Trainer, steps: int, warmup: int, work) -> float:
    batches = batches_forever(trainer)
    for _ in range(warmup):
        work(*next(batches))
    synchronize(trainer.device)
    start = time.perf_counter()
    count = 0
    for _ in range(steps):
        images, targets = next(batches)
        work(images, targets)
        count += targets.shape[0]
    synchronize(trainer.device)
    return count * trainer.env.world_size / (time.perf_counter() - start)


def measure(trainer: Trainer, steps: int, warmup: int) -> list[str]:
    """Data loading alone, then the training step with its data; the result lines."""
    data = _images_per_sec(trainer, steps, warmup, lambda images, targets: None)
    trainer.model.train()
    step = _images_per_sec(trainer, steps, warmup, trainer.train_step)
    return [f"data loading alone: {data:.1f} images/s", f"threads in this process: {thread_count()}",
            f"training step with data: {step:.1f} images/s"]


def describe_setup(cfg: Config, trainer: Trainer, world_size: int, device: torch.device) -> str:
    """The settings the numbers were measured with: the recipe `cfg` the caller built `trainer` from."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    average = trainer.weight_average.name if trainer.weight_average is not None else "none"
    return (f"bench: {name}; {world_size} process(es); model {cfg.model.name}; global batch "
            f"{cfg.data.batch_size}; {cfg.data.image_size} px; amp {cfg.amp}; channels_last "
            f"{cfg.channels_last}; compile {cfg.model.compile}; data {cfg.data.backend}; optimizer "
            f"{cfg.optim.name}; loss {trainer.objective.describe()}; grad_clip {cfg.grad_clip.mode}; "
            f"batch_transform {cfg.batch_transform.name}; weight_average {average}")


def thread_count() -> int:
    """Threads of this process now (torch's pools, DALI's, loader threads)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return -1
