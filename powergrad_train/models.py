"""Models by timm name; `resnet18_nobn` is registered with timm like any other model."""

from __future__ import annotations

import timm
import torch
from timm.models import register_model

from powergrad_train.config import ModelConfig
from powergrad_train.errors import ConfigError


@register_model
def resnet18_nobn(pretrained: bool = False, **kwargs):
    """ResNet-18 with every norm layer replaced by identity (the paper's Table 2 network)."""
    kwargs.pop("norm_layer", None)
    return timm.create_model("resnet18", pretrained=pretrained, norm_layer=torch.nn.Identity, **kwargs)


def build_model(cfg: ModelConfig) -> torch.nn.Module:
    if not timm.is_model(cfg.name):
        close = timm.list_models(f"*{cfg.name.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"model.name: '{cfg.name}' is not a timm model{hint}")
    # Passed only when asked: models without residual batch norm do not take the option.
    extra = {} if cfg.zero_init_last else {"zero_init_last": False}
    try:
        return timm.create_model(cfg.name, num_classes=cfg.num_classes, **extra)
    except TypeError as e:
        if "zero_init_last" not in str(e):
            raise
        raise ConfigError(f"model.zero_init_last = false: model '{cfg.name}' has no such option "
                          "(only residual networks such as resnet* and seresnet* have it)") from None


def classifier_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The classifier head's parameters (AGC leaves them alone; the non-finite check reads them)."""
    return list(model.get_classifier().parameters())
