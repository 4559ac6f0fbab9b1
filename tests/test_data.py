"""The ImageFolder backend: global reshuffling, sharding, per-sample seeds, bad folders and files."""

import hashlib
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from powergrad_train.config.build import build_config
from powergrad_train.data import build_train_loader, build_val_loader, check_data, files
from powergrad_train.data.demo import write_demo_dataset
from powergrad_train.data.sampling import TrainSampler, ValSampler
from powergrad_train.system.errors import DataError, ImageError
from tests import warm


def epoch_indices(size, batch, world, epoch, seed=0):
    per_rank = []
    for rank in range(world):
        sampler = TrainSampler(size, batch, rank, world, seed)
        sampler.set_epoch(epoch)
        per_rank.append([i for i, _ in sampler])
    return per_rank


@pytest.mark.parametrize("world", [1, 2, 4])
def test_train_sampler_covers_each_sample_at_most_once_with_equal_lengths(world):
    ranks = epoch_indices(103, 8, world, epoch=0)
    assert len({len(r) for r in ranks}) == 1
    flat = [i for r in ranks for i in r]
    assert len(flat) == 96 == len(set(flat))  # 12 full global batches, ragged tail of 7 dropped


def test_train_sampler_reshuffles_every_epoch_and_repeats_with_seed():
    assert epoch_indices(64, 8, 2, epoch=0) != epoch_indices(64, 8, 2, epoch=1)
    assert epoch_indices(64, 8, 2, epoch=3) == epoch_indices(64, 8, 2, epoch=3)
    assert epoch_indices(64, 8, 2, epoch=3, seed=1) != epoch_indices(64, 8, 2, epoch=3)


def test_global_batch_is_the_same_whatever_the_world_size():
    one = epoch_indices(64, 8, 1, epoch=2)[0]
    two = epoch_indices(64, 8, 2, epoch=2)
    for k in range(8):
        assert one[8 * k: 8 * k + 8] == two[0][4 * k: 4 * k + 4] + two[1][4 * k: 4 * k + 4]


def test_start_batch_skips_exactly_the_batches_already_seen():
    full = TrainSampler(64, 8, 0, 1, 0)
    full.set_epoch(1)
    rest = TrainSampler(64, 8, 0, 1, 0)
    rest.set_epoch(1, start_batch=3)
    assert list(rest) == list(full)[24:] and len(rest) == 40


def test_val_sampler_covers_every_image_once():
    for world in (1, 2, 3):
        flat = sorted(i for r in range(world) for i, _ in ValSampler(10, r, world))
        assert flat == list(range(10))


def test_loader_batches_do_not_depend_on_workers(tiny_root):
    batches = []
    for workers in (0, 2):
        cfg = build_config(None, [f"data.root={tiny_root}", "data.image_size=16", "data.batch_size=16",
                                  f"data.workers={workers}"])
        loader, classes = build_train_loader(cfg.data, seed=0, rank=0, world_size=1)
        loader.sampler.set_epoch(1)
        batches.append(next(iter(loader)))
    assert classes == sorted(classes) and len(classes) == 10
    assert batches[0][0].shape == (16, 3, 16, 16) and batches[0][0].dtype == torch.float32
    assert torch.equal(batches[0][0], batches[1][0]) and torch.equal(batches[0][1], batches[1][1])


def test_demo_dataset_is_deterministic(tmp_path):
    digests = []
    for name in ("a", "b"):
        write_demo_dataset(tmp_path / name, {"train": 2, "val": 1})
        files = sorted((tmp_path / name).rglob("*.jpg"))
        digests.append([hashlib.sha256(f.read_bytes()).hexdigest() for f in files])
    assert len(digests[0]) == 30 and digests[0] == digests[1]


