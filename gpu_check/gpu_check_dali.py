"""GPU check, part 1: DALI on the GPU end to end, against DALI on the CPU, on ImageNet-like JPEGs.

    python gpu_check/gpu_check_dali.py [--out DIR] [--size auto|full|small]

On a generated folder of 500x375 JPEGs (quality 90, 10 classes; full size: 10,000 train and
500 val images):
  1. train and val loaders with data.dali_device gpu and cpu: the same shapes, dtypes and label
     order, each epoch's batches exactly the sampler's files, batches on the run's device;
  2. val images of the gpu placement within a stated tolerance of the cpu placement's (and of
     the torchvision backend's);
  3. a mid-epoch resume from the loader's state continues with identical batches;
  4. the training step (resnet50, fp16, channels_last, 256 images, PGT) through DALI on the GPU
     against the same step on synthetic data (goal: at least 0.9x), and through DALI on the CPU
     and the torchvision backend, side by side. Timed inside epochs (5 warm-up steps, then 25),
     rounds alternating between the data sources: an ImageNet epoch has 1,250 steps at a global
     batch of 1,024, so a pipeline's start at each epoch is left out. The loaders alone, without
     a step, are timed by benchmarks/bench_data.py on the same folder.
On a machine without a GPU the gpu placement's steps are skipped, and the rest runs at small sizes.
"""

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from gpu_check_common import ON_GPU, SCRIPTS, Results, device, is_small, jpeg_folder, parser, work_dir

from powergrad_train.config.build import build_config
from powergrad_train.data import build_train_loader, build_val_loader, read_split
from powergrad_train.data.sampling import TrainSampler
from powergrad_train.system.dist import DistEnv
from powergrad_train.training.bench import synchronize
from powergrad_train.training.run import build_run

# Val images of the two placements: mean absolute difference after normalisation (one 8-bit level
# is 1 / 255 / 0.225 = 0.0174), so below half a level on average.
VAL_MEAN_TOLERANCE = 0.0087
STEP_GOAL = 0.9


def loader_cfg(root, size, placement):
    return build_config(None, [f"data.root={root}", "data.backend=dali", f"data.dali_device={placement}",
                               f"data.image_size={size['image']}", f"data.batch_size={size['batch']}",
                               f"data.workers={size['workers']}"]).data


def train_epoch(cfg, epoch):
    """One epoch's labels per batch and its first batch's (image shape, dtype, device, label dtype,
    device), and the labels of the files the sampler picks for it, per batch."""
    loader, _ = build_train_loader(cfg, seed=0, rank=0, world_size=1, device=device())
    loader.set_epoch(epoch)
    labels, first = [], None
    for images, targets in loader:
        first = first or (tuple(images.shape), images.dtype, images.device, targets.dtype, targets.device)
        labels.append(targets.tolist())
    loader.close()
    samples = read_split(cfg, "train", verbose=False).samples
    sampler = TrainSampler(len(samples), cfg.batch_size, 0, 1, seed=0)
    sampler.set_epoch(epoch)
    expected = [samples[i][1] for i, _ in sampler]
    expected = [expected[b:b + cfg.batch_size] for b in range(0, len(expected), cfg.batch_size)]
    return labels, first, expected


def val_batches(cfg):
    loader, _ = build_val_loader(cfg, rank=0, world_size=1, device=device())
    batches = [(x.cpu(), y.cpu()) for x, y in loader]
    loader.close()
    return batches


def resumed_identically(cfg, results, placement):
    loader, _ = build_train_loader(cfg, seed=3, rank=0, world_size=1, device=device())
    loader.set_epoch(1)
    batches, state, stop = [], None, loader.batches_per_epoch // 2
    for i, (x, y) in enumerate(loader):
        batches.append((x.cpu(), y.cpu()))
        if i == stop - 1:
            state = loader.state_dict()
    loader.close()
    resumed, _ = build_train_loader(cfg, seed=3, rank=0, world_size=1, device=device())
    resumed.set_epoch(1, start_batch=stop)
    resumed.load_state_dict(state)
    rest = [(x.cpu(), y.cpu()) for x, y in resumed]
    resumed.close()
    same = len(rest) == len(batches) - stop and all(torch.equal(a, c) and torch.equal(b, d)
                                                     for (a, b), (c, d) in zip(batches[stop:], rest))
    worst = max(((a - c).abs().max().item() for (a, _), (c, _) in zip(batches[stop:], rest)), default=0.0)
    results.check(same, f"{placement}: resumed after batch {stop} of epoch 2 from the loader's state, the "
                        f"{len(rest)} remaining batches are identical (largest pixel difference {worst:.3g})")


