"""The training step itself: each variant changes what it should, compiled equals eager, the bench
command measures it."""

import csv
import json

import pytest
import torch

from powergrad_train.cli import main
from powergrad_train.config.build import build_config
from powergrad_train.system.dist import DistEnv
from powergrad_train.training.optim import lr_at_step
from powergrad_train.training.outputs import Output
from powergrad_train.training.run import build_run
from tests.conftest import needs_a_cpu_compiler, tiny_overrides


def trainer(root, tmp_path, *extra):
    overrides = [o.removeprefix("--set=") for o in tiny_overrides(root, **{"loss.pgt_alpha": 0.25})]
    return build_run(build_config("smoke.yaml", overrides + list(extra)), tmp_path, DistEnv(), torch.device("cpu"))


def snapshot(t):
    return {n: p.detach().clone() for n, p in t.model.named_parameters()}


@needs_a_cpu_compiler
def test_compiled_step_makes_the_same_update_as_eager(tiny_root, tmp_path):
    eager = trainer(tiny_root, tmp_path / "e")
    compiled = trainer(tiny_root, tmp_path / "c", "model.compile=true")
    images, targets = next(iter(eager.data.train))
    before = snapshot(eager)
    updates = []
    for t in (eager, compiled):
        t.train_model.train()
        t.train_step(images, targets)
        updates.append({n: p.detach() - before[n] for n, p in t.model.named_parameters()})
    moved = [name for name in before if updates[0][name].abs().max() > 0]
    assert len(moved) > len(before) // 2  # (zero-initialised last BN scales leave some convs still)
    for name in before:
        # Relative to the update itself, not to the weights: a wrong step cannot hide behind them.
        torch.testing.assert_close(updates[1][name], updates[0][name], rtol=1e-3,
                                   atol=1e-4 * updates[0][name].abs().max().item(), msg=lambda m: f"{name}: {m}")
    eager.close()
    compiled.close()


def head_bias_gradient(t, images, targets):
    """The classifier bias gradient of one forward/backward, and the logits it came from."""
    t.train_model.train()
    logits, loss = t.forward_loss(images, targets)
    loss.backward()
    return t.model.get_classifier().bias.grad.clone(), logits.detach().float()


@pytest.mark.parametrize("variant,expected_probabilities", [
    ([], lambda z: z.softmax(1)),
    (["loss.pgt_alpha=0.25"], lambda z: (0.25 * z).softmax(1)),
    (["loss.label_smoothing=0.1"], lambda z: z.softmax(1) - 0.1 / z.shape[1]),
    (["loss.pgt_alpha=0.25", "loss.label_smoothing=0.1"], lambda z: (0.25 * z).softmax(1) - 0.1 / z.shape[1]),
])
def test_loss_variants_reach_the_gradient(tiny_root, tmp_path, variant, expected_probabilities):
    """d loss / d bias = mean over the batch of (p~ - q): PGT changes p~, label smoothing q."""
    t = trainer(tiny_root, tmp_path, "loss.pgt_alpha=null", *variant)
    images, targets = next(iter(t.data.train))
    grad, logits = head_bias_gradient(t, images, targets)
    eps = t.objective.label_smoothing
    one_hot = torch.nn.functional.one_hot(targets, logits.shape[1]).float() * (1 - eps)
    expected = (expected_probabilities(logits) - one_hot).mean(0)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
    t.close()


