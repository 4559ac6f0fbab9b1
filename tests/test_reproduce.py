"""One command per table: the plan, seeds, reusing only the same run, and the report at the end."""

import sys

import pytest

from powergrad_train.cli import main
from powergrad_train.config.build import build_config, dump
from powergrad_train.reproduction import paper, reproduce
from powergrad_train.reproduction.report import read_run_config
from tests import warm

# The recipes' ImageNet settings shrunk to the tiny demo set, for every row alike.
TINY = ["data.image_size=16", "data.crop_scale_min=0.35", "data.batch_size=16", "data.workers=0",
        "data.backend=torchvision", "data.val_backend=same", "model.num_classes=10", "schedule.epochs=1",
        "schedule.warmup_epochs=0", "schedule.cooldown_epochs=0", "amp=off", "channels_last=false",
        "checkpoint.every_steps=0", "train.log_every_steps=5"]


@pytest.mark.parametrize("row", paper.ROWS, ids=lambda r: f"table{r.table}-{r.recipe}")
def test_each_row_has_a_recipe_that_trains_it(row):
    cfg = build_config(row.recipe)
    assert paper.matches(row, cfg)
    assert (cfg.model.name, cfg.schedule.name, cfg.loss.pgt_alpha, cfg.loss.label_smoothing, cfg.grad_clip.mode) == (
        row.model, row.schedule, row.alpha, row.label_smoothing, row.clip)
    assert row.batch is None or cfg.data.batch_size == row.batch


def test_step_recipes_train_the_90_epochs_the_authors_step_runs_trained():
    """timm 0.4.12's create_scheduler adds --cooldown-epochs for cosine only: their step runs ended at epoch 90."""
    for row in paper.ROWS:
        s = build_config(row.recipe).schedule
        assert (s.epochs, s.cooldown_epochs) == ((90, 0) if row.schedule == "step" else (100, 10)), row.recipe


def plan_lines(capsys, *args):
    main(["reproduce", *map(str, args), "--dry-run"])
    return capsys.readouterr().out.splitlines()


def test_the_plan_names_recipe_seed_command_batch_steps_lr_and_gpu_hours(tmp_path, capsys):
    out = plan_lines(capsys, "3", "--data", tmp_path / "imagenet", "--nproc", "4", "--images-per-sec", "5000",
                     "--out", tmp_path / "runs")
    # 1,281,167 images without a train/ folder; 90 epochs x (1251 x 1024 train + 50,000 val at 3x) / 5000 / 3600 x 4
    hours = 90 * (1251 * 1024 / 5000 + 50_000 / 15_000) / 3600 * 4
    assert out[0] == (f"Table 3 row 1: step, seed 0 (to run): resnet50_step_baseline.yaml, global batch 1024, 1251 steps "
                      f"per epoch x 90 epochs, about {hours:.0f} GPU hours at 5000 images/s")
    assert "-m torch.distributed.run --standalone --nproc_per_node=4 -m powergrad_train --config " \
           f"resnet50_step_baseline.yaml --output {tmp_path / 'runs' / 'resnet50_step_baseline'} --resume auto " \
           f"--set data.root={tmp_path / 'imagenet'}" in out[1]
    assert f"steps per epoch: from ImageNet's 1,281,167 train images ({tmp_path / 'imagenet' / 'train'} not found)" in out
    lr_head = out.index("LR at the first step of each epoch: (a) step, authors_per_epoch: resnet50_step_baseline, "
                        "resnet50_step_pgt | (b) cosine, authors_per_epoch: resnet50_baseline, resnet50_ls, "
                        "resnet50_pgt03, resnet50_ls_pgt03, resnet50_pgt, resnet50_ls_pgt")
    assert out[lr_head + 1] == "  epoch    1: 0.01 | 0.01" and out[lr_head + 90] == "  epoch   90: 0.0001 | 0.0001"
    assert out[lr_head + 91] == "  epoch   91: - | 0.0001" and out[lr_head + 101].startswith("left to run:")
    assert out[-1].startswith("left to run: about ") and "8 run(s) (seeds 0)" in out[-1]
    assert "at an assumed 3x the training images/s" in out[-1]
    assert not (tmp_path / "runs").exists()


