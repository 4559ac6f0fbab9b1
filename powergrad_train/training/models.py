"""Models by timm name; `resnet18_nobn` is registered with timm like any other model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import timm
import torch
from timm.models import register_model

from powergrad_train.config.schema import suggestion
from powergrad_train.config.sections import ModelConfig
from powergrad_train.system.errors import CheckpointError, ConfigError, printable, shown


@register_model
def resnet18_nobn(pretrained: bool = False, **kwargs):
    """ResNet-18 with every norm layer replaced by identity (the paper's Table 2 network)."""
    kwargs.pop("norm_layer", None)
    return timm.create_model("resnet18", pretrained=pretrained, norm_layer=torch.nn.Identity, **kwargs)


def build_model(cfg: ModelConfig) -> torch.nn.Module:
    if not timm.is_model(cfg.name):
        hint = suggestion(cfg.name, timm.list_models())
        raise ConfigError(f"model.name: {shown(cfg.name)} is not a timm model{hint}")
    if cfg.zero_init_last:  # timm's default; models without residual batch norm do not take the option
        return timm.create_model(cfg.name, num_classes=cfg.num_classes)
    try:
        return timm.create_model(cfg.name, num_classes=cfg.num_classes, zero_init_last=False)
    except TypeError:
        timm.create_model(cfg.name, num_classes=cfg.num_classes)  # any other TypeError surfaces here
        raise ConfigError(f"model.zero_init_last = false: model {shown(cfg.name)} has no such option "
                          "(only residual networks such as resnet* and seresnet* have it)") from None


def check_model_runs(cfg: ModelConfig, image_size: int, batch: int, train: bool, batch_note: str = "") -> None:
    """Refuse, before any work, a model that cannot run on `batch` images of image_size pixels.

    The model is built on the meta device (no memory, no compute) and runs one forward pass there,
    in train mode for training: timm's and torch's own shape checks run as they would at step 1 (an
    input size a model does not take, a kernel larger than its feature map, batch norm's 'more than
    1 value per channel' at a micro-batch of 1). A model or op that the meta device cannot run is
    tried on the CPU instead, with at most 2 images (batch norm's check differs only at 1).
    """
    def forward(model, n):
        model.train(train)
        with torch.no_grad():
            model(torch.zeros(n, 3, image_size, image_size, device=next(model.parameters()).device))

    try:
        with torch.device("meta"):
            meta = build_model(cfg)
        forward(meta, batch)
        return
    except ConfigError:
        raise
    except Exception:  # the meta device lacks some ops and initialisers: ask the CPU
        pass
    try:
        forward(build_model(cfg), min(batch, 2))
    except ConfigError:
        raise
    except Exception as e:
        why = printable(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        raise ConfigError(f"model.name: {cfg.name} cannot {'train' if train else 'evaluate'} on {batch} image(s) of "
                          f"{image_size}x{image_size} px per step{batch_note}: {why}") from None


def check_compile(cuda: bool) -> None:
    """model.compile: the tools torch.compile's inductor builds its kernels with are there. On the CPU
    a C++ compiler, found by torch's own search ($CXX, else g++); on CUDA GPUs, triton and the C
    compiler it builds its launcher with ($CC, else gcc or clang, as triton looks for them)."""
    fix = "or set model.compile: false"
    if cuda:
        from torch.utils._triton import has_triton
        if not has_triton():
            raise ConfigError(f"model.compile = true on CUDA GPUs needs triton (pip install triton), {fix}")
        if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
            raise ConfigError(f"model.compile = true needs a C compiler for triton: install gcc or set CC, {fix}")
        return
    from torch._inductor import cpp_builder, exc
    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        raise ConfigError(f"model.compile = true on the CPU needs a C++ compiler (torch.compile builds its kernels "
                          f"with one): install g++ or set CXX to one, {fix}") from None


def classifier_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The classifier head's parameters (AGC leaves them alone; the non-finite check reads them)."""
    return list(model.get_classifier().parameters())


def head_names(model: torch.nn.Module) -> set[str]:
    """The state_dict keys of the classifier head."""
    head = model.get_classifier()
    prefix = next(name for name, module in model.named_modules() if module is head)
    return {f"{prefix}.{key}" for key in head.state_dict()}


INIT_FROM = "model.init_from"


def _weights_in(path: Path) -> dict[str, torch.Tensor]:
    """A model's weights from a state_dict file (timm, torchvision), a training checkpoint that holds
    one under 'state_dict' or 'model' (timm's train.py and the PGT authors' .pth.tar, this project),
    unwrapped from DDP's 'module.'. Loaded as validate loads a checkpoint (checkpoint.torch_load)."""
    from powergrad_train.training import checkpoint
    if path.is_dir():
        held = sorted(p.name for p in path.iterdir() if p.name.endswith((".pt", ".pth", ".pth.tar", ".bin")))[:4]
        raise CheckpointError(f"{INIT_FROM}: {printable(path)} is a folder; give a weights file"
                              + (f" (files there: {', '.join(printable(n) for n in held)})" if held else ""))
    try:
        state = checkpoint.torch_load(path)
        if isinstance(state, dict) and str(state.get("format", "")).startswith("powergrad-train-checkpoint/"):
            state = checkpoint.load(path)  # checked against its checksum
    except CheckpointError as e:
        raise CheckpointError(f"{INIT_FROM}: {e}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{INIT_FROM}: {path} holds no model weights (a state_dict of tensors)")
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
        raise CheckpointError(f"{INIT_FROM}: {path}: the weights do not fit the model ({first}; "
                              f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} of another shape)")
    model.load_state_dict(weights, strict=not kept_head)
    return f"weights from {path}" + (" (classifier head re-initialised: other class count)" if kept_head else "")
