"""The optimizers `optim.name` chooses (config/registry.py), each a Part whose build returns the optimizer
over the parameter groups and how it leaves out a step whose gradients are not finite (step_guard.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from powergrad_train.config.declare import Part, opt
from powergrad_train.system.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from powergrad_train.config.sections import OptimConfig
    from powergrad_train.training.step_guard import StepSkipper


class OptimizerBuilder(Protocol):
    def __call__(self, cfg: OptimConfig, groups: list[dict]) -> tuple[torch.optim.Optimizer, StepSkipper]:
        """The optimizer over these parameter groups, and how it skips a step whose gradients are bad."""


def sgd(cfg: OptimConfig, groups: list[dict]) -> tuple[torch.optim.Optimizer, StepSkipper]:
    """torch's fused SGD (Nesterov by default): several times faster than foreach on the CPU, and it
    skips a step on the device. Its momentum buffers exist as zeros from the start, so a skipped
    first step leaves no garbage in them."""
    import torch

    from powergrad_train.training.step_guard import SKIP_ON_DEVICE, zero_momentum_buffers
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=True)
    zero_momentum_buffers(optimizer)
    return optimizer, SKIP_ON_DEVICE


def adamw(cfg: OptimConfig, groups: list[dict]) -> tuple[torch.optim.Optimizer, StepSkipper]:
    """torch's fused AdamW, which skips a step on the device (its state is created by then)."""
    import torch

    from powergrad_train.training.step_guard import SKIP_ON_DEVICE
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
    return optimizer, SKIP_ON_DEVICE


def lamb(cfg: OptimConfig, groups: list[dict]) -> tuple[torch.optim.Optimizer, StepSkipper]:
    """timm's LAMB, for large batches; it cannot skip on the device, so the check is read on the host."""
    from timm.optim import Lamb

    from powergrad_train.training.step_guard import SKIP_ON_HOST
    optimizer = Lamb(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    return optimizer, SKIP_ON_HOST


@dataclass
class SgdKeys:
    momentum: float = opt(0.9, "momentum", ge=0.0, lt=1.0, fixed=True)
    nesterov: bool = opt(True, "Nesterov momentum (needs momentum > 0)", fixed=True)


@dataclass
class AdamKeys:
    beta1: float = opt(0.9, "decay of the first moment estimate", ge=0.0, lt=1.0, fixed=True)
    beta2: float = opt(0.999, "decay of the second moment estimate", ge=0.0, lt=1.0, fixed=True)
    eps: float = opt(1e-8, "added to the denominator", gt=0.0, fixed=True)


def _check_sgd(cfg, where) -> None:
    if cfg.optim.nesterov and cfg.optim.momentum == 0:
        raise ConfigError(f"{where('optim.nesterov', 'optim.momentum')}: optim.nesterov needs optim.momentum > 0")


SGD = Part(sgd, "torch's fused SGD", keys=SgdKeys, check=_check_sgd)
ADAMW = Part(adamw, "torch's fused AdamW", keys=AdamKeys)
LAMB = Part(lamb, "timm's LAMB", keys=AdamKeys)
