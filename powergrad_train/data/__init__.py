"""Data pipelines: the builders below pick the backend named by `data.backend`.

A train loader has `sampler.set_epoch(epoch, start_batch)` and `sampler.batches_per_epoch`,
and yields (images, targets) batches of this process's share of the global batch.
"""

from __future__ import annotations

from pathlib import Path

from powergrad_train.config import DEMO_ROOT, DataConfig
from powergrad_train.errors import DataError


def resolve_root(cfg: DataConfig) -> Path:
    if cfg.root == DEMO_ROOT:
        from powergrad_train.data.demo import ensure_demo_dataset
        return ensure_demo_dataset()
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root: folder '{cfg.root}' does not exist")
    return root


def check_data(cfg: DataConfig) -> None:
    """Fail early, before any process group exists, on a missing folder, split or empty class."""
    from powergrad_train.data.imagefolder import check_split
    root = resolve_root(cfg)
    for split in ("train", "val"):
        check_split(root, split)


def build_train_loader(cfg: DataConfig, seed: int, rank: int, world_size: int, pin_memory: bool = False):
    """(loader, class_names): this process's share of every global batch, reshuffled each epoch."""
    from powergrad_train.data.imagefolder import build_imagefolder_train
    return build_imagefolder_train(cfg, resolve_root(cfg), seed, rank, world_size, pin_memory)


def build_val_loader(cfg: DataConfig, rank: int, world_size: int, pin_memory: bool = False):
    """(loader, class_names): this process's share of the val split, each image once over all ranks."""
    from powergrad_train.data.imagefolder import build_imagefolder_val
    return build_imagefolder_val(cfg, resolve_root(cfg), rank, world_size, pin_memory)


def check_classes(train_classes: list[str], val_classes: list[str], num_classes: int) -> None:
    if train_classes != val_classes:
        raise DataError("data.root: train/ and val/ hold different class folders")
    if len(train_classes) > num_classes:
        raise DataError(f"data.root holds {len(train_classes)} classes but model.num_classes is {num_classes}")
