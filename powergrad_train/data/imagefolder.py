"""The portable backend: torchvision ImageFolder with PIL transforms and a torch DataLoader.

Every sample's augmentation is drawn from its own seed (run seed, epoch, position in the
epoch's global order), so the images a run sees do not depend on the number of workers
or processes, and a resumed run sees exactly what an uninterrupted one would.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Sampler
from torchvision import datasets, transforms

from powergrad_train.config import DataConfig
from powergrad_train.errors import DataError


def train_transform(cfg: DataConfig):
    return transforms.Compose([
        transforms.RandomResizedCrop(cfg.image_size, scale=(cfg.crop_scale_min, 1.0), ratio=(3 / 4, 4 / 3),
                                     interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def val_transform(cfg: DataConfig):
    return transforms.Compose([
        transforms.Resize(int(cfg.image_size / cfg.crop_pct), interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(cfg.image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def _load_rgb(path: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:  # PIL raises many types for a bad file
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


class SeededImageFolder(datasets.ImageFolder):
    """An ImageFolder indexed by (index, seed): the seed fixes that sample's augmentation."""

    def __init__(self, root: Path, transform):
        super().__init__(str(root), transform=transform, loader=_load_rgb)

    def __getitem__(self, key):
        index, seed = key
        path, target = self.samples[index]
        image = self.loader(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), target


def sample_seed(seed: int, epoch: int, position: int) -> int:
    return ((seed * 1_000_003 + epoch) * 2_147_483_659 + position) % (1 << 63)


class TrainSampler(Sampler):
    """One global shuffle per epoch (seeded by run seed and epoch); this rank takes its slice of
    every global batch. The ragged tail is dropped so every rank has the same number of steps."""

    def __init__(self, size: int, global_batch: int, rank: int, world_size: int, seed: int):
        self.size, self.global_batch, self.rank, self.seed = size, global_batch, rank, seed
        self.local_batch = global_batch // world_size
        self.batches_per_epoch = size // global_batch
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.local_batch

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 10_007 + self.epoch))
        order = order.tolist()
        for batch in range(self.start_batch, self.batches_per_epoch):
            first = batch * self.global_batch + self.rank * self.local_batch
            for position in range(first, first + self.local_batch):
                yield order[position], sample_seed(self.seed, self.epoch, position)


class ValSampler(Sampler):
    """Every image exactly once across ranks, no padding."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.indices = range(rank, size, world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return ((i, 0) for i in self.indices)


def check_split(root: Path, split: str) -> Path:
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"data.root: {root} has no '{split}/' folder (expected an ImageFolder root with train/ and val/)")
    classes = sorted(d for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{folder}: no class folders (expected one sub-folder of images per class)")
    for d in classes:
        if not any(f.suffix.lower() in datasets.folder.IMG_EXTENSIONS for f in d.iterdir() if f.is_file()):
            raise DataError(f"{d}: class folder holds no images")
    return folder


def _loader_options(cfg: DataConfig, pin_memory: bool) -> dict:
    return dict(num_workers=cfg.workers, pin_memory=pin_memory, persistent_workers=cfg.workers > 0)


def build_imagefolder_train(cfg: DataConfig, root: Path, seed: int, rank: int, world_size: int, pin_memory: bool):
    dataset = SeededImageFolder(check_split(root, "train"), train_transform(cfg))
    sampler = TrainSampler(len(dataset), cfg.batch_size, rank, world_size, seed)
    if sampler.batches_per_epoch == 0:
        raise DataError(f"data.root: {root}/train has {len(dataset)} images, fewer than one batch "
                        f"(data.batch_size = {cfg.batch_size})")
    loader = DataLoader(dataset, batch_size=sampler.local_batch, sampler=sampler, **_loader_options(cfg, pin_memory))
    return loader, dataset.classes


def build_imagefolder_val(cfg: DataConfig, root: Path, rank: int, world_size: int, pin_memory: bool):
    dataset = SeededImageFolder(check_split(root, "val"), val_transform(cfg))
    batch = (cfg.val_batch_size or cfg.batch_size) // world_size
    loader = DataLoader(dataset, batch_size=batch, sampler=ValSampler(len(dataset), rank, world_size),
                        **_loader_options(cfg, pin_memory))
    return loader, dataset.classes
