"""An LR schedule: after warmup, the LR is multiplied by gamma every epoch, smoothly per step."""

from dataclasses import dataclass

from powergrad_train.config.declare import Part, opt
from powergrad_train.training.schedules import Schedule


@dataclass
class Keys:
    gamma: float = opt(0.5, "LR factor per epoch", gt=0.0, le=1.0, fixed=True)


def decay(cfg, base_lr: float, step: int, steps_per_epoch: int, warmup: int, decay_end: int) -> float:
    return base_lr * cfg.gamma ** ((step - warmup) / steps_per_epoch)


PART = Part(Schedule(decay), "times gamma per epoch", keys=Keys)
