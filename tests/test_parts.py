"""The Trainer's parts, each chosen by name from one place: every registry entry satisfies its
interface and does what it says; adding a checkpoint part or an output is one entry."""

import csv
import json

import pytest
import torch

from powergrad_train import registry
from powergrad_train.cli import main
from powergrad_train.config import KEYS, build_config
from powergrad_train.dist import DistEnv
from powergrad_train.errors import CheckpointError, ConfigError, TrainingError
from powergrad_train.models import build_model, load_initial_weights
from powergrad_train.optim import build_optimizer, set_lr
from powergrad_train.run import build_run
from tests.conftest import assert_same_weights, load_weights, tiny_overrides

TABLES = {"data.backend": registry.DATA_BACKENDS, "loss.name": registry.OBJECTIVES,
          "batch_transform.name": registry.BATCH_TRANSFORMS, "optim.name": registry.OPTIMIZERS,
          "log.outputs": registry.OUTPUTS}


def tiny_trainer(root, run_dir, *extra, **values):
    overrides = [o.removeprefix("--set=") for o in tiny_overrides(root, **values)] + list(extra)
    return build_run(build_config("smoke.yaml", overrides), run_dir, DistEnv(), torch.device("cpu"))


@pytest.mark.parametrize("key", TABLES)
def test_each_config_choice_is_a_registry_entry_that_loads(key):
    assert tuple(KEYS[key].meta["choices"]) == tuple(TABLES[key])
    for name in TABLES[key]:
        assert registry.load(TABLES[key], name) is not None, name


# ----------------------------------------------------------------------------- optimizers

def tiny_model():
    torch.manual_seed(0)
    return build_model(build_config(None, ["model.name=resnet10t", "model.num_classes=3"]).model)


def state_tensors(optimizer, model):
    """Parameters and every tensor of the optimizer's state, copied."""
    copied = {f"param.{i}": p.detach().clone() for i, p in enumerate(model.parameters())}
    for i, p in enumerate(model.parameters()):
        for k, v in optimizer.state.get(p, {}).items():
            if torch.is_tensor(v):
                copied[f"state.{i}.{k}"] = v.clone()
    return copied


@pytest.mark.parametrize("name", registry.OPTIMIZERS)
def test_every_optimizer_skips_a_flagged_step_completely_and_applies_the_next(name):
    """The skip strategy each entry declares really skips: for torch's fused optimizers this is the
    `found_inf` attribute the GradScaler sets, a private protocol this test pins down."""
    model = tiny_model()
    optimizer, skipper = build_optimizer(build_config(None, [f"optim.name={name}"]).optim, model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        before = state_tensors(optimizer, model)
        skipper.step(optimizer, scaler, torch.ones(1) if step == 1 else torch.zeros(1))
        after = state_tensors(optimizer, model)
        changed = [k for k in before if not torch.equal(before[k], after.get(k, before[k]))]
        if step == 1:
            assert set(after) == set(before) and not changed, changed  # nothing moved, no state appeared
        else:
            assert any(k.startswith("param.") for k in changed)


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_other_optimizers_train_and_resume_through_the_trainer(name, tiny_root, tmp_path):
    """No SGD assumption anywhere (momentum buffers, found_inf): a NaN step is skipped, the run checkpoints
    and a resumed step equals the straight one."""
    runs = [tiny_trainer(tiny_root, tmp_path / run, f"optim.name={name}", "optim.lr=0.001") for run in "ab"]
    images, targets = next(iter(runs[0].data.train))
    a = runs[0]
    a.train_step(images, targets)
    before = {k: v.clone() for k, v in a.model.state_dict().items()}
    a.train_step(torch.full_like(images, float("nan")), targets)
    assert_same_weights(before, a.model.state_dict())
    a.train_step(images, targets)
    path = a.save_checkpoint()
    a.train_step(images, targets)
    resumed = build_run(a.cfg, tmp_path / "c", DistEnv(), torch.device("cpu"), resume_from=path)
    resumed.train_step(images, targets)
    assert_same_weights(a.model.state_dict(), resumed.model.state_dict())
    for t in (*runs, resumed):
        t.close()


def test_set_lr_keeps_the_per_group_scales_of_layer_decay():
    from timm.optim import param_groups_layer_decay
    model = tiny_model()
    groups = param_groups_layer_decay(model, weight_decay=0.0, layer_decay=0.5)
    optimizer = torch.optim.SGD(groups, lr=1.0)
    set_lr(optimizer, 0.1)
    scales = {g["lr_scale"] for g in optimizer.param_groups}
    assert len(scales) > 2
    assert all(g["lr"] == pytest.approx(0.1 * g["lr_scale"]) for g in optimizer.param_groups)


# ----------------------------------------------------------------------------- objectives and batch transforms

def test_mixup_targets_go_through_pgt_as_probabilities(tiny_root, tmp_path):
    """softmax(alpha z) - q with q the mixed target, and the train top-1 against its largest class."""
    t = tiny_trainer(tiny_root, tmp_path, "batch_transform.name=mixup", "batch_transform.cutmix_alpha=0",
                     **{"loss.pgt_alpha": 0.25})
    images, targets = next(iter(t.data.train))
    original = images.clone()
    torch.manual_seed(0)
    import numpy as np
    np.random.seed(0)
    mixed, q = t.batch_transform(images, targets)
    assert torch.equal(images, original)  # the loader's batch is left as it was
    assert q.shape == (16, 10) and torch.allclose(q.sum(1), torch.ones(16))
    assert not torch.equal(mixed, images) and (q.max(1).values < 1).all()  # really mixed
    logits = t.model(mixed).detach().requires_grad_()
    t.objective(logits, q).backward()
    expected = ((0.25 * logits.detach()).softmax(1) - q) / 16
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-7)
    t.meter.update(torch.tensor(1.0), logits.detach(), q)
    correct = (logits.argmax(1) == q.argmax(1)).sum().item()
    assert t.meter.read()["top1"] == pytest.approx(100 * correct / 16)
    t.close()


