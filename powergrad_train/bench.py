"""`powergrad-train bench`: images/s of the full training step and of data loading alone.

Warm-up steps are excluded; the device is synchronised before each clock read.
"""

from __future__ import annotations

import itertools
import os
import time

import torch

from powergrad_train.engine import Trainer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_batches(trainer: Trainer):
    """Training batches on the device, epoch after epoch."""
    for epoch in itertools.count():
        trainer.train_loader.set_epoch(epoch)
        for batch in trainer.train_loader:
            yield trainer.to_device(*batch)


def data_images_per_sec(trainer: Trainer, steps: int, warmup: int) -> float:
    batches = device_batches(trainer)
    for _ in range(warmup):
        next(batches)
    synchronize(trainer.device)
    start = time.perf_counter()
    count = sum(next(batches)[1].shape[0] for _ in range(steps))
    synchronize(trainer.device)
    return count * trainer.env.world_size / (time.perf_counter() - start)


def step_images_per_sec(trainer: Trainer, steps: int, warmup: int) -> float:
    trainer.train_model.train()
    batches = device_batches(trainer)
    for _ in range(warmup):
        trainer.train_step(*next(batches))
    synchronize(trainer.device)
    start = time.perf_counter()
    count = 0
    for _ in range(steps):
        images, targets = next(batches)
        trainer.train_step(images, targets)
        count += targets.shape[0]
    synchronize(trainer.device)
    return count * trainer.env.world_size / (time.perf_counter() - start)


def thread_count() -> int:
    """Threads of this process now (torch's pools, DALI's, loader threads)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return -1
