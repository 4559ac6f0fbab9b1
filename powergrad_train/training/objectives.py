"""What a run minimises: (logits, targets) -> loss, chosen by `loss.name` (config/registry.py).

An objective is built from the config's loss section and called once per micro-batch in the
training step. Targets are class indices (N,) or, after a batch transform such as mixup, class
probabilities (N, C); every objective takes both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Protocol

from powergrad_train.config.declare import Part, opt
from powergrad_train.system.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from powergrad_train.config.sections import LossConfig


class Objective(Protocol):
    def __init__(self, cfg: LossConfig) -> None: ...

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean loss over the batch (a scalar tensor)."""

    def describe(self) -> str:
        """What it computes, for the start-up block and bench lines."""


class CrossEntropy:
    """Cross-entropy with label smoothing; with loss.pgt_alpha set, its gradient is the PGT one (pgt.py)."""

    def __init__(self, cfg: LossConfig):
        from powergrad_train.pgt import power_grad_cross_entropy  # (torch: not for the schema's import)
        self.loss = power_grad_cross_entropy
        self.alpha, self.label_smoothing, self.impl = cfg.pgt_alpha, cfg.label_smoothing, cfg.pgt_impl

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, targets, self.alpha, self.label_smoothing, impl=self.impl)

    def describe(self) -> str:
        gradient = "plain gradient" if self.alpha is None else f"PowerGrad Transform alpha {self.alpha:g}" + (
            " (the authors' hook)" if self.impl == "authors_hook" else "")
        return f"cross-entropy, {gradient}, label smoothing {self.label_smoothing:g}"


@dataclass
class CrossEntropyKeys:
    pgt_alpha: Optional[float] = opt(None, "PowerGrad Transform exponent alpha in (0, 1]; null = plain cross-entropy "
                                           "gradient", gt=0.0, le=1.0, fixed=True)
    label_smoothing: float = opt(0.0, "label smoothing epsilon", ge=0.0, lt=1.0, fixed=True)
    pgt_impl: str = opt("exact", "how the PGT gradient is computed: exact = softmax(alpha * logits) from the logits "
                                 "themselves; authors_hook = the PGT authors' tensor hook, which rebuilds the "
                                 "probabilities from the incoming gradient in the logits' dtype, so it depends on "
                                 "the fp16 loss scale and the per-process batch (to study their numbers)",
                        choices=("exact", "authors_hook"), fixed=True)


def _check_cross_entropy(cfg, where) -> None:
    if cfg.loss.pgt_impl == "authors_hook" and cfg.batch_transform.name != "none":
        raise ConfigError(f"{where('batch_transform.name', 'loss.pgt_impl')}: loss.pgt_impl = authors_hook is the "
                          "authors' computation for class-index targets; it cannot take the probabilities "
                          f"batch_transform.name = {cfg.batch_transform.name} makes")


CROSS_ENTROPY = Part(CrossEntropy, "with the PowerGrad Transform and label smoothing; takes class indices or the "
                                   "class probabilities mixup makes", keys=CrossEntropyKeys, check=_check_cross_entropy)


def build_objective(cfg: LossConfig) -> Objective:
    from powergrad_train.config import registry
    return registry.load("objective", cfg.name).build(cfg)
