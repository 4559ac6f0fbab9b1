"""The report's arms and comparisons: runs grouped into arms by their resolved config, two arms that
differ in one setting compared over their seeds (checked against scipy and by hand), the report's
order with and without paper rows, and its command-line mistakes.

Run folders written by the tests (config.yaml and summary.csv, as training writes them) give the
seeds without training; one end-to-end test trains two seeds per arm on generated images through
the CLI and draws the figures."""

import csv
import math
import os
import statistics

import pytest
from scipy import stats

from powergrad_train.cli import main
from powergrad_train.config.build import build_config
from powergrad_train.config.schema import KEYS
from powergrad_train.data.demo import write_demo_dataset
from powergrad_train.reproduction import paper, report, seed_stats
from powergrad_train.reproduction.report import read_run
from tests.conftest import tiny_overrides
from tests.test_report import R18_BASE, R18_PGT, row_line, row_run, write_run

SETTING = ["model.name=resnet18", "model.num_classes=10", "data.image_size=32", "data.batch_size=64",
           "schedule.epochs=4", "schedule.warmup_epochs=0", "schedule.cooldown_epochs=0"]
PGT = "loss.pgt_alpha=0.25"
BASE_FINAL = {0: 70.1, 1: 70.3, 2: 70.2}
PGT_FINAL = {0: 70.4, 1: 70.55, 2: 70.55}  # 0.3, 0.25 and 0.35 above their seed's baseline
PGT_BEST = {0: 0.0, 1: 1.2, 2: 0.0}  # best epoch above the final: best-epoch gains 0.3, 1.45, 0.35
T_975_DF2 = 4.302652729911275  # Student's t, 97.5% quantile at 2 degrees of freedom (printed tables: 4.303)


def arm_runs(tmp_path, name, finals, *sets, best=None):
    """One arm: a run folder `<name>-s<seed>` per seed, its final test top-1 `finals[seed]` (its best
    epoch `best[seed]` above it; train top-1 is 2 above test) after 4 epochs."""
    return [read_run(write_run(tmp_path / f"{name}-s{seed}", build_config(None, [*SETTING, f"seed={seed}", *sets]),
                               value, best_offset=(best or {}).get(seed, 0.0))) for seed, value in finals.items()]


def gain_line(text, which):
    return next(line for line in text.splitlines() if line.startswith(f"| {which} epoch |"))


def needed_by_hand(noise, effect, paired):
    """The smallest n with (t_.975 + t_.8) * se(n) <= effect: se = noise / sqrt(n) over n - 1 degrees
    of freedom paired, noise * sqrt(2 / n) over 2n - 2 unpaired."""
    n = 2
    while True:
        se, df = (noise / math.sqrt(n), n - 1) if paired else (noise * math.sqrt(2 / n), 2 * n - 2)
        if (stats.t.ppf(0.975, df) + stats.t.ppf(0.8, df)) * se <= effect:
            return n
        n += 1


def spread(values):
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


# ----------------------------------------------------------------------------- statistics of a comparison

def test_three_seeds_per_arm_are_paired_by_seed_against_scipy_and_by_hand(tmp_path):
    runs = arm_runs(tmp_path, "plain", BASE_FINAL) + arm_runs(tmp_path, "pgt", PGT_FINAL, PGT, best=PGT_BEST)
    text = report.Report(runs).text
    assert "### resnet18 cosine, 4 epochs: baseline vs PGT 0.25" in text
    best = {s: v + PGT_BEST[s] for s, v in PGT_FINAL.items()}
    trained = [v + 2 for v in PGT_FINAL.values()]
    # PGT's mean passes the baseline's final 70.20 at its best epoch, 3; the baseline never reaches PGT's 70.50.
    assert (f"| PGT 0.25 | pgt-s0, pgt-s1, pgt-s2 | 3 | 0, 1, 2 | {spread(trained)} | {spread(PGT_FINAL.values())} | "
            f"{spread(best.values())} | epoch 3 of 4 (baseline final 70.20) |") in text
    assert (f"| baseline | plain-s0, plain-s1, plain-s2 | 3 | 0, 1, 2 | {spread([v + 2 for v in BASE_FINAL.values()])} "
            f"| {spread(BASE_FINAL.values())} | {spread(BASE_FINAL.values())} | never (PGT 0.25 final 70.50) |") in text
    for which, pgt, verdict in (("final", PGT_FINAL, "resolved"), ("best", best, "within noise")):
        ref = stats.ttest_rel(list(pgt.values()), list(BASE_FINAL.values()))
        low, high = ref.confidence_interval()
        diffs = [pgt[s] - BASE_FINAL[s] for s in BASE_FINAL]
        gain, sd = statistics.fmean(diffs), statistics.stdev(diffs)
        half = T_975_DF2 * sd / math.sqrt(3)  # by hand: the differences' mean ± t * sd / sqrt(n)
        assert (low, high) == pytest.approx((gain - half, gain + half), abs=1e-9)
        assert gain_line(text, which) == (f"| {which} epoch | {gain:+.2f} | [{low:+.2f}, {high:+.2f}] | "
                                          f"{ref.pvalue:.2g} | paired | {verdict} | "
                                          f"{needed_by_hand(sd, gain, paired=True)} |")
    # --effect: the seeds needed for a gain of that size instead of the observed one
    text = report.Report(runs, effect=0.1).text
    assert "| seeds per arm to resolve a gain of 0.1 |" in text
    assert gain_line(text, "final").endswith(f"| {needed_by_hand(0.05, 0.1, paired=True)} |")