def test_mixup_needs_an_even_batch_per_process():
    from powergrad_train.config import check_runtime
    cfg = build_config(None, ["batch_transform.name=mixup", "data.batch_size=6"])
    check_runtime(cfg, 3, cuda=False)  # 2 per process
    with pytest.raises(ConfigError, match="gives 3 per process; choose an even number per process"):
        check_runtime(cfg, 2, cuda=False)


# ----------------------------------------------------------------------------- EMA

def test_the_ema_moves_only_on_applied_steps_and_is_a_checked_part(tiny_root, tmp_path):
    t = tiny_trainer(tiny_root, tmp_path, "ema.decay=0.5")
    images, targets = next(iter(t.data.train))
    t.train_step(images, targets)
    average = {k: v.clone() for k, v in t.ema.state_dict().items()}
    t.train_step(torch.full_like(images, float("nan")), targets)  # skipped
    assert_same_weights(average, t.ema.state_dict())
    t.train_step(images, targets)
    key = "fc.weight"
    torch.testing.assert_close(t.ema.state_dict()[key], 0.5 * average[key] + 0.5 * t.model.state_dict()[key])
    path = t.save_checkpoint()
    from powergrad_train import checkpoint
    assert_same_weights(checkpoint.load(path)["ema"], t.ema.state_dict())
    t.ema.module.fc.weight.data[0, 0] = float("nan")  # an EMA is checked before a save like every part
    with pytest.raises(TrainingError, match=r"^ema\.fc\.weight is not finite"):
        t.save_checkpoint()
    t.close()


def test_an_ema_run_logs_eval_ema_top1_and_resumes_exactly(two_epoch_run, tiny_root, tmp_path):
    run = tmp_path / "ema"
    overrides = tiny_overrides(tiny_root, **{"ema.decay": 0.9})
    main(["--config", "smoke.yaml", "--output", str(run), *overrides])
    rows = list(csv.DictReader(open(run / "summary.csv")))
    assert all(0 <= float(r["eval_ema_top1"]) <= 100 for r in rows)
    # the EMA does not change what the weights train to
    assert_same_weights(load_weights(two_epoch_run / "last.pt"), load_weights(run / "last.pt"))
    resumed = tmp_path / "resumed"
    main(["--config", "smoke.yaml", "--output", str(resumed), "--resume", str(run / "epoch-0001.pt"), *overrides])
    from powergrad_train import checkpoint
    assert_same_weights(checkpoint.load(run / "last.pt")["ema"], checkpoint.load(resumed / "last.pt")["ema"])
    assert [r["eval_ema_top1"] for r in csv.DictReader(open(resumed / "summary.csv"))] == \
        [rows[1]["eval_ema_top1"]]  # a new folder: epoch 2 only
    assert all(r["eval_ema_top1"] == "" for r in csv.DictReader(open(two_epoch_run / "summary.csv")))