def test_gpu_hours_per_model_and_stated_estimates_without_a_measurement(tmp_path, capsys):
    args = ["1", "--data", tmp_path, "--nproc", "4", "--out", tmp_path / "runs", "--rows", "7,13"]
    given = plan_lines(capsys, *args, "--images-per-sec", "resnet18=10000,resnet101=2500")
    hours = {m: 100 * (1251 * 1024 / ips + 50_000 / (3 * ips)) / 3600 * 4 for m, ips in
             (("resnet18", 10000), ("resnet101", 2500))}
    assert given[0].endswith(f"about {hours['resnet101']:.0f} GPU hours at 2500 images/s")
    assert given[2].endswith(f"about {hours['resnet18']:.0f} GPU hours at 10000 images/s")
    assert hours["resnet101"] > 3.9 * hours["resnet18"]
    assert not any("(estimate)" in line for line in given)
    estimated = plan_lines(capsys, *args)
    v100 = reproduce.V100_IMAGES_PER_SEC
    assert estimated[0].endswith(f"at {v100['resnet101'] * 4} images/s (estimate)")
    assert estimated[2].endswith(f"at {v100['resnet18'] * 4} images/s (estimate)")
    assert estimated[-1].startswith("GPU hours marked (estimate) use stated V100 fp16 throughputs")