def test_agc_changes_the_body_update_and_leaves_the_head_alone(tiny_root, tmp_path):
    plain = trainer(tiny_root, tmp_path / "p")
    agc = trainer(tiny_root, tmp_path / "a", "grad_clip.mode=agc", "grad_clip.value=0.001")
    images, targets = next(iter(plain.data.train))
    before = snapshot(plain)
    for t in (plain, agc):
        t.train_model.train()
        t.train_step(images, targets)
    head = {n for n, _ in plain.model.named_parameters() if n.startswith(plain.model.default_cfg["classifier"])}
    assert head
    for name, p in agc.model.named_parameters():
        q = dict(plain.model.named_parameters())[name]
        if name in head:
            assert torch.equal(p, q), f"AGC touched the head parameter {name}"
    clipped = [n for n in before if n not in head and
               (agc.model.get_parameter(n) - before[n]).norm() < 0.99 * (plain.model.get_parameter(n) - before[n]).norm()]
    assert len(clipped) > len(before) // 4, clipped  # a small clipping factor shrinks many body updates
    plain.close()
    agc.close()


def test_bf16_runs_the_forward_in_bf16_and_stays_close_to_float32(tiny_root, tmp_path):
    fp32 = trainer(tiny_root, tmp_path / "f")
    bf16 = trainer(tiny_root, tmp_path / "b", "amp=bf16")
    images, targets = next(iter(fp32.data.train))
    assert bf16.forward_loss(images, targets)[0].dtype == torch.bfloat16
    assert fp32.forward_loss(images, targets)[0].dtype == torch.float32
    before = snapshot(fp32)
    for t in (fp32, bf16):
        t.optimizer.zero_grad(set_to_none=True)
        t.train_step(images, targets)
    name = f"{fp32.model.default_cfg['classifier']}.weight"
    update32 = fp32.model.get_parameter(name).detach() - before[name]
    update16 = bf16.model.get_parameter(name).detach() - before[name]
    assert not torch.equal(update16, update32)  # bf16 really ran
    assert torch.nn.functional.cosine_similarity(update16.flatten(), update32.flatten(), dim=0) > 0.9
    fp32.close()
    bf16.close()


def test_bench_command_prints_its_figures(tiny_root, capsys):
    main(["bench", "--config", "smoke.yaml", "--steps", "3", "--warmup", "1",
          *tiny_overrides(tiny_root, **{"model.num_classes": 3})])  # synthetic data fits any class count
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("bench: cpu") and "model resnet10t" in out[0] and "data synthetic" in out[0]
    assert "; loss cross-entropy, plain gradient, label smoothing 0;" in out[0]  # the objective describes itself
    assert out[-1].startswith("training step with data: ") and float(out[-1].split()[-2]) > 0
    main(["bench", "--config", "smoke.yaml", "--steps", "3", "--warmup", "1", "--data", "real",
          *tiny_overrides(tiny_root)])
    assert "data torchvision" in capsys.readouterr().out


class JsonLines(Output):
    """What a user would add: every epoch row and progress record as a JSON line."""

    def __init__(self, path):
        self.path = path

    def progress(self, values):
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": "progress", **values}) + "\n")

    def epoch_end(self, row):
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": "epoch", **row}) + "\n")


def test_an_added_output_receives_what_summary_csv_gets(tiny_root, tmp_path):
    overrides = [o.removeprefix("--set=") for o in tiny_overrides(tiny_root)]
    log = tmp_path / "log.jsonl"
    cfg = build_config("smoke.yaml", overrides)
    t = build_run(cfg, tmp_path / "run", DistEnv(), torch.device("cpu"), outputs=[JsonLines(log)])
    t.fit()
    t.close()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    with open(tmp_path / "run" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [e["epoch"] for e in epochs] == [int(r["epoch"]) for r in rows] == [1, 2]
    for e, r in zip(epochs, rows):
        assert float(r["eval_top1"]) == pytest.approx(e["eval_top1"], rel=1e-5)
        # summary.csv's lr is the LR of the epoch's last optimizer step
        assert float(r["lr"]) == pytest.approx(lr_at_step(cfg.schedule, cfg.optim.lr, e["step"] - 1,
                                                          t.steps_per_epoch), rel=1e-5)
    steps = [r["step"] for r in records if r["kind"] == "progress"]
    assert steps == list(range(4, 21, 4))  # every train.log_every_steps (4) of the 20 steps
