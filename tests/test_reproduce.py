"""One command per table: the plan, skipping finished rows, resuming, and the report at the end."""

import pytest

from powergrad_train import paper
from powergrad_train.cli import main
from powergrad_train.config import build_config

# The recipes' ImageNet settings shrunk to the tiny demo set, for every row alike.
TINY = ["data.image_size=16", "data.crop_scale_min=0.35", "data.batch_size=16", "data.workers=0",
        "data.backend=torchvision", "data.val_backend=same", "model.num_classes=10", "schedule.epochs=1",
        "schedule.warmup_epochs=0", "schedule.cooldown_epochs=0", "amp=off", "channels_last=false",
        "checkpoint.every_steps=0", "train.log_every_steps=5"]


@pytest.mark.parametrize("row", paper.ROWS, ids=lambda r: f"table{r.table}-{r.recipe}")
def test_each_row_has_a_recipe_that_trains_it(row):
    assert paper.matches(row, build_config(row.recipe))


def test_the_plan_names_recipe_command_batch_steps_and_gpu_hours(tmp_path, capsys):
    main(["reproduce", "3", "--data", str(tmp_path / "imagenet"), "--nproc", "4", "--images-per-sec", "5000",
          "--out", str(tmp_path / "runs"), "--dry-run"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 * 8 + 1  # a line and a command per row, and the total
    assert out[0] == ("Table 3 row 1: step (to run): resnet50_step_baseline.yaml, global batch 1024, 1251 steps "
                      "per epoch x 100 epochs, about 28 GPU hours")  # 1,281,167 images without a train/ folder
    assert "-m torch.distributed.run --standalone --nproc_per_node=4 -m powergrad_train --config " \
           f"resnet50_step_baseline.yaml --output {tmp_path / 'runs' / 'resnet50_step_baseline'} --resume auto " \
           f"--set data.root={tmp_path / 'imagenet'}" in out[1]
    assert out[-1] == "left to run: about 228 GPU hours at 5000 images/s on 4 GPU(s)"
    assert not (tmp_path / "runs").exists()


def test_rows_run_in_turn_finished_ones_are_skipped_and_the_report_follows(tiny_root, tmp_path, capsys):
    args = ["reproduce", "1", "--data", str(tiny_root), "--rows", "13,14", "--out", str(tmp_path),
            *[a for s in TINY for a in ("--set", s)]]
    main(args)
    out = capsys.readouterr().out
    assert "Table 1 resnet18 cosine baseline (to run)" in out
    for recipe in ("resnet18_baseline", "resnet18_pgt"):
        assert (tmp_path / recipe / "last.pt").is_file()
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| resnet18_pgt (finished) |" in report and "| resnet18_baseline (finished) |" in report
    main(args)
    out = capsys.readouterr().out
    assert out.count("finished, skipped") == 2 and "finished: skipped" in out


def test_rows_out_of_range_are_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "2", "--data", "x", "--rows", "11", "--dry-run"])
    assert capsys.readouterr().err.strip() == "error: reproduce --rows 11: Table 2 has rows 1 to 10"
