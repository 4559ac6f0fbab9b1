"""Data pipelines: the builders below pick the backend named by `data.backend`.

Both backends read the same file lists (files.py) in the same order (sampling.py).
A train loader has:
  set_epoch(epoch, start_batch)   position the next pass (start_batch global batches in)
  batches_per_epoch, num_samples
  iteration                       (images, targets) of this process's share of each global batch
  state() / restore(state)        backend position inside an epoch for a checkpoint (or None)
  close()                         stop worker processes / pipelines now
A val loader iterates (images, targets) and has num_samples and close().
"""

from __future__ import annotations

from pathlib import Path

import torch

from powergrad_train.config import DEMO_ROOT, DataConfig
from powergrad_train.data.files import check_split, list_split
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
    if cfg.backend == "synthetic":
        return
    root = resolve_root(cfg)
    for split in ("train", "val"):
        check_split(root, split)


def build_train_loader(cfg: DataConfig, seed: int, rank: int, world_size: int,
                       device: torch.device = torch.device("cpu")):
    """(loader, class_names): this process's share of every global batch, reshuffled each epoch."""
    if cfg.backend == "synthetic":
        from powergrad_train.data.synthetic import CLASSES, build_synthetic_train
        return build_synthetic_train(cfg, rank, world_size, device), CLASSES
    root = resolve_root(cfg)
    classes, samples = list_split(root, "train", verbose=rank == 0)
    if len(samples) < cfg.batch_size:
        raise DataError(f"data.root: {root}/train has {len(samples)} images, fewer than one batch "
                        f"(data.batch_size = {cfg.batch_size})")
    if cfg.backend == "dali":
        from powergrad_train.data.dali import build_dali_train
        return build_dali_train(cfg, samples, seed, rank, world_size), classes
    from powergrad_train.data.imagefolder import build_imagefolder_train
    return build_imagefolder_train(cfg, samples, seed, rank, world_size, device.type == "cuda"), classes


def build_val_loader(cfg: DataConfig, rank: int, world_size: int, device: torch.device = torch.device("cpu")):
    """(loader, class_names): this process's share of the val split, each image once over all ranks."""
    if cfg.backend == "synthetic":
        from powergrad_train.data.synthetic import CLASSES, build_synthetic_val
        return build_synthetic_val(cfg, rank, world_size, device), CLASSES
    classes, samples = list_split(resolve_root(cfg), "val", verbose=rank == 0)
    if cfg.backend == "dali" and cfg.val_backend == "same":
        from powergrad_train.data.dali import build_dali_val
        return build_dali_val(cfg, samples, rank, world_size), classes
    from powergrad_train.data.imagefolder import build_imagefolder_val
    return build_imagefolder_val(cfg, samples, rank, world_size, device.type == "cuda"), classes


def check_classes(train_classes: list[str], val_classes: list[str], num_classes: int) -> None:
    if train_classes != val_classes:
        raise DataError("data.root: train/ and val/ hold different class folders")
    if len(train_classes) > num_classes:
        raise DataError(f"data.root holds {len(train_classes)} classes but model.num_classes is {num_classes}")
