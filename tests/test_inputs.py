"""What a user gives the command line, checked before any work: paths, names, the model against the
recipe, text from the disk, and --dry-run making every check a real start makes."""

import os
import shutil
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.models import register_model

from powergrad_train.cli import _bench_parser, _train_parser, _validate_parser, main
from powergrad_train.config.build import build_config
from powergrad_train.config.recipes import BUNDLED_RECIPES
from powergrad_train.config.sections import ModelConfig
from powergrad_train.data.demo import write_demo_dataset
from powergrad_train.system.errors import ConfigError
from powergrad_train.training.models import build_model, check_model_runs
from tests import warm
from tests.conftest import refused, tiny_overrides

LONG = "a" * 300  # one name longer than any file system allows (255 bytes on Linux)


def tree(folder) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ----------------------------------------------------------------------------- paths

@pytest.mark.parametrize("option,args", [
    ("--output", ["--config", "smoke.yaml", "--output", "{tmp}/" + LONG]),
    ("--output", ["--config", "smoke.yaml", "--output", "{tmp}/" + LONG, "--dry-run"]),
    ("--output", ["--config", "smoke.yaml", "--output", "{tmp}/new/" + LONG + "/run"]),  # under a folder not there yet
    ("--resume", ["--config", "smoke.yaml", "--output", "{tmp}/run", "--resume", "{tmp}/" + LONG]),
    ("data.root", ["--config", "smoke.yaml", "--output", "{tmp}/run", "--set", "data.root={tmp}/" + LONG]),
    ("--checkpoint", ["validate", "--checkpoint", "{tmp}/" + LONG]),
    ("report", ["report", "{tmp}/" + LONG]),
    ("report --out", ["report", "{tmp}", "--out", "{tmp}/" + LONG]),
    ("reproduce --data", ["reproduce", "1", "--data", "{tmp}/" + LONG, "--dry-run"]),
    ("reproduce --out", ["reproduce", "1", "--data", "{tmp}", "--out", "{tmp}/" + LONG, "--dry-run"]),
])
def test_every_path_option_refuses_a_name_the_system_cannot_hold(tmp_path, capsys, tiny_root, option, args):
    extra = tiny_overrides(tiny_root) if args[0] == "--config" and "data.root" not in option else []
    line = refused(capsys, *[a.format(tmp=tmp_path) for a in args], *extra)
    assert line.startswith(f"error: {option}: ") and "is longer than this file system allows (255 bytes)" in line
    assert tree(tmp_path) == []


def test_home_and_relative_paths_mean_the_same_from_any_folder(tiny_root, tmp_path, monkeypatch, capsys):
    """~ in --config, --output, --resume, --checkpoint and data.root (as `--opt=~/x` leaves it to us), and a
    relative data.root, stored absolute: validate and a resume from another folder find the same data."""
    home, work, elsewhere = tmp_path / "home", tmp_path / "work", tmp_path / "elsewhere"
    for folder in (home, work, elsewhere):
        folder.mkdir()
    (home / "r.yaml").write_text("base: smoke.yaml\n")
    (work / "data").symlink_to(tiny_root)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    one_epoch = {"schedule.epochs": 1, "data.batch_size": 32}
    main(["--config=~/r.yaml", "--output=~/runs/x", *tiny_overrides("data", **one_epoch)])
    assert (home / "runs" / "x" / "last.pt").is_file() and not (work / "~").exists()
    assert f"root: {work / 'data'}\n" in (home / "runs" / "x" / "config.yaml").read_text()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    main(["validate", "--checkpoint=~/runs/x/last.pt"])
    assert capsys.readouterr().out.startswith(f"{home / 'runs' / 'x' / 'last.pt'}: val loss ")
    main(["--config=~/r.yaml", "--output=~/runs/y", "--resume=~/runs/x/epoch-0001.pt", "--dry-run",
          *tiny_overrides("~/../work/data", **one_epoch)])
    assert tree(elsewhere) == [] and not (home / "runs" / "y").exists()


