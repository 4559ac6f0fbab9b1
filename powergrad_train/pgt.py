"""The PowerGrad Transform (PGT) loss: the one place where PGT happens.

Forward: the ordinary cross-entropy (label-smoothed if asked), averaged over the batch.
Backward: the gradient w.r.t. the logits is

    upstream * (softmax(alpha * z) - q) / N

instead of upstream * (softmax(z) - q) / N, with q the (smoothed) one-hot target.
Everything upstream of the logits backpropagates as usual.

The transformed probabilities are computed from the logits themselves, in float32.
The authors' reference code instead rebuilt p from the incoming gradient
(p = grad / N + q), which is right only when the AMP loss scale equals N^2; see
shared/paper/NOTES.md. Here the result does not depend on loss scale, batch size,
reduction, logit precision or the number of processes.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class _PowerGradCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, alpha: float, label_smoothing: float):
        z = logits.float()
        num_classes = z.shape[1]
        # CE = logsumexp(z) - sum_i q_i z_i, with q = (1 - eps) * onehot + eps / C.
        loss = torch.logsumexp(z, dim=1) - (1.0 - label_smoothing) * z.gather(1, target[:, None]).squeeze(1)
        if label_smoothing:
            loss = loss - (label_smoothing / num_classes) * z.sum(dim=1)
        ctx.save_for_backward(logits, target)
        ctx.alpha, ctx.label_smoothing = alpha, label_smoothing
        return loss.mean()

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        logits, target = ctx.saved_tensors
        n, num_classes = logits.shape
        eps = ctx.label_smoothing
        # softmax(alpha * z) in float32, from the logits (never from the incoming gradient).
        grad = torch.softmax(logits.to(torch.float32, copy=True).mul_(ctx.alpha), dim=1)
        grad.scatter_add_(1, target[:, None], grad.new_full((n, 1), -(1.0 - eps)))
        if eps:
            grad.sub_(eps / num_classes)
        grad.mul_(upstream / n)
        return grad.to(logits.dtype), None, None, None


def power_grad_cross_entropy(logits: torch.Tensor, target: torch.Tensor, alpha: Optional[float],
                             label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of `logits` (N x C) against class indices `target` (N,).

    alpha=None gives torch's cross-entropy (plain gradient). A float alpha in (0, 1]
    gives the PGT gradient; alpha=1 equals plain cross-entropy.
    """
    if logits.ndim != 2 or target.ndim != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"expected logits (N, C) and target (N,), got {tuple(logits.shape)} and {tuple(target.shape)}")
    if alpha is None:
        return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"pgt alpha must be in (0, 1], got {alpha}")
    return _PowerGradCrossEntropy.apply(logits, target, float(alpha), float(label_smoothing))
