"""The PowerGrad Transform (PGT) loss: the one place where PGT happens.

Forward: the ordinary cross-entropy (label-smoothed if asked), reduced as torch's
`F.cross_entropy` reduces it. Backward: the gradient w.r.t. each row of logits is

    upstream * (softmax(alpha * z) * sum(q) - q) / N

instead of upstream * (softmax(z) * sum(q) - q) / N, with q the (smoothed) one-hot target or
the given class probabilities (sum(q) = 1 for both) and N the mean's divisor. Everything
upstream of the logits backpropagates as usual.

The transformed probabilities are computed from the logits themselves, in float32.
The authors' reference code instead rebuilt p from the incoming gradient, p = grad / N + q;
that gradient is S * (p - q) / N for an AMP loss scale S, so the rebuilt p is right only
when S == N^2 (for example 256 images per GPU and GradScaler's initial scale 65536).
Here the result does not depend on loss scale, batch size, reduction, logit precision or
the number of processes.

impl="authors_hook" reproduces the authors' computation instead, to study where their numbers
come from: the ordinary cross-entropy, whose gradient reaches the logits (in their dtype, fp16
under autocast) as S * (p - q) / N, then a hook that rebuilds p = grad / N + q, raises it to
alpha, renormalises and returns N * (ptilde - q), every step in the logits' dtype. Its result
is right only when S == N^2; for S > N^2 the rebuilt target probability is negative and the
power gives NaN (the GradScaler then skips the step and halves S), for S < N^2 it is wrong, and
in fp16 probabilities below about 3e-8 become 0 before the power.

As a library (torch alone is imported):

    from powergrad_train import PowerGradCrossEntropy
    criterion = PowerGradCrossEntropy(alpha=0.25, label_smoothing=0.1)   # a drop-in for nn.CrossEntropyLoss
    loss = criterion(logits, targets)

Paper: B. Das, M. Mondal, B. Lall, S. D. Joshi, S. Dutta Roy, "Altering Backward Pass
Gradients improves Convergence", arXiv:2111.12495. Authors' code:
https://github.com/bishshoy/power-grad-transform
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("exact", "authors_hook")


class _PowerGradCrossEntropy(torch.autograd.Function):
    """Rows of logits (M, C) against class indices (M,) or class probabilities (M, C)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, alpha: float, label_smoothing: float,
                reduction: str, ignore_index: int):
        log_p = torch.log_softmax(logits.float(), dim=1)  # fp16/bf16 logits are upcast to float32
        eps, num_classes = label_smoothing, log_p.shape[1]
        soft = target.is_floating_point()
        if soft:
            q = target.float() * (1.0 - eps) + eps / num_classes if eps else target.float()
            rows = -(q * log_p).sum(dim=1)
            count = None  # torch's mean over probability targets divides by the number of rows
            valid = None
        else:
            rows = F.nll_loss(log_p, target, ignore_index=ignore_index, reduction="none")  # 0 where ignored
            valid = target != ignore_index
            if eps:  # torch's definition: (1 - eps) * nll + eps * mean over classes of -log p
                rows = (1.0 - eps) * rows - eps * log_p.mean(dim=1) * valid
            count = valid.sum()
        if reduction == "mean":
            loss = rows.sum() / (count if count is not None else rows.shape[0])
        elif reduction == "sum":
            loss = rows.sum()
        else:
            loss = rows
        # Cross-entropy keeps log_p for its backward too: PGT needs no extra memory, and the
        # backward turns this buffer into the gradient in place.
        ctx.save_for_backward(target, log_p, *(() if count is None else (count,)))
        ctx.alpha, ctx.label_smoothing, ctx.dtype = alpha, label_smoothing, logits.dtype
        ctx.reduction, ctx.ignore_index = reduction, ignore_index
        return loss

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        target, log_p, *count = ctx.saved_tensors
        n, num_classes = log_p.shape
        eps = ctx.label_smoothing
        if ctx.reduction == "mean":
            scale = upstream / (count[0] if count else n)
        else:  # sum: a scalar; none: one upstream value per row
            scale = upstream if ctx.reduction == "sum" else upstream[:, None]
        soft = target.is_floating_point()
        if not soft:
            valid = target != ctx.ignore_index
            scale = scale * valid[:, None]  # ignored rows get no gradient
        # softmax(alpha * z) = exp(alpha * log_p) / sum, since log_p = z - logsumexp(z): computed
        # from the logits' own log-probabilities, never from the incoming gradient. alpha * log_p <= 0,
        # so exp cannot overflow, and the largest term is >= C^-alpha, so the sum cannot vanish.
        # In place: a second backward through the same graph (retain_graph) fails loudly in autograd.
        grad = log_p.mul_(ctx.alpha).exp_()
        if soft:
            q = target.float() * (1.0 - eps) + eps / num_classes if eps else target.float()
            grad.mul_(scale * q.sum(dim=1, keepdim=True) / grad.sum(dim=1, keepdim=True))
            grad.sub_(q * scale)
        else:
            grad.mul_(scale / grad.sum(dim=1, keepdim=True))  # normalise and scale in one pass
            index = torch.where(valid, target, 0)[:, None]  # an ignored row's scale is 0: any index will do
            grad.scatter_add_(1, index, (scale * (eps - 1.0)).expand(n, 1))  # - q, no one-hot
            if eps:
                grad.sub_(scale * (eps / num_classes))
        return grad.to(ctx.dtype), None, None, None, None, None


