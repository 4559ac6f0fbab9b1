"""The optimizer built (the parts are in optimizers.py), its and the GradScaler's checkpoint state, the LR
of a step (from the schedules in schedules.py), and the gradient stage (GC / AGC)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable

import torch
from timm.optim import param_groups_weight_decay
from timm.utils import dispatch_clip_grad

from powergrad_train.training.models import classifier_parameters
from powergrad_train.training.step_guard import StepSkipper, zero_momentum_buffers

if TYPE_CHECKING:
    from powergrad_train.config.sections import GradClipConfig, OptimConfig, ScheduleConfig


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module) -> tuple[torch.optim.Optimizer, StepSkipper]:
    """optim.name's optimizer; biases and norm parameters (all 1-d tensors) get no weight decay."""
    from powergrad_train.config import registry
    groups = param_groups_weight_decay(model, cfg.weight_decay)
    return registry.load("optimizer", cfg.name).build(cfg, groups)


class OptimizerState:
    """The optimizer as a checkpoint part: its state (momentum buffers, moment estimates, step counts)
    comes from the checkpoint, its settings (momentum, nesterov, weight decay, betas, eps, ...) from the
    recipe. torch's load_state_dict restores the saved groups' settings too, so a run resumed with new
    ones (--resume-force) would train with the old ones while its config said the new ones.

    A group's settings are the keys it has when built; a key an optimizer adds as it steps (LAMB's
    per-group step count) is state."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
        for group, settings in zip(self.optimizer.param_groups, self.settings):
            group.update(settings)
        if isinstance(self.optimizer, torch.optim.SGD):
            zero_momentum_buffers(self.optimizer)  # a checkpoint saved with momentum 0 has no buffers


class ScalerState:
    """The fp16 GradScaler as a checkpoint part: its loss scale and growth count from the checkpoint, its
    settings (growth and backoff factors, interval) from this run. A checkpoint saved without fp16 has no
    loss scale: the run starts from the initial one."""

    STATE = ("scale", "_growth_tracker")

    def __init__(self, scaler: torch.amp.GradScaler):
        self.scaler = scaler

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state and self.scaler.is_enabled():
            settings = {k: v for k, v in self.scaler.state_dict().items() if k not in self.STATE}
            self.scaler.load_state_dict({**state, **settings})


@functools.cache
def _schedule(name: str):
    """schedule.name's Schedule, looked up once (lr_at_step runs every step)."""
    from powergrad_train.config import registry
    return registry.load("schedule", name).build


def lr_at_step(cfg: ScheduleConfig, base_lr: float, step: int, steps_per_epoch: int) -> float:
    """The LR of optimizer step `step` (0-based, counted over the whole run): schedule.name's entry of
    config/registry.py, updated every step or, under schedule.mode = authors_per_epoch, once per epoch."""
    schedule = _schedule(cfg.name)
    if cfg.mode == "authors_per_epoch":
        epoch = step // steps_per_epoch + 1  # 1-based
        return schedule.at_epoch_like_authors(cfg, base_lr, 0 if epoch == 1 else epoch)
    return schedule.per_step(cfg, base_lr, step, steps_per_epoch)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's LR in every group, times the group's `lr_scale` where it has one (timm's
    layer-wise LR decay gives each group its own)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def build_grad_clipper(cfg: GradClipConfig, model: torch.nn.Module) -> Callable[[], None]:
    """The gradient stage, called after unscaling: timm's clip by value / norm / AGC.

    AGC skips the classifier head, as in the NFNet paper.
    """
    if cfg.mode == "none":
        return lambda: None
    head = {id(p) for p in classifier_parameters(model)} if cfg.mode == "agc" else set()
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in head]
    return lambda: dispatch_clip_grad(params, cfg.value, mode=cfg.mode)
