"""The report: runs placed by their exact config, seeds with statistics, the authors' logs, the figures.

Two real tiny runs (the shared baseline `two_epoch_run` and a PGT partner trained here) give real
curves and diagnostics; run folders written by the tests (config.yaml, summary.csv, diagnostics)
give the exact matches and the seeds the statistics need, without training."""

import csv
import math
import shutil
import statistics

import numpy as np
import pytest
from scipy import stats

from powergrad_train.cli import main
from powergrad_train.config.build import build_config, dump
from powergrad_train.config.schema import KEYS, get
from powergrad_train.reproduction import paper, report, seed_stats
from powergrad_train.reproduction.report import read_run, tables
from powergrad_train.reproduction.report_figures import alpha_groups, main_path_convs
from powergrad_train.training.diagnostics import save_filter_norms
from powergrad_train.training.outputs import SUMMARY_COLUMNS, RunInfo, SummaryCsv, trim_summary_csv
from tests.conftest import tiny_overrides

ROW = {r.label: r for r in paper.table_rows(1)}
R18_BASE, R18_PGT = ROW["resnet18 cosine baseline"], ROW["resnet18 cosine PGT 0.25"]
GC_PGT = next(r for r in paper.ROWS if r.recipe == "nobn_b256_gc_pgt.yaml")


@pytest.fixture(scope="module")
def pgt_run(tiny_root, module_tmp):
    """The PGT 0.25 partner of `two_epoch_run`: the same tiny settings, alpha aside."""
    folder = module_tmp / "report" / "pgt"
    main(["--config", "smoke.yaml", "--output", str(folder), *tiny_overrides(tiny_root, **{"loss.pgt_alpha": 0.25})])
    return folder


def write_run(folder, cfg, test_top1, best_offset=0.0, seed_curve=0.0, diagnostics=None):
    """A run folder as training writes it: config.yaml, and a summary.csv whose test top-1 climbs
    to `test_top1` at the last epoch (the best epoch `best_offset` above it, one epoch earlier)."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(dump(cfg))
    epochs = cfg.schedule.epochs
    with open(folder / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, SUMMARY_COLUMNS)
        w.writeheader()
        for e in range(1, epochs + 1):
            top1 = test_top1 * e / epochs + seed_curve
            if e == epochs - 1:
                top1 = test_top1 + best_offset
            if e == epochs:
                top1 = test_top1
            w.writerow({"epoch": e, "step": e * 10, "train_loss": 2.0 - e / epochs, "train_top1": top1 + 2,
                        "eval_loss": 1.0, "eval_top1": top1, "eval_top5": 90, "lr": 0.1, "images_per_sec": 1000,
                        "epoch_time_s": 1, "logit_norm": 10.0, "eval_logit_norm": 9.0, "zeroed_filters": 0,
                        "dead_features": 0})
    for epoch, norms in (diagnostics or {}).items():
        save_filter_norms(norms, folder, epoch)
    return folder


def row_run(tmp_path, row, name, test_top1, seed=0, **kw):
    return write_run(tmp_path / name, build_config(row.recipe, [f"seed={seed}"]), test_top1, **kw)


def report_text(capsys, *args):
    main(["report", *map(str, args)])
    return capsys.readouterr().out


def tables_of(*folders, reading="global"):
    """The report's text without its figures (the statistics tests need no PNGs)."""
    return tables(report.Report([read_run(f) for f in folders], reading=reading))


def row_line(text, label):
    return next(line for line in text.splitlines() if line.startswith(f"| {label} |"))


# ----------------------------------------------------------------------------- which row a run is

def with_other_value(row, key):
    """The row recipe's config with `key` set to another valid value."""
    current = get(paper.row_config(row), key)
    k = KEYS[key]
    if key == "model.name":
        value = "resnet34"
    elif key == "model.init_from":
        value = "/weights/pretrained.pth"
    elif k.meta["choices"]:
        value = next(c for c in k.meta["choices"] if c not in (current, "none"))
    elif k.type is bool:
        value = str(not current).lower()
    elif k.type is int or key == "schedule.warmup_epochs":  # the authors' schedule wants whole epochs
        value = current + 1
    else:
        value = {"data.crop_pct": 0.9, "data.crop_scale_min": 0.35}.get(key, current / 2 if current else 0.1)
    return build_config(row.recipe, [f"{key}={value}"])


