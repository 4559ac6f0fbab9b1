"""The synthetic backend: one random batch kept on the device and served again and again.

For measuring the training step without data loading (`powergrad-train bench --data synthetic`,
or `data.backend: synthetic`); nothing is read from disk and nothing can be learned.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from powergrad_train.config.declare import Part
from powergrad_train.data import Backend, TrainLoader

if TYPE_CHECKING:
    import torch

    from powergrad_train.config.sections import DataConfig

CLASSES = ("synthetic",)  # one class: labels do not change the cost, and any model.num_classes fits
BATCHES_PER_EPOCH = 100


class SyntheticLoader(TrainLoader):
    def __init__(self, cfg: DataConfig, batch: int, batches: int, rank: int, device: torch.device):
        import torch
        g = torch.Generator().manual_seed(rank)
        self.images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g).to(device)
        self.targets = torch.randint(0, len(CLASSES), (batch,), generator=g).to(device)
        self.batches_per_epoch, self.start_batch = batches, 0
        self.num_samples = batch * batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.start_batch = start_batch

    def __iter__(self):
        return ((self.images, self.targets) for _ in range(self.start_batch, self.batches_per_epoch))

    def close(self) -> None:
        pass


def build_train(cfg: DataConfig, samples, seed: int, rank: int, world_size: int,
                device: torch.device) -> SyntheticLoader:
    return SyntheticLoader(cfg, cfg.batch_size // world_size, BATCHES_PER_EPOCH, rank, device)


def build_val(cfg: DataConfig, samples, rank: int, world_size: int, device: torch.device) -> SyntheticLoader:
    return SyntheticLoader(cfg, cfg.val_batch_per_process(world_size), 1, rank, device)


PART = Part(Backend(build_train, build_val, classes=CLASSES), "one random batch on the device, for benchmarks")