def test_bad_folders_are_clear_errors(tmp_path):
    def check(root):
        check_data(build_config(None, [f"data.root={root}"]).data)

    with pytest.raises(DataError, match="does not exist"):
        check(tmp_path / "missing")
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="has no 'val/' folder"):
        check(tmp_path)
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match=r"val: no class folders"):
        check(tmp_path)
    # Listing (rank 0, after the cheap checks) finds a class without images.
    (tmp_path / "val" / "cat").mkdir()
    cfg = build_config(None, [f"data.root={tmp_path}"]).data
    with pytest.raises(DataError, match=r"train/cat: class folder holds no images"):
        build_train_loader(cfg, seed=0, rank=0, world_size=1)


def jpeg_without_tables() -> bytes:
    """Markers that parse (so the scan keeps the file) but no Huffman tables: decoding fails."""
    sof = b"\xff\xc0\x00\x11\x08\x00\x08\x00\x08\x03\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    sos = b"\xff\xda\x00\x0c\x03\x01\x00\x02\x00\x03\x00\x00\x3f\x00"
    return b"\xff\xd8" + sof + sos + b"\x12\x34" * 20 + b"\xff\xd9"


def lines_naming(text, path):
    return [line for line in text.splitlines() if str(path) in line]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_val_image_that_fails_to_decode_is_skipped_named_and_listed(tmp_path, workers, capsys):
    write_demo_dataset(tmp_path, {"train": 1, "val": 1})
    bad = sorted((tmp_path / "val").rglob("*.jpg"))[0]
    bad.write_bytes(jpeg_without_tables())
    cfg = build_config(None, [f"data.root={tmp_path}", "data.image_size=16", "data.batch_size=2",
                              f"data.workers={workers}"])
    loader, _ = build_val_loader(cfg.data, rank=0, world_size=1)
    assert sum(len(y) for _, y in loader) == 9  # the other images of the split, each once
    assert sum(len(y) for _, y in loader) == 9  # and again in the next validation
    loader.close()
    assert loader.skipped.found == [str(bad)]  # counted, also when a worker process met it
    (line,) = lines_naming(capsys.readouterr().out, bad)  # said once, in one line
    assert line.startswith(f"data: cannot read {bad} (") and "validation goes on without it (1 file(s) skipped" in line
    report = line.split("listed in ")[1].rstrip(")")
    assert lines_naming(open(report).read(), bad) == [f"{bad}  (cannot read image: {line.split(' (')[1].split(')')[0]}; "
                                                      "skipped when read)"]
    files.list_split(tmp_path, "val", verbose=True)  # a later start names it
    assert "1 file(s) in" in capsys.readouterr().out


def test_a_training_image_that_fails_to_decode_leaves_every_other_sample_as_it_was(tmp_path, capsys):
    write_demo_dataset(tmp_path / "clean", {"train": 2, "val": 1})
    shutil.copytree(tmp_path / "clean", tmp_path / "damaged")
    loaders = {name: build_train_loader(data_cfg(tmp_path / name), seed=0, rank=0, world_size=1)[0]
               for name in ("clean", "damaged")}
    loaders["clean"].set_epoch(1)
    order = loaders["clean"].sampler.epoch_order()
    victim = loaders["damaged"].loader.dataset.samples[order[5]][0]  # the second image of the second batch
    Path(victim).write_bytes(jpeg_without_tables())  # passes the listing's check, fails to decode
    batches = {}
    for name, loader in loaders.items():
        loader.set_epoch(1)
        batches[name] = list(loader)
    assert len(batches["damaged"]) == len(batches["clean"]) == 5  # the epoch keeps its steps
    for i, ((x, y), (cx, cy)) in enumerate(zip(batches["damaged"], batches["clean"])):
        keep = [0, 2, 3] if i == 1 else [0, 1, 2, 3]
        assert torch.equal(x, cx[keep]) and torch.equal(y, cy[keep]), i  # the same augmentation for every other
    assert loaders["damaged"].skipped.found == [victim]
    assert lines_naming(capsys.readouterr().out, victim)[0].startswith(f"data: cannot read {victim} (")


