"""Transforms of a whole training batch on the device, chosen by `batch_transform.name`
(config/registry.py): applied after the batch reaches the device, before the forward.

A transform returns (images, targets); targets may become class probabilities (N, C), which
every objective takes. The training top-1 then counts a hit when the predicted class is the
target's most probable one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from powergrad_train.config.declare import Part, opt
from powergrad_train.system.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from powergrad_train.config.sections import BatchTransformConfig


class BatchTransform(Protocol):
    pairs_images: bool  # it pairs each image with another of its process's batch (needs an even batch per process)

    def __init__(self, cfg: BatchTransformConfig, num_classes: int) -> None: ...

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class NoTransform:
    pairs_images = False

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
    pairs_images = True
    uses = ("mixup_alpha", "cutmix_alpha")  # the alphas it draws from

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


@dataclass
class MixupKeys:
    mixup_alpha: float = opt(0.8, "the mixing weight is drawn from Beta(mixup_alpha, mixup_alpha) (cutmix: not "
                                  "used, stored as 0)", ge=0.0, fixed=True)


@dataclass
class CutmixKeys:
    cutmix_alpha: float = opt(1.0, "the same for CutMix's box area (mixup: not used, stored as 0)", ge=0.0, fixed=True)


@dataclass
class ProbKeys:
    prob: float = opt(1.0, "probability that a batch is mixed", ge=0.0, le=1.0, fixed=True)


@dataclass
class SwitchKeys:
    switch_prob: float = opt(0.5, "probability of CutMix instead of mixup", ge=0.0, le=1.0, fixed=True)


def _alphas_checked(transform: type[MixupCutmix]):
    """The rule of a transform that draws from `transform.uses`: each of those alphas > 0; the other one,
    given > 0, asks for the switch (mixup_cutmix); not given, it is stored as 0, what it trains."""
    def check(cfg, where) -> None:
        b, name = cfg.batch_transform, cfg.batch_transform.name
        for alpha in transform.uses:
            if getattr(b, alpha) == 0:
                alone = [other for other in ("mixup", "cutmix") if f"{other}_alpha" != alpha]
                hint = f" (with it 0 only {alone[0]} is on: use batch_transform.name = {alone[0]})" \
                    if len(transform.uses) == 2 else ""
                raise ConfigError(f"{where('batch_transform.name', 'batch_transform.' + alpha)}: batch_transform.name "
                                  f"= {name} needs batch_transform.{alpha} > 0{hint}")
        for unused in {"mixup_alpha", "cutmix_alpha"} - set(transform.uses):
            if getattr(b, unused) > 0 and where.given(f"batch_transform.{unused}"):
                raise ConfigError(f"{where('batch_transform.name', 'batch_transform.' + unused)}: batch_transform.name "
                                  f"= {name} does not use batch_transform.{unused} ({getattr(b, unused):g}); for timm's "
                                  "switch between mixup and CutMix use batch_transform.name = mixup_cutmix")
            setattr(b, unused, 0.0)  # stored as what it trains, so the saved config reads back unambiguously
    return check


NONE = Part(NoTransform, "no transform")
MIXUP = Part(MixupOnly, "each image blended with another (timm's Mixup)", keys=(MixupKeys, ProbKeys),
             check=_alphas_checked(MixupOnly))
CUTMIX = Part(CutmixOnly, "a box pasted from another image", keys=(CutmixKeys, ProbKeys),
              check=_alphas_checked(CutmixOnly))
MIXUP_CUTMIX = Part(MixupCutmix, "per batch one or the other, CutMix with probability switch_prob",
                    keys=(MixupKeys, CutmixKeys, ProbKeys, SwitchKeys), check=_alphas_checked(MixupCutmix))


def build_batch_transform(cfg: BatchTransformConfig, num_classes: int) -> BatchTransform:
    from powergrad_train.config import registry
    return registry.load("batch_transform", cfg.name).build(cfg, num_classes)
