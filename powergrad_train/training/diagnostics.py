"""What the PGT paper plots, measured at the end of every epoch without touching training.

- Per-filter L2 norm of every convolution's weight (Fig. 5-7): saved per epoch as a compressed
  array file, and the filters whose norm fell below ZEROED_NORM counted per layer and in total.
- The pooled feature vector that enters the classifier, over the val pass: the channels that
  are zero for every val image (Fig. 5c, 5f), and each channel's root-mean-square value, saved
  per epoch beside the filter norms.
- The mean L2 norm of the val logits (Fig. 8, beside the final val loss the eval pass gives).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from powergrad_train.system.atomic import make_folder, write_file

ZEROED_NORM = 1e-3  # a filter with a smaller L2 norm counts as zeroed out


@torch.no_grad()
def conv_filter_norms(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """{layer name: L2 norm of each output filter}, for every convolution."""
    return {name: m.weight.detach().float().flatten(1).norm(dim=1).cpu().numpy()
            for name, m in model.named_modules() if isinstance(m, torch.nn.modules.conv._ConvNd)}


def save_pooled_features(rms: np.ndarray, run_dir: Path, epoch: int) -> Path:
    folder = Path(run_dir) / "diagnostics"
    make_folder(folder)
    path = folder / f"pooled-features-epoch-{epoch:04d}.npz"
    write_file(path, lambda f: np.savez_compressed(f, rms=rms))
    return path


def save_filter_norms(norms: dict[str, np.ndarray], run_dir: Path, epoch: int) -> Path:
    folder = Path(run_dir) / "diagnostics"
    make_folder(folder)
    path = folder / f"filter-norms-epoch-{epoch:04d}.npz"
    arrays = {name.replace(".", "/"): values.astype(np.float32) for name, values in norms.items()}
    write_file(path, lambda f: np.savez_compressed(f, **arrays))
    return path


def load_filter_norms(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as arrays:
        return {name.replace("/", "."): arrays[name] for name in arrays.files}


def zeroed_filters(norms: dict[str, np.ndarray]) -> dict[str, int]:
    return {name: int((values < ZEROED_NORM).sum()) for name, values in norms.items()}


class PooledFeatureWatch:
    """Records, during evaluation, the largest |value| and the sum of squares of each channel of the
    classifier's input (on the device: no host sync per batch); `dead_channels()` counts those that
    stayed 0, `channel_rms()` gives each channel's root-mean-square value over the images."""

    def __init__(self, model: torch.nn.Module):
        self.peak = self.squares = None
        self.images = 0
        self.handle = model.get_classifier().register_forward_pre_hook(self._record)
        self.active = False

    def _record(self, module, inputs) -> None:
        if not self.active:
            return
        features = inputs[0].detach().float().flatten(1)
        peak, squares = features.abs().amax(dim=0), features.square().sum(dim=0)
        self.peak = peak if self.peak is None else torch.maximum(self.peak, peak)
        self.squares = squares if self.squares is None else self.squares + squares
        self.images += features.shape[0]

    def start(self) -> None:
        self.peak = self.squares = None
        self.images, self.active = 0, True

    def dead_channels(self) -> int:
        """Channels zero on every image of every rank (ends the recording; a collective)."""
        self.active = False
        if self.peak is None:
            return 0
        peak = self.peak.clone()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        return int((peak == 0).sum().item())

    def channel_rms(self) -> np.ndarray:
        """Each channel's root-mean-square over the images of every rank (a collective)."""
        if self.squares is None:
            return np.zeros(0, dtype=np.float32)
        totals = torch.cat([self.squares, torch.tensor([float(self.images)], device=self.squares.device)])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        return (totals[:-1] / totals[-1].clamp_min(1)).sqrt().cpu().numpy().astype(np.float32)

    def close(self) -> None:
        self.handle.remove()


def epoch_diagnostics(model: torch.nn.Module, run_dir: Path, epoch: int, is_main: bool,
                      feature_rms: np.ndarray) -> dict[str, int]:
    """Rank 0 saves the filter norms and the pooled features' channel RMS of `epoch`; every rank
    returns the zeroed filters per layer."""
    norms = conv_filter_norms(model)
    if is_main:
        save_filter_norms(norms, run_dir, epoch)
        save_pooled_features(feature_rms, run_dir, epoch)
    return zeroed_filters(norms)

