"""The PGT authors' published files, built here in their formats: timm 0.4.12 checkpoints and their logs."""

import argparse
import fractions
import re

import pytest
import timm
import torch

from powergrad_train.cli import main
from powergrad_train.config.sections import ModelConfig
from powergrad_train.reproduction import authors
from powergrad_train.reproduction.report import read_summary
from powergrad_train.training.models import build_model
from tests.conftest import load_weights


def their_args(**changes):
    """The Namespace their train.py saved: its parser's options as their README command set them."""
    values = dict(model="resnet18", batch_size=256, epochs=90, cooldown_epochs=10, warmup_epochs=5, sched="cosine",
                  lr=0.1, warmup_lr=0.01, min_lr=1e-4, weight_decay=5e-4, momentum=0.9, decay_epochs=30,
                  decay_rate=0.1, seed=42, modify_softmax=0.25, smoothing=0.0, amp=True, native_amp=True,
                  apex_amp=False, dali=True, num_classes=1000, world_size=4, rank=0, device="cuda:0",
                  data_dir="/imagenet", ratio=[3 / 4, 4 / 3], scale=[0.08, 1.0], mean=None, clip_grad=None,
                  clip_mode="norm", train_continuous=1, num_train_images=1281167)
    values.update(changes)
    return argparse.Namespace(**values)


