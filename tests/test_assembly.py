"""One assembly path: train, --dry-run, validate and bench make the same checks in the same order and
refuse the same recipe with the same line; the checkpoint's parts and summary.csv's columns follow the
parts a run is built with (a weight average under its own name, an objective with a state)."""

from __future__ import annotations

import copy
import csv
import sys

import torch

from powergrad_train.cli import main
from powergrad_train.training import checkpoint, run, run_folder
from tests.conftest import refused, tiny_overrides


def test_every_command_checks_the_data_folder_before_the_model(two_epoch_run, tiny_root, tmp_path, capsys):
    """A recipe with two mistakes gets the same first one from every command: the checks run in one order
    (validate and bench checked the model first, and validate the data folder only once the process group
    was up)."""
    mistakes = [f"--set=data.root={tmp_path / 'missing'}", "--set=model.name=no_such_model"]
    commands = {
        "train": ["--config", "smoke.yaml", "--output", tmp_path / "run", *tiny_overrides(tiny_root), *mistakes],
        "dry run": ["--config", "smoke.yaml", "--output", tmp_path / "run", "--dry-run", *tiny_overrides(tiny_root),
                    *mistakes],
        "validate": ["validate", "--checkpoint", two_epoch_run / "last.pt", *mistakes],
        "bench": ["bench", "--config", "smoke.yaml", "--data", "real", "--steps", "1", "--warmup", "0",
                  *tiny_overrides(tiny_root), *mistakes],
    }
    lines = {name: refused(capsys, *args) for name, args in commands.items()}
    assert set(lines.values()) == {f"error: data.root: folder '{tmp_path / 'missing'}' does not exist"}, lines
    assert not (tmp_path / "run").exists()


def test_a_missing_tracker_package_is_refused_by_every_command_that_builds_the_outputs(
        tiny_root, tmp_path, monkeypatch, capsys):
    """--dry-run built no outputs, so it passed a recipe the start then refused."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without the package has
    overrides = [*tiny_overrides(tiny_root), "--set=log.outputs=[csv,wandb]"]
    commands = {"train": ["--config", "smoke.yaml", "--output", tmp_path / "run", *overrides],
                "dry run": ["--config", "smoke.yaml", "--output", tmp_path / "run", "--dry-run", *overrides],
                "bench": ["bench", "--config", "smoke.yaml", "--steps", "1", "--warmup", "0", *overrides]}
    lines = {name: refused(capsys, *args) for name, args in commands.items()}
    assert set(lines.values()) == {'error: log.outputs: wandb needs the wandb package: pip install -e ".[wandb]"'}, lines
    assert not (tmp_path / "run").exists()


def test_a_summary_csv_without_its_header_is_refused_by_a_dry_run_too(tiny_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / run_folder.MARKER).write_text("")
    (run_dir / "summary.csv").write_text("1,2,3\n")  # an earlier try's folder, its header edited away
    args = ["--config", "smoke.yaml", "--output", run_dir, *tiny_overrides(tiny_root)]
    lines = {refused(capsys, *args, *extra) for extra in ([], ["--dry-run"])}
    assert len(lines) == 1 and lines.pop().startswith(
        f"error: {run_dir / 'summary.csv'}: its first line is not a header with an 'epoch' column")
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([run_folder.MARKER, "summary.csv"])
    assert (run_dir / "summary.csv").read_text() == "1,2,3\n"


def test_a_checkpoint_whose_parts_do_not_fit_is_refused_by_a_dry_run_too(two_epoch_run, tiny_root, tmp_path, capsys):
    """--resume-force lets a changed model through the config check; restoring the checkpoint's parts
    then fails, and --dry-run, which restored none, passed."""
    saved = two_epoch_run / "epoch-0001.pt"
    args = ["--config", "smoke.yaml", "--output", tmp_path / "new", "--resume", saved, "--resume-force",
            *tiny_overrides(tiny_root, **{"model.name": "resnet14t"})]
    lines = {refused(capsys, *args, *extra) for extra in ([], ["--dry-run"])}
    assert len(lines) == 1 and lines.pop().startswith(f"error: {saved}: its model does not fit this run (")
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------- parts with a state of their own

class UniformAverage:
    """A weight average named `swa`: the plain mean of the weights after every applied step (stochastic
    weight averaging's), as a user's own part would be."""

    name = "swa"

    def __init__(self, model: torch.nn.Module):
        self.module = copy.deepcopy(model)
        self.count = torch.zeros((), device=next(model.parameters()).device)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, skipped: torch.Tensor) -> None:
        applied = 1.0 - skipped.float().reshape(())
        self.count += applied
        for average, value in zip(self.module.state_dict().values(), model.state_dict().values()):
            if average.is_floating_point():
                average += (value - average) * applied / self.count.clamp(min=1)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.count.copy_(state["count"])


class CountingObjective:
    """The recipe's objective, counting the micro-batches it scored: an objective with a state."""

    def __init__(self, objective):
        self.objective, self.calls = objective, 0

    def __call__(self, logits, targets):
        self.calls += 1
        return self.objective(logits, targets)

    def describe(self) -> str:
        return self.objective.describe()

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]


