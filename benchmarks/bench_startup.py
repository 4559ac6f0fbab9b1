"""Start-up cost of listing and checking the training split, against the number of files.

    python benchmarks/bench_startup.py                                  # 10,000 and 50,000 files
    python benchmarks/bench_startup.py --files 1281167 --classes 1000   # ImageNet's train split

For each size it builds an ImageFolder of that many files (hard links to a few small JPEGs,
so the tree costs directory entries, not disk space; every file is in the page cache, as on a
machine that has read the data set once), then times, in this process:
  cold   the first listing: walk the tree, check every file, write the cache
  warm   a later start with nothing changed (a resume, the next run)
  one    a later start after one file was added to one class folder
and prints the cache's size. Rounds repeat warm and one-changed and report the median.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision  # noqa: F401  (a start has loaded it with timm before it lists the files)

from powergrad_train.data import files
from powergrad_train.data.demo import write_demo_dataset


def build_tree(root: Path, count: int, classes: int) -> None:
    """`count` files in `classes` folders: hard links to a few distinct small JPEGs (a file takes
    at most 65,000 links on ext4)."""
    write_demo_dataset(root / "sources", {"train": count // 600_000 + 1})  # 10 JPEGs each
    originals = sorted((root / "sources" / "train").rglob("*.jpg"))
    train = root / "data" / "train"
    for c in range(classes):
        folder = train / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(c, count, classes):
            os.link(originals[i % len(originals)], folder / f"n{c:08d}_{i}.JPEG")
    old = time.time() - 3600  # a data set copied before the run, not seconds ago
    for folder in [train, *train.iterdir()]:
        os.utime(folder, (old, old))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", default="10000,50000", help="comma-separated numbers of files")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print(f"{os.cpu_count()} CPU cores; python {sys.version.split()[0]}, torch {torch.__version__}; "
          f"{args.classes} class folders; files in the page cache")
    print(f"{'files':>10} | {'cold s':>8} | {'warm s':>8} | {'one file added s':>16} | cache")
    for count in [int(n) for n in args.files.split(",")]:
        with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
            tmp = Path(tmp)
            build_tree(tmp, count, args.classes)
            os.environ["POWERGRAD_TRAIN_CACHE"] = str(tmp / "cache")
            root = tmp / "data"
            listing = []
            cold = timed(lambda: listing.append(files.list_split(root, "train", verbose=False)))
            assert len(listing[0].samples) == count
            time.sleep(2.1)  # folders the cold listing saw change within 2 s are not trusted: let them age
            files.list_split(root, "train", verbose=False)
            warm = statistics.median(timed(lambda: files.list_split(root, "train", verbose=False))
                                     for _ in range(args.rounds))
            changed = []
            folder = root / "train" / "n00000000"
            for r in range(args.rounds):
                shutil.copy(next(folder.iterdir()), folder / f"added_{r}.JPEG")
                old = time.time() - 3600
                os.utime(folder, (old - r, old - r))  # a change made long enough ago to be trusted
                changed.append(timed(lambda: files.list_split(root, "train", verbose=False)))
            (cache,) = (tmp / "cache" / "scans").rglob(files.CACHE_NAME)
            print(f"{count:>10,} | {cold:>8.2f} | {warm:>8.3f} | {statistics.median(changed):>16.3f} | "
                  f"{cache.stat().st_size / 2**20:.2f} MiB", flush=True)


if __name__ == "__main__":
    main()
