"""LR schedules, chosen by `schedule.name` (registry.SCHEDULES): the LR as a pure function of the step.

Every schedule has three phases, with W = warmup_epochs * steps_per_epoch and
D = (epochs - cooldown_epochs) * steps_per_epoch:
    warmup  : steps [0, W)     linear from warmup_lr (at step 0) towards optim.lr
    decay   : steps [W, D)     the schedule's own decay, starting from optim.lr
    cooldown: steps [D, end)   min_lr
A schedule is one `Schedule` below: its decay, optionally its per-epoch form as the PGT authors'
fork ran timm's schedulers (schedule.mode = authors_per_epoch), and the schedule.* keys only it reads.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from powergrad_train.config.schema import ScheduleConfig

# (cfg, base_lr, step, steps_per_epoch, warmup, decay_end) -> the LR of a step in [warmup, decay_end)
Decay = Callable[["ScheduleConfig", float, int, int, int, int], float]
# (cfg, base_lr, t) -> the LR at scheduler time t >= warmup_epochs, in epochs
EpochDecay = Callable[["ScheduleConfig", float, int], float]


@dataclass(frozen=True)
class Schedule:
    decay: Decay
    like_authors: Optional[EpochDecay] = None  # None: schedule.mode = authors_per_epoch is refused
    keys: tuple[str, ...] = ()  # the schedule.* keys this schedule reads that not every schedule does

    def per_step(self, cfg: ScheduleConfig, base_lr: float, step: int, steps_per_epoch: int) -> float:
        """The LR of optimizer step `step` (0-based, over the whole run), updated every step."""
        warmup = round(cfg.warmup_epochs * steps_per_epoch)
        decay_end = (cfg.epochs - cfg.cooldown_epochs) * steps_per_epoch
        if step < warmup:
            return cfg.warmup_lr + (base_lr - cfg.warmup_lr) * step / warmup
        if step >= decay_end:
            return cfg.min_lr
        return self.decay(cfg, base_lr, step, steps_per_epoch, warmup, decay_end)

    def at_epoch_like_authors(self, cfg: ScheduleConfig, base_lr: float, t: int) -> float:
        """timm's per-epoch schedulers as the authors' fork configured them (t_in_epochs, no warmup
        prefix, t_initial = epochs - cooldown_epochs), at scheduler time t.

        Warmup replaces the first warmup_epochs values of the decay instead of coming before it, so
        the cosine is already past its peak when warmup ends.
        """
        warmup = round(cfg.warmup_epochs)
        if t < warmup:
            return cfg.warmup_lr + t * (base_lr - cfg.warmup_lr) / warmup
        return self.like_authors(cfg, base_lr, t)


def _cosine(cfg: ScheduleConfig, base_lr: float, step: int, steps_per_epoch: int, warmup: int, decay_end: int) -> float:
    """timm's CosineLRScheduler(warmup_prefix=True): half a cosine from base_lr to min_lr over the decay."""
    t, span = step - warmup, decay_end - warmup
    return cfg.min_lr + 0.5 * (base_lr - cfg.min_lr) * (1 + math.cos(math.pi * t / span))


def _cosine_like_authors(cfg: ScheduleConfig, base_lr: float, t: int) -> float:
    t_initial = cfg.epochs - cfg.cooldown_epochs
    if t >= t_initial:  # from t_initial on the LR stays at min_lr
        return cfg.min_lr
    return cfg.min_lr + 0.5 * (base_lr - cfg.min_lr) * (1 + math.cos(math.pi * t / t_initial))


def _step(cfg: ScheduleConfig, base_lr: float, step: int, steps_per_epoch: int, warmup: int, decay_end: int) -> float:
    """timm's StepLRScheduler(warmup_prefix=False): times decay_rate every decay_epochs, counted from step 0."""
    return base_lr * cfg.decay_rate ** (step // round(cfg.decay_epochs * steps_per_epoch))


def _step_like_authors(cfg: ScheduleConfig, base_lr: float, t: int) -> float:
    return base_lr * cfg.decay_rate ** (t // round(cfg.decay_epochs))


def _multistep(cfg: ScheduleConfig, base_lr: float, step: int, steps_per_epoch: int, warmup: int,
               decay_end: int) -> float:
    """timm's MultiStepLRScheduler(warmup_prefix=False): times decay_rate at each milestone (in epochs,
    counted from step 0). As timm does, a milestone of m steps applies from step m - 1."""
    milestones = [round(m * steps_per_epoch) for m in cfg.milestones]
    return base_lr * cfg.decay_rate ** bisect.bisect_right(milestones, step + 1)


def _linear(cfg: ScheduleConfig, base_lr: float, step: int, steps_per_epoch: int, warmup: int, decay_end: int) -> float:
    """timm's PolyLRScheduler(power=1, warmup_prefix=True): a straight line from base_lr to min_lr over the decay."""
    return cfg.min_lr + (base_lr - cfg.min_lr) * (1 - (step - warmup) / (decay_end - warmup))


cosine = Schedule(_cosine, like_authors=_cosine_like_authors)
step = Schedule(_step, like_authors=_step_like_authors, keys=("schedule.decay_epochs", "schedule.decay_rate"))
multistep = Schedule(_multistep, keys=("schedule.milestones", "schedule.decay_rate"))
linear = Schedule(_linear)
