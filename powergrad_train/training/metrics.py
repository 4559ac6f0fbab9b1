"""Device-side meters: the training step's running sums (read from the device only at a log interval)
and the evaluation's, reduced over the processes."""

from __future__ import annotations

import math

import torch

from powergrad_train.system import dist


class TrainMeter:
    """Running sums of the epoch and counters of skipped steps, kept on the device so the training
    step never waits for the host; read (and reduced over ranks) at log time.

    A step whose loss was not finite adds to the image count (throughput) but not to the loss,
    top-1 and logit-norm sums, which therefore stay finite. Targets may be class probabilities
    (mixup): a hit is then the target's most probable class. Each rank checkpoints its own sums.
    """

    SUMS = ("loss", "correct", "images", "logit_norm", "scored")
    LOSS, CORRECT, IMAGES, LOGIT_NORM, SCORED = range(len(SUMS))

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(self.SUMS), dtype=torch.float64, device=device)
        self.skip_streak = torch.zeros(1, dtype=torch.float64, device=device)  # skipped steps in a row, now
        self.longest_skip_streak = torch.zeros(1, dtype=torch.float64, device=device)
        self.bad_losses = torch.zeros(1, dtype=torch.float64, device=device)  # since clear_bad_losses()

    def reset(self) -> None:
        self.sums.zero_()

    @torch.no_grad()
    def update(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        # In-place adds of device values and Python numbers: no host-to-device copy, so no sync.
        logits = logits.detach().float()
        labels = targets.argmax(1) if targets.is_floating_point() else targets
        n = targets.shape[0]
        loss, norms = loss.detach(), logits.norm(dim=1).sum()
        finite = torch.isfinite(loss) & torch.isfinite(norms)
        zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
        self.sums[self.LOSS] += torch.where(finite, loss, zero) * n
        self.sums[self.CORRECT] += (logits.argmax(1) == labels).sum() * finite
        self.sums[self.IMAGES] += n
        self.sums[self.LOGIT_NORM] += torch.where(finite, norms, zero)
        self.sums[self.SCORED] += finite * n

    @torch.no_grad()
    def count_step(self, skipped: torch.Tensor, bad_loss: torch.Tensor) -> None:
        """skipped: the step was not applied; bad_loss: its loss was not finite (device scalars)."""
        self.skip_streak.copy_((self.skip_streak + 1) * skipped)  # back to 0 on an applied step
        torch.maximum(self.longest_skip_streak, self.skip_streak, out=self.longest_skip_streak)
        self.bad_losses += bad_loss

    def bad_losses_on_any_rank(self) -> int:
        """Steps with a non-finite loss on any rank since clear_bad_losses() (a collective)."""
        return int(dist.all_reduce_sum(self.bad_losses.clone()).item())

    def clear_bad_losses(self) -> None:
        self.bad_losses.zero_()

    def state_dict(self) -> dict:
        """This rank's sums and streaks, on the host."""
        return {"sums": self.sums.cpu(), "skip_streak": self.skip_streak.cpu(),
                "longest_skip_streak": self.longest_skip_streak.cpu(), "bad_losses": self.bad_losses.cpu()}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            getattr(self, name).copy_(value)

    def read(self) -> dict:
        """The epoch so far over all ranks (a collective: every rank calls it)."""
        values = dict(zip(self.SUMS, dist.all_reduce_sum(self.sums.clone()).cpu().tolist()))
        streak = dist.all_reduce_max(self.longest_skip_streak.clone()).item()
        scored = values["scored"] or math.nan  # no finite step yet: the means are undefined
        return {"loss": values["loss"] / scored, "top1": 100 * values["correct"] / scored, "images": values["images"],
                "logit_norm": values["logit_norm"] / scored, "longest_skip_streak": streak}


class EvalMeter:
    SUMS = ("loss", "top1", "top5", "images", "logit_norm")
    LOSS, TOP1, TOP5, IMAGES, LOGIT_NORM = range(len(SUMS))

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(self.SUMS), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == targets[:, None]
        self.sums[self.LOSS] += torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        self.sums[self.TOP1] += hits[:, 0].sum()
        self.sums[self.TOP5] += hits.any(1).sum()
        self.sums[self.IMAGES] += targets.shape[0]
        self.sums[self.LOGIT_NORM] += logits.norm(dim=1).sum()

    def read(self) -> dict:
        sums = dict(zip(self.SUMS, dist.all_reduce_sum(self.sums.clone()).tolist()))
        count = max(sums["images"], 1.0)
        return {"loss": sums["loss"] / count, "top1": 100 * sums["top1"] / count, "top5": 100 * sums["top5"] / count,
                "images": count, "logit_norm": sums["logit_norm"] / count}
