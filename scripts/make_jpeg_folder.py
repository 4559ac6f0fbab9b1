"""Write an ImageFolder of ImageNet-like JPEGs, for the GPU check and benchmarks.

    python scripts/make_jpeg_folder.py OUT [--train 300] [--val 50] [--size 500x375] [--quality 90] [--workers N]

Each image is one of the demo set's ten shape classes (powergrad_train/data/demo.py), drawn at
64 px, scaled to --size and given fine noise, so a file weighs about what a photo of that size
does (about 100 KB at 500x375 and quality 90; ImageNet's train set averages about 110 KB, 138 GB
over 1.28 M files) while a model can still learn the classes. The same arguments write the same
files. The folder is written under a temporary name and renamed when complete; a folder that
already holds the same arguments (its COMPLETE file) is reused as it is.
"""

import argparse
import json
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from powergrad_train.data.demo import CLASSES, draw

NOISE = 20.0  # pixel noise sigma: sets the file size (8: about 60 KB, 20: about 100 KB at 500x375)


def write_class(job) -> int:
    folder, kind, count, seed, size, quality = job
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        img = draw(kind, rng).resize(size, Image.BICUBIC)
        noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, NOISE, (size[1], size[0], 3)).astype(np.float32)
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f"{kind}_{i:05d}.jpg", quality=quality)
    return count


def make_folder(out: Path, train: int, val: int, size=(500, 375), quality: int = 90, workers: int = 0) -> Path:
    """`out` holding train/ and val/ with `train` and `val` images per class (reused when it already does)."""
    settings = {"train": train, "val": val, "size": list(size), "quality": quality, "noise": NOISE, "version": 1}
    if (out / "COMPLETE").exists() and json.loads((out / "COMPLETE").read_text()) == settings:
        return out
    if out.exists():
        raise SystemExit(f"error: {out} exists and is not a folder written with these settings; remove it first")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    jobs = [(tmp / split / kind, kind, count, [split_index, class_index], tuple(size), quality)
            for split_index, (split, count) in enumerate((("train", train), ("val", val)))
            for class_index, kind in enumerate(CLASSES)]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        list(pool.map(write_class, jobs))
    (tmp / "COMPLETE").write_text(json.dumps(settings))
    os.rename(tmp, out)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--train", type=int, default=300, help="train images per class (10 classes)")
    p.add_argument("--val", type=int, default=50, help="val images per class")
    p.add_argument("--size", default="500x375", help="WIDTHxHEIGHT")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--workers", type=int, default=0, help="processes (default: one per core)")
    args = p.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    root = make_folder(args.out, args.train, args.val, size, args.quality, args.workers)
    files = sorted(root.glob("*/*/*.jpg"))
    mean_kb = sum(f.stat().st_size for f in files) / len(files) / 1e3
    print(f"{root}: {len(CLASSES)} classes, {args.train} train + {args.val} val images each, {size[0]}x{size[1]} "
          f"quality {args.quality}, {mean_kb:.0f} KB per file on average", file=sys.stderr)


if __name__ == "__main__":
    main()
