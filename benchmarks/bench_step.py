"""The trainer's full training step against a bare hand-written torch loop doing the same work.

    python benchmarks/bench_step.py                         # resnet18, 32 px, batch 64, CPU, data in memory
    python benchmarks/bench_step.py --data real             # trainer reads the demo JPEGs (torchvision backend)
    python benchmarks/bench_step.py --data real --backend dali   # ... through DALI's CPU pipeline
    python benchmarks/bench_step.py --device cuda --model resnet50 --image-size 224 --batch 256 \\
        --amp bf16 --channels-last [--compile]

Both sides use the same timm model, fused Nesterov SGD and autocast; the bare loop uses plain
F.cross_entropy and no metrics, schedule or checkpoint logic. The trainer runs with PGT on
(alpha 0.25). Rounds alternate bare / trainer; warm-up steps are excluded; the ratio printed
last is the median over rounds:
    trainer/bare: 0.98 [0.95-1.01] (trainer 530.1 img/s, bare 541.2 img/s)
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from powergrad_train.config.build import build_config
from powergrad_train.system.dist import DistEnv
from powergrad_train.training.bench import batches_forever, synchronize, thread_count
from powergrad_train.training.engine import AMP_DTYPES
from powergrad_train.training.run import build_run


def bare_loop(args, device, images, targets):
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = timm.create_model(args.model, num_classes=10).to(device, memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-5, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    forward = torch.compile(model) if args.compile else model
    images = images.to(device, memory_format=fmt)
    targets = targets.to(device)

    def step():
        with torch.autocast(device.type, dtype=AMP_DTYPES.get(args.amp), enabled=args.amp != "off"):
            loss = F.cross_entropy(forward(images).float(), targets)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return step


def trainer_loop(args, device, run_dir):
    overrides = [f"model.name={args.model}", "model.num_classes=10", f"data.image_size={args.image_size}",
                 f"data.batch_size={args.batch}", f"amp={args.amp}", f"channels_last={args.channels_last}",
                 f"model.compile={args.compile}", "loss.pgt_alpha=0.25", "train.log_every_steps=1000000",
                 "schedule.epochs=100", "schedule.warmup_epochs=1", "schedule.cooldown_epochs=0"]
    if args.data == "synthetic":
        overrides.append("data.backend=synthetic")
    elif args.backend == "dali":
        overrides += ["data.backend=dali", "data.dali_device=cpu" if device.type == "cpu" else "data.dali_device=gpu",
                      f"data.workers={args.workers}"]
    else:
        overrides += ["data.backend=torchvision", f"data.workers={args.workers}"]
    trainer = build_run(build_config("smoke.yaml", overrides), run_dir, DistEnv(), device)
    trainer.model.train()
    batches = batches_forever(trainer)
    return trainer, lambda: trainer.train_step(*next(batches))


def images_per_sec(step, steps, batch, device):
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * batch / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--amp", default="off", choices=("off", "fp16", "bf16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", default="synthetic", choices=("synthetic", "real"),
                   help="trainer data: one batch in memory, or the demo JPEGs (1000 train images, 64 px)")
    p.add_argument("--backend", default="torchvision", choices=("torchvision", "dali"), help="with --data real")
    p.add_argument("--workers", type=int, default=2, help="with --data real: loader workers or DALI threads")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer, trainer_step = trainer_loop(args, device, Path(run_dir))
        images, targets = next(iter(trainer.data.train))
        bare_step = bare_loop(args, device, images.clone(), targets.clone())
        for step in (bare_step, trainer_step):
            for _ in range(args.warmup):
                step()
        ratios, bare_ips, trainer_ips = [], [], []
        for _ in range(args.rounds):
            b = images_per_sec(bare_step, args.steps, args.batch, device)
            t = images_per_sec(trainer_step, args.steps, args.batch, device)
            ratios.append(t / b)
            bare_ips.append(b)
            trainer_ips.append(t)
        threads = thread_count()
        trainer.close()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{name}; {args.model}, {args.image_size} px, batch {args.batch}, amp {args.amp}, channels_last "
          f"{args.channels_last}, compile {args.compile}; trainer data {args.data}"
          f"{f' ({args.backend}, {args.workers} workers)' if args.data == 'real' else ''}; {args.rounds} rounds of "
          f"{args.steps} steps after {args.warmup} warm-up; {threads} threads in the process; "
          f"python {sys.version.split()[0]}, torch {torch.__version__}")
    print(f"trainer/bare: {statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}] "
          f"(trainer {statistics.median(trainer_ips):.1f} img/s, bare {statistics.median(bare_ips):.1f} img/s)")


if __name__ == "__main__":
    main()
