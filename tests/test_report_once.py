"""The reproduction code computes each thing once: a report places each run against each paper row
once (its text, tables and figure plan read that one placement), and `reproduce` reads each run
folder's summary.csv once to say where the run stands.

The counts come from the real functions, wrapped to count their calls and then called: what they
return is what the code under test gets."""

import collections
import functools
import pathlib

from powergrad_train.config.build import build_config, dump
from powergrad_train.reproduction import paper, report, reproduce
from tests.test_report import R18_BASE, R18_PGT, write_run


def counted(monkeypatch, module, name, key):
    """`module.name`, called as before, each call counted under key(*args)."""
    calls, real = collections.Counter(), getattr(module, name)

    @functools.wraps(real)
    def counting(*args, **kwargs):
        calls[key(*args, **kwargs)] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, counting)
    return calls


def run_folder(tmp_path, name, recipe, *sets):
    """A run folder before its first epoch: its config.yaml alone."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.yaml").write_text(dump(build_config(recipe, list(sets))))
    return folder


def test_a_report_places_each_run_against_each_row_once(tmp_path, monkeypatch):
    by_row_and_run = lambda row, cfg, reading="global": (row, id(cfg))  # noqa: E731
    checks = {name: counted(monkeypatch, paper, name, by_row_and_run) for name in ("is_about", "differences")}
    beside_rows = [run_folder(tmp_path, "base-s0", R18_BASE.recipe), run_folder(tmp_path, "base-s1", R18_BASE.recipe,
                                                                                 "seed=1"),
                   run_folder(tmp_path, "pgt-s0", R18_PGT.recipe),  # with base: a paper pair
                   run_folder(tmp_path, "pgt-lr", R18_PGT.recipe, "optim.lr=0.2"),  # related to the PGT row
                   run_folder(tmp_path, "smoke", "smoke.yaml")]  # about no row
    no_row = [run_folder(tmp_path, "smoke-pgt", "smoke.yaml", "loss.pgt_alpha=0.25"), beside_rows[3], beside_rows[4]]
    for folders, heading in ((beside_rows, "# Runs beside the paper"), (no_row, "# Runs compared over seeds")):
        for calls in checks.values():
            calls.clear()
        text, _ = report.write_report(folders, tmp_path / "report")  # (the figure plan places nothing again)
        assert text.startswith(heading)
        assert sum(checks["is_about"].values()) == len(folders) * len(paper.ROWS)
        for name, calls in checks.items():
            assert max(calls.values()) == 1, f"paper.{name} asked twice about one run and row"
    assert "- pgt-lr: related to Table 1 resnet18 cosine PGT 0.25: differs in optim.lr (run 0.2, row 0.1)" in text
    assert "- smoke: closest to Table " in text


def test_reproduce_reads_each_run_folder_once_to_say_where_it_stands(tmp_path, monkeypatch):
    out = tmp_path / "runs"
    short = ["schedule.warmup_epochs=0", "schedule.cooldown_epochs=0"]
    runs = reproduce.plan(1, tmp_path / "imagenet", 1, out, [*short, "schedule.epochs=3"], [13, 14])
    for run, epochs in zip(runs, (1, 3)):  # one run part way, one finished
        write_run(run.output, build_config(run.row.recipe, [*short, f"schedule.epochs={epochs}"]), 70.0)
    reads = counted(monkeypatch, pathlib.Path, "read_text", lambda path, *a, **k: path)
    plan = reproduce.describe(runs, 1, reproduce.parse_throughput(None), tmp_path / "imagenet")
    assert "(continues after epoch 1)" in plan.splitlines()[0] and "(finished: skipped)" in plan.splitlines()[2]
    summaries = {path: n for path, n in reads.items() if path.name == "summary.csv"}
    assert summaries == {run.output / "summary.csv": 1 for run in runs}
