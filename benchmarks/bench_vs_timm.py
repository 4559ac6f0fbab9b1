"""The whole job, end to end, against timm's own train.py at the same settings.

    python benchmarks/bench_vs_timm.py --timm-train /path/to/pytorch-image-models/train.py [--rounds 3]

timm's train.py is not part of the timm package: pass the file from a checkout of
pytorch-image-models. The script writes an ImageFolder of small JPEGs (8,000 train and 1,000
val images of 32x32 px, 10 classes; kept in the cache folder and reused), then alternates the
two jobs, each in a fresh process: resnet18 at 32 px, global batch 64, 2 loader workers, 2
epochs, SGD (Nesterov in ours, timm's default sgd is Nesterov too) lr 0.05, weight decay 5e-4,
cosine without warmup, float32 on the CPU, validation after every epoch, checkpoints on. The
augmentation is the same: random resized crop (scale 0.08-1, bilinear), horizontal flip,
normalise (timm's colour jitter off). Wall time of the whole command, start-up included;
prints each round and the median ratio last; the two go first in turn.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from powergrad_train.data.demo import CLASSES, draw
from powergrad_train.system.cache import cache_dir


def write_images(root: Path) -> Path:
    """8,000 train / 1,000 val JPEGs of 32x32 px in the demo's 10 classes, written once."""
    if (root / "COMPLETE").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    for split, count in (("train", 800), ("val", 100)):
        for c, kind in enumerate(CLASSES):
            folder = root / split / kind
            folder.mkdir(parents=True)
            rng = np.random.default_rng([split == "val", c])
            for i in range(count):
                draw(kind, rng).resize((32, 32)).save(folder / f"{kind}_{i:04d}.jpg", quality=90)
    (root / "COMPLETE").touch()
    return root


def commands(data: Path, out: Path, timm_train: str, workers: int) -> dict[str, list[str]]:
    ours = [sys.executable, "-m", "powergrad_train", "--config", "smoke.yaml", "--output", str(out / "ours")]
    for key, value in {"model.name": "resnet18", "data.root": data, "data.image_size": 32, "data.crop_scale_min": 0.08,
                       "data.batch_size": 64, "data.workers": workers, "schedule.epochs": 2,
                       "schedule.warmup_epochs": 0, "optim.lr": 0.05, "optim.weight_decay": 5e-4,
                       "train.log_every_steps": 50}.items():
        ours += ["--set", f"{key}={value}"]
    timm = [sys.executable, timm_train, "--data-dir", str(data), "--val-split", "val", "--model", "resnet18",
            "--num-classes", "10", "--img-size", "32", "-b", "64", "-j", str(workers), "--epochs", "2",
            "--device", "cpu", "--no-prefetcher", "--color-jitter", "0", "--interpolation", "bilinear",
            "--lr", "0.05", "--weight-decay", "5e-4", "--sched", "cosine", "--warmup-epochs", "0",
            "--cooldown-epochs", "0", "--opt", "sgd", "--momentum", "0.9", "--log-interval", "50",
            "--checkpoint-hist", "2", "--output", str(out / "timm")]
    return {"timm": timm, "ours": ours}


def wall_time(command: list[str], out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return elapsed


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timm-train", required=True, help="train.py of a pytorch-image-models checkout")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    data = write_images(cache_dir() / "bench-vs-timm-32px")
    with tempfile.TemporaryDirectory(prefix="bench-vs-timm-") as tmp:
        jobs = commands(data, Path(tmp), args.timm_train, args.workers)
        # A first run lists and checks the files (unless an earlier one cached the result): shown, not counted.
        print(f"ours, first run: {wall_time(jobs['ours'], Path(tmp) / 'ours'):.1f} s", flush=True)
        times = {"timm": [], "ours": []}
        for r in range(args.rounds):
            # Alternate which goes first, so a drift in the machine's speed favours neither.
            for name in ("timm", "ours") if r % 2 == 0 else ("ours", "timm"):
                times[name].append(wall_time(jobs[name], Path(tmp) / name))
            print(f"round {r + 1}: timm {times['timm'][-1]:.1f} s, ours {times['ours'][-1]:.1f} s", flush=True)
    ratios = [t / o for t, o in zip(times["timm"], times["ours"])]
    print(f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads; python {sys.version.split()[0]}, "
          f"torch {torch.__version__}; resnet18 32 px, batch 64, {args.workers} workers, 2 epochs of 8,000 images")
    print(f"speed relative to timm's train.py (its wall time / ours): {statistics.median(ratios):.3f} "
          f"[{min(ratios):.3f}-{max(ratios):.3f}] (timm {statistics.median(times['timm']):.1f} s, "
          f"ours {statistics.median(times['ours']):.1f} s)")


if __name__ == "__main__":
    main()
