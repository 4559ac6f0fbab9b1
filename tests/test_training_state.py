"""Training state that cannot be silently corrupted: skipped steps leave no trace, checkpoints
hold only finite, good states, and resume state lives in one place."""

import math
import shutil
import subprocess
import sys

import pytest
import torch

from powergrad_train.cli import main
from powergrad_train.config.build import build_config
from powergrad_train.system.dist import DistEnv
from powergrad_train.system.errors import CheckpointError, ConfigError, TrainingError
from powergrad_train.training import checkpoint
from powergrad_train.training.run import build_run
from tests import warm
from tests.conftest import REPO, assert_same_weights, load_weights, tiny_overrides

DATA = REPO / "tests" / "data"


def make_trainer(root, run_dir, **extra):
    overrides = [o.removeprefix("--set=") for o in tiny_overrides(root, **extra)]
    return build_run(build_config("smoke.yaml", overrides), run_dir, DistEnv(), torch.device("cpu"))


def full_state(trainer) -> dict:
    """Weights, buffers and momentum: everything a step may change."""
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for i, p in enumerate(trainer.model.parameters()):
        state[f"momentum.{i}"] = trainer.optimizer.state[p]["momentum_buffer"].clone()
    return state


def nan_batch(images):
    return torch.full_like(images, float("nan"))


def test_a_skipped_first_step_leaves_no_trace(tiny_root, tmp_path):
    """Step 1 has a NaN loss and is skipped; step 2 must then equal a run that never had step 1."""
    skipped = make_trainer(tiny_root, tmp_path / "a")
    images, targets = next(iter(skipped.data.train))
    skipped.train_step(nan_batch(images), targets)
    skipped.train_step(images, targets)
    clean = make_trainer(tiny_root, tmp_path / "b")
    clean.state.step = 1  # the same LR as the skipping run's second step
    clean.train_step(images, targets)
    a, b = full_state(skipped), full_state(clean)
    assert any("running_mean" in k for k in a)  # a batch-norm model: its statistics are checked too
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 loss scaling needs a CUDA GPU")
def test_fp16_overflow_on_the_first_step_leaves_no_trace(tiny_root, tmp_path):
    device = torch.device("cuda")
    overrides = [o.removeprefix("--set=") for o in tiny_overrides(tiny_root, amp="fp16")]
    runs = [build_run(build_config("smoke.yaml", overrides), tmp_path / n, DistEnv(), device) for n in "ab"]
    images, targets = (t.to(device) for t in next(iter(runs[0].data.train)))
    for run in runs:
        run.scaler.scale(torch.ones((), device=device))  # the scaler creates its scale lazily
    runs[0].scaler.update(new_scale=2.0 ** 126)  # the first step's scaled gradients overflow
    runs[0].train_step(images, targets)
    assert runs[0].scaler.get_scale() == 2.0 ** 125  # the scaler skipped it and backed off
    for run in runs:
        run.scaler.update(new_scale=1024.0)
    runs[0].train_step(images, targets)
    runs[1].state.step = 1
    runs[1].train_step(images, targets)
    a, b = full_state(runs[0]), full_state(runs[1])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5, msg=lambda m: f"{k}: {m}")


def test_nonfinite_gradient_is_caught_before_clipping_and_outside_the_head(tiny_root, tmp_path):
    """Clipping by value would turn an inf gradient finite, and the head alone would look fine."""
    trainer = make_trainer(tiny_root, tmp_path, **{"grad_clip.mode": "value", "grad_clip.value": 1.0})
    images, targets = next(iter(trainer.data.train))
    trainer.train_step(images, targets)
    name, first_conv = next(trainer.model.named_parameters())
    handle = first_conv.register_hook(lambda g: torch.full_like(g, math.inf))
    before = full_state(trainer)
    trainer.train_step(images, targets)
    after = full_state(trainer)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    handle.remove()
    trainer.train_step(images, targets)  # the next good step is applied again
    assert not torch.equal(first_conv, before[name])
    assert trainer.meter.read()["longest_skip_streak"] == 1


def test_repeated_bad_steps_stop_the_run_and_name_a_good_checkpoint(tiny_root, tmp_path):
    trainer = make_trainer(tiny_root, tmp_path, **{"train.max_nonfinite_steps": 3})
    images, targets = next(iter(trainer.data.train))
    trainer.train_step(images, targets)
    trainer.save_checkpoint()
    before = full_state(trainer)
    for _ in range(3):
        trainer.train_step(nan_batch(images), targets)
    after = full_state(trainer)
    for k in before:  # batch-norm statistics included: the NaN batches left no trace
        assert torch.equal(before[k], after[k]), k
    with pytest.raises(TrainingError, match=r"3 steps in a row had non-finite gradients .* Last good checkpoint: "
                                            r".*last\.pt \(epoch 0, step 1\); lower optim\.lr"):
        trainer._check_finite()
    trainer.close()


