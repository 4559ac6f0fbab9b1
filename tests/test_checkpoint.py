"""Atomic checkpoint files, clear errors for bad ones, RNG round trips."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from powergrad_train.system.errors import CheckpointError
from powergrad_train.training import checkpoint
from powergrad_train.training.checkpoint import Checkpointer, RngState, load, save_atomic


def state(value: float) -> dict:
    return {"format": checkpoint.FORMAT, "model": {"w": torch.full((3,), value)}}


def checkpointer(run_dir, keep_last):
    return Checkpointer(run_dir, keep_last, parts={}, per_rank={}, meta={})


def test_save_load_and_keep_last(tmp_path):
    ckpt = checkpointer(tmp_path, keep_last=2)
    for epoch in range(1, 5):
        ckpt.write(state(epoch), epoch, is_best=epoch == 2, numbered=True)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["best.pt", "epoch-0003.pt", "epoch-0004.pt", "last.pt"]
    assert load(ckpt.last)["model"]["w"][0] == 4
    assert load(ckpt.best)["model"]["w"][0] == 2
    assert not list(tmp_path.glob(".*tmp*"))


def test_keep_last_zero_writes_only_last(tmp_path):
    ckpt = checkpointer(tmp_path, keep_last=0)
    ckpt.write(state(1), 1, is_best=True, numbered=True)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["best.pt", "last.pt"]


def test_crash_while_writing_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic(state(1), path)

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt  # as if killed mid-write

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_atomic(state(2), path)
    monkeypatch.undo()
    assert load(path)["model"]["w"][0] == 1


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", "truncated"])
def test_bad_files_give_one_clear_error(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content == "truncated":
        save_atomic(state(1), tmp_path / "good.pt")
        content = (tmp_path / "good.pt").read_bytes()[:200]
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"bad\.pt: not a readable checkpoint, truncated or not a checkpoint"):
        load(path)


def test_foreign_torch_file_and_missing_file(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a powergrad-train checkpoint"):
        load(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load(tmp_path / "missing.pt")


class NotAllowed:
    pass


def test_a_file_outside_the_allow_list_is_named_as_such(tmp_path):
    torch.save({"format": checkpoint.FORMAT, "thing": NotAllowed()}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match=r"pickled\.pt: holds Python objects besides tensors, plain values and "
                                              r"argparse\.Namespace"):
        load(tmp_path / "pickled.pt")


@pytest.mark.parametrize("error, message", [
    (PermissionError(13, "Permission denied"), "cannot read checkpoint x.pt (Permission denied)"),
    (OSError(5, "Input/output error"), "cannot read checkpoint x.pt (Input/output error)"),
    (torch.OutOfMemoryError("cannot allocate 4 GiB"), "not enough memory to load checkpoint x.pt"),
    (MemoryError(), "not enough memory to load checkpoint x.pt"),
])
def test_load_failures_are_reported_as_what_they_are(error, message):
    assert str(checkpoint.load_failure(Path("x.pt"), error)).startswith(message)


def test_an_unexpected_load_failure_keeps_its_type():
    error = ValueError("a bug")
    assert checkpoint.load_failure(Path("x.pt"), error) is error


def test_rng_states_round_trip_through_a_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_atomic({"format": checkpoint.FORMAT, "rng": RngState().state_dict()}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    RngState().load_state_dict(load(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])