def test_a_batch_with_no_readable_image_is_an_error_naming_a_file(tmp_path):
    write_demo_dataset(tmp_path, {"train": 2, "val": 1})
    loader, _ = build_train_loader(data_cfg(tmp_path, batch=2), seed=0, rank=0, world_size=1)
    order = loader.sampler.epoch_order()
    victims = [loader.loader.dataset.samples[order[i]][0] for i in (0, 1)]
    for victim in victims:
        Path(victim).write_bytes(jpeg_without_tables())
    with pytest.raises(ImageError) as raised:
        next(iter(loader))
    assert raised.value.path == victims[0] and "every other image of its batch" in str(raised.value)
    assert "\n" not in str(raised.value)


def test_unreadable_files_are_left_out_of_both_splits(tmp_path, capsys):
    write_demo_dataset(tmp_path, {"train": 2, "val": 1})
    (tmp_path / "train" / "ring" / "zero.jpg").write_bytes(b"")
    (tmp_path / "train" / "ring" / "text.jpg").write_bytes(b"hello")
    cfg = build_config(None, [f"data.root={tmp_path}", "data.image_size=16", "data.batch_size=4", "data.workers=0"])
    loader, _ = build_train_loader(cfg.data, seed=0, rank=0, world_size=1)
    assert loader.num_samples == 20
    assert "skipped 2 unusable file(s)" in capsys.readouterr().out


IMAGE_FORMATS = {"bmp": {}, "tif": {}, "tiff": {"compression": "tiff_lzw"}, "webp": {"lossless": True}, "ppm": {},
                 "png": {}, "jpg": {}}