# (a key with a single allowed value, such as loss.name while one objective is registered, cannot differ)
@pytest.mark.parametrize("key", [k for k in paper.ROW_KEYS if len(KEYS[k].meta["choices"] or "ab") > 1])
def test_a_run_that_differs_in_any_key_a_row_fixes_is_related_never_the_row(key):
    # A cosine row ignores the step decay, and a row without clipping its threshold: those on rows that use them.
    row = GC_PGT if key.startswith("grad_clip.") else \
        next(r for r in (R18_PGT, ROW["resnet18 step PGT 0.25"]) if key not in paper.unused(paper.row_config(r)))
    cfg = with_other_value(row, key)
    assert paper.matches(row, build_config(row.recipe))
    assert not paper.matches(row, cfg)
    assert [d[0] for d in paper.differences(row, cfg)] == [key]
    subject = paper.SUBJECT_KEYS + (("data.batch_size",) if row.batch else ())
    assert paper.is_about(row, cfg) == (key not in subject)
    assert not any(paper.matches(r, cfg) for r in paper.ROWS)


def test_keys_a_row_does_not_fix_keep_the_run_the_row():
    cfg = build_config(R18_PGT.recipe, ["seed=5", "data.root=/elsewhere", "data.workers=2", "channels_last=false",
                                        "train.accumulate_steps=2", "checkpoint.keep_last=9", "tf32=false"])
    assert paper.matches(R18_PGT, cfg)


def test_the_step_pgt_row_is_labelled_with_the_alpha_its_recipe_runs():
    row = ROW["resnet50 step PGT 0.3 (Table 1 prints 0.05)"]
    assert row.alpha == 0.3 == build_config(row.recipe).loss.pgt_alpha
    assert not paper.matches(row, build_config(row.recipe, ["loss.pgt_alpha=0.05"]))


def test_table2_per_gpu_reading_files_a_b256_run_at_batch_1024_under_256(tmp_path, capsys):
    """Read per GPU, row "256" trains 1024 images a step on the authors' 4 GPUs: a b256 recipe run with
    --set data.batch_size=1024 is that row, not the "1024" row (which then wants 4096)."""
    b256, b1024 = (next(r for r in paper.table_rows(2) if r.label == f"batch {b} baseline") for b in (256, 1024))
    cfg = build_config(b256.recipe, ["data.batch_size=1024"])
    assert paper.matches(b256, cfg, "per-gpu") and not paper.matches(b1024, cfg, "per-gpu")
    assert paper.matches(b1024, cfg, "global") and not paper.matches(b256, cfg, "global")  # the same training
    write_run(tmp_path / "b256x4", cfg, 60.0)
    text = report_text(capsys, tmp_path / "b256x4", "--out", tmp_path / "out", "--table2-batch", "per-gpu")
    assert "(batch read per GPU: global batch = 4 x the printed batch)" in text
    assert "| b256x4 (finished) |" in row_line(text, "batch 256 baseline")
    assert "| not run |" in row_line(text, "batch 1024 baseline")


# ----------------------------------------------------------------------------- seeds and statistics

