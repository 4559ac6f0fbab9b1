"""The PGT loss against the analytic gradient, computed independently in float64."""

import pytest
import torch
import torch.nn.functional as F

from powergrad_train.pgt import power_grad_cross_entropy


def reference_grad(logits, target, alpha, eps, upstream):
    """upstream * (softmax(alpha z) - q) / N in float64, with q the smoothed one-hot."""
    z = logits.double()
    n, c = z.shape
    p_alpha = torch.exp(alpha * z - torch.logsumexp(alpha * z, dim=1, keepdim=True))
    q = torch.full_like(z, eps / c)
    q[torch.arange(n), target] += 1 - eps
    return upstream * (p_alpha - q) / n


def make(n, c, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    target = torch.randint(0, c, (n,), generator=g)
    return logits, target


@pytest.mark.parametrize("alpha", [0.05, 0.25, 0.3, 0.92, 1.0])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("n", [1, 7, 256])
def test_gradient_matches_formula(alpha, eps, n):
    logits, target = make(n, 1000 if n == 256 else 13, seed=n)
    upstream = 37.5  # an arbitrary scale on the loss, like an AMP loss scale
    (power_grad_cross_entropy(logits, target, alpha, eps) * upstream).backward()
    expected = reference_grad(logits.detach(), target, alpha, eps, upstream)
    torch.testing.assert_close(logits.grad.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("alpha", [0.25, 1.0])
def test_low_precision_logits(dtype, tol, alpha):
    logits, target = make(64, 100, dtype=dtype)
    loss = power_grad_cross_entropy(logits, target, alpha, 0.1)
    assert loss.dtype == torch.float32
    (loss * 1024.0).backward()
    assert logits.grad.dtype == dtype
    # The reference sees the same (rounded) logits; only the returned gradient is rounded.
    expected = reference_grad(logits.detach(), target, alpha, 0.1, 1024.0)
    torch.testing.assert_close(logits.grad.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    torch.testing.assert_close(loss, F.cross_entropy(logits.detach().float(), target, label_smoothing=0.1))


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_alpha_one_is_cross_entropy(eps):
    logits, target = make(32, 50)
    ref_logits = logits.detach().clone().requires_grad_()
    loss = power_grad_cross_entropy(logits, target, 1.0, eps)
    ref = F.cross_entropy(ref_logits, target, label_smoothing=eps)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(logits.grad, ref_logits.grad)


def test_forward_is_plain_cross_entropy_and_none_is_torch():
    logits, target = make(16, 10)
    for alpha in (None, 0.05, 0.5):
        loss = power_grad_cross_entropy(logits, target, alpha, 0.1)
        torch.testing.assert_close(loss, F.cross_entropy(logits, target, label_smoothing=0.1))


def test_independent_of_loss_scale_and_batch_split():
    """The trap in the reference code: the gradient must not depend on the loss scale or N."""
    logits, target = make(8, 10)
    grads = []
    for scale in (1.0, 65536.0, 2 * 8 ** 2):
        x = logits.detach().clone().requires_grad_()
        (power_grad_cross_entropy(x, target, 0.25) * scale).backward()
        grads.append(x.grad / scale)
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0])
    # Two halves of the batch, each a mean over 4, averaged: the same gradient as the whole batch.
    x = logits.detach().clone().requires_grad_()
    (0.5 * power_grad_cross_entropy(x[:4], target[:4], 0.25) + 0.5 * power_grad_cross_entropy(x[4:], target[4:], 0.25)).backward()
    torch.testing.assert_close(x.grad, grads[0])


def test_smaller_alpha_flattens_gradient_distribution():
    """Proposition 1: softmax(alpha z) moves toward uniform as alpha falls."""
    logits, target = make(4, 10)
    entropies = []
    for alpha in (1.0, 0.5, 0.05):
        x = logits.detach().clone().requires_grad_()
        power_grad_cross_entropy(x, target, alpha).backward()
        p = x.grad * 4 + F.one_hot(target, 10)  # recover softmax(alpha z) from the test side only
        entropies.append(-(p * p.log()).sum(1).mean().item())
    assert entropies[0] < entropies[1] < entropies[2]


def test_rejects_bad_alpha_and_shapes():
    logits, target = make(4, 10)
    with pytest.raises(ValueError):
        power_grad_cross_entropy(logits, target, 0.0)
    with pytest.raises(ValueError):
        power_grad_cross_entropy(logits, target, 1.5)
    with pytest.raises(ValueError):
        power_grad_cross_entropy(logits[0], target, 0.5)


def test_compiled_loss_gives_the_same_gradients():
    logits, target = make(64, 100)
    eager = logits.detach().clone().requires_grad_()
    (power_grad_cross_entropy(eager, target, 0.3, 0.1) * 5.0).backward()
    compiled_fn = torch.compile(lambda x, t: power_grad_cross_entropy(x, t, 0.3, 0.1) * 5.0)
    compiled = logits.detach().clone().requires_grad_()
    compiled_fn(compiled, target).backward()
    torch.testing.assert_close(compiled.grad, eager.grad, rtol=1e-5, atol=1e-8)


def test_second_backward_fails_loudly_instead_of_silently_wrong():
    """The backward reuses the saved log-probabilities in place: autograd refuses a second pass."""
    logits, target = make(8, 10)
    loss = power_grad_cross_entropy(logits, target, 0.5)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
