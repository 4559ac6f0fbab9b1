"""Weight averages (`weight_average.name`, config/registry.py): none, or an exponential moving average of
the weights (`ema`), kept by timm's ModelEmaV3.

After every step the average moves towards the model, `ema += (1 - decay) * (model - ema)` for
every floating-point tensor of the state (weights and batch-norm statistics; counters are
copied), except after a skipped step: the weight is then 0, decided on the device, so the
training step still never waits for the host. A weight average is a checkpoint part under its
name and is evaluated beside the model after every epoch (eval_<name>_top1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Protocol

from powergrad_train.config.declare import Part, opt

if TYPE_CHECKING:
    import torch


class WeightAverage(Protocol):
    name: str  # its checkpoint part and its eval column, eval_<name>_top1
    module: torch.nn.Module  # the averaged model, for evaluation

    def update(self, model: torch.nn.Module, skipped: torch.Tensor) -> None:
        """After a step of `model`; no change where `skipped` (a device flag) is set."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class ExponentialAverage:
    name = "ema"

    def __init__(self, cfg, model: torch.nn.Module):
        from timm.utils import ModelEmaV3
        self.decay = cfg.decay
        self.ema = ModelEmaV3(model, decay=cfg.decay)

    @property
    def module(self) -> torch.nn.Module:
        return self.ema.module

    def update(self, model: torch.nn.Module, skipped: torch.Tensor) -> None:
        import torch
        with torch.no_grad():
            # ModelEmaV3 interpolates with weight 1 - decay; a device tensor keeps the choice on the device.
            self.ema.apply_update_(model, decay=1.0 - (1.0 - self.decay) * (1.0 - skipped.reshape(())))

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


@dataclass
class EmaKeys:
    decay: float = opt(0.9998, "the average's decay per step (timm's ModelEmaV3)", gt=0.0, lt=1.0, fixed=True)


NONE = Part(lambda cfg, model: None, "no average")
EMA = Part(ExponentialAverage, "exponential moving average of the weights", keys=EmaKeys)


def build_weight_average(cfg, model: torch.nn.Module) -> Optional[WeightAverage]:
    """The run's weight average (`cfg`: the whole config), or None."""
    from powergrad_train.config import registry
    return registry.load("weight_average", cfg.weight_average.name).build(cfg.weight_average, model)
