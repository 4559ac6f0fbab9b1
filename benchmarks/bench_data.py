"""Images/s of the train loader alone: DALI's CPU pipeline against the torchvision loader (and
DALI's GPU pipeline, on a machine with CUDA).

    python benchmarks/bench_data.py [--images 600] [--workers 2] [--size 224] [--rounds 3] [--root DIR]

All read the same folder of JPEGs (a generated one of 400x350 JPEGs, or --root's train/) with
the same augmentation at the same crop size, DALI with `--workers` threads and torchvision with
`--workers` worker processes; the first batches of each pass (warm-up) are excluded. On a GPU
machine the loaders are those of a run on GPU 0: DALI hands over batches on the GPU (decoded
there, or on the CPU and copied by DALI), torchvision on the CPU. Last lines:
    dali-cpu: 412.3 images/s [405.1-420.0]
    torchvision: 280.4 images/s [270.2-291.3]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from powergrad_train.config.build import build_config
from powergrad_train.data import build_train_loader


def write_folder(root: Path, images: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / "train" / f"c{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        # smooth content with noise, so JPEG sizes are like photos rather than pure noise
        base = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((400, 350), Image.BILINEAR)
        noisy = np.asarray(img, dtype=np.int16) + rng.integers(-20, 20, (350, 400, 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    for c in range(10):
        (root / "val" / f"c{c}").mkdir(parents=True, exist_ok=True)
        (root / "val" / f"c{c}" / "x.jpg").write_bytes((root / "train" / f"c{c}" / f"{c:05d}.jpg").read_bytes())


def images_per_sec(loader, warmup_batches: int) -> float:
    loader.set_epoch(0)
    count, start = 0, None
    for i, (_, targets) in enumerate(loader):
        if i == warmup_batches:
            sync(targets)
            start = time.perf_counter()
        elif i > warmup_batches:
            count += targets.shape[0]
    sync(targets)
    return count / (time.perf_counter() - start)


def sync(tensor) -> None:
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--root", type=Path, help="read this ImageFolder's train/ instead of generated JPEGs")
    args = p.parse_args()
    backends = {"dali-cpu": ["data.backend=dali", "data.dali_device=cpu"], "torchvision": ["data.backend=torchvision"]}
    if torch.cuda.is_available():
        backends["dali-gpu"] = ["data.backend=dali", "data.dali_device=gpu"]
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        if not args.root:
            write_folder(root, args.images)
        results = {name: [] for name in backends}
        for _ in range(args.rounds):
            for name, backend in backends.items():
                cfg = build_config(None, [f"data.root={root}", f"data.image_size={args.size}",
                                          f"data.batch_size={args.batch}", f"data.workers={args.workers}", *backend])
                loader, _ = build_train_loader(cfg.data, seed=0, rank=0, world_size=1, device=device)
                results[name].append(images_per_sec(loader, warmup_batches=2))
                loader.close()
    print(f"{args.root or f'{args.images} JPEGs of 400x350'}, crop {args.size}, batch {args.batch}, {args.workers} "
          f"DALI threads / loader workers, {args.rounds} rounds, loaders of a run on {device}")
    for name, values in results.items():
        print(f"{name}: {statistics.median(values):.1f} images/s [{min(values):.1f}-{max(values):.1f}]")


if __name__ == "__main__":
    main()