def test_parts_with_a_state_are_checkpoint_parts_and_a_weight_average_has_its_own_column(
        two_epoch_run, tiny_root, tmp_path, monkeypatch, capsys):
    build_objective = run.build_objective
    monkeypatch.setattr(run, "build_objective", lambda cfg: CountingObjective(build_objective(cfg)))
    monkeypatch.setattr(run, "build_weight_average", lambda cfg, model: UniformAverage(model))
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    main(["--config", "smoke.yaml", "--output", str(first), *tiny_overrides(tiny_root)])
    epoch_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ") and "val loss" in line]
    assert len(epoch_lines) == 2 and all(" (swa " in line for line in epoch_lines), epoch_lines
    saved = checkpoint.load(first / "last.pt")
    assert saved["objective"] == {"calls": 20} and int(saved["swa"]["count"]) == 20  # 10 steps an epoch
    with open(first / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [0 <= float(r["eval_swa_top1"]) <= 100 for r in rows] == [True, True]

    # Resumed after epoch 1 elsewhere: both parts continue from the checkpoint.
    main(["--config", "smoke.yaml", "--output", str(resumed), "--resume", str(first / "epoch-0001.pt"),
          *tiny_overrides(tiny_root)])
    again = checkpoint.load(resumed / "last.pt")
    assert again["objective"] == {"calls": 20} and int(again["swa"]["count"]) == 20
    with open(resumed / "summary.csv", newline="") as f:
        assert [r["eval_swa_top1"] for r in csv.DictReader(f)] == [rows[1]["eval_swa_top1"]]

    # A checkpoint saved before the objective kept a state (and with no weight average): it starts fresh.
    monkeypatch.setattr(run, "build_weight_average", lambda cfg, model: None)
    old = tmp_path / "old"
    main(["--config", "smoke.yaml", "--output", str(old), "--resume", str(two_epoch_run / "epoch-0001.pt"),
          *tiny_overrides(tiny_root)])
    assert checkpoint.load(old / "last.pt")["objective"] == {"calls": 10}


def test_a_weight_average_named_like_another_checkpoint_part_is_one_line(tiny_root, monkeypatch, capsys):
    """A package's weight average whose name is taken (its state would replace the optimizer's): refused
    before anything is written, in one line, as the package's other faults are."""
    class Misnamed(UniformAverage):
        name = "optimizer"

    monkeypatch.setattr(run, "build_weight_average", lambda cfg, model: Misnamed(model))
    line = refused(capsys, "--config", "smoke.yaml", "--dry-run", *tiny_overrides(tiny_root))
    assert line.startswith("error: weight_average.name = none: its name 'optimizer' is that of another "
                           "checkpoint part (model, optimizer, scaler, train_state, outputs"), line
