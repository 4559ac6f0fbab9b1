"""Transforms of a whole training batch on the device, chosen by `batch_transform.name`
(registry.BATCH_TRANSFORMS): applied after the batch reaches the device, before the forward.

A transform returns (images, targets); targets may become class probabilities (N, C), which
every objective takes. The training top-1 then counts a hit when the predicted class is the
target's most probable one.
"""

from __future__ import annotations

from typing import Protocol

import torch

from powergrad_train.config import BatchTransformConfig


class BatchTransform(Protocol):
    def __init__(self, cfg: BatchTransformConfig, num_classes: int) -> None: ...

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class NoTransform:
    def __init__(self, cfg: BatchTransformConfig, num_classes: int):
        pass

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images, targets


class MixupCutmix:
    """timm's Mixup/CutMix: each image blended with (or a box pasted from) the batch's flipped order.

    Label smoothing stays with the objective, so timm's own smoothing is off here. The mixing
    weight is drawn from numpy's global generator, which checkpoints save and restore per rank.
    """

    def __init__(self, cfg: BatchTransformConfig, num_classes: int):
        from timm.data import Mixup
        self.mixup = Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.prob,
                           switch_prob=cfg.switch_prob, label_smoothing=0.0, num_classes=num_classes)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # timm mixes in place; a copy leaves the loader's tensor as it was (the synthetic backend
        # serves the same one again)
        return self.mixup(images.clone(), targets)


def build_batch_transform(cfg: BatchTransformConfig, num_classes: int) -> BatchTransform:
    from powergrad_train import registry
    return registry.load(registry.BATCH_TRANSFORMS, cfg.name)(cfg, num_classes)