def loaders_alone(root, size, results):
    """benchmarks/bench_data.py on the same folder: each loader's images/s without a training step."""
    command = [sys.executable, str(SCRIPTS.parent / "benchmarks" / "bench_data.py"), "--root", str(root), "--batch", str(size["batch"]),
               "--size", str(size["image"]), "--workers", str(size["workers"]), "--rounds", str(size["rounds"])]
    done = subprocess.run(command, capture_output=True, text=True)
    if results.check(done.returncode == 0, f"loaders alone (benchmarks/bench_data.py): exit status {done.returncode}"):
        for line in done.stdout.strip().splitlines():
            results.note(line)
    else:
        print(done.stderr[-2000:])


def step_trainer(root, size, data, run_dir):
    overrides = [f"model.name={size['model']}", "model.num_classes=1000", f"data.image_size={size['image']}",
                 "data.crop_scale_min=0.08",
                 f"data.batch_size={size['batch']}", f"data.workers={size['workers']}", f"amp={size['amp']}",
                 f"channels_last={ON_GPU}", "loss.pgt_alpha=0.25", "train.log_every_steps=1000000",
                 "schedule.epochs=100", "schedule.warmup_epochs=0", "schedule.cooldown_epochs=0"]
    overrides += {"synthetic": ["data.backend=synthetic"],
                  "dali-gpu": [f"data.root={root}", "data.backend=dali", "data.dali_device=gpu"],
                  "dali-cpu": [f"data.root={root}", "data.backend=dali", "data.dali_device=cpu"],
                  "torchvision": [f"data.root={root}", "data.backend=torchvision"]}[data]
    trainer = build_run(build_config("smoke.yaml", overrides), Path(tempfile.mkdtemp(dir=run_dir)), DistEnv(), device())
    trainer.model.train()
    return trainer


def step_images_per_sec(trainer, epoch, warmup, steps):
    batches = trainer.device_batches(epoch)
    for _ in range(warmup):
        trainer.train_step(*next(batches))
    synchronize(trainer.device)
    start, count = time.perf_counter(), 0
    for _ in range(steps):
        images, targets = next(batches)
        trainer.train_step(images, targets)
        count += targets.shape[0]
    synchronize(trainer.device)
    return count / (time.perf_counter() - start)


def step_cost(root, size, results, run_dir):
    warmup, steps, rounds = size["warmup"], size["steps"], size["rounds"]
    sources = ["synthetic", "dali-gpu"] if ON_GPU else ["synthetic"]
    trainers = {name: step_trainer(root, size, name, run_dir) for name in sources}
    speeds = {name: [] for name in sources}
    ratios = []
    for r in range(rounds):  # alternate, so drift hits both alike
        for name in sources if r % 2 == 0 else sources[::-1]:
            speeds[name].append(step_images_per_sec(trainers[name], r, warmup, steps))
        if ON_GPU:
            ratios.append(speeds["dali-gpu"][-1] / speeds["synthetic"][-1])
    for trainer in trainers.values():
        trainer.close()
    for name in ("dali-cpu", "torchvision"):  # one at a time: their loaders use the CPU cores
        trainer = step_trainer(root, size, name, run_dir)
        speeds[name] = [step_images_per_sec(trainer, r, warmup, steps) for r in range(rounds)]
        trainer.close()
    what = (f"{size['model']}, {size['image']} px, batch {size['batch']}, amp {size['amp']}, channels_last {ON_GPU}, "
            f"PGT; {rounds} rounds of {steps} steps after {warmup} warm-up, inside an epoch")
    results.note(f"training step images/s ({what}), median [range]:")
    for name, values in speeds.items():
        results.note(f"  {name}: {statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]")
    if ON_GPU:
        ratio = statistics.median(ratios)
        results.check(ratio >= STEP_GOAL, f"the step through DALI on the GPU runs at {ratio:.3f}x "
                                          f"[{min(ratios):.3f}-{max(ratios):.3f}] the same step on synthetic data "
                                          f"(goal: at least {STEP_GOAL}x)")
    else:
        results.skip("the step through DALI on the GPU against synthetic data: no GPU here (the figures above "
                     "come from this CPU, at small sizes)")