def test_arms_without_the_same_seeds_get_welchs_interval(tmp_path):
    base, pgt = {0: 70.0, 1: 70.2, 2: 70.4}, {3: 70.5, 4: 70.6, 5: 70.7}
    text = report.Report(arm_runs(tmp_path, "plain", base) + arm_runs(tmp_path, "pgt", pgt, PGT)).text
    ref = stats.ttest_ind(list(pgt.values()), list(base.values()), equal_var=False)
    low, high = ref.confidence_interval()
    # By hand: variances 0.04 and 0.01 over 3 seeds: se^2 = 0.05 / 3, Welch-Satterthwaite df = 50 / 17.
    half = stats.t.ppf(0.975, 50 / 17) * math.sqrt(0.05 / 3)
    assert (low, high) == pytest.approx((0.4 - half, 0.4 + half), abs=1e-9)
    needed = needed_by_hand(math.sqrt(0.025), 0.4, paired=False)  # the two arms' variances pooled
    assert gain_line(text, "final") == (f"| final epoch | +0.40 | [{low:+.2f}, {high:+.2f}] | {ref.pvalue:.2g} | "
                                        f"Welch | within noise | {needed} |")
    # Seeds 0, 1, 2 against 0, 4, 5: not the same seeds, so not paired.
    shared = arm_runs(tmp_path / "b", "plain", base) + arm_runs(tmp_path / "b", "pgt", {0: 70.5, 4: 70.6, 5: 70.7}, PGT)
    assert "| Welch |" in gain_line(report.Report(shared).text, "final")


# ----------------------------------------------------------------------------- which arms are compared

def test_a_third_arm_that_differs_in_two_keys_is_not_compared_and_the_keys_are_named(tmp_path):
    runs = (arm_runs(tmp_path, "plain", BASE_FINAL) + arm_runs(tmp_path, "pgt", PGT_FINAL, PGT)
            + arm_runs(tmp_path, "lr", {0: 69.0, 1: 69.5, 2: 69.2}, PGT, "optim.lr=0.2"))
    text = report.Report(runs).text
    assert [line for line in text.splitlines() if line.startswith("### ")] == [
        "### resnet18 cosine, 4 epochs: baseline vs PGT 0.25"]
    assert ("- lr-s0, lr-s1, lr-s2 and plain-s0, plain-s1, plain-s2: they differ in loss.pgt_alpha (0.25 vs null), "
            "and also in optim.lr (0.2 vs 0.1)") in text
    # Compared by optim.lr instead, the third arm and the PGT one are a comparison, the baseline apart.
    text = report.Report(runs, keys=report.compare_keys("optim.lr")).text
    assert [line for line in text.splitlines() if line.startswith("### ")] == [
        "### resnet18 cosine, 4 epochs, PGT 0.25: optim.lr 0.1 vs optim.lr 0.2"]


