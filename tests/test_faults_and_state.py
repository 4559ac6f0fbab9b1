"""Faults and restored state: a stop signal to `reproduce` reaches its trainer, which saves; a resumed
run takes its settings from the recipe and only its state from the checkpoint; a batch that comes out
short mid-epoch still trains; a worker lost under torchrun is one line, and torchrun's restart recovers
exactly. Real files, real processes, real signals."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from powergrad_train.cli import main
from powergrad_train.config.build import build_config
from powergrad_train.data.demo import write_demo_dataset
from powergrad_train.system.dist import DistEnv
from powergrad_train.training import checkpoint
from powergrad_train.training.run import build_run
from tests import warm
from tests.conftest import assert_same_weights, load_weights, tiny_overrides
from tests.test_data import jpeg_without_tables

SMALL = {"model.name": "test_efficientnet"}  # timm's test model: batch norm, 0.1 M parameters


def settings(root, **extra) -> list[str]:
    return [o.removeprefix("--set=") for o in tiny_overrides(root, **extra)]


def stderr_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def folder_state(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- a batch that comes out short

@pytest.fixture(scope="module")
def one_bad_file(module_tmp):
    """10 classes of 4 train images, one of which passes the listing's check but cannot be decoded (every
    epoch, the batch it is in comes out one image short)."""
    root = module_tmp / "one_bad_file"
    write_demo_dataset(root, {"train": 4, "val": 1})
    sorted((root / "train").rglob("*.jpg"))[5].write_bytes(jpeg_without_tables())
    return root


@pytest.mark.parametrize("backend,transform,accumulate,batch", [
    ("torchvision", "none", 1, 2),  # a batch of 1: batch norm refuses it
    ("torchvision", "none", 2, 4),  # micro-batches of 2 and 1
    ("torchvision", "mixup", 1, 2),  # timm's Mixup asserts an even batch
    ("torchvision", "mixup", 2, 4),
    ("dali", "mixup", 2, 4),
])
def test_a_file_that_fails_when_read_mid_epoch_does_not_stop_the_run(one_bad_file, tmp_path, backend, transform,
                                                                      accumulate, batch):
    """The start-up checks assumed a full batch per process (even for mixup, micro-batches of more than
    one image for batch norm): the batch the file leaves short is filled up, so every step holds them."""
    run_dir = tmp_path / "run"
    main(["--config", "smoke.yaml", "--output", str(run_dir), *tiny_overrides(one_bad_file, **SMALL, **{
        "data.backend": backend, "data.dali_device": "cpu", "data.batch_size": batch,
        "train.accumulate_steps": accumulate, "batch_transform.name": transform, "schedule.epochs": 1,
        "checkpoint.every_steps": 0})])
    state = checkpoint.load(run_dir / "last.pt")
    assert state["train_state"]["epoch"] == 1 and state["train_state"]["step"] == 40 // batch


# ----------------------------------------------------------------------------- what a checkpoint restores

def resumed(root, tmp_path, saved, **changes):
    """build_run resuming checkpoint `saved` with the recipe changed, under --resume-force."""
    run_dir = tmp_path / "resumed"
    run_dir.mkdir(exist_ok=True)
    shutil.copy(saved, run_dir / "last.pt")
    cfg = build_config("smoke.yaml", settings(root, **changes))
    return build_run(cfg, run_dir, DistEnv(), torch.device("cpu"), run_dir / "last.pt", resume_force=True)


@pytest.fixture(scope="module")
def one_step(tiny_root, module_tmp):
    """one_step(name): a checkpoint of the small model written after one real step with optimizer `name`
    (its optimizer state exists), made once per module."""
    made = {}

    def checkpoint_of(name):
        if name not in made:
            cfg = build_config("smoke.yaml", settings(tiny_root, **SMALL, **{"optim.name": name}))
            trainer = build_run(cfg, module_tmp / f"one-step-{name}", DistEnv(), torch.device("cpu"))
            try:
                trainer.train_step(*next(iter(trainer.device_batches(0))))
                made[name] = trainer.save_checkpoint()
            finally:
                trainer.close()
        return made[name]
    return checkpoint_of


def group_settings(optimizer, keys):
    return [{k: group[k] for k in keys} for group in optimizer.param_groups]


def assert_same_state(optimizer, saved):
    state, saved = optimizer.state_dict()["state"], checkpoint.load(saved)["optimizer"]["state"]
    assert state.keys() == saved.keys()
    for i in state:
        assert state[i].keys() == saved[i].keys()
        for k in state[i]:
            assert torch.equal(torch.as_tensor(state[i][k]), torch.as_tensor(saved[i][k])), (i, k)


def test_resume_force_trains_with_the_recipes_optimizer_settings_and_the_checkpoints_state(one_step, tiny_root,
                                                                                           tmp_path):
    trainer = resumed(tiny_root, tmp_path, one_step("sgd"), **SMALL, **{
        "optim.momentum": 0.5, "optim.nesterov": False, "optim.weight_decay": 1e-3})
    try:
        assert group_settings(trainer.optimizer, ("momentum", "nesterov", "weight_decay")) == [
            {"momentum": 0.5, "nesterov": False, "weight_decay": 0.0},  # biases and norm parameters: no decay
            {"momentum": 0.5, "nesterov": False, "weight_decay": 1e-3}]
        assert_same_state(trainer.optimizer, one_step("sgd"))  # the momentum buffers
    finally:
        trainer.close()


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_resume_force_with_new_betas_eps_and_weight_decay_keeps_the_moments_and_step_counts(one_step, tiny_root,
                                                                                           tmp_path, name):
    trainer = resumed(tiny_root, tmp_path, one_step(name), **SMALL, **{
        "optim.name": name, "optim.beta1": 0.8, "optim.beta2": 0.99, "optim.eps": 1e-6, "optim.weight_decay": 0.01})
    try:
        assert group_settings(trainer.optimizer, ("betas", "eps", "weight_decay")) == [
            {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.0},
            {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.01}]
        assert_same_state(trainer.optimizer, one_step(name))  # moments (and AdamW's step counts)
        if name == "lamb":  # timm's LAMB counts its steps in each group: state, not a setting
            assert [group["step"] for group in trainer.optimizer.param_groups] == [1, 1]
    finally:
        trainer.close()


def test_switching_the_optimizer_is_refused_in_one_line_before_anything_is_written(one_step, tiny_root, tmp_path,
                                                                                  capsys):
    for was, now in (("adamw", "sgd"), ("sgd", "lamb")):
        run_dir = tmp_path / f"{was}-to-{now}"
        run_dir.mkdir()
        shutil.copy(one_step(was), run_dir / "last.pt")
        (run_dir / "config.yaml").write_text("the config of the run that saved last.pt\n")
        before = folder_state(run_dir)
        with pytest.raises(SystemExit) as stop:
            main(["--config", "smoke.yaml", "--output", str(run_dir), "--resume", "auto", "--resume-force",
                  *tiny_overrides(tiny_root, **SMALL, **{"optim.name": now})])
        assert stop.value.code == 2
        assert stderr_lines(capsys) == [
            f"error: --resume {run_dir / 'last.pt'}: its optimizer state is {was}'s, which optim.name = {now} cannot "
            f"continue from, even with --resume-force; resume with optim.name={was}, or start a new run from its "
            f"weights with model.init_from={run_dir / 'last.pt'}"]
        assert folder_state(run_dir) == before


def test_a_checkpoint_saved_without_fp16_resumes_with_fp16_from_the_initial_loss_scale(one_step, tiny_root,
                                                                                      tmp_path):
    """amp is not fixed on resume (a run moved from bf16 to a GPU without it goes on in fp16)."""
    trainer = resumed(tiny_root, tmp_path, one_step("sgd"), **SMALL, amp="fp16")
    try:
        assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == 2.0 ** 16
    finally:
        trainer.close()


# ----------------------------------------------------------------------------- reproduce: plans and signals

@pytest.mark.parametrize("case", ["fewer images than a batch", "an empty train folder"])
def test_a_data_folder_without_one_batch_is_one_line_for_the_plan_and_the_run(tiny_root, tmp_path, capsys, case):
    data = tmp_path / "data"
    if case == "an empty train folder":
        (data / "train" / "class0").mkdir(parents=True)
        count = "0"
    else:
        shutil.copytree(tiny_root, data)
        count = "160"
    for dry_run in (["--dry-run"], []):
        with pytest.raises(SystemExit) as stop:
            main(["reproduce", "1", "--rows", "14", "--data", str(data), "--out", str(tmp_path / "out"), *dry_run])
        assert stop.value.code == 2
        assert stderr_lines(capsys) == [
            f"error: reproduce --data {data}: {data / 'train'} holds {count} file(s) in its class folders, fewer than "
            "one global batch of resnet18_pgt.yaml (1024); give the ImageNet root (train/ and val/), or a smaller "
            "data.batch_size with --set"]
    assert not (tmp_path / "out").exists()


def test_an_out_that_is_a_file_is_refused_up_front(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "resnet18_pgt").write_text("not a folder")
    for out, message in ((tmp_path / "file", f"{tmp_path / 'file'} (--out) is a file, not a folder"),
                         (tmp_path / "file" / "sub", f"cannot create or write {tmp_path / 'file' / 'sub'} "
                                                     f"({tmp_path / 'file'} is a file)"),
                         (tmp_path / "out", f"{tmp_path / 'out' / 'resnet18_pgt'} (the run folder of "
                                            "resnet18_pgt.yaml) is a file, not a folder")):
        for dry_run in (["--dry-run"], []):
            with pytest.raises(SystemExit) as stop:
                main(["reproduce", "1", "--rows", "14", "--data", str(tmp_path / "imagenet"), "--out", str(out),
                      *dry_run])
            assert stop.value.code == 2 and stderr_lines(capsys) == [f"error: reproduce --out: {message}"]


def test_ctrl_c_to_reproduce_reaches_its_trainer_which_writes_its_checkpoint(tiny_root, tmp_path):
    """The interrupt goes to `reproduce` alone (as `kill -INT` does; a terminal's Ctrl-C reaches its
    process group, in which the trainer is not): it passes it on and waits for the trainer's stop
    checkpoint (not an epoch's: those are the only others), then says so; the next seed never starts."""
    from tests.test_reproduce import TINY
    out = tmp_path / "out"
    sets = [*TINY, "data.batch_size=2", "schedule.epochs=2", "model.name=test_resnet"]  # 80 steps an epoch
    args = ["reproduce", "1", "--data", str(tiny_root), "--rows", "14", "--seeds", "0,1", "--out", str(out),
            *[a for s in sets for a in ("--set", s)]]
    code = f"import sys\nsys.executable = {warm.interpreter()!r}\nfrom powergrad_train.cli import main\nmain({args!r})"
    proc = warm.popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                      start_new_session=True)
    for line in proc.stdout:  # until the trainer trains (its first progress line)
        if line.startswith("epoch 1/2 step"):
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=300)
    last = out / "resnet18_pgt" / "last.pt"
    assert proc.returncode == 128 + signal.SIGINT and last.is_file(), err[-3000:]
    state = checkpoint.load(last)["train_state"]
    assert state["batch_in_epoch"] > 0 or state["eval_pending"]  # (validating, if the signal came that late)
    lines = err.strip().splitlines()
    assert lines[-2].startswith("stopped by SIGINT ")  # the trainer's own word
    assert lines[-1] == (f"reproduce: stopped by SIGINT: resnet18_pgt.yaml (seed 0) wrote its checkpoint {last} "
                         f"(epoch {state['epoch']}, step {state['step']}); run the same reproduce command again to "
                         "continue from it")
    assert not (out / "resnet18_pgt-seed1").exists()


