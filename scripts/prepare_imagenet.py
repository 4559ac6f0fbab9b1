"""Build the ImageFolder tree the trainer reads from the official ILSVRC2012 archives.

    python scripts/prepare_imagenet.py ARCHIVE_DIR OUT_DIR

ARCHIVE_DIR holds ILSVRC2012_img_train.tar (a tar of one tar per class), ILSVRC2012_img_val.tar
and ILSVRC2012_devkit_t12.tar.gz. OUT_DIR gets train/<synset>/*.JPEG and val/<synset>/*.JPEG,
the layout torchvision's ImageNet class builds. It is idempotent and resumable: a class folder
is renamed into place only once fully extracted, val images already in place are skipped, so an
interrupted run is simply started again. At the end the counts are checked against ILSVRC2012
(1,281,167 train and 50,000 val images, 1000 classes) and anything missing is listed; exit 1 then.
The devkit's meta.mat is read with scipy (`pip install -e ".[prepare]"`).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tarfile
from pathlib import Path

from tqdm import tqdm

TRAIN, VAL, DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"
GROUND_TRUTH = "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"
META = "ILSVRC2012_devkit_t12/data/meta.mat"
EXPECTED = (1_281_167, 50_000, 1000)


class PrepareError(Exception):
    """A missing or wrong archive: one line, exit 2."""


def open_archive(path: Path) -> tarfile.TarFile:
    if not path.is_file():
        raise PrepareError(f"{path} is missing (expected the official ILSVRC2012 archive of that name)")
    try:
        return tarfile.open(path)
    except (tarfile.TarError, OSError):
        raise PrepareError(f"{path} is not a readable tar archive (damaged, or another file under that name)") from None


def val_synsets(devkit: Path) -> list[str]:
    """The synset (WNID) of every val image, in file-number order, from the devkit."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise PrepareError("reading the devkit's meta.mat needs scipy: pip install -e '.[prepare]'") from None
    with open_archive(devkit) as tar:
        try:
            meta = loadmat(io.BytesIO(tar.extractfile(META).read()), squeeze_me=True)["synsets"]
            truth = tar.extractfile(GROUND_TRUTH).read().decode().split()
        except (KeyError, AttributeError):
            raise PrepareError(f"{devkit} has no {META} or {GROUND_TRUTH}: not the ILSVRC2012 devkit") from None
    wnid_of = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in meta if int(s["num_children"]) == 0}
    return [wnid_of[int(i)] for i in truth]


def extract_train(archive: Path, out: Path) -> None:
    """Each class tar into train/<wnid>/, through a temporary folder renamed when complete."""
    with open_archive(archive) as outer:
        members = [m for m in outer.getmembers() if m.name.endswith(".tar")]
        for member in tqdm(members, desc="train classes", unit="class"):
            folder = out / Path(member.name).stem
            if folder.is_dir():
                continue  # done by an earlier run
            partial = folder.with_name(folder.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            with tarfile.open(fileobj=outer.extractfile(member)) as inner:
                for image in inner.getmembers():
                    if image.isfile():
                        (partial / Path(image.name).name).write_bytes(inner.extractfile(image).read())
            partial.rename(folder)


def extract_val(archive: Path, synsets: list[str], out: Path) -> None:
    with open_archive(archive) as tar:
        for member in tqdm(tar, desc="val images", unit="image", total=len(synsets)):
            if not member.isfile():
                continue
            name = Path(member.name).name  # ILSVRC2012_val_00000001.JPEG
            number = int(name.rsplit("_", 1)[1].split(".")[0])
            target = out / synsets[number - 1] / name
            if target.is_file() and target.stat().st_size == member.size:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{name}.tmp")
            tmp.write_bytes(tar.extractfile(member).read())
            os.replace(tmp, target)


def counts(out: Path) -> tuple[int, int, int, set[str], set[str]]:
    def per_class(split):
        folder = out / split
        if not folder.is_dir():
            return {}
        return {d.name: len(os.listdir(d)) for d in folder.iterdir() if d.is_dir() and not d.name.endswith(".partial")}
    train, val = per_class("train"), per_class("val")
    return sum(train.values()), sum(val.values()), len(train), set(train), set(val)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("archive_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--expect", default=",".join(map(str, EXPECTED)), metavar="TRAIN,VAL,CLASSES",
                   help="counts to check at the end (default: ILSVRC2012's)")
    args = p.parse_args(argv)
    expected = tuple(int(n) for n in args.expect.split(","))
    try:
        synsets = val_synsets(args.archive_dir / DEVKIT)
        open_archive(args.archive_dir / TRAIN).close()  # fail on a missing archive before hours of work
        open_archive(args.archive_dir / VAL).close()
        extract_train(args.archive_dir / TRAIN, args.out_dir / "train")
        extract_val(args.archive_dir / VAL, synsets, args.out_dir / "val")
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train, val, classes, train_classes, val_classes = counts(args.out_dir)
    print(f"{args.out_dir}: {train} train images in {classes} classes, {val} val images")
    missing = []
    if (train, val, classes) != expected:
        missing.append(f"expected {expected[0]} train / {expected[1]} val images in {expected[2]} classes")
    if train_classes != val_classes:
        missing.append(f"classes without val images: {sorted(train_classes - val_classes)[:5]}; "
                       f"without train images: {sorted(val_classes - train_classes)[:5]}")
    if missing:
        print("missing: " + "; ".join(missing) + " (run again to finish an interrupted run, or check the archives)")
        return 1
    print("complete: train with --set data.root=" + str(args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