def test_compare_optim_name_answers_whether_adamw_beats_sgd(tmp_path):
    adamw = {0: 71.0, 1: 71.4, 2: 70.9}
    runs = (arm_runs(tmp_path, "adamw", adamw, "optim.name=adamw") + arm_runs(tmp_path, "sgd", BASE_FINAL)
            + arm_runs(tmp_path, "pgt", PGT_FINAL, PGT))
    text = report.Report(runs, keys=report.compare_keys("optim.name")).text
    # SGD (the default) is the base though AdamW was given first; momentum and betas, each used by one
    # optimizer alone, keep no two arms apart.
    assert [line for line in text.splitlines() if line.startswith("### ")] == [
        "### resnet18 cosine, 4 epochs, baseline: optim.name sgd vs optim.name adamw"]
    assert "| optim.name adamw minus optim.name sgd (test top-1) |" in text
    ref = stats.ttest_rel(list(adamw.values()), list(BASE_FINAL.values()))
    low, high = ref.confidence_interval()
    gain = statistics.fmean(adamw.values()) - statistics.fmean(BASE_FINAL.values())
    assert gain_line(text, "final").startswith(
        f"| final epoch | {gain:+.2f} | [{low:+.2f}, {high:+.2f}] | {ref.pvalue:.2g} | paired | resolved |")
    assert ("- pgt-s0, pgt-s1, pgt-s2 and adamw-s0, adamw-s1, adamw-s2: they differ in optim.name (sgd vs adamw), "
            "and also in loss.pgt_alpha (0.25 vs null)") in text
    assert "| 0.1 | baseline | off | optim.name adamw | 0, 1, 2 | finished |" in text  # the arms table names it
    # The same runs by the loss method (the default): SGD against PGT alone.
    assert [line for line in report.Report(runs).text.splitlines() if line.startswith("### ")] == [
        "### resnet18 cosine, 4 epochs: baseline vs PGT 0.25"]


BOOKKEEPING_VALUES = {
    "data.root": "/data/elsewhere", "data.backend": "dali", "data.dali_device": "cpu",
    "data.val_backend": "torchvision", "data.workers": 1, "data.val_batch_size": 32, "channels_last": "true",
    "tf32": "false", "model.compile": "true",
    "train.accumulate_steps": 2, "checkpoint.keep_last": 7, "checkpoint.every_steps": 5,
    "train.log_every_steps": 3, "train.max_nonfinite_steps": 4, "log.outputs": "[csv]",
}


def test_bookkeeping_keys_are_defined_once_for_arms_and_for_rows(tmp_path):
    """A seed run on another machine (data elsewhere, other loader and speed settings, other
    checkpointing and logs) is a seed of the same arm, and of the same paper row."""
    assert set(BOOKKEEPING_VALUES) == set(paper.BOOKKEEPING_KEYS)
    assert set(paper.SETTING_KEYS) | set(paper.BOOKKEEPING_KEYS) | {"seed"} == set(KEYS)
    assert not set(paper.ROW_KEYS) & set(paper.BOOKKEEPING_KEYS)
    elsewhere = [f"{k}={v}" for k, v in BOOKKEEPING_VALUES.items()]
    assert paper.matches(R18_PGT, build_config(R18_PGT.recipe, ["seed=3", *elsewhere]))
    runs = arm_runs(tmp_path, "here", {0: 70.0, 1: 70.2}) + arm_runs(tmp_path, "there", {2: 70.1}, *elsewhere)
    assert [[r.name for r in arm.runs] for arm in report.group_arms(runs)] == [["here-s0", "here-s1", "there-s2"]]
    # A setting that changes the training (batch norm over all processes) makes another arm.
    runs += arm_runs(tmp_path, "sync", {0: 70.0}, "model.sync_bn=true")
    assert len(report.group_arms(runs)) == 2


# ----------------------------------------------------------------------------- the report's order

def test_the_report_leads_with_the_paper_only_when_a_run_is_a_paper_row(tmp_path):
    mine = arm_runs(tmp_path, "plain", BASE_FINAL) + arm_runs(tmp_path, "pgt", PGT_FINAL, PGT)
    text = report.Report(mine).text
    assert text.startswith("# Runs compared over seeds\n\n## Comparisons\n") and "## Table" not in text
    assert text.index("### resnet18 cosine") < text.index("## Arms") < text.index("None of the runs is a row")
    # The closest row, once per arm (not once per seed).
    assert [line.split(": ")[:2] for line in text.splitlines() if line.startswith("- ")] == [
        ["- plain-s0, plain-s1, plain-s2", "related to Table 1 resnet18 cosine baseline"],
        ["- pgt-s0, pgt-s1, pgt-s2", "related to Table 1 resnet18 cosine PGT 0.25"]]
    # The authors' logs given: their tables follow the comparisons.
    assert text.index("## Arms") < report.Report(mine, reference=report.Reference({}, {})).text.index("## Table 1")
    # Runs of a paper row given too: the tables first, then the comparison of the other arms (not
    # the rows' pair again: Table 1's gains hold it), then the runs that are no row.
    rows = [read_run(row_run(tmp_path, row, f"{name}{s}", 70.0 + s / 10 + gain, seed=s))
            for row, name, gain in ((R18_BASE, "b", 0.0), (R18_PGT, "p", 0.2)) for s in (0, 1)]
    text = report.Report(mine + rows).text
    assert text.startswith("# Runs beside the paper\n")
    assert text.index("## Table 1") < text.index("## Comparisons") < text.index("## Other runs")
    assert [line for line in text.splitlines() if line.startswith("### ")] == [
        "### resnet18 cosine, 4 epochs: baseline vs PGT 0.25"]
    assert "| 2 seeds (0, 1), finished |" in row_line(text, R18_PGT.label)