# ----------------------------------------------------------------------------- outputs

def test_outputs_are_chosen_by_config_and_told_where_the_run_starts(tiny_root, tmp_path, capsys):
    run = tmp_path / "jsonl"
    overrides = tiny_overrides(tiny_root, **{"log.outputs": "[jsonl]"})
    main(["--config", "smoke.yaml", "--output", str(run), *overrides])
    assert capsys.readouterr().out == ""  # no console output asked for
    assert not (run / "summary.csv").exists() and not list(run.glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert records[0] == {"kind": "start", "step": 0, "epoch": 0, "resumed_from": None}
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]
    assert [r["step"] for r in records if r["kind"] == "progress"] == [4, 8, 12, 16, 20]
    # as if killed during epoch 2 before its checkpoint: the output is told where the run resumes,
    # and the records written after that step are dropped
    for name in ("last.pt", "epoch-0002.pt", "best.pt"):
        (run / name).unlink(missing_ok=True)
    main(["--config", "smoke.yaml", "--output", str(run), "--resume", "auto", *overrides])
    again = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r for r in again if r["kind"] == "start"] == [
        records[0], {"kind": "start", "step": 10, "epoch": 1, "resumed_from": str(run / "epoch-0001.pt")}]
    assert [r["text"].split(":")[0] for r in again if r["kind"] == "message"] == ["model", "model", "done"]
    assert [r["epoch"] for r in again if r["kind"] == "epoch"] == [1, 2]
    assert [r["step"] for r in again if r["kind"] == "progress"] == [4, 8, 12, 16, 20]


# ----------------------------------------------------------------------------- initial weights

def test_init_from_a_state_dict_keeps_the_body_and_reinitialises_another_head(tiny_root, tmp_path):
    pretrained = build_model(build_config(None, ["model.name=resnet10t", "model.num_classes=1000"]).model)
    torch.save(pretrained.state_dict(), tmp_path / "resnet10t.pth")  # as timm and torchvision ship weights
    torch.save({"state_dict": pretrained.state_dict(), "epoch": 3}, tmp_path / "wrapped.pth.tar")
    for path in (tmp_path / "resnet10t.pth", tmp_path / "wrapped.pth.tar"):
        model = build_model(build_config(None, ["model.name=resnet10t", "model.num_classes=10"]).model)
        fresh_head = model.fc.weight.detach().clone()
        note = load_initial_weights(model, path)
        assert "classifier head re-initialised" in note
        mine, theirs = model.state_dict(), pretrained.state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine if not k.startswith("fc."))
        assert torch.equal(model.fc.weight, fresh_head)


def test_init_from_this_project_s_checkpoint_and_a_misfit_is_one_line(two_epoch_run, tiny_root, tmp_path, capsys):
    t = tiny_trainer(tiny_root, tmp_path / "ft", f"model.init_from={two_epoch_run / 'last.pt'}")
    assert_same_weights(load_weights(two_epoch_run / "last.pt"), t.model.state_dict())
    assert t.init_note == f"weights from {two_epoch_run / 'last.pt'}"
    t.close()
    with pytest.raises(SystemExit):
        main(["--config", "smoke.yaml", "--output", str(tmp_path / "bad"), "--dry-run",
              *tiny_overrides(tiny_root, **{"model.name": "resnet18", "model.init_from": two_epoch_run / "last.pt"})])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: model.init_from: {two_epoch_run / 'last.pt'}: the weights "
                                               "do not fit the model ("), err


def test_init_from_a_file_without_weights():
    model = tiny_model()
    with pytest.raises(CheckpointError, match="not found"):
        load_initial_weights(model, __import__("pathlib").Path("/nonexistent.pth"))


# ----------------------------------------------------------------------------- PGT as a library

def test_pgt_as_a_library_imports_torch_alone():
    import subprocess
    import sys
    code = ("import sys\nfrom powergrad_train import PowerGradCrossEntropy, power_grad_cross_entropy\n"
            "import torch\nloss = PowerGradCrossEntropy(alpha=0.25, label_smoothing=0.1).to('cpu')\n"
            "z = torch.randn(4, 10, requires_grad=True)\nloss(z, torch.tensor([1, 2, 3, 4])).backward()\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'timm', 'tensorboard', 'nvidia', 'matplotlib', "
            "'torchvision', 'yaml', 'PIL'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