def test_seeds_of_a_row_give_mean_sd_and_the_gain_with_its_interval(tmp_path):
    base = {0: 70.1, 1: 70.3, 2: 70.2}
    pgt = {0: 70.4, 1: 70.55, 2: 70.55}  # 0.3, 0.25 and 0.35 above their seed's baseline
    folders = [row_run(tmp_path, R18_BASE, f"b{s}", v, seed=s, best_offset=0.1) for s, v in base.items()]
    folders += [row_run(tmp_path, R18_PGT, f"p{s}", v, seed=s, best_offset=0.2) for s, v in pgt.items()]
    text = tables_of(*folders)
    line = row_line(text, R18_PGT.label)
    assert "| 3 seeds (0, 1, 2), finished |" in line
    mean, sd = statistics.fmean(pgt.values()), statistics.stdev(pgt.values())
    assert f"| {mean:.2f} ± {sd:.2f} | {mean + 0.2:.2f} ± {sd:.2f} |" in line  # final, best
    assert f"| {mean - R18_PGT.test:+.2f} / {mean + 0.2 - R18_PGT.test:+.2f} |" in line
    gains = next(line for line in text.splitlines() if line.startswith(f"| {R18_PGT.label} | +0.09 |"))
    # Paired by seed (both arms ran 0, 1, 2): scipy's paired t test on the same numbers.
    ref = stats.ttest_rel(list(pgt.values()), list(base.values()))
    low, high = ref.confidence_interval()
    diff = mean - statistics.fmean(base.values())
    assert f"{diff:+.2f} [{low:+.2f}, {high:+.2f}], p {ref.pvalue:.2g} (paired, n 3/3): resolved" in gains
    needed = seed_stats.seeds_needed(statistics.stdev([pgt[s] - base[s] for s in base]), 0.09, paired=True)
    assert f"| {needed} / " in gains
    assert "| epoch 99 of 100 (baseline final 70.20) |" in gains  # PGT's best epoch 99 passes it first


def test_welch_interval_against_scipy_and_by_hand():
    base, pgt = {0: 70.0, 1: 70.2, 2: 70.4}, {3: 70.5, 4: 70.6, 5: 70.7}  # no seed in common: Welch
    g = seed_stats.compare(base, pgt)
    ref = stats.ttest_ind(list(pgt.values()), list(base.values()), equal_var=False)
    assert g.test == "Welch" and g.p == pytest.approx(ref.pvalue, rel=1e-9)
    assert (g.low, g.high) == pytest.approx(tuple(ref.confidence_interval()), rel=1e-9)
    # By hand: variances 0.04 and 0.01, se^2 = 0.04/3 + 0.01/3, Welch-Satterthwaite df = 50/17.
    se = math.sqrt(0.05 / 3)
    assert g.df == pytest.approx((0.05 / 3) ** 2 / ((0.04 / 3) ** 2 / 2 + (0.01 / 3) ** 2 / 2)) == pytest.approx(50 / 17)
    assert g.gain == pytest.approx(0.4) and (g.high - g.low) / 2 == pytest.approx(stats.t.ppf(0.975, 50 / 17) * se)
    assert g.verdict == "within noise"  # the interval [-0.02, 0.82] holds 0
    one = seed_stats.compare({0: 70.0}, {0: 70.5})
    assert one.verdict.startswith("no statement about noise is possible") and one.gain == pytest.approx(0.5)


def test_seeds_needed_by_hand():
    """sd 0.1, the paper's ResNet-18 gain 0.09: (t_.975 + t_.8) * 0.1 * sqrt(2/n) <= 0.09 first at n = 21
    (n = 20: df 38, t 2.024 + 0.851 = 2.875, 2.875 * 0.1 * sqrt(0.1) = 0.0909 > 0.09)."""
    assert seed_stats.seeds_needed(0.1, 0.09) == 21
    se20, se21 = 0.1 * math.sqrt(2 / 20), 0.1 * math.sqrt(2 / 21)
    assert (stats.t.ppf(0.975, 38) + stats.t.ppf(0.8, 38)) * se20 > 0.09
    assert (stats.t.ppf(0.975, 40) + stats.t.ppf(0.8, 40)) * se21 <= 0.09
    assert seed_stats.seeds_needed(0.12, 0.73) == 2  # SE-ResNet-50's gain stands out at 2 seeds


def test_one_seed_per_arm_says_no_statement_is_possible(tmp_path):
    text = tables_of(row_run(tmp_path, R18_BASE, "b", 70.0), row_run(tmp_path, R18_PGT, "p", 70.5))
    gains = next(line for line in text.splitlines() if line.startswith(f"| {R18_PGT.label} | +0.09 |"))
    assert "+0.50 (n 1/1): no statement about noise is possible (needs at least 2 seeds per arm)" in gains
    assert "unknown (needs 2 seeds per arm)" in gains
    assert "| epoch 99 of 100 (baseline final 70.00) |" in gains  # epoch 99 is at its final value already


