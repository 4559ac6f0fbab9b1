"""Which samples each process reads, in which order, with which augmentation seed.

Shared by both backends, so they read the same images in the same order. The samplers are plain
iterables (what a DataLoader's `sampler` takes), so the backends' declarations import no torch.
"""

from __future__ import annotations


def sample_seed(seed: int, epoch: int, position: int) -> int:
    return ((seed * 1_000_003 + epoch) * 2_147_483_659 + position) % (1 << 63)


class TrainSampler:
    """One global shuffle per epoch (seeded by run seed and epoch); this rank takes its slice of
    every global batch. The ragged tail is dropped so every rank has the same number of steps.
    Yields (index, augmentation seed).

    `batches_per_epoch` may be set higher than the samples fill (a resumed run keeps its own
    steps per epoch when its data set has lost a few files since): the epoch's last positions
    then wrap around to the start of its shuffle."""

    def __init__(self, size: int, global_batch: int, rank: int, world_size: int, seed: int):
        self.size, self.global_batch, self.rank, self.seed = size, global_batch, rank, seed
        self.local_batch = global_batch // world_size
        self.batches_per_epoch = size // global_batch
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.local_batch

    def epoch_order(self) -> list[int]:
        import torch
        generator = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self):
        order = self.epoch_order()
        for batch in range(self.start_batch, self.batches_per_epoch):
            first = batch * self.global_batch + self.rank * self.local_batch
            for position in range(first, first + self.local_batch):
                yield order[position % self.size], sample_seed(self.seed, self.epoch, position)


class ValSampler:
    """Every image exactly once across ranks, no padding. Yields (index, 0)."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.indices = range(rank, size, world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return ((i, 0) for i in self.indices)


class SampledEpochs:
    """For a loader whose order comes from its TrainSampler: the epoch's length in global batches,
    settable (a resumed run keeps its own when a few files came or went)."""

    sampler: TrainSampler

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    @batches_per_epoch.setter
    def batches_per_epoch(self, batches: int) -> None:
        self.sampler.batches_per_epoch = batches
