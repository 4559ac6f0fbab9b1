"""What a run minimises: (logits, targets) -> loss, chosen by `loss.name` (registry.OBJECTIVES).

An objective is built from the config's loss section and called once per micro-batch in the
training step. Targets are class indices (N,) or, after a batch transform such as mixup, class
probabilities (N, C); every objective takes both.
"""

from __future__ import annotations

from typing import Protocol

import torch

from powergrad_train.config.schema import LossConfig
from powergrad_train.pgt import power_grad_cross_entropy


class Objective(Protocol):
    def __init__(self, cfg: LossConfig) -> None: ...

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean loss over the batch (a scalar tensor)."""

    def describe(self) -> str:
        """What it computes, for the start-up block and bench lines."""


class CrossEntropy:
    """Cross-entropy with label smoothing; with loss.pgt_alpha set, its gradient is the PGT one (pgt.py)."""

    def __init__(self, cfg: LossConfig):
        self.alpha, self.label_smoothing, self.impl = cfg.pgt_alpha, cfg.label_smoothing, cfg.pgt_impl

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return power_grad_cross_entropy(logits, targets, self.alpha, self.label_smoothing, impl=self.impl)

    def describe(self) -> str:
        gradient = "plain gradient" if self.alpha is None else f"PowerGrad Transform alpha {self.alpha:g}" + (
            " (the authors' hook)" if self.impl == "authors_hook" else "")
        return f"cross-entropy, {gradient}, label smoothing {self.label_smoothing:g}"


def build_objective(cfg: LossConfig) -> Objective:
    from powergrad_train.config import registry
    return registry.load(registry.OBJECTIVES, cfg.name)(cfg)
