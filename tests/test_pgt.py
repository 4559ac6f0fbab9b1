"""The PGT loss against the analytic gradient, computed independently in float64."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from powergrad_train.pgt import power_grad_cross_entropy
from tests.conftest import needs_a_cpu_compiler


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


@needs_a_cpu_compiler
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


# ----------------------------------------------------------------------------- the authors' hook

def authors_reference(grad, target, alpha, eps):
    """The authors' hook written from their formula, in numpy: q = (1 - eps) onehot + eps / C,
    p = grad / N + q, ptilde = p^alpha / sum p^alpha, returned as N (ptilde - q). In fp16 every
    operation is done in float32 and rounded to the tensor's dtype, as CUDA's half kernels do
    (sums accumulate in float32)."""
    dtype = {torch.float16: np.float16, torch.float32: np.float32}[grad.dtype]
    g = grad.numpy().astype(np.float32)
    n, c = g.shape

    def r(x):  # round to the tensor's dtype, carried on in float32
        return np.asarray(x, np.float32).astype(dtype).astype(np.float32)

    onehot = np.zeros((n, c), np.float32)
    onehot[np.arange(n), target.numpy()] = 1.0
    q = r(r(onehot * np.float32(1.0 - eps)) + np.float32(eps / c))
    with np.errstate(invalid="ignore"):
        p = r(np.power(r(r(g / np.float32(n)) + q), np.float32(alpha)))
    p = r(p / r(p.sum(axis=1, keepdims=True)))
    return torch.from_numpy(r(r(p - q) * np.float32(n)))


def incoming_gradient(logits, target, eps, scale):
    """What reaches the logits from the scaled cross-entropy: S (softmax(z) - q) / N in float32,
    rounded to the logits' dtype (the float32 cast's backward)."""
    n, c = logits.shape
    q = torch.full((n, c), eps / c)
    q[torch.arange(n), target] += 1.0 - eps
    return (scale * (torch.softmax(logits.detach().float(), 1) - q) / n).to(logits.dtype)


def authors_grad(logits, target, alpha, eps, scale):
    """(the gradient that reached the hook, the gradient the logits got) for the loss times `scale`."""
    x = logits.detach().clone().requires_grad_()
    seen = []
    x.register_hook(seen.append)  # hooks run in the order registered: this one sees the incoming gradient
    (power_grad_cross_entropy(x, target, alpha, eps, impl="authors_hook") * scale).backward()
    return seen[0], x.grad


def assert_same_fp16(actual, expected):
    """Equal, NaN where the reference has NaN; at most one unit in the last place apart (float32
    sums may round differently at a boundary)."""
    assert torch.equal(actual.isnan(), expected.isnan())
    keep = ~expected.isnan()
    ulp = torch.finfo(actual.dtype).eps * expected[keep].abs().clamp_min(2.0 ** -14)
    assert ((actual[keep].float() - expected[keep]).abs() <= ulp).all()


@pytest.mark.parametrize("scale_of_n2", [1.0, 0.25, 1 / 4096])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("alpha", [0.05, 0.25])
def test_authors_hook_matches_their_formula_in_fp16(scale_of_n2, eps, alpha):
    n = 64
    logits, target = make(n, 1000, dtype=torch.float16, scale=4.0, seed=3)
    scale = scale_of_n2 * n * n
    incoming, got = authors_grad(logits, target, alpha, eps, scale)
    assert incoming.dtype == got.dtype == torch.float16
    assert_same_fp16(incoming, incoming_gradient(logits, target, eps, scale))  # S (p - q) / N, in fp16
    assert_same_fp16(got, authors_reference(incoming, target, alpha, eps))


def test_authors_hook_is_exact_pgt_only_when_the_loss_scale_is_n_squared():
    n = 16
    logits, target = make(n, 10, scale=1.0)  # float32, no tiny probabilities
    exact = reference_grad(logits.detach(), target, 0.25, 0.0, 1.0)  # (ptilde - q) / N
    at_n2 = authors_grad(logits, target, 0.25, 0.0, n * n)[1]
    torch.testing.assert_close(at_n2.double() / (n * n), exact, rtol=1e-4, atol=1e-7)
    incoming, lower = authors_grad(logits, target, 0.25, 0.0, n * n / 4)
    unscaled = lower.double() / (n * n / 4)  # what the optimizer gets after the GradScaler unscales
    assert (unscaled - exact).abs().max() > 0.5 * exact.abs().max()  # wrong: 4x too large, and bent
    torch.testing.assert_close(lower, authors_reference(incoming, target, 0.25, 0.0), rtol=1e-5, atol=1e-6)
    # Above N^2 the rebuilt target probability is negative where p_target < 1/2, and the power is NaN.
    above = authors_grad(logits, target, 0.25, 0.0, 2 * n * n)[1]
    p_target = torch.softmax(logits.detach(), 1)[torch.arange(n), target]
    assert torch.equal(above.isnan().any(1), p_target < 0.5) and (p_target < 0.5).any()


def test_authors_hook_in_fp16_drops_probabilities_below_about_3e_8():
    """At alpha 0.05 a probability of 1e-8 still weighs p^alpha = 0.4 in exact PGT; rebuilt in fp16 it is 0."""
    n = 256
    logits = torch.zeros(n, 1000, dtype=torch.float64)
    logits[:, 0] = 24.0  # the target, confident
    logits[:, 1] = 24.0 - 10.0  # p ~ 4.5e-5: kept
    logits[:, 2:] = 24.0 - 18.5  # p ~ 9e-9 each: lost in fp16
    logits = logits.half()
    target = torch.zeros(n, dtype=torch.long)
    exact = reference_grad(logits.detach(), target, 0.05, 0.0, 1.0)
    assert (exact[:, 2:].sum(1) * n > 0.9).all()  # exact PGT gives the 998 tiny classes most of ptilde
    incoming, got = authors_grad(logits, target, 0.05, 0.0, 65536.0)  # GradScaler's initial scale, = N^2 here
    assert incoming[:, 2:].abs().max() > 0  # the scaled gradient still holds them (256 p = 2e-6)...
    assert torch.equal(got[:, 2:], torch.zeros_like(got[:, 2:]))  # ...grad / N does not
    assert got[:, 1].min() > 0 and got[:, 0].max() < 0
    assert_same_fp16(got, authors_reference(incoming, target, 0.05, 0.0))


def test_authors_hook_leaves_the_plain_gradient_and_eval_alone():
    logits, target = make(8, 10)
    plain = logits.detach().clone().requires_grad_()
    power_grad_cross_entropy(plain, target, None, 0.1, impl="authors_hook").backward()
    ref = logits.detach().clone().requires_grad_()
    F.cross_entropy(ref, target, label_smoothing=0.1).backward()
    torch.testing.assert_close(plain.grad, ref.grad)
    with torch.no_grad():  # no graph, no hook: the loss value only
        power_grad_cross_entropy(logits.detach(), target, 0.25, impl="authors_hook")
    with pytest.raises(ValueError, match="impl"):
        power_grad_cross_entropy(logits, target, 0.25, impl="authors")


def test_authors_hook_in_training_under_fp16_loss_scaling(tiny_root, tmp_path):
    """Through the engine, as their runs trained (fp16 autocast and a GradScaler; CPU autocast here):
    a loss scale above N^2 makes the gradient NaN, so the GradScaler skips the step and halves the
    scale until it reaches N^2, where the step applies the same update as exact PGT."""
    from powergrad_train.config.build import build_config
    from powergrad_train.system.dist import DistEnv
    from powergrad_train.training.run import build_run
    from tests.conftest import tiny_overrides

    def trainer(impl):
        sets = tiny_overrides(tiny_root, amp="fp16", **{"model.name": "test_byobnet",  # CPU fp16 is slow: a tiny net
                                                        "loss.pgt_alpha": 0.25, "loss.pgt_impl": impl})
        t = build_run(build_config("smoke.yaml", [s.removeprefix("--set=") for s in sets]), tmp_path / impl, DistEnv(),
                    torch.device("cpu"))
        t.scaler.scale(torch.ones(()))  # the scaler creates its scale lazily
        return t

    def weights(t):
        return {k: v.clone() for k, v in t.model.state_dict().items()}

    hook, exact = trainer("authors_hook"), trainer("exact")
    images, targets = next(iter(hook.data.train))
    n = images.shape[0]  # 16 per process: N^2 = 256
    hook.scaler.update(new_scale=2.0 * n * n)
    start = weights(hook)
    hook.train_step(images, targets)
    assert hook.scaler.get_scale() == n * n  # skipped, and backed off
    assert all(torch.equal(start[k], v) for k, v in weights(hook).items())
    hook.train_step(images, targets)
    exact.scaler.update(new_scale=float(n * n))
    exact.state.step = hook.state.step - 1  # the same LR
    exact.train_step(images, targets)
    assert hook.scaler.get_scale() == exact.scaler.get_scale() == n * n  # applied: no back-off
    a, b = weights(hook), weights(exact)
    assert any(not torch.equal(start[k], a[k]) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=2e-3, atol=2e-5, msg=lambda m: f"{k}: {m}")
    hook.close()
    exact.close()