def test_time_to_accuracy_never(tmp_path):
    text = tables_of(row_run(tmp_path, R18_BASE, "b", 70.0), row_run(tmp_path, R18_PGT, "p", 69.0))
    assert "| never (baseline final 70.00) |" in text


# ----------------------------------------------------------------------------- real runs, other runs

def test_tiny_runs_are_no_row_so_their_comparison_comes_first(two_epoch_run, pgt_run, tmp_path, capsys):
    text = report_text(capsys, two_epoch_run, pgt_run, "--out", tmp_path / "out")
    assert text.startswith("# Runs compared over seeds\n\n## Comparisons")
    assert "## Table" not in text and "None of the runs is a row of the paper's tables" in text
    pgt = [r for r in csv.DictReader(open(pgt_run / "summary.csv"))]
    assert (f"| pgt | resnet10t | cosine (per_step) | 2 | 16 | 0.05 | PGT 0.25 | off | 0 | finished | "
            f"{float(pgt[-1]['train_top1']):.2f} | {float(pgt[-1]['eval_top1']):.2f} | "
            f"{max(float(r['eval_top1']) for r in pgt):.2f} |") in text.split("## Arms")[1]
    assert "| run | resnet10t | cosine (per_step) | 2 | 16 | 0.05 | baseline |" in text
    assert "### resnet10t cosine, 2 epochs: baseline vs PGT 0.25" in text
    assert "- pgt: closest to Table " in text  # resnet10t is about no paper row
    assert (tmp_path / "out" / "report.md").read_text() == text.split("\nwritten: ")[0]


def test_a_try_out_of_a_recipe_is_related_and_says_what_differs(tmp_path):
    cfg = build_config(R18_PGT.recipe, ["schedule.epochs=3", "schedule.mode=per_step", "data.batch_size=64",
                                        "schedule.warmup_epochs=1", "schedule.cooldown_epochs=0"])
    tryout = read_run(write_run(tmp_path / "tryout", cfg, 30.0))
    differs = ("- tryout: related to Table 1 resnet18 cosine PGT 0.25: differs in data.batch_size (run 64, row 1024), "
               "schedule.mode (run per_step, row authors_per_epoch), schedule.epochs (run 3, row 100), "
               "schedule.warmup_epochs (run 1, row 5), schedule.cooldown_epochs (run 0, row 10)")
    assert differs in report.Report([tryout]).text  # alone: no row is run, no table shown
    text = report.Report([tryout, read_run(row_run(tmp_path, R18_BASE, "b", 70.0))]).text  # beside a row's run
    assert "| not run; related: tryout (see other runs) |" in row_line(text, R18_PGT.label)
    assert differs in text.split("## Other runs")[1]


# ----------------------------------------------------------------------------- what report trusts

@pytest.mark.parametrize("content,message", [
    ("", "is empty; a run folder's config.yaml holds the run's whole resolved config"),
    ("{}\n", "is empty; a run folder's config.yaml holds the run's whole resolved config"),
    ("- a\n- b\n", "is not a run's config (a mapping of config keys), it holds a list"),
    ("model: [\n", "not valid YAML"),
    ("model:\n  name: 7\n", "model.name = 7 must be a string"),
])
def test_a_bad_config_yaml_is_one_line(tmp_path, capsys, content, message):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(content)
    with pytest.raises(SystemExit) as stop:
        main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_hand_edited_summary_cells_and_rows_are_read_without_a_traceback(tmp_path, capsys):
    folder = row_run(tmp_path, R18_PGT, "edited", 70.0)
    lines = (folder / "summary.csv").read_text().splitlines()
    blank = lines[50].split(",")
    blank[5] = ""  # eval_top1 of epoch 50 left blank
    lines[50] = ",".join(blank)
    lines.insert(20, "# lr lowered by hand here,,,")  # a note row
    (folder / "summary.csv").write_text("\n".join(lines) + "\n")
    run = read_run(folder)
    assert run.finished and run.final("eval_top1") == 70.0 and len(run.curve("eval_top1")[0]) == 99
    (folder / "summary.csv").write_text("\n".join(lines[1:]) + "\n")  # the header line deleted
    with pytest.raises(SystemExit):
        main(["report", str(folder), "--out", str(tmp_path / "out")])
    assert capsys.readouterr().err.strip() == (f"error: report: {folder / 'summary.csv'}: its first line is not a "
                                               "header naming the columns (epoch, ...)")


