"""The LR schedule registry: every schedule against timm's own scheduler, every registered name run,
and the rules of schedule.name, schedule.mode and schedule.milestones."""

import math

import pytest
import torch
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, PolyLRScheduler, StepLRScheduler

from powergrad_train.cli import main
from powergrad_train.config import registry
from powergrad_train.config.build import build_config
from powergrad_train.config.schema import KEYS
from powergrad_train.reproduction import paper
from powergrad_train.system.errors import ConfigError
from powergrad_train.training.optim import lr_at_step
from tests.conftest import tiny_overrides

SPE = 7  # steps per epoch
EPOCHS, WARMUP, COOLDOWN = 12, 2, 2
DECAY_END = (EPOCHS - COOLDOWN) * SPE
COMMON = [f"schedule.epochs={EPOCHS}", f"schedule.warmup_epochs={WARMUP}", f"schedule.cooldown_epochs={COOLDOWN}",
          "schedule.warmup_lr=0.001", "schedule.min_lr=0.0001"]
OWN = {"cosine": [], "step": ["schedule.decay_epochs=3"], "multistep": ["schedule.milestones=[3, 5, 8]"], "linear": []}


def timm_lrs(scheduler_cls, **kwargs):
    """timm's LR at each step of the decay phase's end, its scheduler stepped per iteration."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = scheduler_cls(opt, t_in_epochs=False, warmup_t=WARMUP * SPE, warmup_lr_init=1e-3, **kwargs)
    lrs = []
    for step in range(DECAY_END):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


TIMM = {  # warmup_prefix: the cosine and linear decays start after warmup, the step decays count from step 0
    "cosine": lambda: timm_lrs(CosineLRScheduler, t_initial=DECAY_END - WARMUP * SPE, lr_min=1e-4,
                               warmup_prefix=True),
    "step": lambda: timm_lrs(StepLRScheduler, decay_t=3 * SPE, decay_rate=0.1, warmup_prefix=False),
    "multistep": lambda: timm_lrs(MultiStepLRScheduler, decay_t=[3 * SPE, 5 * SPE, 8 * SPE], decay_rate=0.1,
                                  warmup_prefix=False),
    "linear": lambda: timm_lrs(PolyLRScheduler, t_initial=DECAY_END - WARMUP * SPE, lr_min=1e-4, power=1.0,
                               warmup_prefix=True),
}


def lrs_of(name, *extra):
    cfg = build_config(None, [f"schedule.name={name}", *COMMON, *OWN[name], *extra]).schedule
    return [lr_at_step(cfg, 0.1, s, SPE) for s in range(EPOCHS * SPE)]


@pytest.mark.parametrize("name", list(TIMM))
def test_each_schedule_matches_timm_with_warmup_and_cooldown(name):
    ours = lrs_of(name)
    assert ours[:DECAY_END] == pytest.approx(TIMM[name](), rel=1e-12)
    assert ours[0] == 0.001 and ours[DECAY_END:] == [1e-4] * (COOLDOWN * SPE)


def test_multistep_decays_at_each_milestone_from_the_step_before_it_as_timm_does():
    ours = lrs_of("multistep")
    before = [ours[m * SPE - 2] for m in (3, 5, 8)]
    at = [ours[m * SPE - 1] for m in (3, 5, 8)]
    assert before == pytest.approx([0.1, 0.01, 0.001]) and at == pytest.approx([0.01, 0.001, 0.0001])


def test_linear_is_a_straight_line_from_the_peak_to_min_lr():
    ours = lrs_of("linear")
    span = DECAY_END - WARMUP * SPE
    expected = [1e-4 + (0.1 - 1e-4) * (1 - t / span) for t in range(span)]
    assert ours[WARMUP * SPE:DECAY_END] == pytest.approx(expected, rel=1e-12)


def test_every_schedule_name_runs_from_warmup_lr_to_min_lr():
    names = KEYS["schedule.name"].meta["choices"]
    assert set(names) == {"cosine", "step", "multistep", "linear"}
    sequences = {}
    for name in names:
        lrs = lrs_of(name, "schedule.mode=per_step")
        assert all(math.isfinite(lr) for lr in lrs), name
        assert lrs[0] == 0.001 and lrs[WARMUP * SPE] == pytest.approx(0.1) and lrs[-1] == 1e-4, name
        decay = lrs[WARMUP * SPE:]
        assert all(b <= a for a, b in zip(decay, decay[1:])), name  # never rises after warmup
        assert registry.load("schedule", name).build.per_step  # each entry is a Schedule
        sequences[name] = tuple(lrs)
    assert len(set(sequences.values())) == len(names)  # four schedules, none an alias of another


def test_an_unknown_schedule_is_refused_at_the_key_with_the_closest_name():
    with pytest.raises(ConfigError) as e:
        build_config(None, ["schedule.name=multstep"])
    assert str(e.value) == ("--set schedule.name=multstep: schedule.name = 'multstep' is not allowed: one of cosine, "
                            "step, multistep, linear (did you mean multistep?)")
    assert e.value.key == "schedule.name"


@pytest.mark.parametrize("name", ["multistep", "linear"])
def test_the_authors_per_epoch_mode_refuses_the_new_schedules(name):
    with pytest.raises(ConfigError, match=rf"^--set schedule.name={name}: schedule.mode = authors_per_epoch "
                                          rf"reproduces the authors' cosine and step schedules only; "
                                          rf"schedule.name = {name} runs with schedule.mode = per_step$"):
        build_config(None, ["schedule.mode=authors_per_epoch", f"schedule.name={name}", *OWN[name]])


@pytest.mark.parametrize("overrides, message", [
    (["schedule.milestones=[30]"], "--set schedule.milestones=[30]: schedule.milestones is read by the multistep "
                                   "schedule only; schedule.name = cosine would ignore it (set it to [])"),
    (["schedule.name=step", "schedule.milestones=[30]"], "--set schedule.milestones=[30]: schedule.milestones is "
                                                         "read by the multistep schedule only"),
    (["schedule.name=multistep"], "--set schedule.name=multistep: schedule.name = multistep needs "
                                  "schedule.milestones, the epochs to decay at, e.g. [30, 60, 80]"),
    (["schedule.name=multistep", "schedule.milestones=[60, 30]"], "--set schedule.milestones=[60, 30]: "
                                                                   "schedule.milestones = [60.0, 30.0] must be increasing"),
    (["schedule.name=multistep", "schedule.milestones=[0, 30]"], "--set schedule.milestones=[0, 30]: "
                                                                  "schedule.milestones = [0.0, 30.0] holds 0, which is out "
                                                                  "of range: each must be > 0.0"),
    (["schedule.name=multistep", "schedule.milestones=[30, x]"], "--set schedule.milestones=[30, x]: "
                                                                  "schedule.milestones = [30.0, 'x'] must be a list of "
                                                                  "float"),
])
def test_milestones_belong_to_multistep_and_increase(overrides, message):
    with pytest.raises(ConfigError) as e:
        build_config(None, overrides)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_milestones_take_fractional_epochs():
    cfg = build_config(None, ["schedule.name=multistep", "schedule.milestones=[30, 60.5, 80]"]).schedule
    assert cfg.milestones == [30.0, 60.5, 80.0]


def test_a_run_s_unused_keys_follow_its_schedule():
    def unused(*overrides):
        return {k for k in paper.unused(build_config(None, list(overrides))) if k.startswith("schedule.")}
    assert unused() == {"schedule.decay_epochs", "schedule.decay_rate", "schedule.milestones"}
    assert unused("schedule.name=step") == {"schedule.milestones"}
    assert unused("schedule.name=multistep", "schedule.milestones=[3]") == {"schedule.decay_epochs"}
    assert unused("schedule.name=linear") == unused()


def test_dry_run_of_a_schedule_without_the_authors_mode_prints_its_own_lr(tiny_root, tmp_path, capsys):
    main(["--config", "smoke.yaml", "--dry-run", "--output", str(tmp_path / "dry"),
          *tiny_overrides(tiny_root, **{"schedule.name": "multistep", "schedule.milestones": "[1]"})])
    out = capsys.readouterr().out
    assert "LR at the first step of each epoch: schedule.mode per_step (in use)\n" in out
    # epoch 2 starts at step 10, the milestone's step: decayed from the step before
    assert "epoch    1 (step       0): 0.005\n" in out and "epoch    2 (step      10): 0.005\n" in out
    assert not (tmp_path / "dry").exists()