def write_image_formats(root):
    """Two classes in train/ and val/, each holding one image of every format, plus a JPEG whose
    second marker is preceded by 0xFF fill bytes (allowed by the standard) under the .jpg name."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(("a", "b")):
            folder = root / split / name
            folder.mkdir(parents=True)
            pixels = np.full((40, 48, 3), 60 + 120 * c, dtype=np.uint8) + rng.integers(0, 20, (40, 48, 3), dtype=np.uint8)
            for ext, options in IMAGE_FORMATS.items():
                Image.fromarray(pixels).save(folder / f"img.{ext}", **options)
            jpeg = (folder / "img.jpg").read_bytes()
            (folder / "img.jpg").write_bytes(jpeg[:2] + b"\xff\xff\xff" + jpeg[2:])


def test_the_scan_keeps_every_format_torchvision_decodes(tmp_path, capsys):
    write_image_formats(tmp_path)
    (tmp_path / "val" / "a" / "broken.bmp").write_bytes(b"BM" + bytes(60))
    cfg = build_config(None, [f"data.root={tmp_path}", "data.image_size=16", "data.batch_size=2", "data.workers=0"])
    loader, _ = build_val_loader(cfg.data, rank=0, world_size=1)
    images = torch.cat([x for x, _ in loader])
    assert images.shape[0] == 2 * len(IMAGE_FORMATS) and torch.isfinite(images).all()
    out = capsys.readouterr().out
    assert "skipped 1 unusable file(s)" in out and "(a/broken.bmp: not an image, or damaged)" in out  # named


def data_cfg(root, batch=4):
    return build_config(None, [f"data.root={root}", "data.image_size=16", f"data.batch_size={batch}",
                               "data.workers=0"]).data


def test_links_in_the_wild_dangling_and_looping(tmp_path, capsys):
    write_demo_dataset(tmp_path, {"train": 2, "val": 1})
    ring = tmp_path / "train" / "ring"
    (ring / "ghost.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (ring / "again").symlink_to(".")  # a loop: walked naively it repeats the class ~40 times
    loader, _ = build_train_loader(data_cfg(tmp_path), seed=0, rank=0, world_size=1)
    assert loader.num_samples == 20  # 10 classes x 2, each file once
    out = capsys.readouterr().out
    assert "skipped 1 folder link(s) in" in out and "(ring/again)" in out
    assert "skipped 1 unusable file(s)" in out and "ring/ghost.jpg: cannot be opened (No such file or directory)" in out


def test_a_class_left_empty_by_the_scan_is_an_error(tmp_path):
    write_demo_dataset(tmp_path, {"train": 2, "val": 1})
    for image in (tmp_path / "val" / "cross").iterdir():
        image.write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"val/cross: no usable image left in this class after the scan"):
        build_val_loader(data_cfg(tmp_path), rank=0, world_size=1)


def test_an_unwritable_scan_cache_only_costs_a_rescan(tmp_path, monkeypatch, capsys):
    write_demo_dataset(tmp_path / "data", {"train": 2, "val": 1})
    (tmp_path / "data" / "train" / "ring" / "bad.jpg").write_bytes(b"")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")  # a cache path below a file cannot be created, even by root
    monkeypatch.setenv("POWERGRAD_TRAIN_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(files, "_cache_warned", False)
    for _ in range(2):
        loader, _ = build_train_loader(data_cfg(tmp_path / "data"), seed=0, rank=0, world_size=1)
        assert loader.num_samples == 20
    out = capsys.readouterr().out
    assert out.count("cannot write the file-scan cache") == 1  # said once
    assert "skipped 1 unusable file(s)" in out and "list in" not in out


def test_images_over_the_decompression_bomb_limit_are_reported_before_training(tmp_path, monkeypatch, capsys):
    write_demo_dataset(tmp_path, {"train": 2, "val": 1})  # 64x64 JPEGs
    big = tmp_path / "train" / "dots" / "big.jpg"
    Image.new("RGB", (80, 70), (1, 2, 3)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2500)  # PIL refuses images over twice this: 5000 pixels
    loader, _ = build_train_loader(data_cfg(tmp_path), seed=0, rank=0, world_size=1)
    assert loader.num_samples == 20
    assert "dots/big.jpg: 80x70 pixels, over PIL's decompression-bomb limit of 5000 pixels" in capsys.readouterr().out


def test_val_interpolation_reaches_the_pipeline(tiny_root):
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torchvision import transforms
    first = {}
    for mode in ("bilinear", "bicubic"):
        cfg = build_config(None, [f"data.root={tiny_root}", "data.image_size=16", "data.batch_size=4",
                                  "data.workers=0", f"data.val_interpolation={mode}"]).data
        loader, _ = build_val_loader(cfg, rank=0, world_size=1)
        first[mode] = next(iter(loader))[0][0]
    assert not torch.equal(first["bilinear"], first["bicubic"])
    path = sorted((tiny_root / "val" / "checker").iterdir())[0]
    by_hand = transforms.Compose([
        transforms.Resize(18, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(16),
        transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    assert torch.equal(first["bicubic"], by_hand(Image.open(path).convert("RGB")))


def count_checks(monkeypatch) -> list:
    """The files the listing checks from now on (it opens no other)."""
    checked, check = [], files.problem_with
    monkeypatch.setattr(files, "problem_with", lambda path: checked.append(path) or check(path))
    return checked


def test_a_warm_start_checks_only_folders_whose_files_changed(tmp_path, monkeypatch):
    write_demo_dataset(tmp_path, {"train": 3, "val": 1})
    monkeypatch.setattr(files, "RACY_NS", 0)  # files written a moment ago count as settled (the rule has its test)
    first = files.list_split(tmp_path, "train", verbose=False)
    assert len(first.samples) == 30
    checked = count_checks(monkeypatch)
    assert files.list_split(tmp_path, "train", verbose=False) == first and checked == []  # opens no file
    ring, dots = tmp_path / "train" / "ring", tmp_path / "train" / "dots"
    (dots / "dots_0000.jpg").write_bytes(b"garbage")  # damaged in place
    rewritten = ring / "ring_0000.jpg"  # in place with the same size and its old time put back (rsync --inplace -t)
    before = rewritten.stat()
    rewritten.write_bytes(bytes(before.st_size))
    os.utime(rewritten, ns=(before.st_atime_ns, before.st_mtime_ns))
    paths = {p for p, _ in files.list_split(tmp_path, "train", verbose=False).samples}
    assert str(dots / "dots_0000.jpg") not in paths and str(rewritten) not in paths and len(paths) == 28
    assert sorted({os.path.dirname(p) for p in checked}) == [str(dots), str(ring)]  # those two folders alone
    checked.clear()
    (dots / "new.jpg").write_bytes((dots / "dots_0001.jpg").read_bytes())  # a file added
    paths = {p for p, _ in files.list_split(tmp_path, "train", verbose=False).samples}
    assert str(dots / "new.jpg") in paths and {os.path.dirname(p) for p in checked} == {str(dots)}
    (dots / "new.jpg").unlink()  # a file removed is gone at once
    assert str(dots / "new.jpg") not in {p for p, _ in files.list_split(tmp_path, "train", verbose=False).samples}


def test_files_changed_just_before_a_listing_are_checked_again_next_time(tmp_path, monkeypatch):
    """A change within the same timestamp tick as the listing could go unseen: such folders are not trusted."""
    write_demo_dataset(tmp_path, {"train": 2, "val": 1})  # files written just now
    files.list_split(tmp_path, "train", verbose=False)
    checked = count_checks(monkeypatch)
    files.list_split(tmp_path, "train", verbose=False)
    assert len(checked) == 20


def test_a_file_that_failed_when_read_is_read_again_once_repaired_even_with_its_old_size_and_mtime(tmp_path):
    write_demo_dataset(tmp_path, {"train": 2, "val": 1})
    bad = sorted((tmp_path / "train").rglob("*.jpg"))[0]
    files.SkippedFiles(tmp_path / "train", "training").add(str(bad), "damaged")
    assert files.SkippedFiles(tmp_path / "train", "training").earlier == {str(bad)}
    before = bad.stat()
    time.sleep(0.05)  # past the file system's timestamp tick
    bad.write_bytes(bad.read_bytes())  # repaired in place with the same size...
    os.utime(bad, ns=(before.st_atime_ns, before.st_mtime_ns))  # ...and its old mtime (rsync --inplace -t)
    assert files.SkippedFiles(tmp_path / "train", "training").earlier == set()


def test_the_listing_cache_is_compact(tmp_path, monkeypatch):
    monkeypatch.setenv("POWERGRAD_TRAIN_CACHE", str(tmp_path / "cache"))
    write_demo_dataset(tmp_path / "data", {"train": 50, "val": 1})
    files.list_split(tmp_path / "data", "train", verbose=False)
    (cache,) = (tmp_path / "cache" / "scans").rglob(files.CACHE_NAME)
    assert cache.stat().st_size / 500 < 20  # bytes per file: names only, compressed


def test_every_backend_is_registered_once_and_builds_the_declared_loaders(tiny_root):
    """Each backend's loaders implement the interface themselves (not the Protocol's stubs) and keep
    what it promises: batches_per_epoch batches of this process's share, num_samples val images."""
    from powergrad_train.config.registry import KINDS
    from powergrad_train.data import TrainLoader, ValLoader

    def implemented(obj, protocol, *names):
        for name in names:
            defined_in = next(c for c in type(obj).__mro__ if name in vars(c))
            assert defined_in is not protocol and defined_in is not ValLoader, f"{type(obj).__name__}.{name}"

    for name in KINDS["data_backend"].builtin:
        cfg = build_config(None, [f"data.root={tiny_root}", f"data.backend={name}", "data.image_size=16",
                                  "data.batch_size=8", "data.workers=1"]).data
        train, _ = build_train_loader(cfg, seed=0, rank=0, world_size=1)
        val, _ = build_val_loader(cfg, rank=0, world_size=1)
        implemented(train, TrainLoader, "__iter__", "set_epoch", "close")
        implemented(val, ValLoader, "__iter__", "close")
        train.set_epoch(0)
        batches = [(images.shape, targets.shape) for images, targets in train]
        assert batches == [((8, 3, 16, 16), (8,))] * train.batches_per_epoch, name
        assert sum(targets.shape[0] for _, targets in val) == val.num_samples, name
        train.close()
        val.close()