# ----------------------------------------------------------------------------- names

@pytest.mark.parametrize("args,hint", [
    (["valdate", "--checkpoint", "x"], "unknown command 'valdate' (did you mean validate?)"),
    (["reprodcue", "1"], "unknown command 'reprodcue' (did you mean reproduce?)"),
    (["smoke.yaml"], "unknown command 'smoke.yaml' (did you mean --config smoke.yaml?)"),
    (["report", "x", "--outt", "y"], "unrecognized argument '--outt' (did you mean --out?)"),
    (["reproduce", "1", "--data", "x", "--rowz", "1"], "unrecognized argument '--rowz' (did you mean --rows?)"),
])
def test_a_misspelled_command_or_option_gets_the_closest(capsys, args, hint):
    assert hint in refused(capsys, *args)


@pytest.mark.parametrize("parser,required", [(_train_parser, ["--config", "x"]),
                                             (_validate_parser, ["--checkpoint", "x"]),
                                             (_bench_parser, ["--config", "x"])])
def test_every_option_misspelled_gets_itself_suggested(parser, required):
    p = parser()
    for option in [o for o in p.option_names if o.startswith("--")]:
        typo = option[:3] + option[4] + option[3] + option[5:] if len(option) > 5 else option + "x"
        with pytest.raises(ConfigError, match=rf"unrecognized argument '{typo}' \(did you mean {option}\?\)"):
            p.parse_args(required + [typo])


@pytest.mark.parametrize("wrong,right", [("resnet5O", "resnet50"), ("ResNet50", "resnet50"), ("resnet-18", "resnet18"),
                                         ("seresnet_50", "seresnet50"), ("resnet18nobn", "resnet18_nobn")])
def test_a_wrong_model_name_gets_the_closest_timm_model(wrong, right):
    with pytest.raises(ConfigError, match=rf"model\.name: '{wrong}' is not a timm model \(did you mean {right}\?\)"):
        build_model(ModelConfig(name=wrong))


# ----------------------------------------------------------------------------- the model against the recipe

@pytest.mark.parametrize("dry_run", [True, False])
def test_a_micro_batch_of_one_at_a_1x1_feature_map_is_one_line_at_start(tiny_root, tmp_path, capsys, dry_run):
    """resnet10t at 16 px ends at 1x1: batch norm in train mode needs more than one value per channel."""
    line = refused(capsys, "--config", "smoke.yaml", "--output", tmp_path / "run", *(["--dry-run"] if dry_run else []),
                   *tiny_overrides(tiny_root, **{"data.batch_size": 4, "train.accumulate_steps": 4}))
    assert line == ("error: model.name: resnet10t cannot train on 1 image(s) of 16x16 px per step (data.batch_size 4 "
                    "over 1 process(es) and 4 accumulation step(s)): Expected more than 1 value per channel when "
                    "training, got input size torch.Size([1, 256, 1, 1])")
    assert tree(tmp_path) == []


def test_an_input_size_the_model_does_not_take_is_one_line_at_start(tiny_root, tmp_path, capsys):
    line = refused(capsys, "--config", "smoke.yaml", "--output", tmp_path / "run", "--dry-run",
                   *tiny_overrides(tiny_root, **{"model.name": "vit_tiny_patch16_224"}))
    assert "vit_tiny_patch16_224 cannot train on 16 image(s) of 16x16 px" in line
    assert "Input height (16) doesn't match model (224)" in line


