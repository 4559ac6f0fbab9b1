"""The PowerGrad Transform (PGT) loss: the one place where PGT happens.

Forward: the ordinary cross-entropy (label-smoothed if asked), averaged over the batch.
Backward: the gradient w.r.t. the logits is

    upstream * (softmax(alpha * z) - q) / N

instead of upstream * (softmax(z) - q) / N, with q the (smoothed) one-hot target.
Everything upstream of the logits backpropagates as usual.

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

Paper: B. Das, M. Mondal, B. Lall, S. D. Joshi, S. Dutta Roy, "Altering Backward Pass
Gradients improves Convergence", arXiv:2111.12495. Authors' code:
https://github.com/bishshoy/power-grad-transform
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class _PowerGradCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, alpha: float, label_smoothing: float):
        log_p = torch.log_softmax(logits.float(), dim=1)  # fp16/bf16 logits are upcast to float32
        loss = F.nll_loss(log_p, target)
        if label_smoothing:  # torch's definition: (1 - eps) * nll + eps * mean over classes of -log p
            loss = (1.0 - label_smoothing) * loss - label_smoothing * log_p.mean()
        # Cross-entropy keeps log_p for its backward too: PGT needs no extra memory, and the
        # backward turns this buffer into the gradient in place.
        ctx.save_for_backward(target, log_p)
        ctx.alpha, ctx.label_smoothing, ctx.dtype = alpha, label_smoothing, logits.dtype
        return loss

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        target, log_p = ctx.saved_tensors
        n, num_classes = log_p.shape
        eps, scale = ctx.label_smoothing, upstream / n
        # softmax(alpha * z) = exp(alpha * log_p) / sum, since log_p = z - logsumexp(z): computed
        # from the logits' own log-probabilities, never from the incoming gradient. alpha * log_p <= 0,
        # so exp cannot overflow, and the largest term is >= C^-alpha, so the sum cannot vanish.
        # In place: a second backward through the same graph (retain_graph) fails loudly in autograd.
        grad = log_p.mul_(ctx.alpha).exp_()
        grad.mul_(scale / grad.sum(dim=1, keepdim=True))  # normalise and scale in one pass
        grad.scatter_add_(1, target[:, None], (scale * (eps - 1.0)).expand(n, 1))  # - q, no one-hot
        if eps:
            grad.sub_(scale * (eps / num_classes))
        return grad.to(ctx.dtype), None, None, None


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
                             label_smoothing: float = 0.0, impl: str = "exact") -> torch.Tensor:
    """Mean cross-entropy of `logits` (N x C) against class indices `target` (N,).

    alpha=None gives torch's cross-entropy (plain gradient). A float alpha in (0, 1]
    gives the PGT gradient; alpha=1 equals plain cross-entropy. impl: "exact", or
    "authors_hook" for the authors' computation (see the module docstring).
    """
    if logits.ndim != 2 or target.ndim != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"expected logits (N, C) and target (N,), got {tuple(logits.shape)} and {tuple(target.shape)}")
    if impl not in ("exact", "authors_hook"):
        raise ValueError(f"pgt impl must be 'exact' or 'authors_hook', got {impl!r}")
    if alpha is None:
        return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"pgt alpha must be in (0, 1], got {alpha}")
    if impl == "authors_hook":
        return _authors_hook(logits, target, float(alpha), float(label_smoothing))
    return _PowerGradCrossEntropy.apply(logits, target, float(alpha), float(label_smoothing))