# ----------------------------------------------------------------------------- a worker lost under torchrun

def torchrun_job(run_dir, overrides, *options):
    return warm.popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *options,
                       "-m", "powergrad_train", "--config", "smoke.yaml", "--output", str(run_dir), "--resume", "auto",
                       *overrides], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def started_worker(torchrun_pid, rank, attempt):
    """The process torchrun started for `rank` in its restart `attempt`, or None (under tests/warm.py it
    stands in for the worker: killed, the worker is killed with it and torchrun sees it die of SIGKILL)."""
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            if parent != torchrun_pid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        if env.get(b"RANK") == b"%d" % rank and env.get(b"TORCHELASTIC_RESTART_COUNT") == b"%d" % attempt:
            return int(entry)
    return None


def wait_until(condition, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "waited in vain"
        time.sleep(0.05)


def saved_step(path):
    try:
        return checkpoint.load(path, verify=False)["train_state"]["step"]
    except checkpoint.CheckpointError:  # not there yet
        return -1


def test_a_worker_killed_under_torchrun_is_one_line_and_a_restart_resumes_exactly(tiny_root, tmp_path):
    """kill -9 of rank 1, then (after torchrun's restart) of rank 0: each time the survivor says so in one
    line, no traceback; torchrun --max-restarts restarts the group, which must not connect to the dead
    workers' addresses, and --resume auto continues to the weights of an uninterrupted run."""
    overrides = tiny_overrides(tiny_root, **SMALL, **{"data.batch_size": 4, "schedule.epochs": 1,
                                                      "checkpoint.every_steps": 2})  # 40 steps
    straight = torchrun_job(tmp_path / "straight", overrides)
    run_dir = tmp_path / "killed"
    # (torchrun looks at its workers every --monitor-interval s: by then warm's server has killed the worker too)
    job = torchrun_job(run_dir, overrides, "--max-restarts=2", "--monitor-interval=0.5")
    for attempt, victim in ((0, 1), (1, 0)):
        # Once the attempt's workers run, the attempt before has ended (its last write too): the step
        # they resume from is known. Killed after a checkpoint of their own, they are training, not starting.
        wait_until(lambda: started_worker(job.pid, victim, attempt), job)
        resumed_from = saved_step(run_dir / "last.pt")
        wait_until(lambda: saved_step(run_dir / "last.pt") > resumed_from, job)
        os.kill(started_worker(job.pid, victim, attempt), signal.SIGKILL)
    _, err = job.communicate(timeout=300)
    assert job.returncode == 0, err[-3000:]
    said = [line for line in err.splitlines() if line.startswith("error:")]
    assert [line.split(" of the run")[0] for line in said] == ["error: process 0", "error: process 1"], err[-3000:]
    for line in said:
        assert " lost contact with another, which ended without saying why (killed, out of memory, or its machine " \
               "failed): RuntimeError: " in line and line.endswith("; --resume auto continues from the last checkpoint")
    assert "Traceback" not in err and not any(line.startswith("[rank") for line in err.splitlines()), err[-3000:]
    _, straight_err = straight.communicate(timeout=300)
    assert straight.returncode == 0, straight_err[-3000:]
    assert_same_weights(load_weights(tmp_path / "straight" / "last.pt"), load_weights(run_dir / "last.pt"))