def test_every_paper_recipe_s_model_passes_the_check():
    """On the meta device: no memory, no compute, whatever the model's size (each distinct model once:
    the recipes' micro-batches, 32 and more on up to 8 GPUs, all pass batch norm's check alike)."""
    seen = set()
    for path in sorted(BUNDLED_RECIPES.glob("*.yaml")):
        cfg = build_config(path.name)
        case = (cfg.model.name, cfg.model.num_classes, cfg.model.zero_init_last, cfg.data.image_size)
        if path.stem != "smoke" and case not in seen:
            seen.add(case)
            check_model_runs(cfg.model, cfg.data.image_size, cfg.data.batch_size // 8, train=True)
    assert {name for name, *_ in seen} == {"resnet18", "resnet50", "resnet101", "seresnet18", "seresnet50",
                                           "resnet18_nobn"}


class _ReadsItsInput(torch.nn.Module):
    """A model whose forward reads a value to the host, which the meta device cannot do."""

    def __init__(self, num_classes=10, **kwargs):
        super().__init__()
        self.head = torch.nn.Linear(3, num_classes)

    def forward(self, x):
        scale = 1.0 if x.mean().item() > -1 else 2.0
        return self.head(x.mean((2, 3)) * scale)


@register_model
def powergrad_test_reads_input(pretrained=False, **kwargs):
    return _ReadsItsInput(**kwargs)


def test_a_model_the_meta_device_cannot_run_is_checked_on_the_cpu():
    with pytest.raises(RuntimeError), torch.device("meta"):  # the meta device cannot answer .item()
        timm.create_model("powergrad_test_reads_input")(torch.zeros(1, 3, 8, 8))
    check_model_runs(ModelConfig(name="powergrad_test_reads_input", num_classes=10), 8, batch=1, train=True)


@pytest.mark.parametrize("compiler", ["none", "g++"])
def test_compile_on_the_cpu_is_checked_for_a_c_compiler_at_start(tiny_root, tmp_path, compiler):
    """A machine with and without a C++ compiler, made by the PATH the run is given (torch searches $CXX,
    else g++ on the PATH): without one, one line at start; with one, the start-up checks pass."""
    tools = tmp_path / "bin"
    tools.mkdir()
    if compiler == "g++":
        found = shutil.which("g++")
        if found is None:
            pytest.skip("this machine has no g++ to put on the PATH")
        (tools / "g++").symlink_to(found)
    env = {k: v for k, v in os.environ.items() if k != "CXX"}
    env["PATH"] = str(tools)
    result = warm.run([sys.executable, "-m", "powergrad_train", "--config", "smoke.yaml", "--dry-run",
                       "--output", str(tmp_path / "run"), *tiny_overrides(tiny_root, **{"model.compile": "true"})],
                      env=env, capture_output=True, text=True, timeout=300)
    if compiler == "none":
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [
            "error: model.compile = true on the CPU needs a C++ compiler (torch.compile builds its kernels "
            "with one): install g++ or set CXX to one, or set model.compile: false"]
    else:
        assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- --dry-run checks what a start checks

@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("case", ["output holds a run", "resume changes a fixed key", "output under a file"])
def test_dry_run_refuses_what_a_start_refuses(two_epoch_run, tiny_root, tmp_path, capsys, case, dry_run):
    (tmp_path / "file").write_text("")
    args, message = {
        "output holds a run": (["--output", two_epoch_run], "already holds a run"),
        "resume changes a fixed key": (["--output", tmp_path / "new", "--resume", two_epoch_run / "epoch-0001.pt",
                                        "--set", "optim.lr=0.5"],
                                       "the recipe changes keys that define the run: optim.lr: 0.05 -> 0.5"),
        "output under a file": (["--output", tmp_path / "file" / "run"],
                                f"--output: cannot create or write the run folder {tmp_path / 'file' / 'run'} "
                                f"({tmp_path / 'file'} is a file)"),
    }[case]
    before = tree(two_epoch_run)
    line = refused(capsys, "--config", "smoke.yaml", *tiny_overrides(tiny_root), *args, *(["--dry-run"] if dry_run else []))
    assert message in line
    assert tree(tmp_path) == ["file"] and tree(two_epoch_run) == before


# ----------------------------------------------------------------------------- clearer messages

def test_train_and_val_with_different_classes_are_named(tmp_path, capsys):
    root = tmp_path / "data"
    write_demo_dataset(root, {"train": 2, "val": 1})
    (root / "val" / "ring").rename(root / "val" / "rings")
    line = refused(capsys, "--config", "smoke.yaml", "--output", tmp_path / "run", "--dry-run", *tiny_overrides(root))
    assert line == (f"error: data.root: {root}: train/ and val/ hold different class folders (only in train/: ring; "
                    "only in val/: rings)")


def test_a_data_root_that_is_a_file_says_so(tmp_path, capsys):
    (tmp_path / "imagenet.tar").write_bytes(b"")
    line = refused(capsys, "--config", "smoke.yaml", "--dry-run", "--output", tmp_path / "run",
                   "--set", f"data.root={tmp_path / 'imagenet.tar'}")
    assert line == (f"error: data.root: '{tmp_path / 'imagenet.tar'}' is a file, not a folder (an ImageFolder root "
                    "holds train/ and val/ folders)")


def test_validate_given_a_run_folder_lists_its_checkpoints(two_epoch_run, capsys):
    line = refused(capsys, "validate", "--checkpoint", two_epoch_run)
    assert line == (f"error: --checkpoint: {two_epoch_run} is a folder; pass a checkpoint file in it (checkpoints "
                    "there: best.pt, epoch-0001.pt, epoch-0002.pt, last.pt)")


# ----------------------------------------------------------------------------- text from the disk

def test_names_with_any_bytes_are_printed_logged_and_cached_safely(tmp_path, capsys):
    """A data folder, class folder and file names that are not UTF-8 or hold a newline: listed, cached,
    reported and printed escaped on one line each (first by a real process whose stdout is strict UTF-8)."""
    root = os.fsencode(tmp_path) + b"/data\xff"
    write_demo_dataset(Path(os.fsdecode(root)), {"train": 2, "val": 1})
    os.rename(root + b"/train/ring", root + b"/train/ri\xffng")
    os.rename(root + b"/val/ring", root + b"/val/ri\xffng")
    with open(root + b"/train/ri\xffng/bad\nname\x1b[31m.jpg", "wb") as f:
        f.write(b"garbage")
    for folder, _, _ in os.walk(root):  # older than the listing's racy window: the cache will be trusted
        os.utime(folder, (1e9, 1e9))
    args = ["--config", "smoke.yaml", "--dry-run", *tiny_overrides(Path(os.fsdecode(root)), **{"data.batch_size": 4})]
    printed = r"data\xff/train (ri\xffng/bad\nname\x1b[31m.jpg: not an image, or damaged)"
    result = warm.run([sys.executable, "-m", "powergrad_train", *map(os.fsencode, args)], cwd=tmp_path,
                            env=dict(os.environ, PYTHONIOENCODING="utf-8:strict"), capture_output=True, timeout=300)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert "data: skipped 1 unusable file(s) in " in out and printed in out and "\x1b" not in out
    skipped = [p for p in Path(os.environ["POWERGRAD_TRAIN_CACHE"]).rglob("skipped.txt")
               if b"data\\xff" in p.read_bytes()]
    assert [p.read_text("utf-8").count("\n") for p in skipped] == [1]
    listing = [(p, p.stat().st_mtime_ns) for p in skipped[0].parent.iterdir()]
    main(args)  # the second start reads the names back from the listing cache
    out = capsys.readouterr().out
    assert printed in out and "20 train / 10 val images" in out
    assert [(p, p.stat().st_mtime_ns) for p in skipped[0].parent.iterdir()] == listing  # not listed again
    for image in os.listdir(root + b"/val/ri\xffng"):  # a class left without a usable image: an error naming it
        os.remove(root + b"/val/ri\xffng/" + image)
    with open(root + b"/val/ri\xffng/\xff.jpg", "wb") as f:
        f.write(b"garbage")
    line = refused(capsys, *args)
    assert line == f"error: {tmp_path}/data\\xff/val/ri\\xffng: no usable image left in this class after the scan"
