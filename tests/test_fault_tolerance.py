"""Preemption (SIGTERM), kill -9, non-finite losses and resume checks, through real processes."""

import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from powergrad_train.cli import main
from powergrad_train.config.build import build_config
from powergrad_train.system.dist import DistEnv
from powergrad_train.system.preemption import Preempted, StopRequest
from powergrad_train.training import checkpoint
from powergrad_train.training.run import build_run
from tests import warm
from tests.conftest import assert_same_weights, load_weights, tiny_overrides

# 40 steps per epoch, so a signal lands inside an epoch.
SMALL_BATCH = {"data.batch_size": 4, "schedule.epochs": 2, "train.log_every_steps": 10}
ONLY_AT_EPOCH_ENDS = "--set=checkpoint.every_steps=0"  # fewer writes for a resumed run; same weights


def start(run_dir, overrides, *extra, nproc=1):
    launcher = [sys.executable, "-m", "powergrad_train"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
         "powergrad_train"]
    # Its own session: a test can signal the run's whole process group, as SLURM does, without pytest's.
    return warm.popen([*launcher, "--config", "smoke.yaml", "--output", str(run_dir), *overrides, *extra],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def wait_for_new_checkpoints(path, proc, count, timeout=120):
    """Until the run has replaced `path` `count` times: evidence that it trains (each atomic write
    brings a new inode, made while the old file still exists)."""
    deadline = time.time() + timeout
    seen = path.stat().st_ino if path.exists() else None
    while count:
        inode = path.stat().st_ino if path.exists() else None
        if inode != seen:
            seen, count = inode, count - 1
            continue
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, f"{path} was not written again"
        time.sleep(0.01)


def summary_rows(run_dir):
    with open(run_dir / "summary.csv", newline="") as f:
        return [{k: r[k] for k in ("epoch", "step", "train_loss", "train_top1", "eval_top1")} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def straight_run(tiny_root, module_tmp):
    run_dir = module_tmp / "straight" / "run"
    main(["--config", "smoke.yaml", "--output", str(run_dir), *tiny_overrides(tiny_root, **SMALL_BATCH)])
    return run_dir


def test_sigterm_mid_epoch_then_resume_is_exact(straight_run, tiny_root, tmp_path):
    run_dir = tmp_path / "preempted"
    overrides = tiny_overrides(tiny_root, **SMALL_BATCH, **{"checkpoint.every_steps": 5})
    proc = start(run_dir, overrides)
    wait_for(run_dir / "last.pt", proc)  # training is under way
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "--resume auto" in err
    assert checkpoint.load(run_dir / "last.pt")["train_state"]["batch_in_epoch"] > 0  # stopped inside an epoch

    # (checkpoint.every_steps only says when to save: the rest of the run saves at epoch ends alone)
    main(["--config", "smoke.yaml", "--output", str(run_dir), "--resume", "auto", *overrides, ONLY_AT_EPOCH_ENDS])
    assert_same_weights(load_weights(straight_run / "last.pt"), load_weights(run_dir / "last.pt"))
    assert summary_rows(run_dir) == summary_rows(straight_run)  # train metrics of the cut epoch too
    assert tensorboard_steps(run_dir) == tensorboard_steps(straight_run)  # no gaps, no repeats


def tensorboard_steps(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [e.step for e in events.Scalars("train/loss")], [e.step for e in events.Scalars("epoch/eval_top1")]


def test_sigterm_under_torchrun_two_processes(tiny_root, tmp_path):
    """The tiny model has batch norm: its buffers resume exactly under DDP too."""
    overrides = tiny_overrides(tiny_root, **{**SMALL_BATCH, "schedule.epochs": 1})
    straight = tmp_path / "straight"
    assert start(straight, overrides, nproc=2).wait(timeout=300) == 0
    run_dir = tmp_path / "preempted"
    proc = start(run_dir, overrides, "--set=checkpoint.every_steps=5", nproc=2)
    wait_for(run_dir / "last.pt", proc)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
    _, err = proc.communicate(timeout=120)
    assert err.count("stopped by SIGTERM") == 1, err[-3000:]  # rank 0 speaks for both
    state = checkpoint.load(run_dir / "last.pt")
    assert 0 < state["train_state"]["batch_in_epoch"] < 40
    resumed = start(run_dir, overrides, "--resume", "auto", nproc=2)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert_same_weights(load_weights(straight / "last.pt"), load_weights(run_dir / "last.pt"))


def test_repeated_kill_9_never_corrupts_and_resume_is_exact(straight_run, tiny_root, tmp_path):
    run_dir = tmp_path / "killed"
    overrides = tiny_overrides(tiny_root, **SMALL_BATCH, **{"checkpoint.every_steps": 2})
    rng = random.Random(0)
    for _ in range(2):
        proc = start(run_dir, overrides, "--resume", "auto")
        # while it trains: killed once it has written 1 to 3 checkpoints (every 2 steps, 80 in all) of its own
        wait_for_new_checkpoints(run_dir / "last.pt", proc, rng.randint(1, 3))
        proc.kill()
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        checkpoint.load(run_dir / "last.pt")  # always readable
    main(["--config", "smoke.yaml", "--output", str(run_dir), "--resume", "auto", *overrides, ONLY_AT_EPOCH_ENDS])
    assert_same_weights(load_weights(straight_run / "last.pt"), load_weights(run_dir / "last.pt"))
    assert not list(run_dir.glob(".*tmp*"))
    assert summary_rows(run_dir) == summary_rows(straight_run)
    assert tensorboard_steps(run_dir) == tensorboard_steps(straight_run)


def test_resume_with_a_changed_recipe_is_refused_unless_forced(straight_run, tiny_root, tmp_path, capsys):
    run_dir = tmp_path / "changed"
    run_dir.mkdir()
    shutil.copy(straight_run / "epoch-0001.pt", run_dir / "last.pt")
    overrides = tiny_overrides(tiny_root, **SMALL_BATCH, **{"optim.lr": 0.2, "data.workers": 1})
    with pytest.raises(SystemExit):
        main(["--config", "smoke.yaml", "--output", str(run_dir), "--resume", "auto", *overrides])
    err = capsys.readouterr().err
    assert "the recipe changes keys that define the run: optim.lr: 0.05 -> 0.2 (pass --resume-force" in err
    assert "data.workers" not in err
    main(["--config", "smoke.yaml", "--output", str(run_dir), "--resume", "auto", "--resume-force", *overrides])
    assert checkpoint.load(run_dir / "last.pt")["train_state"]["epoch"] == 2


@pytest.mark.parametrize("nproc,backend", [(1, "torchvision"), (2, "torchvision"), (1, "dali")])
def test_sigterm_to_the_whole_process_group_still_checkpoints(tiny_root, tmp_path, nproc, backend):
    """SLURM's time limit and scancel signal every process of the job, loader workers included."""
    run_dir = tmp_path / "group"
    overrides = tiny_overrides(tiny_root, **SMALL_BATCH, **{
        "data.workers": 2, "data.backend": backend, "data.dali_device": "cpu", "checkpoint.every_steps": 5})
    proc = start(run_dir, overrides, nproc=nproc)
    wait_for(run_dir / "last.pt", proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert "DataLoader worker" not in err, err[-3000:]
    assert err.count("stopped by SIGTERM") == 1, err[-3000:]
    if nproc == 1:
        assert proc.returncode == 128 + signal.SIGTERM
    assert 0 < checkpoint.load(run_dir / "last.pt")["train_state"]["batch_in_epoch"] < 40


def test_sigterm_during_validation_saves_at_once_and_validates_again_on_resume(straight_run, tiny_root, tmp_path):
    run_dir = tmp_path / "val"
    overrides = tiny_overrides(tiny_root, **SMALL_BATCH)
    trainer = build_run(build_config("smoke.yaml", [o.removeprefix("--set=") for o in overrides]), run_dir,
                      DistEnv(), torch.device("cpu"))
    real_val_loader = trainer.data.val

    class SignalledDuringValidation:  # a real SIGTERM to this process after the first val batch
        def __iter__(self):
            for i, batch in enumerate(real_val_loader):
                yield batch
                if i == 0:
                    os.kill(os.getpid(), signal.SIGTERM)

        def close(self):
            real_val_loader.close()

    trainer.data.val = SignalledDuringValidation()
    with pytest.raises(Preempted, match="stopped by SIGTERM while validating epoch 1") as stop:
        trainer.fit()
    trainer.close()
    assert stop.value.exit_code == 128 + signal.SIGTERM
    state = checkpoint.load(run_dir / "last.pt")["train_state"]
    assert state["epoch"] == 1 and state["eval_pending"] and state["batch_in_epoch"] == 0
    assert not (run_dir / "epoch-0001.pt").exists() and not (run_dir / "summary.csv").exists()
    main(["--config", "smoke.yaml", "--output", str(run_dir), "--resume", "auto", *overrides])
    assert summary_rows(run_dir) == summary_rows(straight_run)  # epoch 1 validated after the resume
    assert_same_weights(load_weights(straight_run / "last.pt"), load_weights(run_dir / "last.pt"))


def test_a_second_sigint_raises_keyboard_interrupt():
    stop = StopRequest()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested() == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here
    finally:
        stop.close()


def test_a_second_ctrl_c_is_one_line_and_exit_130(tiny_root, tmp_path):
    """A large model, so the checkpoint the first Ctrl-C asks for takes a while to write."""
    run_dir = tmp_path / "twice"
    proc = start(run_dir, tiny_overrides(tiny_root, **SMALL_BATCH, **{
        "model.name": "resnet50", "checkpoint.every_steps": 3, "checkpoint.keep_last": 0}))
    wait_for(run_dir / "last.pt", proc, timeout=240)
    before = (run_dir / "last.pt").stat().st_mtime_ns
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines() == ["error: interrupted: stopped at once, no checkpoint written for this stop "
                                        "(the run folder's last.pt, if any, is intact; continue with --resume auto)"]
    if (run_dir / "last.pt").stat().st_mtime_ns != before:  # a periodic save finished in between
        checkpoint.load(run_dir / "last.pt")


def assert_no_process_left(group, timeout=30):
    """The run's process group is empty: no loader worker outlived the run."""
    deadline = time.time() + timeout
    while True:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        assert time.time() < deadline, "a process of the run is still there"
        time.sleep(0.1)


def test_kill_9_then_an_immediate_resume_with_loader_workers(straight_run, tiny_root, tmp_path):
    """Orphaned loader workers live on for a few seconds after kill -9 (here: until this test ends
    them); the run folder's lock must not be theirs, so a requeued job resumes at once."""
    run_dir = tmp_path / "killed"
    overrides = tiny_overrides(tiny_root, **SMALL_BATCH, **{"data.workers": 2, "checkpoint.every_steps": 5})
    proc = start(run_dir, overrides)
    wait_for(run_dir / "last.pt", proc)
    os.killpg(proc.pid, signal.SIGSTOP)  # the workers stay where kill -9 finds them
    proc.kill()
    proc.wait()  # (its output pipes stay open in the workers)
    try:
        os.killpg(proc.pid, 0)  # the orphaned workers are still there
        main(["--config", "smoke.yaml", "--output", str(run_dir), "--resume", "auto", *overrides, ONLY_AT_EPOCH_ENDS])
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.stdout.close()
        proc.stderr.close()
    assert_same_weights(load_weights(straight_run / "last.pt"), load_weights(run_dir / "last.pt"))


def test_sigusr1_to_the_process_group_checkpoints_like_sigterm(tiny_root, tmp_path):
    """(SIGHUP: the next test, from a terminal that really closes.)"""
    signum = signal.SIGUSR1
    run_dir = tmp_path / "group"
    overrides = tiny_overrides(tiny_root, **SMALL_BATCH, **{"data.workers": 2, "checkpoint.every_steps": 5})
    proc = start(run_dir, overrides)
    wait_for(run_dir / "last.pt", proc)
    os.killpg(proc.pid, signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-3000:]
    assert f"stopped by {signal.Signals(signum).name}" in err and "DataLoader worker" not in err, err[-3000:]
    assert 0 < checkpoint.load(run_dir / "last.pt")["train_state"]["batch_in_epoch"] < 40
    assert_no_process_left(proc.pid)


def test_closing_the_terminal_of_a_run_checkpoints_it(tiny_root, tmp_path):
    """The terminal of an interactive run goes away (a closed window, a dropped ssh session): its
    process group gets SIGHUP, and writing to the terminal fails from then on."""
    import select
    run_dir = tmp_path / "hangup"
    overrides = tiny_overrides(tiny_root, **SMALL_BATCH, **{"data.workers": 2, "checkpoint.every_steps": 5})
    leader, terminal = os.openpty()
    proc = warm.popen([sys.executable, "-m", "powergrad_train", "--config", "smoke.yaml", "--output", str(run_dir),
                       *overrides], stdin=terminal, stdout=terminal, stderr=terminal,
                      start_new_session=True, controlling_terminal=True)
    os.close(terminal)
    shown = b""
    while not (run_dir / "last.pt").exists():  # read what the run shows, as a terminal would
        assert proc.poll() is None, shown[-2000:]
        if select.select([leader], [], [], 0.1)[0]:
            shown += os.read(leader, 1 << 16)
    os.close(leader)  # the terminal goes away
    assert proc.wait(timeout=120) == 128 + signal.SIGHUP, shown[-2000:]
    assert 0 < checkpoint.load(run_dir / "last.pt")["train_state"]["batch_in_epoch"] < 40
    assert_no_process_left(proc.pid)


def test_an_event_file_dated_in_the_future_neither_blocks_a_resume_nor_escapes_the_purge(two_epoch_run, tiny_root,
                                                                                        tmp_path):
    """Another machine's clock ran ahead when it wrote the run's events. TensorBoard reads event
    files in name order, and the name starts with the second the file was made in."""
    run_dir = tmp_path / "skewed"
    shutil.copytree(two_epoch_run, run_dir)
    for name in ("epoch-0002.pt", "best.pt"):  # back to epoch 1, with the events of epoch 2 still there
        (run_dir / name).unlink()
    shutil.copy(run_dir / "epoch-0001.pt", run_dir / "last.pt")
    (events,) = run_dir.glob("events.out.tfevents.*")
    second = events.name.split(".")[3]
    events.rename(events.with_name(events.name.replace(second, str(int(second) + 10 * 365 * 86400))))
    main(["--config", "smoke.yaml", "--output", str(run_dir), "--resume", "auto", *tiny_overrides(tiny_root)])
    assert tensorboard_steps(run_dir) == tensorboard_steps(two_epoch_run)  # the stale epoch 2 purged, once
    assert summary_rows(run_dir) == summary_rows(two_epoch_run)


def test_a_data_set_that_lost_a_file_resumes_with_the_runs_steps_per_epoch(two_epoch_run, tiny_root, tmp_path, capsys):
    """A bad file deleted between a checkpoint and its resume: 159 images give 9 batches of 16, the
    run has 10; it keeps its 10, the epoch filled from the start of its shuffle. Losing more than
    one step (or 1% of the steps) is another data set."""
    data = tmp_path / "data"
    shutil.copytree(tiny_root, data)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(two_epoch_run / "epoch-0001.pt", run_dir / "last.pt")
    next((data / "train" / "ring").iterdir()).unlink()
    main(["--config", "smoke.yaml", "--output", str(run_dir), "--resume", "auto", *tiny_overrides(data)])
    assert "159 train / 60 val images, 10 steps per epoch" in capsys.readouterr().out
    state = checkpoint.load(run_dir / "last.pt")
    assert state["train_state"]["step"] == 20 and state["steps_per_epoch"] == 10
    for path in sorted((data / "train" / "dots").iterdir())[:8] + sorted((data / "train" / "ring").iterdir())[:8]:
        path.unlink()  # 143 images: 8 steps
    (tmp_path / "again").mkdir()
    shutil.copy(two_epoch_run / "epoch-0001.pt", tmp_path / "again" / "last.pt")
    with pytest.raises(SystemExit):
        main(["--config", "smoke.yaml", "--output", str(tmp_path / "again"), "--resume", "auto",
              *tiny_overrides(data)])
    assert "saved with 10 steps per epoch, this run has 8" in capsys.readouterr().err
