"""A data backend: images drawn in memory, a bright horizontal band whose position is the class."""

from dataclasses import dataclass

import torch

from powergrad_train.config.declare import Part, opt
from powergrad_train.data import Backend

CLASSES = ("band0", "band1", "band2", "band3")


@dataclass
class Keys:
    bands_images: int = opt(64, "train images per epoch", ge=1, fixed=True)


def _batch(cfg, seed: int, positions: range, device):
    """The images at these positions of a pass: each drawn from its own seed, so any process and any
    resumed pass draws the same ones."""
    size, images, labels = cfg.image_size, [], []
    for position in positions:
        g = torch.Generator().manual_seed(seed * 1_000_003 + position)
        label = int(torch.randint(len(CLASSES), (), generator=g))
        image = 0.3 * torch.randn(3, size, size, generator=g)
        band = size // len(CLASSES)
        image[:, label * band:(label + 1) * band, :] += 1.0
        images.append(image)
        labels.append(label)
    return torch.stack(images).to(device), torch.tensor(labels).to(device)


class Loader:
    def __init__(self, cfg, images: int, batch: int, rank: int, world_size: int, seed: int, device):
        self.cfg, self.batch, self.rank, self.world_size, self.seed, self.device = \
            cfg, batch, rank, world_size, seed, device
        self.num_samples = images
        self.batches_per_epoch = images // (batch * world_size)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        for b in range(self.start_batch, self.batches_per_epoch):
            first = (b * self.world_size + self.rank) * self.batch
            yield _batch(self.cfg, self.seed * 7919 + self.epoch, range(first, first + self.batch), self.device)

    def state_dict(self):
        return None

    def load_state_dict(self, state) -> None:
        pass

    def close(self) -> None:
        pass


def build_train(cfg, samples, seed: int, rank: int, world_size: int, device) -> Loader:
    return Loader(cfg, cfg.bands_images, cfg.batch_size // world_size, rank, world_size, seed, device)


def build_val(cfg, samples, rank: int, world_size: int, device) -> Loader:
    batch = cfg.val_batch_per_process(world_size)
    return Loader(cfg, 2 * batch * world_size, batch, rank, world_size, -1, device)


PART = Part(Backend(build_train, build_val, classes=CLASSES), "images drawn in memory", keys=Keys)