@pytest.mark.parametrize("args,message", [
    (["--rows="], "error: reproduce --rows: give row numbers separated by commas, e.g. --rows 1,2 "
                  "(Table 1 has rows 1 to 14)"),
    (["--rows", "1,x"], "error: reproduce --rows 1,x: 'x' is not a row number (Table 1 has rows 1 to 14)"),
    (["--rows", "15"], "error: reproduce --rows 15: Table 1 has rows 1 to 14"),
    (["--rows", "2,2"], "error: reproduce --rows 2,2: row 2 is given twice"),
    (["--images-per-sec", "-100"], "error: reproduce --images-per-sec -100: '-100' is not a positive number of "
                                   "images per second"),
    (["--images-per-sec", "nan"], "error: reproduce --images-per-sec nan: 'nan' is not a positive number"),
    (["--images-per-sec", "inf"], "error: reproduce --images-per-sec inf: 'inf' is not a positive number"),
    (["--images-per-sec", "resnet19=500"], "error: reproduce --images-per-sec resnet19=500: 'resnet19' is no model of "
                                           "the paper's tables (did you mean resnet18? models: resnet101, resnet18,"),
    (["--seeds", "0,x"], "error: reproduce --seeds 0,x: 'x' is not a seed (a whole number >= 0)"),
    (["--seeds", "1,1"], "error: reproduce --seeds 1,1: seed 1 is given twice"),
    (["--seeds", "1", "--set", "seed=2"], "error: reproduce: give the seeds either with --seeds or with --set seed=N"),
])
def test_bad_arguments_are_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as stop:
        main(["reproduce", "1", "--data", str(tmp_path), "--out", str(tmp_path / "runs"), "--dry-run", *args])
    captured = capsys.readouterr()
    assert stop.value.code == 2 and captured.err.strip().startswith(message) and not captured.out
    assert len(captured.err.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_seeds_get_their_own_folders_and_gpu_hours(tmp_path, capsys):
    out = plan_lines(capsys, "1", "--data", tmp_path, "--rows", "14", "--seeds", "0,1,2", "--out", tmp_path / "r")
    assert [line.split(" (")[0] for line in out[0:6:2]] == [f"Table 1 row 14: resnet18 cosine PGT 0.25, seed {s}"
                                                            for s in (0, 1, 2)]
    assert [f"--output {tmp_path / 'r' / name} " in line for line, name in
            zip(out[1:6:2], ("resnet18_pgt", "resnet18_pgt-seed1", "resnet18_pgt-seed2"))] == [True] * 3
    assert "--set seed=2" in out[5] and "3 run(s) (seeds 0, 1, 2)" in out[-2]
    one = float(out[0].split("about ")[1].split()[0])
    assert float(out[-2].split("about ")[1].split()[0]) == pytest.approx(3 * one, abs=1.5)


def test_table2_per_gpu_reading_trains_four_times_the_printed_batch(tmp_path, capsys):
    out = plan_lines(capsys, "2", "--data", tmp_path, "--rows", "5", "--table2-batch", "per-gpu", "--out", tmp_path / "r")
    assert "batch 256 baseline, seed 0 (to run): nobn_b256_baseline.yaml, global batch 1024" in out[0]
    assert f"--output {tmp_path / 'r' / 'nobn_b256_baseline-per-gpu'} " in out[1] and "data.batch_size=1024" in out[1]


def test_the_step_pgt_row_is_labelled_with_the_alpha_it_runs(tmp_path, capsys):
    out = plan_lines(capsys, "1", "--data", tmp_path, "--rows", "6", "--out", tmp_path / "r")
    assert out[0].startswith("Table 1 row 6: resnet50 step PGT 0.3 (Table 1 prints 0.05), seed 0 (to run): "
                             "resnet50_step_pgt.yaml")


def test_a_folder_holding_another_run_is_refused_before_anything_starts(tmp_path, capsys):
    runs = tmp_path / "runs"
    (runs / "resnet18_pgt").mkdir(parents=True)
    stored = build_config("resnet18_pgt.yaml", [f"data.root={tmp_path}", "seed=0", "data.workers=2"])
    (runs / "resnet18_pgt" / "config.yaml").write_text(dump(stored))
    before = {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()}
    for args, changed in ((["--set", "optim.lr=0.2"], "optim.lr: 0.1 -> 0.2"),
                          (["--set", "loss.pgt_impl=authors_hook"], "loss.pgt_impl: 'exact' -> 'authors_hook'")):
        with pytest.raises(SystemExit) as stop:
            main(["reproduce", "1", "--data", str(tmp_path), "--rows", "13,14", "--out", str(runs), *args])
        assert stop.value.code == 2
        assert capsys.readouterr().err.strip() == (
            f"error: reproduce: {runs / 'resnet18_pgt'} holds another run than this command trains ({changed}); "
            "nothing was started: give another --out, or the settings that folder was started with")
    assert {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()} == before
    assert not (runs / "resnet18_baseline").exists()
    # The same run, on data moved elsewhere and with other loader processes, is reused.
    out = plan_lines(capsys, "1", "--data", tmp_path / "moved", "--rows", "14", "--out", runs)
    assert "(to run)" in out[0]


def test_rows_run_in_turn_finished_ones_are_skipped_and_the_report_follows(tiny_root, tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.setattr(sys, "executable", warm.interpreter())  # each row's training, a real process
    args = ["reproduce", "1", "--data", str(tiny_root), "--rows", "14", "--seeds", "0,1", "--out", str(tmp_path),
            *[a for s in TINY for a in ("--set", s)]]
    main(args)
    out = capsys.readouterr().out
    assert "Table 1 row 14: resnet18 cosine PGT 0.25, seed 1 (to run)" in out
    for folder in ("resnet18_pgt", "resnet18_pgt-seed1"):
        assert (tmp_path / folder / "last.pt").is_file()
    assert read_run_config(tmp_path / "resnet18_pgt-seed1" / "config.yaml").seed == 1
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| resnet18_pgt, resnet18_pgt-seed1 | resnet18 | cosine (authors_per_epoch) | 1 | 16 |" in report  # one arm of two seeds, no row
    assert "- resnet18_pgt, resnet18_pgt-seed1: related to Table 1 resnet18 cosine PGT 0.25: differs in model.num_classes" in report
    # Another table's run in the same OUT: the next report keeps it.
    other = tmp_path / "nobn_b256_baseline"
    other.mkdir()
    (other / "config.yaml").write_text(dump(build_config("nobn_b256_baseline.yaml", TINY)))
    main(args)
    out = capsys.readouterr().out
    assert out.count("finished, skipped") == 2 and "seed 0 (finished: skipped)" in out
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| nobn_b256_baseline | resnet18_nobn |" in report and "| resnet18_pgt, resnet18_pgt-seed1 | resnet18 |" in report