# ----------------------------------------------------------------------------- the command line

EFFECT = "report --effect: the gain to resolve, in points of test top-1, must be a number > 0, got"


@pytest.mark.parametrize("args,message", [
    (["--compare", "optim.nme"], "report --compare: 'optim.nme' is not a config key (did you mean optim.name?)"),
    (["--compare", "data.workers"], "report --compare: data.workers never changes what a run trains"),
    (["--compare", "seed"], "report --compare: seed: the runs of one arm are its seeds"),
    (["--effect", "nan"], f"{EFFECT} nan"),
    (["--effect", "0"], f"{EFFECT} 0"),
    (["--out", "{file}"], "report --out: {file} is a file, not a folder (report.md and the figures go into a folder)"),
    (["--out", "{file}/report"], "report --out: {file} is a file, not a folder, so {file}/report cannot be made"),
])
def test_report_option_mistakes_are_one_line_and_write_nothing(tmp_path, capsys, args, message):
    run = write_run(tmp_path / "run", build_config(None, SETTING), 70.0)
    (tmp_path / "notes.txt").write_text("mine\n")
    args = [a.format(file=tmp_path / "notes.txt") for a in args]
    with pytest.raises(SystemExit) as stop:
        main(["report", str(run), "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(f"error: {message.format(file=tmp_path / 'notes.txt')}")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "run"]
    assert (tmp_path / "notes.txt").read_text() == "mine\n"


# ----------------------------------------------------------------------------- end to end

def test_two_seeds_per_arm_trained_through_the_cli_give_one_comparison_and_its_figures(tmp_path, capsys):
    """Plain and PGT, seeds 0 and 1, one epoch on generated images. A folder given twice, once by a
    link, counts once."""
    write_demo_dataset(tmp_path / "data", {"train": 1, "val": 1})  # 10 images each: one step an epoch
    folders = {}
    for alpha in ("null", "0.25"):
        for seed in (0, 1):
            folder = folders[alpha, seed] = tmp_path / f"a{alpha}-s{seed}"
            one_step = {"schedule.epochs": 1, "data.batch_size": 10, "schedule.warmup_epochs": 0}
            main(["--config", "smoke.yaml", "--output", str(folder), *tiny_overrides(
                tmp_path / "data", **{"loss.pgt_alpha": alpha, "seed": seed, "log.outputs": "[csv]", **one_step})])
    os.symlink(folders["0.25", 1], tmp_path / "link")
    capsys.readouterr()
    main(["report", *map(str, folders.values()), str(folders["0.25", 0]), str(tmp_path / "link"),
          "--out", str(tmp_path / "report")])
    text = capsys.readouterr().out
    assert (tmp_path / "report" / "report.md").read_text() == text.split("\nwritten: ")[0]
    assert text.startswith("# Runs compared over seeds\n\n## Comparisons\n")
    assert [line for line in text.splitlines() if line.startswith("### ")] == [
        "### resnet10t cosine, 1 epoch: baseline vs PGT 0.25"]
    final = {key: float(list(csv.DictReader(open(f / "summary.csv")))[-1]["eval_top1"]) for key, f in folders.items()}
    base, pgt = ({s: final[alpha, s] for s in (0, 1)} for alpha in ("null", "0.25"))
    assert "| PGT 0.25 | a0.25-s0, a0.25-s1 | 2 | 0, 1 | " in text
    g = seed_stats.compare(base, pgt)
    assert gain_line(text, "final").startswith(f"| final epoch | {g.gain:+.2f} | [{g.low:+.2f}, {g.high:+.2f}] | "
                                               f"{g.p:.2g} | paired | {g.verdict} |")
    assert "| a0.25-s0, a0.25-s1 | resnet10t |" in text.split("## Arms")[1]  # in the arms table too, once
    # The comparison's two figures, the seeds in them: no figure of a seed on its own.
    names = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert names == ["accuracy.png", "alpha.png", "filters-resnet10t-baseline-vs-PGT-0.25.png",
                     "pair-resnet10t-baseline-vs-PGT-0.25.png"]
    for name in names:
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
