"""scripts/prepare_imagenet.py on fake ILSVRC2012 archives of the official structure (3 classes)."""

import io
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO

WNIDS = ["n01440764", "n01443537", "n01484850"]
VAL_TRUTH = [3, 1, 2, 2, 3, 1]  # ILSVRC2012_IDs of val images 1..6: id k is WNIDS[k - 1]


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_archives(folder):
    from scipy.io import savemat
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children"]
    synsets = np.zeros(4, dtype=[(f, "O") for f in fields])
    for i, wnid in enumerate(WNIDS):
        synsets[i] = (i + 1, wnid, f"class {i}", "", 0)
    synsets[3] = (1001, "n00000001", "a parent", "", 3)  # not a leaf: no class of its own
    meta = io.BytesIO()
    savemat(meta, {"synsets": synsets})
    with tarfile.open(folder / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        add(tar, "ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue())
        add(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
            "".join(f"{k}\n" for k in VAL_TRUTH).encode())
    with tarfile.open(folder / "ILSVRC2012_img_train.tar", "w") as outer:
        for c, wnid in enumerate(WNIDS):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for i in range(4):
                    add(tar, f"{wnid}_{i}.JPEG", jpeg(10 * c + i))
            add(outer, f"{wnid}.tar", inner.getvalue())
    with tarfile.open(folder / "ILSVRC2012_img_val.tar", "w") as tar:
        for n in range(1, 7):
            add(tar, f"ILSVRC2012_val_{n:08d}.JPEG", jpeg(100 + n))


def prepare(archives, out, *extra):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_imagenet.py"), str(archives), str(out), *extra],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def archives(tmp_path):
    folder = tmp_path / "archives"
    folder.mkdir()
    write_archives(folder)
    return folder


def test_builds_the_imagefolder_tree_idempotently_and_resumes(archives, tmp_path):
    out = tmp_path / "imagenet"
    result = prepare(archives, out, "--expect", "12,6,3")
    assert result.returncode == 0, result.stderr
    assert f"{out}: 12 train images in 3 classes, 6 val images" in result.stdout
    assert sorted(p.name for p in (out / "train").iterdir()) == WNIDS
    assert sorted(p.name for p in (out / "train" / WNIDS[0]).iterdir()) == [f"{WNIDS[0]}_{i}.JPEG" for i in range(4)]
    for n, k in enumerate(VAL_TRUTH, start=1):  # each val image in the folder of its ground-truth class
        assert (out / "val" / WNIDS[k - 1] / f"ILSVRC2012_val_{n:08d}.JPEG").read_bytes() == jpeg(100 + n)
    first_val = out / "val" / WNIDS[2] / "ILSVRC2012_val_00000001.JPEG"
    before = first_val.stat().st_mtime_ns
    (out / "train" / WNIDS[1]).rename(out / "train" / f"{WNIDS[1]}.partial")  # as if killed mid-class
    result = prepare(archives, out, "--expect", "12,6,3")
    assert result.returncode == 0, result.stderr
    assert len(list((out / "train" / WNIDS[1]).iterdir())) == 4 and not (out / "train" / f"{WNIDS[1]}.partial").exists()
    assert first_val.stat().st_mtime_ns == before  # already in place: not rewritten


def test_counts_short_of_ilsvrc2012_are_listed(archives, tmp_path):
    result = prepare(archives, tmp_path / "imagenet")
    assert result.returncode == 1
    assert "missing: expected 1281167 train / 50000 val images in 1000 classes" in result.stdout


@pytest.mark.parametrize("damage", ["missing", "not a tar"])
def test_a_missing_or_wrong_archive_is_one_line(archives, tmp_path, damage):
    train = archives / "ILSVRC2012_img_train.tar"
    if damage == "missing":
        train.unlink()
        message = f"error: {train} is missing (expected the official ILSVRC2012 archive of that name)"
    else:
        train.write_bytes(b"garbage" * 100)
        message = f"error: {train} is not a readable tar archive"
    result = prepare(archives, tmp_path / "imagenet")
    assert result.returncode == 2
    assert result.stderr.strip().startswith(message) and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "imagenet").exists()  # refused before extracting anything
