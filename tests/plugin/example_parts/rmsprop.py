"""An optimizer: torch's RMSprop; its step is left out on the host when the gradients are not finite."""

from dataclasses import dataclass

import torch

from powergrad_train.config.declare import Part, opt
from powergrad_train.system.errors import ConfigError
from powergrad_train.training.step_guard import SKIP_ON_HOST


@dataclass
class Keys:
    rms_alpha: float = opt(0.99, "smoothing constant of the squared-gradient average", gt=0.0, lt=1.0, fixed=True)


def rmsprop(cfg, groups):
    return torch.optim.RMSprop(groups, lr=cfg.lr, alpha=cfg.rms_alpha), SKIP_ON_HOST


def check(cfg, where) -> None:
    if cfg.optim.lr > 0.5:
        raise ConfigError(f"{where('optim.lr', 'optim.name')}: optim.name = rmsprop diverges above optim.lr 0.5")


PART = Part(rmsprop, "torch's RMSprop", keys=Keys, check=check)
