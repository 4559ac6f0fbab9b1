"""An objective: cross-entropy of the logits divided by a temperature; it counts its calls, a state kept
in the checkpoint."""

from dataclasses import dataclass

import torch

from powergrad_train.config.declare import Part, opt


@dataclass
class Keys:
    temperature: float = opt(1.0, "the logits are divided by it", gt=0.0, fixed=True)


class TemperedCrossEntropy:
    def __init__(self, cfg):
        self.temperature, self.calls = cfg.temperature, 0

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.nn.functional.cross_entropy(logits / self.temperature, targets)

    def describe(self) -> str:
        return f"cross-entropy at temperature {self.temperature:g}"

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]


PART = Part(TemperedCrossEntropy, "cross-entropy of logits / temperature", keys=Keys)