def main():
    p = parser(__doc__)
    args = p.parse_args()
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        Results("gpu check part 1: DALI on the GPU end to end", "").skip(
            "DALI is not installed (gpu_check/gpu_check_install.py installs it from local wheels): nothing checked")
        return
    small = is_small(args)
    size = dict(train=12, val=4, image=32, batch=16, workers=2, model="resnet10t", amp="off", warmup=1, steps=2,
                rounds=2) if small else \
        dict(train=1000, val=50, image=224, batch=256, workers=8, model="resnet50", amp="fp16", warmup=5,
             steps=25, rounds=3)
    root = jpeg_folder(args.out, size["train"], size["val"])
    results = Results("gpu check part 1: DALI on the GPU end to end",
                      f"{root}: {size['train']} train + {size['val']} val images per class; {size['image']} px, "
                      f"batch {size['batch']}, {size['workers']} DALI threads; {'small' if small else 'full'} size")
    placements = ["cpu", "gpu"] if ON_GPU else ["cpu"]
    if not ON_GPU:
        results.skip("data.dali_device gpu (no CUDA GPU here): its loaders, images and resume are not checked; "
                     "the cpu placement runs alone")
    epochs, vals = {}, {}
    for placement in placements:
        cfg = loader_cfg(root, size, placement)
        labels, first, expected = train_epoch(cfg, epoch=0)
        epochs[placement] = (labels, first)
        results.check(labels == expected, f"{placement}: epoch 1 gives {len(labels)} batches holding exactly the "
                                          f"sampler's files, in its order")
        results.check(first[2] == device() and first[4] == device(),
                      f"{placement}: batches arrive on {first[2]} (images) and {first[4]} (labels); the run's "
                      f"device is {device()}")
        vals[placement] = val_batches(cfg)
        resumed_identically(cfg, results, placement)
    if ON_GPU:
        (gpu_labels, gpu_first), (cpu_labels, cpu_first) = epochs["gpu"], epochs["cpu"]
        results.check(gpu_labels == cpu_labels and gpu_first[:2] == cpu_first[:2] and gpu_first[3] == cpu_first[3],
                      f"gpu and cpu placements: the same label order, images {gpu_first[0]} {gpu_first[1]}, "
                      f"labels {gpu_first[3]}")
    torchvision = val_batches(build_config(None, [f"data.root={root}", "data.backend=torchvision",
                                                  f"data.image_size={size['image']}",
                                                  f"data.batch_size={size['batch']}", "data.workers=2"]).data)
    vals["torchvision"] = torchvision
    pairs = [("gpu", "cpu"), ("gpu", "torchvision"), ("cpu", "torchvision")] if ON_GPU else [("cpu", "torchvision")]
    for a, b in pairs:
        same_labels = all(torch.equal(ya, yb) for (_, ya), (_, yb) in zip(vals[a], vals[b]))
        diffs = torch.cat([(xa - xb).abs().flatten() for (xa, _), (xb, _) in zip(vals[a], vals[b])]).sort().values
        mean, p999, top = diffs.mean().item(), diffs[int(0.999 * (len(diffs) - 1))].item(), diffs[-1].item()
        line = (f"val images, {a} vs {b}: mean absolute difference {mean:.4f}, 99.9th percentile {p999:.4f}, "
                f"largest {top:.4f}; labels {'equal' if same_labels else 'DIFFER'}")
        if (a, b) == ("gpu", "cpu"):  # the claim: the placement changes speed, not the images
            results.check(same_labels and mean < VAL_MEAN_TOLERANCE,
                          line + f" (tolerance: mean below {VAL_MEAN_TOLERANCE}, half an 8-bit level)")
        else:
            results.note(line)
    loaders_alone(root, size, results)
    step_cost(root, size, results, work_dir(args.out, "part1"))
    results.exit()


if __name__ == "__main__":
    main()
