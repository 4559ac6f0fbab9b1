"""LR schedule against timm's schedulers, weight-decay groups, and the gradient stage."""

import pytest
import torch
from timm.scheduler import CosineLRScheduler, StepLRScheduler
from timm.utils import adaptive_clip_grad

from powergrad_train.config.build import build_config
from powergrad_train.system.errors import ConfigError
from powergrad_train.training.models import build_model
from powergrad_train.training.optim import build_grad_clipper, build_optimizer, lr_at_step

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
    opt, _ = build_optimizer(cfg.optim, model)
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


def authors_loop_lrs(scheduler_cls, epochs, **kwargs):
    """The LR each 1-based epoch trained at in the authors' train.py: the scheduler is stepped per epoch
    (t_in_epochs), and the loop's epoch counter is already incremented when it calls step(epoch + 1)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = scheduler_cls(opt, t_in_epochs=True, warmup_prefix=False, **kwargs)
    lrs = []
    for epoch in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        epoch += 1
        sched.step(epoch + 1)
    return lrs


@pytest.mark.parametrize("name", ["cosine", "step"])
def test_authors_per_epoch_schedule_matches_timm_stepped_as_the_authors_did(name):
    cfg = build_config(None, ["schedule.mode=authors_per_epoch", f"schedule.name={name}", "schedule.epochs=100",
                              "schedule.warmup_epochs=5", "schedule.cooldown_epochs=10", "schedule.warmup_lr=0.01",
                              "schedule.min_lr=0.0001", "schedule.decay_epochs=30"]).schedule
    if name == "cosine":
        expected = authors_loop_lrs(CosineLRScheduler, 100, t_initial=90, lr_min=1e-4, warmup_t=5,
                                    warmup_lr_init=0.01)
    else:
        expected = authors_loop_lrs(StepLRScheduler, 100, decay_t=30, decay_rate=0.1, warmup_t=5,
                                    warmup_lr_init=0.01)
    ours = [lr_at_step(cfg, 0.1, s, SPE) for s in range(100 * SPE)]
    assert ours[::SPE] == pytest.approx(expected, rel=1e-12)
    assert all(ours[e * SPE:(e + 1) * SPE] == [ours[e * SPE]] * SPE for e in range(100))  # one LR per epoch
    assert ours[0] == 0.01 and ours[SPE] == pytest.approx(0.046)  # epoch 2 at t=2: t=1 is never used
    if name == "cosine":
        assert ours[4 * SPE] == pytest.approx(0.0992, abs=5e-5) and max(ours) < 0.1  # the peak is never reached
        assert ours[89 * SPE:] == [1e-4] * (11 * SPE)  # the floor from epoch 90 on: 11 epochs
    else:
        assert [e + 1 for e in range(1, 100) if ours[e * SPE] < ours[(e - 1) * SPE] * 0.5] == [30, 60, 90]


def test_zero_init_last_reaches_the_model():
    for flag, expected in ((True, 0.0), (False, 1.0)):
        model = build_model(build_config(None, ["model.name=resnet18", f"model.zero_init_last={flag}"]).model)
        last_scales = [block.bn2.weight for layer in (model.layer1, model.layer4) for block in layer]
        assert all(torch.all(w == expected) for w in last_scales), flag
    with pytest.raises(ConfigError, match="model 'test_vit' has no such option"):
        build_model(build_config(None, ["model.name=test_vit", "model.zero_init_last=false"]).model)


def test_the_authors_schedule_needs_whole_epochs():
    with pytest.raises(ConfigError, match=r"--set schedule.warmup_epochs=0.5: schedule.mode = authors_per_epoch "
                                          r"steps the LR once per epoch"):
        build_config(None, ["schedule.mode=authors_per_epoch", "schedule.warmup_epochs=0.5"])