def test_a_state_with_nonfinite_losses_never_becomes_last_pt(tiny_root, tmp_path, capsys):
    trainer = make_trainer(tiny_root, tmp_path)
    images, targets = next(iter(trainer.data.train))
    trainer.train_step(images, targets)
    assert trainer.save_checkpoint() == tmp_path / "last.pt"
    good = (tmp_path / "last.pt").read_bytes()
    trainer.train_step(nan_batch(images), targets)
    trainer.train_step(images, targets)
    assert trainer.save_checkpoint(val_top1=99.0) == tmp_path / "nonfinite.pt"
    assert (tmp_path / "last.pt").read_bytes() == good and not (tmp_path / "best.pt").exists()
    assert "1 step(s) since the last checkpoint had non-finite losses" in capsys.readouterr().out
    assert checkpoint.load(tmp_path / "nonfinite.pt")["train_state"]["step"] == 3
    trainer.train_step(images, targets)  # a clean stretch: last.pt moves on, nonfinite.pt is superseded
    assert trainer.save_checkpoint() == tmp_path / "last.pt"
    assert checkpoint.load(tmp_path / "last.pt")["train_state"]["step"] == 4
    assert not (tmp_path / "nonfinite.pt").exists()
    trainer.close()


@pytest.mark.parametrize("where", ["parameter", "buffer", "optimizer"])
def test_no_checkpoint_holds_a_nonfinite_tensor(tiny_root, tmp_path, where):
    trainer = make_trainer(tiny_root, tmp_path)
    images, targets = next(iter(trainer.data.train))
    trainer.train_step(images, targets)
    if where == "parameter":
        name, tensor = next((f"model[.]{n}", p.data) for n, p in trainer.model.named_parameters())
    elif where == "buffer":
        name, tensor = next((f"model[.]{n}", b) for n, b in trainer.model.named_buffers() if n.endswith("running_var"))
    else:
        tensor = trainer.optimizer.state[next(trainer.model.parameters())]["momentum_buffer"]
        name = r"optimizer[.]state[.]\d+[.]momentum_buffer"
    tensor.view(-1)[0] = float("nan")
    with pytest.raises(TrainingError, match=rf"^{name} is not finite at step 1: not saving"):
        trainer.save_checkpoint()
    assert not list(tmp_path.glob("*.pt"))
    trainer.close()


