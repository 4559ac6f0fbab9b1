"""End to end through the command line: the demo, exact resume, dry runs, validate, user errors."""

import csv
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from powergrad_train.cli import main
from powergrad_train.config.build import build_config
from powergrad_train.data.demo import write_demo_dataset
from powergrad_train.training import checkpoint
from powergrad_train.training.models import build_model
from tests import warm
from tests.conftest import REPO, assert_same_weights, load_weights, tiny_overrides
from tests.test_data import jpeg_without_tables


def read_summary(run_dir):
    with open(run_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def run_cli(*args):
    main([str(a) for a in args])


def run_subprocess(*args, cwd):
    return warm.run([sys.executable, "-m", "powergrad_train", *map(str, args)], cwd=cwd,
                    capture_output=True, text=True, timeout=300)


def test_smoke_recipe_learns_the_demo_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_cli("--config", "smoke.yaml")
    run_dir = tmp_path / "runs" / "smoke"
    rows = read_summary(run_dir)
    assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
    assert float(rows[-1]["eval_top1"]) > 50.0  # 10 classes: chance is 10%
    assert float(rows[-1]["train_top1"]) > float(rows[0]["train_top1"])
    for name in ("config.yaml", "last.pt", "best.pt"):
        assert (run_dir / name).is_file()
    assert list(run_dir.glob("events.out.tfevents.*"))


def test_same_seed_gives_identical_weights(two_epoch_run, tiny_root, tmp_path):
    run_cli("--config", "smoke.yaml", "--output", tmp_path / "b", *tiny_overrides(tiny_root))
    assert_same_weights(load_weights(two_epoch_run / "last.pt"), load_weights(tmp_path / "b" / "last.pt"))


def test_resume_from_epoch_one_continues_exactly(two_epoch_run, tiny_root, tmp_path):
    run_cli("--config", "smoke.yaml", "--output", tmp_path / "r", "--resume", two_epoch_run / "epoch-0001.pt",
            *tiny_overrides(tiny_root))
    assert_same_weights(load_weights(two_epoch_run / "last.pt"), load_weights(tmp_path / "r" / "last.pt"))


def test_resume_auto_appends_to_summary_without_duplicates(two_epoch_run, tiny_root, tmp_path):
    run_dir = tmp_path / "auto"
    run_dir.mkdir()
    shutil.copy(two_epoch_run / "epoch-0001.pt", run_dir / "last.pt")
    shutil.copy(two_epoch_run / "epoch-0001.pt", run_dir / "best.pt")
    shutil.copy(two_epoch_run / "summary.csv", run_dir / "summary.csv")  # as if killed after epoch 2 began
    run_cli("--config", "smoke.yaml", "--output", run_dir, "--resume", "auto", *tiny_overrides(tiny_root))
    assert [r["epoch"] for r in read_summary(run_dir)] == ["1", "2"]
    best = lambda d: checkpoint.load(d / "best.pt")["train_state"]["best_epoch"]  # noqa: E731
    assert best(run_dir) == best(two_epoch_run)  # replaced only if epoch 2 really beat epoch 1
    assert (run_dir / "summary.csv").read_text().count("epoch,") == 1
    assert_same_weights(load_weights(two_epoch_run / "last.pt"), load_weights(run_dir / "last.pt"))


def test_validate_reports_the_run_s_numbers(two_epoch_run, capsys):
    run_cli("validate", "--checkpoint", two_epoch_run / "last.pt")
    last = read_summary(two_epoch_run)[-1]
    assert f"top1 {float(last['eval_top1']):.2f}" in capsys.readouterr().out


def test_dry_run_prints_lr_per_epoch_and_writes_nothing(tiny_root, tmp_path, capsys):
    run_cli("--config", "smoke.yaml", "--output", tmp_path / "dry", "--dry-run", *tiny_overrides(tiny_root))
    out = capsys.readouterr().out
    assert "schedule.mode per_step (in use) | authors_per_epoch (for comparison)" in out
    # per step: cosine, 5 of 15 steps; the authors' per epoch: half a warmup epoch rounds to none, and
    # epoch 2 trains at t=2, the end of a 2-epoch cosine
    assert "epoch    1 (step       0): 0.005 | 0.05" in out and "epoch    2 (step      10): 0.0375 | 0" in out
    assert "resnet10t" in out and "10 steps per epoch" in out
    assert not (tmp_path / "dry").exists()


def update(weights: dict, init: dict) -> torch.Tensor:
    """Everything training changed, as one vector (floating-point entries only)."""
    return torch.cat([(weights[k].float() - init[k].float()).flatten() for k in init if init[k].is_floating_point()])


def initial_weights(model_name: str) -> dict:
    """The weights build_run starts from at seed 0 (it seeds, then builds the model)."""
    torch.manual_seed(0)
    cfg = build_config(None, [f"model.name={model_name}", "model.num_classes=10"])
    return build_model(cfg.model).state_dict()


@pytest.mark.parametrize("extra", [
    # (amp=bf16 through the trainer: test_engine's bf16 test, a step instead of a run, as bf16 is slow on a CPU)
    ["--set", "channels_last=true"],
    ["--set", "loss.pgt_alpha=0.25", "--set", "grad_clip.mode=agc", "--set", "grad_clip.value=0.01",
     "--set", "model.name=resnet18_nobn", "--set", "loss.label_smoothing=0.1"],
])
def test_training_variants_run(two_epoch_run, tiny_root, tmp_path, extra):
    """Each variant trains, and does what it says: bf16 changes the numbers a little, channels_last
    only the memory layout; the combined loss and gradient stage trains the no-BN model."""
    run_cli("--config", "smoke.yaml", "--output", tmp_path / "v", *tiny_overrides(tiny_root), *extra)
    rows = read_summary(tmp_path / "v")
    assert len(rows) == 2 and all(math.isfinite(float(r[k])) for r in rows for k in ("train_loss", "eval_loss"))
    weights = load_weights(tmp_path / "v" / "last.pt")
    if "model.name=resnet18_nobn" in extra:
        assert update(weights, initial_weights("resnet18_nobn")).abs().max() > 0
        return
    init = initial_weights("resnet10t")
    plain, variant = update(load_weights(two_epoch_run / "last.pt"), init), update(weights, init)
    similarity = torch.nn.functional.cosine_similarity(plain, variant, dim=0).item()
    # Trains like float32 (rounding differences grow over 20 steps of a tiny, noisy run: 0.98 seen)
    assert similarity > 0.9
    if "amp=bf16" in extra:
        assert not torch.equal(plain, variant)  # bf16 really ran
    else:  # the model really ran in the other layout, to its saved weights
        convs = [v for k, v in weights.items() if v.ndim == 4]
        assert convs and all(v.is_contiguous(memory_format=torch.channels_last) for v in convs)


@pytest.mark.parametrize("args,message", [
    (["--config", "smoke.yaml", "--set", "model.nmae=x"], "unknown config key 'model.nmae' (did you mean model.name?)"),
    (["--config", "smoke.yaml", "--set", "schedule.epochs=many"], "schedule.epochs = 'many' must be a whole number"),
    (["--config", "missing.yaml"], "recipe not found: 'missing.yaml'"),
    # a relative path is shown as the absolute path every later use sees
    (["--config", "smoke.yaml", "--set", "data.root=nowhere"], "data.root: folder '{tmp}/nowhere' does not exist"),
    (["--config", "smoke.yaml", "--resume", "nowhere.pt"], "--resume: checkpoint not found: {tmp}/nowhere.pt"),
    (["validate", "--checkpoint", "config.yaml"], "{tmp}/config.yaml: not a readable checkpoint"),
    (["--config", "smoke.yaml", "--resume", "."], "--resume: {tmp} is a folder; pass a checkpoint file ({tmp}/last.pt), "
                                                  "or continue that run with --output {tmp} --resume auto"),
    (["--config", "config.yaml"], "config.yaml: the recipe is empty"),
])
def test_user_errors_are_one_line_exit_2(tmp_path, monkeypatch, capsys, args, message):
    (tmp_path / "config.yaml").write_text("# not a checkpoint\n")
    monkeypatch.chdir(tmp_path)
    message = message.format(tmp=tmp_path)
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"error: {message}"] or (err.count("\n") == 1 and message in err), err