def authors_hook_gradient(grad: torch.Tensor, target: torch.Tensor, alpha: float,
                          label_smoothing: float) -> torch.Tensor:
    """What the authors' hook returns for the incoming logits gradient `grad` (N x C).

    Every operation stays in grad's dtype, in their order: q = the smoothed one-hot target,
    p = grad / N + q, ptilde = p^alpha / sum(p^alpha), returned as N * (ptilde - q).
    """
    n, num_classes = grad.shape
    q = F.one_hot(target, num_classes).to(grad.dtype).mul_(1.0 - label_smoothing).add_(label_smoothing / num_classes)
    # The power in float32, rounded to the dtype: what CUDA's half kernels do (the CPU's own half
    # power is an approximation that can be one unit in the last place off).
    p = grad.div(n).add_(q).float().pow_(alpha).to(grad.dtype)
    p.div_(p.sum(dim=1, keepdim=True))
    return p.sub_(q).mul_(n)


def _authors_hook(logits: torch.Tensor, target: torch.Tensor, alpha: float, label_smoothing: float) -> torch.Tensor:
    # The loss as theirs: cross-entropy in float32, its gradient cast back to the logits' dtype.
    loss = F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
    if logits.requires_grad:
        logits.register_hook(lambda grad: authors_hook_gradient(grad, target, alpha, label_smoothing))
    return loss


def power_grad_cross_entropy(logits: torch.Tensor, target: torch.Tensor, alpha: Optional[float],
                             label_smoothing: float = 0.0, *, reduction: str = "mean",
                             ignore_index: int = -100, impl: str = "exact") -> torch.Tensor:
    """Cross-entropy of `logits` with the PGT gradient; the arguments are `F.cross_entropy`'s.

    logits: (N, C) or (N, C, d1, ...); target: class indices (N,) / (N, d1, ...), or class
    probabilities of the logits' shape. alpha=None gives torch's cross-entropy (plain gradient);
    a float alpha in (0, 1] gives the PGT gradient, and alpha=1 equals plain cross-entropy.
    ignore_index applies to class indices (as in torch). impl: "exact", or "authors_hook" for
    the authors' computation (see the module docstring; (N, C) logits, class indices, mean only).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if impl not in IMPLS:
        raise ValueError(f"pgt impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    soft = target.is_floating_point()
    if logits.ndim < 2 or (soft and target.shape != logits.shape) or \
            (not soft and target.shape != logits.shape[:1] + logits.shape[2:]):
        raise ValueError(f"expected logits (N, C, ...) and target (N, ...) of class indices or probabilities of the "
                         f"logits' shape, got {tuple(logits.shape)} and {tuple(target.shape)}")
    if alpha is None:
        return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing, reduction=reduction,
                               ignore_index=ignore_index)
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"pgt alpha must be in (0, 1], got {alpha}")
    if impl == "authors_hook":
        if logits.ndim != 2 or soft or reduction != "mean":
            raise ValueError("impl='authors_hook' is the authors' computation: (N, C) logits, class-index targets "
                             f"and the mean only, got {tuple(logits.shape)}, {target.dtype} targets, {reduction!r}")
        return _authors_hook(logits, target, float(alpha), float(label_smoothing))
    batch_shape = target.shape[:1] + target.shape[2:] if soft else target.shape
    if logits.ndim > 2:  # classes last, then one row per position: what the 2-d case computes
        num_classes = logits.shape[1]
        logits = logits.movedim(1, -1).reshape(-1, num_classes)
        target = target.movedim(1, -1).reshape(-1, num_classes) if soft else target.reshape(-1)
    loss = _PowerGradCrossEntropy.apply(logits, target, float(alpha), float(label_smoothing), reduction,
                                        int(ignore_index))
    return loss.reshape(batch_shape) if reduction == "none" else loss


class PowerGradCrossEntropy(torch.nn.Module):
    """A drop-in for `torch.nn.CrossEntropyLoss` whose gradient is the PowerGrad Transform's.

    `PowerGradCrossEntropy(alpha=0.25)` in place of `nn.CrossEntropyLoss()`; label_smoothing,
    reduction and ignore_index mean what they mean there, targets are class indices or class
    probabilities, inputs (N, C) or (N, C, d1, ...). alpha=None trains with the plain gradient.
    """

    def __init__(self, alpha: Optional[float], *, label_smoothing: float = 0.0, reduction: str = "mean",
                 ignore_index: int = -100):
        super().__init__()
        if alpha is not None and not 0.0 < alpha <= 1.0:
            raise ValueError(f"pgt alpha must be in (0, 1], got {alpha}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
        self.alpha, self.label_smoothing = alpha, label_smoothing
        self.reduction, self.ignore_index = reduction, ignore_index

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return power_grad_cross_entropy(input, target, self.alpha, self.label_smoothing, reduction=self.reduction,
                                        ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, label_smoothing={self.label_smoothing}, reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index}")
