"""Transforms of a whole training batch on the device, chosen by `batch_transform.name`
(registry.BATCH_TRANSFORMS): applied after the batch reaches the device, before the forward.

A transform returns (images, targets); targets may become class probabilities (N, C), which
every objective takes. The training top-1 then counts a hit when the predicted class is the
target's most probable one.
"""

from __future__ import annotations

from typing import Protocol

import torch

from powergrad_train.config.schema import BatchTransformConfig


class BatchTransform(Protocol):
    def __init__(self, cfg: BatchTransformConfig, num_classes: int) -> None: ...

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class NoTransform:
    def __init__(self, cfg: BatchTransformConfig, num_classes: int):
        pass

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images, targets


class MixupCutmix:
    """timm's Mixup: each image blended with (mixup) or a box pasted from (CutMix) the batch's flipped
    order; per batch one or the other, CutMix with probability switch_prob.

    Label smoothing stays with the objective, so timm's own smoothing is off here. The mixing
    weight is drawn from numpy's global generator, which checkpoints save and restore per rank.
    """
    uses = ("mixup_alpha", "cutmix_alpha")

    def __init__(self, cfg: BatchTransformConfig, num_classes: int):
        from timm.data import Mixup
        alpha = {k: getattr(cfg, k) if k in self.uses else 0.0 for k in ("mixup_alpha", "cutmix_alpha")}
        self.mixup = Mixup(**alpha, prob=cfg.prob, switch_prob=cfg.switch_prob, label_smoothing=0.0,
                           num_classes=num_classes)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # timm mixes in place; a copy leaves the loader's tensor as it was (the synthetic backend
        # serves the same one again)
        return self.mixup(images.clone(), targets)


class MixupOnly(MixupCutmix):
    """Mixup only: every mixed batch is blended (timm's Mixup with CutMix off)."""
    uses = ("mixup_alpha",)


class CutmixOnly(MixupCutmix):
    """CutMix only: every mixed batch gets pasted boxes (timm's Mixup with mixup off)."""
    uses = ("cutmix_alpha",)


def build_batch_transform(cfg: BatchTransformConfig, num_classes: int) -> BatchTransform:
    from powergrad_train.config import registry
    return registry.load(registry.BATCH_TRANSFORMS, cfg.name)(cfg, num_classes)
