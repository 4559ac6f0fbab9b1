"""Models by timm name; `resnet18_nobn` is registered with timm like any other model."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.models import register_model

from powergrad_train.config import ModelConfig
from powergrad_train.errors import CheckpointError, ConfigError


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
    if cfg.zero_init_last:  # timm's default; models without residual batch norm do not take the option
        return timm.create_model(cfg.name, num_classes=cfg.num_classes)
    try:
        return timm.create_model(cfg.name, num_classes=cfg.num_classes, zero_init_last=False)
    except TypeError:
        timm.create_model(cfg.name, num_classes=cfg.num_classes)  # any other TypeError surfaces here
        raise ConfigError(f"model.zero_init_last = false: model '{cfg.name}' has no such option "
                          "(only residual networks such as resnet* and seresnet* have it)") from None


def classifier_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The classifier head's parameters (AGC leaves them alone; the non-finite check reads them)."""
    return list(model.get_classifier().parameters())


def head_names(model: torch.nn.Module) -> set[str]:
    """The state_dict keys of the classifier head."""
    head = model.get_classifier()
    prefix = next(name for name, module in model.named_modules() if module is head)
    return {f"{prefix}.{key}" for key in head.state_dict()}


def _weights_in(path: Path) -> dict[str, torch.Tensor]:
    """A model's weights from a state_dict file (timm, torchvision), a training checkpoint that holds
    one under 'state_dict' or 'model' (timm's train.py, this project), unwrapped from DDP's 'module.'."""
    from powergrad_train import checkpoint
    if not path.is_file():
        raise CheckpointError(f"model.init_from: {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise checkpoint.load_failure(path, e) from None
    if isinstance(state, dict) and str(state.get("format", "")).startswith("powergrad-train-checkpoint/"):
        state = checkpoint.load(path)  # checked against its checksum
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"model.init_from: {path} holds no model weights (a state_dict of tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_initial_weights(model: torch.nn.Module, path: Path) -> str:
    """Start `model` from the weights in `path`; a head of another class count keeps its fresh
    initialisation. Returns what was done, for the start-up block."""
    weights, own = _weights_in(path), model.state_dict()
    head = head_names(model)
    kept_head = [k for k in head if k in weights and weights[k].shape != own[k].shape]
    if kept_head:
        weights = {k: v for k, v in weights.items() if k not in head}
    missing = [k for k in own if k not in weights and k not in kept_head]
    unexpected = [k for k in weights if k not in own]
    wrong = [k for k in weights if k in own and weights[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        first = (f"{wrong[0]} has shape {tuple(weights[wrong[0]].shape)}, the model's {tuple(own[wrong[0]].shape)}"
                 if wrong else f"{missing[0]} is missing" if missing else f"{unexpected[0]} is not in the model")
        raise CheckpointError(f"model.init_from: {path}: the weights do not fit the model ({first}; "
                              f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} of another shape)")
    model.load_state_dict(weights, strict=not kept_head)
    return f"weights from {path}" + (" (classifier head re-initialised: other class count)" if kept_head else "")