def save_like_timm_0412(path, model, args, epoch=97, metric=67.796):
    """What timm 0.4.12's CheckpointSaver._save wrote (with native AMP's NativeScaler)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    torch.save({"epoch": epoch, "arch": args.model, "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict(), "version": 2, "args": args,
                "amp_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                               "_growth_tracker": 113},
                "metric": metric}, path)
    return path


def test_their_checkpoint_loads_weights_only_and_tells_their_settings(tmp_path):
    model = build_model(ModelConfig(name="resnet18_nobn", num_classes=10))
    path = save_like_timm_0412(tmp_path / "model_best.pth.tar", model, their_args(model="resnet18_wobn", num_classes=10))
    theirs = authors.load_checkpoint(path)
    assert theirs.model == "resnet18_nobn" and theirs.epoch == 97 and theirs.metric == 67.796
    text = theirs.describe()
    assert text.splitlines()[0] == (f"{path}: the PGT authors' checkpoint (timm 0.4.12 format) of epoch 97, their logged "
                                    "val top-1 67.796")
    assert ("their args: model resnet18_wobn (here resnet18_nobn), batch 256 per GPU x 4 GPUs = 1024 global, epochs "
            "90 + 10 cooldown, sched cosine, seed 42, modify_softmax 0.25 (PGT alpha), smoothing 0.0, AMP fp16 (native "
            "AMP, GradScaler), lr 0.1") in text
    cfg = theirs.config(["data.root=/x"])
    assert (cfg.model.name, cfg.model.num_classes, cfg.amp, cfg.data.val_backend) == ("resnet18_nobn", 10, "fp16",
                                                                                      "torchvision")
    ours = build_model(cfg.model)
    ours.load_state_dict(theirs.state_dict)  # strict: every key of their ResNet-18 without norm layers fits
    # Their resnet18_wobn (timm 0.4.12's ResNet with nn.Identity norms) has exactly these weights:
    convs = {f"layer{i}.{j}.conv{k}.weight" for i in range(1, 5) for j in range(2) for k in (1, 2)}
    expected = {"conv1.weight", "fc.weight", "fc.bias"} | convs | {f"layer{i}.0.downsample.0.weight" for i in (2, 3, 4)}
    assert set(theirs.state_dict) == expected


def test_a_step_run_says_timm_ignored_its_cooldown(tmp_path):
    model = timm.create_model("resnet10t", num_classes=10)
    path = save_like_timm_0412(tmp_path / "checkpoint-89.pth.tar", model, their_args(sched="step", modify_softmax=0.0))
    text = authors.load_checkpoint(path).describe()
    assert "epochs 90 (step: timm 0.4.12 ignores --cooldown-epochs 10 for step), sched step" in text
    assert "modify_softmax 0.0 (plain gradient)" in text


def test_a_file_with_other_python_objects_is_refused_in_one_line(tmp_path, capsys):
    model = timm.create_model("resnet10t", num_classes=10)
    path = save_like_timm_0412(tmp_path / "last.pth.tar", model, their_args(lr=fractions.Fraction(1, 10)))
    with pytest.raises(SystemExit) as stop:
        main(["validate", "--checkpoint", str(path)])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == (f"error: {path}: holds Python objects besides tensors, plain values and "
                                               "argparse.Namespace, so it is not loaded (loading it could run code)")
    (tmp_path / "folder.pth.tar").mkdir()
    with pytest.raises(SystemExit):
        main(["validate", "--checkpoint", str(tmp_path / "folder.pth.tar")])
    assert capsys.readouterr().err.startswith(f"error: --checkpoint: {tmp_path / 'folder.pth.tar'} is a folder; pass "
                                              "a checkpoint file in it")
    with pytest.raises(Exception, match=r"\(a folder: give the \.pth\.tar file in it\)"):
        authors.load_checkpoint(tmp_path / "folder.pth.tar")


def test_validate_evaluates_their_weights_through_this_project_s_val_pipeline(two_epoch_run, tiny_root, tmp_path,
                                                                           capsys):
    """The tiny run's weights saved in their format give the top-1 its own checkpoint gives."""
    model = timm.create_model("resnet10t", num_classes=10)
    model.load_state_dict(load_weights(two_epoch_run / "last.pt"))
    path = save_like_timm_0412(tmp_path / "model_best.pth.tar", model, their_args(model="resnet10t", num_classes=10))
    main(["validate", "--checkpoint", str(two_epoch_run / "last.pt")])
    ours = capsys.readouterr().out.strip().splitlines()[-1]
    main(["validate", "--checkpoint", str(path), "--set", f"data.root={tiny_root}", "--set", "data.image_size=16",
          "--set", "amp=off", "--set", "data.workers=0"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith(f"{path}: the PGT authors' checkpoint") and out[1].startswith("  their args: model resnet10t")
    top1 = re.search(r"top1 \S+ top5 \S+ \(60 images\)", ours).group()
    assert out[-1].startswith(f"{path}: val loss ") and out[-1].endswith(top1)


def test_their_folder_layout_maps_to_the_paper_rows(tmp_path):
    for folder in ("resnet18/step-scheduler-alpha-1.0", "resnet50/cosine-scheduler-alpha-0.3",
                   "resnet50/cosine-scheduler-alpha-1.0-label-smoothing", "resnet_non_bn/cosine-scheduler-alpha-0.25",
                   "resnet50/notes"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "summary.csv").write_text("epoch,train_loss,train_acc,eval_loss,eval_top1,eval_top5\n")
    logs = {f"{log.folder.parent.name}/{log.folder.name}": log for log in authors.find_logs(tmp_path)}
    assert sorted(logs) == ["resnet18/step-scheduler-alpha-1.0", "resnet50/cosine-scheduler-alpha-0.3",
                            "resnet50/cosine-scheduler-alpha-1.0-label-smoothing",
                            "resnet_non_bn/cosine-scheduler-alpha-0.25"]
    titles = {name: [r.title for r in log.rows()] for name, log in logs.items()}
    assert titles == {"resnet18/step-scheduler-alpha-1.0": ["Table 1 row 11: resnet18 step baseline"],
                      "resnet50/cosine-scheduler-alpha-0.3": ["Table 3 row 5: cosine, PGT 0.3"],
                      "resnet50/cosine-scheduler-alpha-1.0-label-smoothing": ["Table 3 row 4: cosine, LS 0.1"],
                      "resnet_non_bn/cosine-scheduler-alpha-0.25": ["Table 2 row 8: batch 256 PGT 0.25"]}
    with pytest.raises(Exception, match="holds no <model>/<schedule>-scheduler-alpha-<a>/summary.csv"):
        authors.find_logs(tmp_path / "resnet50")


def test_their_summary_csv_is_read_as_they_wrote_it(tmp_path):
    """timm's update_summary writes the header again when a run resumes (best_metric is None again);
    a resume from an older checkpoint logs its epochs again."""
    path = tmp_path / "summary.csv"
    header = "epoch,train_loss,train_acc,eval_loss,eval_top1,eval_top5"
    path.write_text(f"{header}\n1,6.1,1.5,5.9,3.25,10.1\n2,5.2,6.0,4.9,9.5,24.0\n{header}\n2,5.1,6.5,4.8,9.75,24.5\n"
                    "3,4.5,12.0,4.2,15.5,35.0\n")
    rows = read_summary(path)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[1]["eval_top1"] == 9.75 and rows[1]["train_top1"] == 6.5  # their train_acc
