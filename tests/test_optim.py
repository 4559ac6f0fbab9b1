"""LR schedule against timm's schedulers, weight-decay groups, and the gradient stage."""

import pytest
import torch
from timm.scheduler import CosineLRScheduler, StepLRScheduler
from timm.utils import adaptive_clip_grad

from powergrad_train.config import build_config
from powergrad_train.models import build_model
from powergrad_train.optim import build_grad_clipper, build_optimizer, lr_at_step

SPE = 7  # steps per epoch


def timm_lrs(scheduler_cls, total_steps, **kwargs):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = scheduler_cls(opt, t_in_epochs=False, **kwargs)
    lrs = []
    for step in range(total_steps):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_cosine_matches_timm_and_cools_down():
    cfg = build_config(None, ["schedule.epochs=12", "schedule.warmup_epochs=2", "schedule.cooldown_epochs=2",
                              "schedule.warmup_lr=0.001", "schedule.min_lr=0.0001"]).schedule
    decay_end = 10 * SPE
    expected = timm_lrs(CosineLRScheduler, decay_end, t_initial=decay_end - 2 * SPE, lr_min=1e-4,
                        warmup_t=2 * SPE, warmup_lr_init=1e-3, warmup_prefix=True)
    ours = [lr_at_step(cfg, 0.1, s, SPE) for s in range(12 * SPE)]
    assert ours[:decay_end] == pytest.approx(expected, rel=1e-12)
    assert ours[0] == 0.001 and ours[2 * SPE] == pytest.approx(0.1)
    assert ours[decay_end:] == [1e-4] * (2 * SPE)  # cooldown at min_lr


def test_step_matches_timm():
    cfg = build_config(None, ["schedule.name=step", "schedule.epochs=10", "schedule.warmup_epochs=1",
                              "schedule.cooldown_epochs=1", "schedule.decay_epochs=3", "schedule.min_lr=0.0001",
                              "schedule.warmup_lr=0"]).schedule
    expected = timm_lrs(StepLRScheduler, 9 * SPE, decay_t=3 * SPE, decay_rate=0.1, warmup_t=SPE, warmup_lr_init=0,
                        warmup_prefix=False)
    ours = [lr_at_step(cfg, 0.1, s, SPE) for s in range(10 * SPE)]
    assert ours[:9 * SPE] == pytest.approx(expected, rel=1e-12)
    assert ours[3 * SPE] == pytest.approx(0.01) and ours[6 * SPE] == pytest.approx(0.001)
    assert ours[9 * SPE:] == [1e-4] * SPE


def test_no_weight_decay_on_biases_and_norms():
    cfg = build_config(None, ["optim.weight_decay=0.001"])
    model = build_model(build_config(None, ["model.name=resnet18", "model.num_classes=5"]).model)
    opt = build_optimizer(cfg.optim, model)
    assert all(g["nesterov"] for g in opt.param_groups)
    for group in opt.param_groups:
        for p in group["params"]:
            assert group["weight_decay"] == (0.001 if p.ndim > 1 else 0.0)


def _model_with_grads(name="resnet18_nobn"):
    torch.manual_seed(0)
    model = build_model(build_config(None, [f"model.name={name}", "model.num_classes=5"]).model)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 10
    return model


def test_agc_clips_body_and_leaves_head_untouched():
    model = _model_with_grads()
    reference = _model_with_grads()
    head = {id(p) for p in model.get_classifier().parameters()}
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    build_grad_clipper(build_config(None, ["grad_clip.mode=agc", "grad_clip.value=0.01"]).grad_clip, model)()
    adaptive_clip_grad([p for p in reference.parameters() if id(p) not in
                        {id(q) for q in reference.get_classifier().parameters()}], clip_factor=0.01)
    changed = 0
    for (name, p), (_, ref) in zip(model.named_parameters(), reference.named_parameters()):
        if id(p) in head:
            assert torch.equal(p.grad, before[name]), f"head parameter {name} was clipped"
        else:
            assert torch.equal(p.grad, ref.grad)
            changed += not torch.equal(p.grad, before[name])
    assert changed > 0


def test_value_and_norm_clipping():
    model = _model_with_grads()
    build_grad_clipper(build_config(None, ["grad_clip.mode=value", "grad_clip.value=0.5"]).grad_clip, model)()
    assert max(p.grad.abs().max().item() for p in model.parameters()) == pytest.approx(0.5)
    model = _model_with_grads()
    build_grad_clipper(build_config(None, ["grad_clip.mode=norm", "grad_clip.value=2.0"]).grad_clip, model)()
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert total.item() == pytest.approx(2.0, rel=1e-4)


def test_resnet18_nobn_has_no_norm_layers():
    model = build_model(build_config(None, ["model.name=resnet18_nobn", "model.num_classes=7"]).model)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._NormBase) for m in model.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
