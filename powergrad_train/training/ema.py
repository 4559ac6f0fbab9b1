"""An exponential moving average of the weights (`ema.decay`), kept by timm's ModelEmaV3.

After every step the average moves towards the model, `ema += (1 - decay) * (model - ema)` for
every floating-point tensor of the state (weights and batch-norm statistics; counters are
copied), except after a skipped step: the weight is then 0, decided on the device, so the
training step still never waits for the host. It is a checkpoint part like the model and is
evaluated beside it after every epoch.
"""

from __future__ import annotations

import torch
from timm.utils import ModelEmaV3


class WeightAverage:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.ema = ModelEmaV3(model, decay=decay)

    @property
    def module(self) -> torch.nn.Module:
        """The averaged model, for evaluation."""
        return self.ema.module

    @torch.no_grad()
    def update(self, model: torch.nn.Module, skipped: torch.Tensor) -> None:
        """After a step of `model`; no change where `skipped` (a device flag) is set."""
        # ModelEmaV3 interpolates with weight 1 - decay; a device tensor keeps the choice on the device.
        self.ema.apply_update_(model, decay=1.0 - (1.0 - self.decay) * (1.0 - skipped.reshape(())))

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
