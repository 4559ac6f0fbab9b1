"""The Trainer's parts, each chosen by name from one place: every registry entry satisfies its
interface and does what it says; adding a checkpoint part or an output is one entry."""

import csv
import json
import sys

import pytest
import torch

from powergrad_train.cli import main
from powergrad_train.config import registry
from powergrad_train.config.build import build_config
from powergrad_train.system.dist import DistEnv
from powergrad_train.system.errors import CheckpointError, ConfigError, TrainingError
from powergrad_train.training.models import build_model, load_initial_weights
from powergrad_train.training.optim import build_optimizer, set_lr
from powergrad_train.training.run import build_run
from tests.conftest import assert_same_weights, load_weights, tiny_overrides
from tests.test_trackers import mlflow_client, offline, wandb_runs


def tiny_trainer(root, run_dir, *extra, **values):
    overrides = [o.removeprefix("--set=") for o in tiny_overrides(root, **values)] + list(extra)
    return build_run(build_config("smoke.yaml", overrides), run_dir, DistEnv(), torch.device("cpu"))


# Optimizers and data backends are each run below and in test_data.py; these run the other tables.

@pytest.mark.parametrize("name", registry.KINDS["objective"].builtin)
def test_every_objective_computes_a_finite_loss_with_a_gradient(name):
    """On class indices and on class probabilities; with alpha null the loss (and so its gradient)
    is torch's cross-entropy."""
    from powergrad_train.training.objectives import build_objective
    torch.manual_seed(0)
    logits = torch.randn(4, 5, requires_grad=True)
    targets = torch.tensor([0, 3, 1, 4])
    for alpha in (None, 0.5):
        objective = build_objective(build_config(None, [f"loss.name={name}", f"loss.pgt_alpha={alpha or 'null'}"]).loss)
        for t in (targets, torch.nn.functional.one_hot(targets, 5).float() * 0.7 + 0.06):
            logits.grad = None
            loss = objective(logits, t)
            loss.backward()
            assert loss.dim() == 0 and torch.isfinite(loss) and torch.isfinite(logits.grad).all()
            assert logits.grad.abs().sum() > 0
            if name == "cross_entropy" and alpha is None:
                torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, t))


@pytest.mark.parametrize("name", registry.KINDS["batch_transform"].builtin)
def test_every_batch_transform_transforms_a_batch(name):
    """Shapes kept, the loader's batch left as it was; a mixing transform makes targets that are
    class probabilities (summing to 1) and changes the images the way its name says."""
    import numpy as np

    from powergrad_train.training.batch_transforms import build_batch_transform
    torch.manual_seed(0)
    images, targets = torch.rand(8, 3, 16, 16), torch.arange(8) % 4
    original = images.clone()
    transform = build_batch_transform(build_config(None, [f"batch_transform.name={name}"]).batch_transform, 4)
    saved = np.random.get_state()  # the mixing draws come from numpy's global generator
    np.random.seed(0)
    kinds = set()
    for _ in range(8):
        out, q = transform(images, targets)
        assert torch.equal(images, original) and out.shape == images.shape
        if name == "none":
            assert out is images and q is targets
            continue
        assert q.shape == (8, 4) and torch.allclose(q.sum(1), torch.ones(8)) and (q >= 0).all()
        flipped = images.flip(0)
        # CutMix: every pixel is this image's or the partner's; mixup: blended pixels
        kinds.add("cutmix" if torch.equal(out, torch.where(out == images, images, flipped)) else "mixup")
    np.random.set_state(saved)
    assert kinds == {"none": set(), "mixup": {"mixup"}, "cutmix": {"cutmix"}, "mixup_cutmix": {"mixup", "cutmix"}}[name]


# how each output's epoch row is read back
OUTPUT_READERS = {
    "console": lambda run_dir, printed: printed,
    "csv": lambda run_dir, printed: (run_dir / "summary.csv").read_text(),
    "jsonl": lambda run_dir, printed: (run_dir / "log.jsonl").read_text(),
    "tensorboard": lambda run_dir, printed: repr(_tensorboard_scalars(run_dir)),
    "wandb": lambda run_dir, printed: repr(wandb_runs(run_dir)),
    "mlflow": lambda run_dir, printed: repr([run.data.metrics for run in mlflow_client(run_dir).search_runs(
        [e.experiment_id for e in mlflow_client(run_dir).search_experiments()])]),
}


@pytest.fixture(autouse=True)
def _trackers_offline(monkeypatch, tmp_path_factory):
    """The W&B and MLflow outputs offline, their files in temporary folders (tests/test_trackers.py)."""
    offline(monkeypatch, tmp_path_factory.mktemp("tracker_home"))
    yield
    if sys.modules.get("wandb") is not None:
        sys.modules["wandb"].teardown()  # W&B's service process, started with this environment


