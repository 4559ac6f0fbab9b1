"""The DALI backend, run for real on the CPU (data.dali_device: cpu)."""

import shutil
import signal
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from powergrad_train import checkpoint
from powergrad_train.cli import main
from powergrad_train.config import build_config
from powergrad_train.data import build_train_loader, build_val_loader
from powergrad_train.data.demo import write_demo_dataset
from powergrad_train.errors import ConfigError
from powergrad_train.data.files import list_split
from tests.conftest import assert_same_weights, load_weights, tiny_overrides
from tests.test_data import IMAGE_FORMATS, jpeg_without_tables, write_image_formats
from tests.test_fault_tolerance import start, wait_for


def dali_cfg(root, *extra):
    return build_config(None, [f"data.root={root}", "data.backend=dali", "data.dali_device=cpu", "data.image_size=16",
                               "data.batch_size=8", "data.workers=1", *extra]).data


@pytest.fixture(scope="module")
def one_per_class(tmp_path_factory):
    """26 classes of one image each, so a label names its image."""
    root = tmp_path_factory.mktemp("unique")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(26):
            (root / split / f"c{c:02d}").mkdir(parents=True)
            pixels = rng.integers(0, 256, (24 + c, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / f"c{c:02d}" / "img.jpg")
    return root


def epoch_labels(loader, epoch):
    loader.set_epoch(epoch)
    batches = [y.tolist() for _, y in loader]
    assert len(batches) == loader.batches_per_epoch
    return batches


def test_shapes_dtypes_and_imagefolder_label_order(tiny_root):
    loader, classes = build_val_loader(dali_cfg(tiny_root), rank=0, world_size=1)
    images, labels = zip(*[(x.clone(), y.clone()) for x, y in loader])
    assert images[0].shape == (8, 3, 16, 16) and images[0].dtype == torch.float32
    assert labels[0].dtype == torch.int64
    reference = ImageFolder(str(tiny_root / "val"))
    assert classes == reference.classes
    assert torch.cat(labels).tolist() == reference.targets  # 60 images: the last batch of 4 is not padded


@pytest.mark.parametrize("world", [1, 2])
def test_epoch_length_and_coverage_over_shards(one_per_class, world):
    cfg = dali_cfg(one_per_class)
    loaders = [build_train_loader(cfg, seed=0, rank=r, world_size=world)[0] for r in range(world)]
    seen = {}
    for epoch in (0, 1):
        per_rank = [epoch_labels(loader, epoch) for loader in loaders]
        assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == 3  # 26 // 8 global batches
        flat = [label for batches in per_rank for batch in batches for label in batch]
        assert len(flat) == 24 == len(set(flat))  # no sample twice, 2 of 26 left for this epoch
        seen[epoch] = [b for batches in per_rank for b in batches]
    assert seen[0] != seen[1]  # reshuffled globally


def test_same_seed_same_batches_and_other_seed_differs(tiny_root):
    def first_batch(seed):
        loader, _ = build_train_loader(dali_cfg(tiny_root), seed=seed, rank=0, world_size=1)
        loader.set_epoch(0)
        images, labels = next(iter(loader))
        return images.clone(), labels.clone()
    a, b, c = first_batch(0), first_batch(0), first_batch(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_resume_inside_an_epoch_gives_the_same_batches(tiny_root):
    cfg = dali_cfg(tiny_root)
    loader, _ = build_train_loader(cfg, seed=3, rank=0, world_size=1)
    loader.set_epoch(1)
    batches, state = [], None
    for i, (x, y) in enumerate(loader):
        batches.append((x.clone(), y.clone()))
        if i == 6:
            state = loader.state()
    resumed, _ = build_train_loader(cfg, seed=3, rank=0, world_size=1)
    resumed.set_epoch(1, start_batch=7)
    resumed.restore(state)
    rest = [(x.clone(), y.clone()) for x, y in resumed]
    assert len(rest) == len(batches) - 7
    for (x, y), (rx, ry) in zip(batches[7:], rest):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_val_images_match_the_torchvision_backend(tiny_root):
    torch_loader, _ = build_val_loader(dali_cfg(tiny_root, "data.backend=torchvision"), rank=0, world_size=1)
    dali_loader, _ = build_val_loader(dali_cfg(tiny_root), rank=0, world_size=1)
    for (a, ya), (b, yb) in zip(torch_loader, dali_loader):
        assert torch.equal(ya, yb)
        # on average within a third of an 8-bit level (1 / 255 / std ~ 0.0175 after normalisation), at most
        # about three levels (the two resizes round differently at some edges)
        assert (a - b).abs().max() < 0.05 and (a - b).abs().mean() < 0.005


def test_corrupt_files_are_skipped_and_listed(tmp_path, capsys):
    write_demo_dataset(tmp_path, {"train": 2, "val": 1})
    folder = tmp_path / "val" / "circle"
    good = next(folder.glob("*.jpg")).read_bytes()
    (folder / "garbage.jpg").write_bytes(np.random.default_rng(0).bytes(5000))
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "png_named.jpg", format="PNG")
    loader, _ = build_val_loader(dali_cfg(tmp_path), rank=0, world_size=1)
    assert sum(len(y) for _, y in loader) == 11  # 10 good JPEGs + the PNG
    out = capsys.readouterr().out
    assert "skipped 3 unusable file(s)" in out
    listed = out.split("list in ")[1].strip()
    assert sorted(open(listed).read().splitlines()) == sorted(f"{folder / n}  (not an image, or damaged)" for n in
                                                              ("empty.jpg", "garbage.jpg", "truncated.jpg"))


def test_every_format_the_scan_keeps_is_decoded(tmp_path, capsys):
    """BMP, TIFF, WebP, PNM and a JPEG with fill bytes before a marker: kept by the scan, read by DALI
    in both splits, with the same pixels as the torchvision backend."""
    write_image_formats(tmp_path)
    for split in ("train", "val"):
        samples = list_split(tmp_path, split, verbose=True).samples
        assert len(samples) == 2 * len(IMAGE_FORMATS)
    assert "skipped" not in capsys.readouterr().out
    train, _ = build_train_loader(dali_cfg(tmp_path, "data.batch_size=2"), seed=0, rank=0, world_size=1)
    assert sum(len(y) for _, y in train) == 2 * len(IMAGE_FORMATS)
    dali_loader, _ = build_val_loader(dali_cfg(tmp_path), rank=0, world_size=1)
    torch_loader, _ = build_val_loader(dali_cfg(tmp_path, "data.backend=torchvision"), rank=0, world_size=1)
    for (a, ya), (b, yb) in zip(torch_loader, dali_loader):
        assert torch.equal(ya, yb)
        assert (a - b).abs().mean() < 0.02


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the gpu placement is valid here")
def test_gpu_placement_without_cuda_is_a_clear_error(tiny_root):
    with pytest.raises(ConfigError, match="data.dali_device = gpu needs a CUDA GPU"):
        build_train_loader(dali_cfg(tiny_root, "data.dali_device=gpu"), seed=0, rank=0, world_size=1)


def test_missing_dali_is_a_clear_error(tiny_root, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ConfigError, match=r"needs NVIDIA DALI: pip install -e '\.\[dali\]'"):
        build_val_loader(dali_cfg(tiny_root), rank=0, world_size=1)


DALI_RUN = {"data.backend": "dali", "data.dali_device": "cpu", "data.workers": 1}


def test_training_through_dali_and_exact_resume_after_sigterm(tiny_root, tmp_path):
    overrides = tiny_overrides(tiny_root, **DALI_RUN, **{"data.batch_size": 4, "train.log_every_steps": 10})
    straight = tmp_path / "straight"
    main(["--config", "smoke.yaml", "--output", str(straight), *overrides])
    run_dir = tmp_path / "preempted"
    proc = start(run_dir, [*overrides, "--set=checkpoint.every_steps=5"])
    wait_for(run_dir / "last.pt", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    state = checkpoint.load(run_dir / "last.pt")
    assert state["train_state"]["batch_in_epoch"] > 0 and state["data"][0]["pipeline"]  # DALI's own position was saved
    main(["--config", "smoke.yaml", "--output", str(run_dir), "--resume", "auto", *overrides])
    assert_same_weights(load_weights(straight / "last.pt"), load_weights(run_dir / "last.pt"))
    shutil.rmtree(straight)


def test_dali_training_can_validate_the_way_the_paper_did(tiny_root):
    """val_backend torchvision: PIL resize and center crop, whatever the train backend."""
    from powergrad_train.data.imagefolder import TorchValLoader
    cfg = dali_cfg(tiny_root, "data.val_backend=torchvision", "data.val_interpolation=bicubic")
    loader, _ = build_val_loader(cfg, rank=0, world_size=1)
    assert isinstance(loader, TorchValLoader)
    reference, _ = build_val_loader(dali_cfg(tiny_root, "data.backend=torchvision", "data.val_interpolation=bicubic"),
                                    rank=0, world_size=1)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(loader, reference))
    dali_bicubic, _ = build_val_loader(dali_cfg(tiny_root, "data.val_interpolation=bicubic"), rank=0, world_size=1)
    dali_bilinear, _ = build_val_loader(dali_cfg(tiny_root), rank=0, world_size=1)
    assert not torch.equal(next(iter(dali_bicubic))[0], next(iter(dali_bilinear))[0])  # DALI honours it too


def test_a_file_dali_cannot_decode_is_named_left_out_of_its_batch_and_resumable(one_per_class, tmp_path, capsys):
    """One image per class, so a label names its image. The bad file passes the listing's check
    (its markers parse) and fails in DALI's decoder."""
    shutil.copytree(one_per_class, tmp_path / "data")
    clean, _ = build_train_loader(dali_cfg(one_per_class), seed=0, rank=0, world_size=1)
    loader, _ = build_train_loader(dali_cfg(tmp_path / "data"), seed=0, rank=0, world_size=1)
    order = loader.sampler.epoch_order()
    victim = loader.samples[order[9]][0]  # the second image of the second batch
    open(victim, "wb").write(jpeg_without_tables())
    expected = epoch_labels(clean, 0)
    loader.set_epoch(0)
    batches, state = [], None
    for i, (x, y) in enumerate(loader):
        batches.append((x.clone(), y.clone()))
        if i == 1:
            state = loader.state()
    assert [y.tolist() for _, y in batches] == [expected[0], expected[1][:1] + expected[1][2:], expected[2]]
    assert loader.skipped.found == [victim]
    (line,) = [line for line in capsys.readouterr().out.splitlines() if victim in line]
    assert line.startswith(f"data: cannot read {victim} (DALI cannot decode it); training goes on without it")
    resumed, _ = build_train_loader(dali_cfg(tmp_path / "data"), seed=0, rank=0, world_size=1)
    resumed.set_epoch(0, start_batch=2)
    resumed.restore(state)  # taken from the pipeline started again after the bad file
    (x, y), = list(resumed)
    assert torch.equal(x, batches[2][0]) and torch.equal(y, batches[2][1])
    assert epoch_labels(loader, 1) == [[label for label in batch if label != expected[1][1]]
                                       for batch in epoch_labels(clean, 1)]  # known from then on


def test_a_val_file_dali_cannot_decode_is_left_out_and_said(tiny_root, tmp_path, capsys):
    shutil.copytree(tiny_root / "val", tmp_path / "data" / "val")
    shutil.copytree(tiny_root / "val", tmp_path / "data" / "train")
    victim = sorted((tmp_path / "data" / "val" / "dots").iterdir())[2]
    victim.write_bytes(jpeg_without_tables())
    loader, _ = build_val_loader(dali_cfg(tmp_path / "data"), rank=0, world_size=1)
    reference = ImageFolder(str(tmp_path / "data" / "val"))  # every file, as listed
    left_out = [path for path, _ in reference.samples].index(str(victim))
    for _ in range(2):  # found in the first validation, known in the second
        labels = [label for _, y in loader for label in y.tolist()]
        assert labels == [t for i, t in enumerate(reference.targets) if i != left_out]
    assert [line for line in capsys.readouterr().out.splitlines() if str(victim) in line][0].startswith(
        f"data: cannot read {victim} (DALI cannot decode it); validation goes on without it")
