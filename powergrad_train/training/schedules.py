"""LR schedules, chosen by `schedule.name` (config/registry.py): the LR as a pure function of the step.

Every schedule has three phases, with W = warmup_epochs * steps_per_epoch and
D = (epochs - cooldown_epochs) * steps_per_epoch:
    warmup  : steps [0, W)     linear from warmup_lr (at step 0) towards optim.lr
    decay   : steps [W, D)     the schedule's own decay, starting from optim.lr
    cooldown: steps [D, end)   min_lr
A schedule is a Part whose build is a `Schedule`: its decay and, optionally, its per-epoch form as the
PGT authors' fork ran timm's schedulers (schedule.mode = authors_per_epoch); the Part declares the
schedule.* keys only it reads.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from powergrad_train.config.declare import Part, opt
from powergrad_train.system.errors import ConfigError

if TYPE_CHECKING:
    from powergrad_train.config.sections import ScheduleConfig

# (cfg, base_lr, step, steps_per_epoch, warmup, decay_end) -> the LR of a step in [warmup, decay_end)
Decay = Callable[["ScheduleConfig", float, int, int, int, int], float]
# (cfg, base_lr, t) -> the LR at scheduler time t >= warmup_epochs, in epochs
EpochDecay = Callable[["ScheduleConfig", float, int], float]


@dataclass(frozen=True)
class Schedule:
    decay: Decay
    like_authors: Optional[EpochDecay] = None  # None: schedule.mode = authors_per_epoch is refused

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


@dataclass
class StepKeys:
    decay_epochs: float = opt(30.0, "multiply the LR by decay_rate every this many epochs (counted from epoch 0)",
                              gt=0.0, fixed=True)


@dataclass
class DecayRateKeys:
    decay_rate: float = opt(0.1, "LR factor at each decay", gt=0.0, le=1.0, fixed=True)


@dataclass
class MilestoneKeys:
    milestones: list[float] = opt([], "the epochs, increasing and counted from epoch 0, at which the LR is multiplied "
                                      "by decay_rate (as timm's MultiStepLRScheduler, a milestone applies from the "
                                      "step before it), e.g. [30, 60, 80]", gt=0.0, fixed=True)


def _check_multistep(cfg, where) -> None:
    milestones = cfg.schedule.milestones
    if not milestones:
        raise ConfigError(f"{where('schedule.milestones', 'schedule.name')}: schedule.name = multistep needs "
                          "schedule.milestones, the epochs to decay at, e.g. [30, 60, 80]")
    if any(a >= b for a, b in zip(milestones, milestones[1:])):
        raise ConfigError(f"{where('schedule.milestones')}: schedule.milestones = "
                          f"{milestones} must be increasing")


COSINE = Part(Schedule(_cosine, like_authors=_cosine_like_authors), "to min_lr")
STEP = Part(Schedule(_step, like_authors=_step_like_authors), "times decay_rate every decay_epochs",
            keys=(StepKeys, DecayRateKeys))
MULTISTEP = Part(Schedule(_multistep), "times decay_rate at each of milestones", keys=(MilestoneKeys, DecayRateKeys),
                 check=_check_multistep)
LINEAR = Part(Schedule(_linear), "to min_lr")
