"""Skipping a bad optimizer step completely, on the device where the optimizer allows it.

A step is bad when any gradient is non-finite (a NaN/inf loss on any rank reaches every
rank through DDP's all-reduce, so all ranks decide alike). Skipping it must leave no
trace: the optimizer does not update (each optimizer comes with a StepSkipper saying how),
SGD's momentum buffers exist before the first step (fused SGD would otherwise start from
uninitialised memory when that step is skipped), and the module buffers the forward pass
already changed (batch-norm running statistics, num_batches_tracked) are put back.
"""

from __future__ import annotations

from typing import Iterable, Protocol

import torch


def nonfinite_gradients(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """1.0 if any gradient holds a NaN or inf, else 0.0: a 1-element float tensor on the device.

    This is the GradScaler's own check (one fused pass over all gradients), with a scale of 1.
    """
    by_dtype: dict[tuple, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            by_dtype.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    found = None
    for (device, _), grads in by_dtype.items():
        found = found if found is not None else torch.zeros(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones(1, device=device))
    return found if found is not None else torch.zeros(1)


class StepSkipper(Protocol):
    def step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, skipped: torch.Tensor) -> None:
        """optimizer.step() and scaler.update(), the update left out where `skipped` (a device flag) is set."""


class _SkipOnDevice:
    """For torch's fused SGD, Adam and AdamW: their kernels leave parameters and state untouched when
    the optimizer's `found_inf` tensor is 1, the attribute the GradScaler itself sets for them
    (tests/test_optim.py checks that every registered optimizer still honours it). No host sync."""

    def step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, skipped: torch.Tensor) -> None:
        if not scaler.is_enabled():  # under fp16 the GradScaler sets found_inf from its own check
            optimizer.found_inf = skipped.reshape(())
        scaler.step(optimizer)
        scaler.update()


class _SkipOnHost:
    """For any other optimizer: the flag is read on the host, one sync per step (the GradScaler does
    the same under fp16 for optimizers that cannot skip on the device)."""

    def step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, skipped: torch.Tensor) -> None:
        if scaler.is_enabled():
            scaler.step(optimizer)
        elif not skipped.item():
            optimizer.step()
        scaler.update()


SKIP_ON_DEVICE, SKIP_ON_HOST = _SkipOnDevice(), _SkipOnHost()


def zero_momentum_buffers(optimizer: torch.optim.SGD) -> None:
    """Create SGD's momentum buffers as zeros before the first step.

    With dampening 0 the first real update is then exactly the one SGD makes when it creates
    the buffer itself (buf = grad), and a skipped first step leaves zeros, not garbage.
    """
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


class BufferSnapshot:
    """The model's buffers before a step, put back if the step is skipped.

    Buffers are grouped by dtype and concatenated, so taking and restoring cost a few
    kernels whatever the number of layers.
    """

    def __init__(self, model: torch.nn.Module):
        groups: dict[torch.dtype, list[torch.Tensor]] = {}
        for buffer in model.buffers():
            groups.setdefault(buffer.dtype, []).append(buffer)
        self.groups = list(groups.values())
        self.saved: list[torch.Tensor] = []

    def take(self) -> None:
        self.saved = [torch.cat([b.reshape(-1) for b in group]) for group in self.groups]

    @torch.no_grad()
    def restore_if(self, skipped: torch.Tensor) -> None:
        """Where `skipped` (a device scalar) is true, every buffer gets its saved value back."""
        for group, saved in zip(self.groups, self.saved):
            now = torch.cat([b.reshape(-1) for b in group])
            merged = torch.where(skipped.bool(), saved, now)
            torch._foreach_copy_(group, [m.view_as(b) for m, b in zip(merged.split([b.numel() for b in group]), group)])