def test_ddp_batch_norm_buffers_agree_and_eval_matches_validate(tiny_root, tmp_path, capsys):
    """2 gloo processes, a batch-norm model: one model on every rank, evaluated and saved; the same
    for its EMA, whose batch-norm statistics each rank averaged from its own."""
    run_dir = tmp_path / "bn"
    overrides = [o.removeprefix("--set=") for o in tiny_overrides(tiny_root, **{"schedule.epochs": 1,
                                                                                  "ema.decay": 0.9})]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "ddp_worker.py"), str(run_dir), *overrides]
    result = warm.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(run_dir / f"weights-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert any(k.endswith("running_mean") for k in ranks[0])
    assert_same_weights(*ranks)  # buffers included
    assert_same_weights(ranks[0], load_weights(run_dir / "last.pt"))
    averages = [torch.load(run_dir / f"ema-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert_same_weights(*averages)
    assert_same_weights(averages[0], checkpoint.load(run_dir / "last.pt")["ema"])
    eval_top1 = float((run_dir / "summary.csv").read_text().splitlines()[1].split(",")[5])
    main(["validate", "--checkpoint", str(run_dir / "last.pt")])
    assert f"top1 {eval_top1:.2f}" in capsys.readouterr().out


def as_format_1(state: dict) -> dict:
    """A checkpoint of this version laid out as format 1 wrote it (the layout of the stored
    tests/data file): train-state fields at the top level, steps per epoch under 'schedule', the
    epoch's train sums (loss, correct, images, logit norm) reduced over ranks, no checksum."""
    old = {k: v for k, v in state.items() if k not in ("train_state", "steps_per_epoch", "world_size", "train_meter")}
    old.update(state["train_state"], format=checkpoint.FORMAT_1,
               schedule={"step": state["train_state"]["step"], "steps_per_epoch": state["steps_per_epoch"]},
               train_meter=sum(m["sums"] for m in state["train_meter"])[:4])
    del old["eval_pending"]  # format 1 had no such field
    return old


def test_format_1_checkpoint_still_resumes_exactly(tiny_root, tmp_path, capsys):
    """Epoch 1 of a run, written in the previous format's layout, resumes to the weights of the run that
    went on uninterrupted (both made here: floating point differs between CPUs)."""
    overrides = tiny_overrides(tiny_root, **{"model.name": "test_efficientnet"})
    straight = tmp_path / "straight"
    main(["--config", "smoke.yaml", "--output", str(straight), *overrides])
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    torch.save(as_format_1(checkpoint.load(straight / "epoch-0001.pt")), run_dir / "last.pt")
    main(["--config", "smoke.yaml", "--output", str(run_dir), "--resume", "auto", *overrides])
    assert "resumed from" in capsys.readouterr().out
    assert_same_weights(load_weights(straight / "last.pt"), load_weights(run_dir / "last.pt"))


def test_the_stored_format_1_file_resumes_to_its_epoch_2(tiny_root, tmp_path, capsys):
    """The real file format 1 wrote (on another machine) resumes; its epoch 2 matches the weights stored
    from that machine within a stated tolerance: 1% (another CPU rounds differently over 10 steps)."""
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    shutil.copy(DATA / "format1-test_efficientnet-epoch1.pt", run_dir / "last.pt")
    main(["--config", "smoke.yaml", "--output", str(run_dir), "--resume", "auto",
          *tiny_overrides(tiny_root, **{"model.name": "test_efficientnet"})])
    assert "resumed from" in capsys.readouterr().out
    expected, resumed = torch.load(DATA / "format1-test_efficientnet-epoch2-weights.pt", weights_only=True), \
        load_weights(run_dir / "last.pt")
    assert expected.keys() == resumed.keys()
    for k in expected:
        torch.testing.assert_close(resumed[k].double(), expected[k].double(), rtol=1e-2,
                                   atol=1e-2 * expected[k].double().abs().max().item() + 1e-6, msg=lambda m: f"{k}: {m}")


def test_a_stored_config_with_an_unknown_key_only_warns(tiny_root, tmp_path, capsys):
    state = checkpoint.load(DATA / "format1-test_efficientnet-epoch1.pt")
    state["config"]["optim"]["renamed_key"] = 1
    state["config"]["data"]["root"] = str(tiny_root)
    checkpoint.save_atomic(state, tmp_path / "c.pt")
    main(["validate", "--checkpoint", str(tmp_path / "c.pt")])
    captured = capsys.readouterr()
    assert "ignoring config key 'optim.renamed_key'" in captured.err
    assert "val loss" in captured.out


def test_mismatched_checkpoint_parts_are_one_kind_of_error(tiny_root, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trainer = make_trainer(tiny_root, run_dir, **{"model.name": "test_efficientnet"})
    with pytest.raises(CheckpointError, match="saved with 10 steps per epoch, this run has 20"):
        checkpoint.check_compatible(checkpoint.load(DATA / "format1-test_efficientnet-epoch1.pt"), "x.pt",
                                    build_config("smoke.yaml", [o.removeprefix("--set=") for o in tiny_overrides(
                                        tiny_root, **{"model.name": "test_efficientnet"})]),
                                    classes=trainer.data.classes, steps_per_epoch=20, world_size=1,
                                    force=True)
    with pytest.raises(CheckpointError, match=r"optim\.lr: 0\.05 -> 0\.2"):
        checkpoint.check_compatible(checkpoint.load(DATA / "format1-test_efficientnet-epoch1.pt"), "x.pt",
                                    build_config("smoke.yaml", [o.removeprefix("--set=") for o in tiny_overrides(
                                        tiny_root, **{"model.name": "test_efficientnet", "optim.lr": 0.2})]),
                                    classes=trainer.data.classes, steps_per_epoch=10, world_size=1, force=False)
    trainer.close()


def test_a_failed_checkpoint_write_is_one_line_and_leaves_no_temp_file(tiny_root, tmp_path):
    """As on a full disk: a file-size limit makes the first checkpoint write fail for real."""
    run_dir = tmp_path / "full"

    # (Python ignores SIGXFSZ: writes past the limit fail with EFBIG)
    result = warm.run([sys.executable, "-m", "powergrad_train", "--config", "smoke.yaml", "--output", str(run_dir),
                       *tiny_overrides(tiny_root, **{"schedule.epochs": 1})],
                      capture_output=True, text=True, timeout=300, file_size_limit=2 * 2**20)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[0].startswith(f"error: cannot write checkpoint {run_dir}/epoch-0001.pt (File too large; "
                               "it needs about"), lines[0]
    assert lines[0].endswith("MiB); last good checkpoint: none yet"), lines[0]
    assert not list(run_dir.glob(".*tmp*")) and not list(run_dir.glob("*.pt"))


def test_low_free_space_is_warned_at_start(tiny_root, tmp_path, monkeypatch, capsys):
    trainer = make_trainer(tiny_root, tmp_path)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10 * 2**20))
    trainer.announce(None)
    out = capsys.readouterr().out
    assert f"warning: {tmp_path} has 10 MiB free; this run's checkpoints need about" in out
    assert "4 files of" in out  # checkpoint.keep_last = 2, best.pt, a temporary file
    trainer.close()


def test_a_fresh_restart_drops_stale_tensorboard_events(tiny_root, tmp_path):
    from tests.test_fault_tolerance import tensorboard_steps
    run_dir = tmp_path / "restart"
    overrides = tiny_overrides(tiny_root, **{"schedule.epochs": 1})
    main(["--config", "smoke.yaml", "--output", str(run_dir), *overrides])
    expected = tensorboard_steps(run_dir)
    for ckpt in run_dir.glob("*.pt"):  # as if the first try died before its first checkpoint
        ckpt.unlink()
    main(["--config", "smoke.yaml", "--output", str(run_dir), "--resume", "auto", *overrides])
    assert tensorboard_steps(run_dir) == expected
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1


def test_images_per_sec_counts_training_time_only(tiny_root, tmp_path, monkeypatch):
    """A checkpoint after every step, each taking 1000 s of the trainer's clock: the epoch's training
    time must not include them. The clock is the test's, so the machine's speed does not matter."""
    from powergrad_train.training import engine

    class Clock:  # every reading advances a millisecond; a checkpoint write advances 1000 s
        now = 0.0

        def perf_counter(self):
            self.now += 1e-3
            return self.now

    clock = Clock()
    monkeypatch.setattr(engine, "time", clock)
    write = checkpoint.Checkpointer.write

    def slow_write(self, *args, **kwargs):
        clock.now += 1000.0
        return write(self, *args, **kwargs)

    monkeypatch.setattr(checkpoint.Checkpointer, "write", slow_write)
    run_dir = tmp_path / "timed"
    main(["--config", "smoke.yaml", "--output", str(run_dir),
          *tiny_overrides(tiny_root, **{"schedule.epochs": 1, "checkpoint.every_steps": 1})])
    row = (run_dir / "summary.csv").read_text().splitlines()[1].split(",")
    assert 0 < float(row[9]) < 1.0  # epoch_time_s: the 9 in-epoch saves would add 9000 s
    assert float(row[8]) == pytest.approx(160 / float(row[9]), rel=1e-3)  # images_per_sec over that time


def test_progress_lines_and_start_block_when_not_on_a_terminal(tiny_root, tmp_path, capsys):
    main(["--config", "smoke.yaml", "--output", str(tmp_path / "log"), *tiny_overrides(tiny_root, **{"schedule.epochs": 1})])
    out = capsys.readouterr().out.splitlines()  # (captured: not a terminal)
    assert out[0] == "model: resnet10t, 4,927,618 parameters, 10 classes"
    assert out[1].startswith("data: ") and "160 train / 60 val images, 10 steps per epoch, batch 16 global" in out[1]
    assert out[2].startswith("device: cpu") and "1 process(es); precision: float32" in out[2]
    assert out[3] == "loss: cross-entropy, plain gradient, label smoothing 0"
    assert out[4] == f"run folder: {tmp_path / 'log'}; fresh start"
    progress = [line for line in out if line.startswith("epoch 1/1 step ")]
    assert [line.split()[3] for line in progress] == ["4/10", "8/10"]  # train.log_every_steps = 4
    assert all("| loss " in line and " img/s | ETA epoch " in line and ", run " in line for line in progress)


def test_help_answers_without_importing_torch():
    code = ("import sys\nfrom powergrad_train.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
            "    pass\nprint('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "False"
    assert "pgt_alpha" in result.stdout


def test_step_decay_shorter_than_a_step_is_a_config_error(tiny_root, capsys):
    with pytest.raises(SystemExit):
        main(["--config", "smoke.yaml", "--dry-run", *tiny_overrides(tiny_root, **{
            "schedule.name": "step", "schedule.decay_epochs": 0.01})])
    assert "schedule.decay_epochs = 0.01 is less than one step at 10 steps per epoch; use at least 0.1" in \
        capsys.readouterr().err


def test_bf16_with_channels_last_is_refused_on_the_cpu():
    from powergrad_train.config.build import check_runtime
    cfg = build_config("smoke.yaml", ["amp=bf16", "channels_last=true"])
    with pytest.raises(ConfigError, match="oneDNN's bf16 channels_last convolution backward"):
        check_runtime(cfg, 1, cuda=False)
    check_runtime(cfg, 1, cuda=True)  # fine on a GPU