def test_a_user_error_in_a_real_process_is_one_line_without_traceback(tmp_path):
    result = run_subprocess("--config", "smoke.yaml", "--set", "model.nmae=x", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: --set model.nmae=x: unknown config key 'model.nmae' "
                                          "(did you mean model.name?)"]


def test_existing_run_folder_is_not_overwritten(two_epoch_run, tiny_root, capsys):
    before = (two_epoch_run / "last.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        run_cli("--config", "smoke.yaml", "--output", two_epoch_run, *tiny_overrides(tiny_root))
    assert e.value.code == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (two_epoch_run / "last.pt").read_bytes() == before


def test_a_checkpoint_trained_with_fp16_is_evaluated_in_float32_on_the_cpu(two_epoch_run, tmp_path, capsys):
    """Its weights are float32 (fp16 is autocast with loss scaling, a GPU's); evaluation needs no scaling."""
    state = checkpoint.load(two_epoch_run / "last.pt")
    assert state["config"]["amp"] == "off"
    state["config"]["amp"] = "fp16"
    torch.save(state, tmp_path / "fp16.pt")
    run_cli("validate", "--checkpoint", two_epoch_run / "last.pt")
    as_trained = capsys.readouterr().out.splitlines()[-1].split(": ", 1)[1]
    run_cli("validate", "--checkpoint", tmp_path / "fp16.pt")
    assert capsys.readouterr().out.splitlines() == [
        "amp: fp16 needs a CUDA GPU; evaluating in float32 on the CPU", f"{tmp_path / 'fp16.pt'}: {as_trained}"]


def test_bench_of_an_fp16_recipe_on_the_cpu_times_float32_and_training_stays_refused(tiny_root, capsys):
    overrides = [o.removeprefix("--set=") for o in tiny_overrides(tiny_root, amp="fp16")]
    run_cli("bench", "--config", "smoke.yaml", "--steps", "1", "--warmup", "0",
            *[a for o in overrides for a in ("--set", o)])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "amp: fp16 needs a CUDA GPU; timing in float32 on the CPU" and "; amp off;" in out[1]
    with pytest.raises(SystemExit) as refused:
        run_cli("--config", "smoke.yaml", "--dry-run", *tiny_overrides(tiny_root, amp="fp16"))
    assert refused.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: amp = fp16 needs a CUDA GPU (fp16 loss scaling); on the CPU use amp: bf16 or off")


def test_help_ends_with_where_the_documentation_is(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last.startswith(f"documentation: {REPO / 'docs'} (start with index.md;")
    assert (REPO / "docs" / "index.md").is_file()


def test_validate_names_the_first_weight_that_does_not_fit(two_epoch_run, capsys):
    with pytest.raises(SystemExit):
        run_cli("validate", "--checkpoint", two_epoch_run / "last.pt", "--set", "model.num_classes=5")
    assert "weights do not fit model 'resnet10t' (size mismatch for fc.weight: copying a param with shape " \
           "torch.Size([10, 512]) from checkpoint" in capsys.readouterr().err


def test_bench_steps_must_be_positive(tmp_path):
    result = run_subprocess("bench", "--config", "smoke.yaml", "--steps", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: powergrad-train bench: argument --steps: must be a whole number >= 1, "
                                          "got '0' (see powergrad-train bench --help)"]


@pytest.mark.parametrize("case", ["before the process group", "found by rank 0's listing"])
def test_under_torchrun_a_user_error_is_printed_once(tmp_path, case):
    if case == "before the process group":
        root, message = "nowhere", f"error: data.root: folder '{tmp_path / 'nowhere'}' does not exist"
    else:  # rank 0 lists the files; the other rank receives the same error instead of a list
        root = tmp_path / "data"
        write_demo_dataset(root, {"train": 2, "val": 1})
        for image in (root / "val" / "ring").iterdir():
            image.write_bytes(b"garbage")
        message = f"error: {root / 'val' / 'ring'}: no usable image left in this class after the scan"
    result = warm.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       "-m", "powergrad_train", "--config", "smoke.yaml", "--set", f"data.root={root}",
                       "--output", str(tmp_path / "run")],
                      cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert (result.stdout + result.stderr).count(message) == 1, result.stderr[-2000:]


def test_an_image_that_fails_to_decode_in_a_worker_is_skipped_and_the_run_goes_on(tmp_path, capsys):
    """A loader worker meets the damaged file: the run trains both epochs without it, names it once
    per process that met it, and lists it in the split's skipped.txt."""
    root = tmp_path / "data"
    write_demo_dataset(root, {"train": 16, "val": 6})
    bad = sorted((root / "train").rglob("*.jpg"))[5]
    bad.write_bytes(jpeg_without_tables())  # passes the scan, fails to decode
    run_cli("--config", "smoke.yaml", "--output", tmp_path / "run", *tiny_overrides(root, **{"data.workers": 1}))
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if str(bad) in line]
    assert lines and lines[0].startswith(f"data: cannot read {bad} (") and "training goes on without it" in lines[0]
    assert (tmp_path / "run" / "epoch-0002.pt").exists()
    listed = [p for p in Path(os.environ["POWERGRAD_TRAIN_CACHE"]).rglob("skipped.txt") if str(bad) in p.read_text()]
    assert len(listed) == 1 and "skipped when read" in listed[0].read_text()
