"""PGT as a drop-in for torch's cross-entropy: every argument of F.cross_entropy that it takes
(reduction, ignore_index, label_smoothing, class-index or probability targets, (N, C, d1, ...)
inputs), each checked against torch at alpha = 1 and against the formula in float64 at alpha < 1."""

import pytest
import torch

from powergrad_train import PowerGradCrossEntropy, power_grad_cross_entropy


def reference(logits, target, alpha, eps, reduction, ignore_index=-100):
    """(loss, gradient w.r.t. the logits of sum(loss * upstream)) in float64, written from the
    definitions: rows are positions, q the smoothed one-hot target or the smoothed probabilities."""
    z = logits.detach().double().movedim(1, -1)
    c = z.shape[-1]
    z = z.reshape(-1, c)
    log_p = torch.log_softmax(z, 1)
    if target.is_floating_point():
        q = target.double().movedim(1, -1).reshape(-1, c) * (1 - eps) + eps / c
        valid = torch.ones(z.shape[0], dtype=torch.bool)
    else:
        t = target.reshape(-1)
        valid = t != ignore_index
        q = torch.zeros_like(z)
        q[valid, t[valid]] = 1.0
        q = (q * (1 - eps) + eps / c) * valid[:, None]
    rows = -(q * log_p).sum(1)
    divisor = (valid.sum() if not target.is_floating_point() else z.shape[0]) if reduction == "mean" else 1
    loss = rows.sum() / divisor if reduction != "none" else rows
    p_alpha = torch.softmax(alpha * z, 1)
    grad_rows = (p_alpha * q.sum(1, keepdim=True) - q) / divisor
    return loss, grad_rows


def make(shape, soft, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, generator=g, dtype=torch.float64) * 3).float().requires_grad_()
    c = shape[1]
    if soft:
        target = torch.randn(*shape, generator=g).softmax(1)
    else:
        target = torch.randint(0, c, shape[:1] + shape[2:], generator=g)
        if ignore:
            target.view(-1)[::3] = -100
    return logits, target


CASES = [(shape, soft, reduction, eps) for shape in [(8, 13), (3, 7, 4, 5)] for soft in (False, True)
         for reduction in ("mean", "sum", "none") for eps in (0.0, 0.1)]


@pytest.mark.parametrize("shape,soft,reduction,eps", CASES)
def test_alpha_one_is_torch_cross_entropy_for_every_argument(shape, soft, reduction, eps):
    logits, target = make(shape, soft)
    mine = logits.detach().clone().requires_grad_()
    ours = PowerGradCrossEntropy(1.0, label_smoothing=eps, reduction=reduction)(mine, target)
    torch_loss = torch.nn.CrossEntropyLoss(label_smoothing=eps, reduction=reduction)(logits, target)
    torch.testing.assert_close(ours, torch_loss)
    upstream = torch.rand(ours.shape, generator=torch.Generator().manual_seed(1)) + 0.5
    (ours * upstream).sum().backward()
    (torch_loss * upstream).sum().backward()
    torch.testing.assert_close(mine.grad, logits.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("alpha", [0.05, 0.25, 0.92])
@pytest.mark.parametrize("shape,soft,reduction,eps", CASES)
def test_pgt_gradient_matches_the_formula_for_every_argument(alpha, shape, soft, reduction, eps):
    logits, target = make(shape, soft, seed=2)
    loss = power_grad_cross_entropy(logits, target, alpha, eps, reduction=reduction)
    expected_loss, grad_rows = reference(logits, target, alpha, eps, reduction)
    torch.testing.assert_close(loss.double().reshape(-1), expected_loss.reshape(-1), rtol=1e-5, atol=1e-6)
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    (loss * upstream.float()).sum().backward()
    scale = upstream.reshape(-1, 1) if reduction == "none" else upstream.reshape(1, 1)
    c = shape[1]
    grad = logits.grad.double().movedim(1, -1).reshape(-1, c)
    torch.testing.assert_close(grad, grad_rows * scale, rtol=1e-5, atol=1e-7)


def test_ignored_positions_get_no_gradient_and_count_in_no_mean():
    logits, target = make((6, 5), soft=False, ignore=False)
    target[[1, 4]] = 3
    ours = power_grad_cross_entropy(logits, target, 0.3, ignore_index=3)
    ours.backward()
    assert logits.grad[[1, 4]].abs().max() == 0
    kept = torch.tensor([0, 2, 3, 5])
    sub = logits.detach()[kept].clone().requires_grad_()
    power_grad_cross_entropy(sub, target[kept], 0.3).backward()
    torch.testing.assert_close(logits.grad[kept], sub.grad)


def test_the_module_is_a_drop_in_in_a_plain_loop():
    """As torch.nn.CrossEntropyLoss is used, and as timm's train.py uses its loss (.to(device))."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    criterion = PowerGradCrossEntropy(alpha=0.25, label_smoothing=0.1).to("cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    y = (x[:, :4].argmax(1))  # learnable
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert list(criterion.state_dict()) == [] and "alpha=0.25" in repr(criterion)


def test_bad_arguments_are_refused_like_torch_does():
    logits, target = make((4, 10), soft=False, ignore=False)
    with pytest.raises(ValueError, match="alpha must be in"):
        PowerGradCrossEntropy(alpha=1.5)
    with pytest.raises(ValueError, match="reduction must be one of"):
        PowerGradCrossEntropy(alpha=0.5, reduction="average")
    with pytest.raises(ValueError, match=r"expected logits \(N, C, ...\)"):
        power_grad_cross_entropy(logits, target[:3], 0.5)
    with pytest.raises(ValueError, match=r"expected logits \(N, C, ...\)"):
        power_grad_cross_entropy(logits, torch.rand(4, 9), 0.5)
