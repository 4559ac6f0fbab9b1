"""Models by timm name; `resnet18_nobn` is registered with timm like any other model."""

from __future__ import annotations

import os
import shutil

import timm
import torch
from timm.models import register_model

from powergrad_train.config import ModelConfig, suggestion
from powergrad_train.errors import ConfigError, printable, shown


@register_model
def resnet18_nobn(pretrained: bool = False, **kwargs):
    """ResNet-18 with every norm layer replaced by identity (the paper's Table 2 network)."""
    kwargs.pop("norm_layer", None)
    return timm.create_model("resnet18", pretrained=pretrained, norm_layer=torch.nn.Identity, **kwargs)


def build_model(cfg: ModelConfig) -> torch.nn.Module:
    if not timm.is_model(cfg.name):
        hint = suggestion(cfg.name, timm.list_models())
        raise ConfigError(f"model.name: {shown(cfg.name)} is not a timm model{hint}")
    # Passed only when asked: models without residual batch norm do not take the option.
    extra = {} if cfg.zero_init_last else {"zero_init_last": False}
    try:
        return timm.create_model(cfg.name, num_classes=cfg.num_classes, **extra)
    except TypeError as e:
        if "zero_init_last" not in str(e):
            raise
        raise ConfigError(f"model.zero_init_last = false: model '{cfg.name}' has no such option "
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
