"""Data pipelines. Each backend is one module registered as a data_backend (config/registry.py);
`backend()` picks it.

A backend module declares `PART = Part(Backend(...), ...)`: two builders with the signatures of
`TrainBuilder` and `ValBuilder`, returning objects that satisfy `TrainLoader` and `ValLoader`.
Its module imports torch, torchvision or DALI inside the builders: the config schema imports every
backend's declaration.
File backends read the same file lists (files.py) in the same order (sampling.py), so they see
the same images in the same order; the trainer never branches on the backend.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Protocol, runtime_checkable

from powergrad_train.config import registry
from powergrad_train.config.schema import check_path
from powergrad_train.config.sections import DEMO_ROOT
from powergrad_train.system.errors import DataError, printable

if TYPE_CHECKING:
    import torch

    from powergrad_train.config.sections import DataConfig
    from powergrad_train.system.dist import DistEnv

Batch = tuple["torch.Tensor", "torch.Tensor"]  # (images, targets)
Samples = list[tuple[str, int]]  # (path, label), as listed by files.list_split


@runtime_checkable
class ValLoader(Protocol):
    num_samples: int  # images of the whole split, over all processes

    def __iter__(self) -> Iterator[Batch]:
        """This process's share of the split, each image once over all processes."""

    def close(self) -> None:
        """Stop worker processes or pipelines now."""


@runtime_checkable
class TrainLoader(ValLoader, Protocol):
    batches_per_epoch: int  # settable: a resumed run keeps its own when a few files came or went

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Position the next pass: `start_batch` global batches into `epoch`."""

    def __iter__(self) -> Iterator[Batch]:
        """This process's share of each global batch of the epoch, reshuffled every epoch."""

    def state_dict(self) -> Any:
        """The backend's own position inside the pass under way, for a checkpoint; None when no pass
        is under way or (epoch, start_batch) says it all."""
        return None

    def load_state_dict(self, state: Any) -> None:
        """Continue from a `state_dict()` at the next pass (None: nothing to restore)."""


class TrainBuilder(Protocol):
    def __call__(self, cfg: DataConfig, samples: Samples, seed: int, rank: int, world_size: int,
                 device: torch.device) -> TrainLoader: ...


class ValBuilder(Protocol):
    def __call__(self, cfg: DataConfig, samples: Samples, rank: int, world_size: int,
                 device: torch.device) -> ValLoader: ...


@dataclasses.dataclass(frozen=True)
class Backend:
    build_train: TrainBuilder
    build_val: ValBuilder
    # A backend that reads no files (synthetic) brings its own class names.
    classes: Optional[tuple[str, ...]] = None

    @property
    def reads_files(self) -> bool:
        return self.classes is None


def backend(name: str) -> Backend:
    """The backend registered as `name`."""
    return registry.load("data_backend", name).build


def val_backend_name(cfg: DataConfig) -> str:
    return cfg.backend if cfg.val_backend == "same" or not backend(cfg.backend).reads_files else cfg.val_backend


def resolve_root(cfg: DataConfig) -> Path:
    if cfg.root == DEMO_ROOT:
        from powergrad_train.data.demo import ensure_demo_dataset
        return ensure_demo_dataset()
    root = Path(cfg.root).expanduser()
    check_path("data.root", root)
    if not root.is_dir():
        if root.exists():
            raise DataError(f"data.root: '{printable(root)}' is a file, not a folder (an ImageFolder root holds "
                            "train/ and val/ folders)")
        raise DataError(f"data.root: folder '{printable(root)}' does not exist")
    return root


def check_data(cfg: DataConfig, splits: tuple[str, ...] = ("train", "val")) -> None:
    """Fail early, before any process group exists, on a missing folder or split (cheap checks only)."""
    if not backend(cfg.backend).reads_files or cfg.root == DEMO_ROOT:  # the demo set is made when first read
        return
    from powergrad_train.data.files import check_split
    root = resolve_root(cfg)
    for split in splits:
        check_split(root, split)


def read_split(cfg: DataConfig, split: str, verbose: bool = True):
    """The split's classes and samples (a backend that reads no files brings its own classes)."""
    from powergrad_train.data.files import Split, list_split
    chosen = backend(cfg.backend)
    if not chosen.reads_files:
        return Split(list(chosen.classes), [])
    return list_split(resolve_root(cfg), split, verbose)


def build_train_loader(cfg: DataConfig, seed: int, rank: int, world_size: int,
                       device: Optional[torch.device] = None, split=None) -> tuple[TrainLoader, list[str]]:
    """(loader, class names): this process's share of every global batch, reshuffled each epoch (on the
    CPU unless `device` says otherwise)."""
    device = device or _cpu()
    split = split or read_split(cfg, "train", verbose=rank == 0)
    if backend(cfg.backend).reads_files and len(split.samples) < cfg.batch_size:
        raise DataError(f"data.root: {printable(cfg.root)}/train has {len(split.samples)} images, fewer than one batch "
                        f"(data.batch_size = {cfg.batch_size})")
    return backend(cfg.backend).build_train(cfg, split.samples, seed, rank, world_size, device), split.classes


def build_val_loader(cfg: DataConfig, rank: int, world_size: int, device: Optional[torch.device] = None,
                     split=None) -> tuple[ValLoader, list[str]]:
    """(loader, class names): this process's share of the val split, each image once over all ranks."""
    device = device or _cpu()
    split = split or read_split(cfg, "val", verbose=rank == 0)
    return backend(val_backend_name(cfg)).build_val(cfg, split.samples, rank, world_size, device), split.classes


def _cpu() -> torch.device:
    import torch
    return torch.device("cpu")


def _class_difference(root: str, train: list[str], val: list[str]) -> str:
    """Which class folders only one split has (the first few of each, by name)."""
    def names(only: list[str]) -> str:
        return ", ".join(printable(n) for n in only[:3]) + (f" and {len(only) - 3} more" if len(only) > 3 else "")

    only = [(split, sorted(set(a) - set(b))) for split, a, b in (("train", train, val), ("val", val, train))]
    return (f"data.root: {printable(root)}: train/ and val/ hold different class folders ("
            + "; ".join(f"only in {split}/: {names(n)}" for split, n in only if n) + ")")


@dataclasses.dataclass
class Loaders:
    train: Optional[TrainLoader]
    val: ValLoader
    classes: list[str]

    def close(self) -> None:
        for loader in (self.train, self.val):
            if loader is not None:
                loader.close()


def build_loaders(cfg: DataConfig, num_classes: int, seed: int, env: DistEnv, device: torch.device,
                  train: bool = True) -> Loaders:
    """This process's loaders. Rank 0 lists (and checks) the files once; the other ranks receive
    the lists, so a start costs one listing however many processes there are."""
    from powergrad_train.system import dist
    names = ("train", "val") if train else ("val",)
    splits = dist.on_main(lambda: [read_split(cfg, name) for name in names])
    if train and splits[0].classes != splits[1].classes:
        raise DataError(_class_difference(cfg.root, splits[0].classes, splits[1].classes))
    classes = splits[-1].classes
    if len(classes) > num_classes:
        raise DataError(f"data.root holds {len(classes)} classes but model.num_classes is {num_classes}")
    val, _ = build_val_loader(cfg, env.rank, env.world_size, device, split=splits[-1])
    train_loader = None
    try:
        if train:
            train_loader, _ = build_train_loader(cfg, seed, env.rank, env.world_size, device, split=splits[0])
    except BaseException:
        val.close()
        raise
    return Loaders(train_loader, val, classes)