def test_an_empty_diagnostics_file_is_left_out_with_a_warning(two_epoch_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_epoch_run, run, ignore=shutil.ignore_patterns("*.pt"))
    (run / "diagnostics" / "filter-norms-epoch-0002.npz").write_bytes(b"")  # a write that never completed
    main(["report", str(run), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert f"warning: report: {run / 'diagnostics' / 'filter-norms-epoch-0002.npz'} is unreadable" in err
    assert (tmp_path / "out" / "filters-run.png").is_file()


def test_hand_edited_summary_csv_survives_a_resume(tmp_path):
    """Columns and note rows added by hand are kept; rows after the checkpoint's epoch are dropped."""
    path = tmp_path / "summary.csv"
    header = ",".join(SUMMARY_COLUMNS) + ",my_note"
    more = len(SUMMARY_COLUMNS) - 2
    path.write_text(f"{header}\n1,10{',1' * more},first\nlr changed by hand\n2,20{',2' * more},second\n")
    trim_summary_csv(tmp_path, start_epoch=1)  # what a resume from epoch 1 does first
    out = SummaryCsv()
    out.start(RunInfo(tmp_path, {}, start_epoch=1, start_step=10, resumed_from=None))
    out.epoch_end({c: 2 for c in SUMMARY_COLUMNS})
    rows = list(csv.reader(open(path)))
    assert rows[0] == [*SUMMARY_COLUMNS, "my_note"]
    assert rows[1] == ["1", "10", *["1"] * more, "first"] and rows[2][0] == "lr changed by hand" and not any(rows[2][1:])
    assert rows[3] == [*["2"] * len(SUMMARY_COLUMNS), ""] and len(rows) == 4  # epoch 2 trained again, its old row gone
    path.write_text("1,10,1,1\n")  # no header line: refused, the file kept
    with pytest.raises(Exception, match="its first line is not a header with an 'epoch' column"):
        trim_summary_csv(tmp_path, start_epoch=1)
    assert path.read_text() == "1,10,1,1\n"


# ----------------------------------------------------------------------------- the authors' logs

def authors_tree(root):
    """The authors' published layout, with summary.csv as their timm fork wrote it (a resumed run
    writes its header again)."""
    for folder, final in (("resnet18/cosine-scheduler-alpha-1.0", 70.2), ("resnet18/cosine-scheduler-alpha-0.25", 70.3),
                          ("resnet_non_bn/cosine-scheduler-alpha-0.25", 67.5)):
        (root / folder).mkdir(parents=True)
        lines = ["epoch,train_loss,train_acc,eval_loss,eval_top1,eval_top5"]
        for e in range(1, 101):
            top1 = final + 0.3 if e == 99 else final * e / 100  # the best epoch is the last but one
            lines.append(f"{e},{3 - e / 50},{e / 2},1.5,{top1},90")
            if e == 40:
                lines.append(lines[0])
        (root / folder / "summary.csv").write_text("\n".join(lines) + "\n")
    return root


def test_reference_puts_the_authors_final_and_best_beside_each_row(tmp_path, capsys):
    ref = authors_tree(tmp_path / "authors")
    runs = [row_run(tmp_path, R18_BASE, "b", 70.0), row_run(tmp_path, R18_PGT, "p", 70.5)]
    text = report_text(capsys, *runs, "--out", tmp_path / "out", "--reference", ref)
    assert row_line(text, R18_BASE.label).endswith("| 70.20 / 70.50 |")
    assert row_line(text, R18_PGT.label).endswith("| 70.30 / 70.60 |")
    assert row_line(text, "batch 256 PGT 0.25").endswith("| 67.50 / 67.80 |")
    assert row_line(text, "resnet50 cosine baseline").endswith("| not published |")
    assert (tmp_path / "out" / "pair-table1-resnet18-cosine-PGT-0.25.png").is_file()
    main(["report", "--reference", str(ref), "--out", str(tmp_path / "only")])  # no runs: the authors' alone
    assert (tmp_path / "only" / "pair-table2-batch-256-PGT-0.25.png").is_file()


# ----------------------------------------------------------------------------- figures

def test_filter_figures_pick_main_path_convolutions():
    import timm
    import torch

    # The middle one is the last convolution of the middle block (of 8 in resnet18, 16 in resnet50).
    for name, expected in (("resnet18", ["conv1", "layer3.0.conv2", "layer4.1.conv2"]),
                           ("resnet10t", ["conv1.0", "layer3.0.conv2", "layer4.0.conv2"]),  # a deep stem; 4 blocks
                           ("seresnet18", ["conv1", "layer3.0.conv2", "layer4.1.conv2"]),  # not se.fc1 / se.fc2
                           ("resnet50", ["conv1", "layer3.1.conv3", "layer4.2.conv3"])):
        model = timm.create_model(name, num_classes=10)
        convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
        assert any("downsample" in n for n in convs) and main_path_convs(convs) == expected, name


def test_the_alpha_figure_never_mixes_models_or_schedules(tmp_path):
    runs = []
    for recipe, alpha, name in (("resnet18_baseline.yaml", None, "a"), ("resnet18_pgt.yaml", 0.25, "b"),
                                ("resnet50_baseline.yaml", None, "c"), ("resnet50_pgt03.yaml", 0.3, "d"),
                                ("resnet50_step_baseline.yaml", None, "e")):
        runs.append(read_run(write_run(tmp_path / name, build_config(recipe), 60.0)))
    groups = sorted(sorted(r.name for r in g) for g in alpha_groups(runs).values())
    assert groups == [["a", "b"], ["c", "d"]]  # the step run has no partner in alpha


def test_figures_are_written(two_epoch_run, pgt_run, tmp_path):
    """A real pair (the tiny runs' curves and filter norms under the resnet18 cosine rows' configs)
    and the real runs themselves; each figure's file is a whole PNG (open them: docs/ holds one of each)."""
    pair = []
    for src, row in ((two_epoch_run, R18_BASE), (pgt_run, R18_PGT)):
        dst = tmp_path / f"as-{src.name}"
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.pt"))
        (dst / "config.yaml").write_text(dump(paper.row_config(row)))
        pair.append(dst)
    main(["report", *map(str, pair), str(two_epoch_run), str(pgt_run), "--out", str(tmp_path / "out"),
          "--reference", str(authors_tree(tmp_path / "authors"))])
    names = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    # The tiny runs are no row, but two arms that differ in alpha alone: a comparison of their own.
    assert names == ["accuracy.png", "alpha.png", "filters-resnet10t-baseline-vs-PGT-0.25.png",
                     "filters-table1-resnet18-cosine-PGT-0.25.png", "pair-resnet10t-baseline-vs-PGT-0.25.png",
                     "pair-table1-resnet18-cosine-PGT-0.25.png", "pair-table2-batch-256-PGT-0.25.png"]
    for path in (tmp_path / "out").glob("*.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_a_folder_that_is_not_a_run_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path)])
    assert capsys.readouterr().err.strip() == f"error: report: {tmp_path} is not a run folder (no config.yaml)"


def test_logit_norm_rises_as_alpha_falls(two_epoch_run, pgt_run):
    """The paper's Fig. 8 mechanism, on small real images: everything equal but alpha (1 vs 0.25).

    Only the logit norm is asserted: on the demo set the final training loss does not rise with
    falling alpha in every regime (scripts/alpha_sweep.py: after 6 epochs it falls), see docs/reproducing.md."""
    def last(folder, column):
        return float(list(csv.DictReader(open(folder / "summary.csv")))[-1][column])
    assert last(pgt_run, "logit_norm") > 1.5 * last(two_epoch_run, "logit_norm")
    assert np.isfinite(last(pgt_run, "train_loss"))


def test_report_without_runs_or_reference_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["report"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == "error: report: give run folders, or --reference AUTHORS_DIR, or both"
