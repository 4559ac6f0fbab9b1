"""DDP with 2 CPU processes under gloo, through the real torchrun launcher, against one process."""

import sys

import pytest
import torch

from tests import warm
from tests.conftest import REPO, assert_same_weights, tiny_overrides
from tests.ddp_worker import train_and_save

NOBN = {"model.name": "resnet18_nobn", "loss.pgt_alpha": 0.25, "loss.label_smoothing": 0.1,
        "grad_clip.mode": "agc", "grad_clip.value": 0.02, "schedule.epochs": 1, "optim.lr": 0.02}


def torchrun(nproc, run_dir, overrides):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "tests" / "ddp_worker.py"), str(run_dir), *[o.removeprefix("--set=") for o in overrides]]
    result = warm.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def one_process(run_dir, overrides):
    """The same training in this test's own process (what torchrun with one process runs)."""
    train_and_save(run_dir, [o.removeprefix("--set=") for o in overrides])


def weights(run_dir, rank=0):
    return torch.load(run_dir / f"weights-rank{rank}.pt", weights_only=True)


def assert_close_weights(a, b):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def two_process_run(tiny_root, module_tmp):
    run_dir = module_tmp / "ddp" / "two"
    result = torchrun(2, run_dir, tiny_overrides(tiny_root, **NOBN))
    return run_dir, result


def test_two_processes_train_and_only_rank0_writes(two_process_run):
    run_dir, result = two_process_run
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert (run_dir / "summary.csv").read_text().count("\n") == 2  # header + one epoch, written once
    assert result.stdout.count("epoch 1:") == 1
    assert (run_dir / "last.pt").is_file()
    assert_same_weights(weights(run_dir, 0), weights(run_dir, 1))


def test_two_processes_match_one_process_with_the_same_global_batch(two_process_run, tiny_root, tmp_path):
    one = tmp_path / "one"
    one_process(one, tiny_overrides(tiny_root, **NOBN))
    assert_close_weights(weights(two_process_run[0]), weights(one))


def test_accumulation_matches_more_processes(two_process_run, tiny_root, tmp_path):
    """1 process x 2 micro-batches gives the update of 2 processes x 1 (PGT, smoothing, AGC on)."""
    acc = tmp_path / "acc"
    one_process(acc, tiny_overrides(tiny_root, **NOBN, **{"train.accumulate_steps": 2}))
    assert_close_weights(weights(two_process_run[0]), weights(acc))