def test_the_fused_to_tensor_and_normalize_is_bit_identical_to_torchvision(tiny_root):
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torchvision import transforms

    from powergrad_train.data.imagefolder import normalized_tensor
    reference = transforms.Compose([transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    for path in sorted((tiny_root / "train").rglob("*.jpg"))[::7]:
        image = Image.open(path).convert("RGB")
        for crop in (image, image.crop((3, 5, 40, 29))):
            assert torch.equal(normalized_tensor(crop), reference(crop))


def test_a_split_walked_in_processes_is_listed_as_in_one(tmp_path, monkeypatch):
    """Many class folders are walked and fingerprinted in forked processes (on a machine with more
    than one core): the listing is the same, and so is the answer of the next start."""
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    for c in range(40):
        (tmp_path / "train" / f"c{c:02d}").mkdir(parents=True)
        Image.fromarray(pixels + c).save(tmp_path / "train" / f"c{c:02d}" / "a.jpg")
    (tmp_path / "train" / "c07" / "bad.jpg").write_bytes(b"garbage")
    monkeypatch.setattr(files, "RACY_NS", 0)
    monkeypatch.setattr(files, "PROCESSES", 2)
    in_processes = files.list_split(tmp_path, "train", verbose=False)
    checked = count_checks(monkeypatch)
    assert files.list_split(tmp_path, "train", verbose=False) == in_processes and checked == []
    monkeypatch.setattr(files, "PROCESSES", 1)
    (tmp_path / "train" / "c07" / "bad.jpg").write_bytes(b"garbage, again")  # rewritten: its folder is checked
    assert files.list_split(tmp_path, "train", verbose=False) == in_processes and len(checked) == 2
    assert len(in_processes.samples) == 40


def test_an_epoch_longer_than_its_samples_wraps_around_to_the_start_of_its_shuffle():
    """A resumed run keeps its steps per epoch when its data set lost a few files since."""
    for world in (1, 2):
        samplers = [TrainSampler(30, 8, rank, world, seed=0) for rank in range(world)]
        for sampler in samplers:
            sampler.batches_per_epoch = 4  # 32 positions for 30 samples
            sampler.set_epoch(1)
        order = samplers[0].epoch_order()
        shares = [[i for i, _ in s] for s in samplers]
        local = samplers[0].local_batch
        assert [i for b in range(4) for share in shares for i in share[b * local:(b + 1) * local]] == order + order[:2]
        seeds = [seed for s in samplers for _, seed in s]
        assert len(set(seeds)) == 32  # every position keeps its own augmentation seed


def test_the_demo_set_in_a_cache_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, capsys):
    from powergrad_train.cli import main
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")  # a cache path below a file cannot be created, even by root
    monkeypatch.setenv("POWERGRAD_TRAIN_CACHE", str(blocker / "cache"))
    with pytest.raises(SystemExit) as exit_:
        main(["--config", "smoke.yaml", "--dry-run"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: data.root: builtin:demo: cannot write the demo set under {blocker / 'cache'} (Not a directory); "
        "set POWERGRAD_TRAIN_CACHE to a writable folder"]


def test_a_demo_set_cut_short_by_a_full_disk_is_one_line_and_leaves_nothing_behind(tmp_path):
    import sys

    result = warm.run([sys.executable, "-m", "powergrad_train", "--config", "smoke.yaml", "--dry-run"],
                      env={**os.environ, "POWERGRAD_TRAIN_CACHE": str(tmp_path)}, capture_output=True, text=True,
                      timeout=300, file_size_limit=1000)  # smaller than one demo JPEG
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: data.root: builtin:demo: cannot write the demo set under {tmp_path} (File too large); "
        "set POWERGRAD_TRAIN_CACHE to a writable folder"]
    assert list(tmp_path.iterdir()) == []