def _tensorboard_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir)).Reload()
    return {tag: [(e.step, round(e.value, 4)) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("name", registry.KINDS["output"].builtin)
def test_every_output_receives_the_epoch_row(name, tmp_path, capsys):
    from powergrad_train.config.schema import to_dict
    from powergrad_train.training.outputs import SUMMARY_COLUMNS, RunInfo, build_outputs
    (output,) = build_outputs([name])
    row = {k: 0.0 for k in SUMMARY_COLUMNS} | {"epoch": 1, "step": 7, "eval_top1": 12.3456, "eval_ema_top1": None}
    output.start(RunInfo(tmp_path, to_dict(build_config(None, [])), 0, 0, None))
    output.epoch_start(1, 1, 7, 0)
    output.epoch_stop()
    output.epoch_end(row)
    output.flush()
    output.close()
    text = OUTPUT_READERS[name](tmp_path, capsys.readouterr().out)
    assert "12.3" in text, text


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


@pytest.mark.parametrize("name", registry.KINDS["optimizer"].builtin)
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
    cfg = build_config("smoke.yaml", [o.removeprefix("--set=") for o in tiny_overrides(tiny_root)]
                       + [f"optim.name={name}", "optim.lr=0.001"])
    resumed = build_run(cfg, tmp_path / "c", DistEnv(), torch.device("cpu"), resume_from=path)
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


@pytest.mark.parametrize("name", ["mixup", "cutmix", "mixup_cutmix"])
def test_mixup_needs_an_even_batch_per_process(name):
    from powergrad_train.config.build import check_runtime
    cfg = build_config(None, [f"batch_transform.name={name}", "data.batch_size=6"])
    check_runtime(cfg, 3, cuda=False)  # 2 per process
    with pytest.raises(ConfigError, match="gives 3 per process; choose an even number per process"):
        check_runtime(cfg, 2, cuda=False)


@pytest.mark.parametrize("sets, error", [
    (["batch_transform.name=mixup", "batch_transform.cutmix_alpha=1"],
     "cutmix_alpha=1: batch_transform.name = mixup does not use batch_transform.cutmix_alpha .*use batch_transform.name = mixup_cutmix"),
    (["batch_transform.name=cutmix", "batch_transform.mixup_alpha=0.2"],
     "mixup_alpha=0.2: batch_transform.name = cutmix does not use batch_transform.mixup_alpha .*mixup_cutmix"),
    (["batch_transform.name=mixup", "batch_transform.mixup_alpha=0"], "mixup needs batch_transform.mixup_alpha > 0"),
    (["batch_transform.name=cutmix", "batch_transform.cutmix_alpha=0"], "cutmix needs batch_transform.cutmix_alpha > 0"),
    (["batch_transform.name=mixup_cutmix", "batch_transform.cutmix_alpha=0"],
     "mixup_cutmix needs batch_transform.cutmix_alpha > 0 .*use batch_transform.name = mixup"),
])
def test_a_mixing_transform_refuses_the_alpha_it_does_not_draw_from(sets, error):
    with pytest.raises(ConfigError, match=error):
        build_config(None, sets)


def test_mixup_is_mixup_only_and_its_stored_config_reads_back_as_it_trained():
    from powergrad_train.config.schema import to_dict
    cfg = build_config(None, ["batch_transform.name=mixup"])
    assert cfg.batch_transform.cutmix_alpha == 0  # stored as what it trains
    stored = to_dict(cfg)
    assert build_config(None, start=("config.yaml", stored), lenient=True).batch_transform == cfg.batch_transform


@pytest.mark.parametrize("alphas, read_as", [((0.8, 1.0), "mixup_cutmix"), ((0.0, 1.0), "cutmix"), ((0.2, 0.0), "mixup")])
def test_an_old_runs_mixup_is_read_as_the_transform_it_trained(alphas, read_as, capsys):
    """Before, `mixup` was timm's Mixup with both alphas as given: the stored config is read as the
    name that makes the same draws, with one notice when the name changes."""
    from powergrad_train.config.schema import to_dict
    stored = to_dict(build_config(None, []))
    stored["batch_transform"].update(name="mixup", mixup_alpha=alphas[0], cutmix_alpha=alphas[1])
    cfg = build_config(None, start=("old/config.yaml", stored), lenient=True)
    b = cfg.batch_transform
    assert (b.name, b.mixup_alpha, b.cutmix_alpha) == (read_as, *alphas)
    mixup = registry.load("batch_transform", b.name).build(b, 10).mixup
    assert (mixup.mixup_alpha, mixup.cutmix_alpha) == alphas  # what timm's Mixup drew from before
    notices = capsys.readouterr().err.splitlines()
    assert notices == ([] if read_as == "mixup" else
                       [f"notice: old/config.yaml: batch_transform.name = mixup with mixup_alpha {alphas[0]:g} and "
                        f"cutmix_alpha {alphas[1]:g} is what this version calls {read_as}; read as {read_as}"])


# ----------------------------------------------------------------------------- EMA

def test_the_ema_moves_only_on_applied_steps_and_is_a_checked_part(tiny_root, tmp_path):
    t = tiny_trainer(tiny_root, tmp_path, "ema.decay=0.5")
    images, targets = next(iter(t.data.train))
    t.train_step(images, targets)
    average = {k: v.clone() for k, v in t.weight_average.state_dict().items()}
    t.train_step(torch.full_like(images, float("nan")), targets)  # skipped
    assert_same_weights(average, t.weight_average.state_dict())
    t.train_step(images, targets)
    key = "fc.weight"
    torch.testing.assert_close(t.weight_average.state_dict()[key], 0.5 * average[key] + 0.5 * t.model.state_dict()[key])
    path = t.save_checkpoint()
    from powergrad_train.training import checkpoint
    assert_same_weights(checkpoint.load(path)["ema"], t.weight_average.state_dict())
    t.weight_average.module.fc.weight.data[0, 0] = float("nan")  # an EMA is checked before a save like every part
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
    from powergrad_train.training import checkpoint
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
