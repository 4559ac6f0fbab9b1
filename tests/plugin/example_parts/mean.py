"""A weight average: the arithmetic mean of the weights after every applied step (evaluated as
eval_mean_top1, kept in the checkpoint as the part `mean`)."""

import copy

import torch

from powergrad_train.config.declare import Part


class MeanWeights:
    name = "mean"

    def __init__(self, section, model: torch.nn.Module):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.count = torch.zeros((), device=next(model.parameters()).device)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, skipped: torch.Tensor) -> None:
        applied = 1.0 - skipped.reshape(()).float()  # decided on the device
        self.count += applied
        weight = applied / self.count.clamp(min=1.0)
        for mean, now in zip(self.module.state_dict().values(), model.state_dict().values()):
            if mean.is_floating_point():
                mean.add_((now - mean) * weight)
            else:
                mean.copy_(now)

    def state_dict(self) -> dict:
        return {"count": self.count, "model": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"].clone()
        self.module.load_state_dict(state["model"])


PART = Part(MeanWeights, "the mean of the weights")
