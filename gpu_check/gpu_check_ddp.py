"""GPU check, part 4: a batch-norm model under DDP, two processes on the one GPU.

    python gpu_check/gpu_check_ddp.py [--out DIR] [--size auto|full|small]

Two processes under torchrun share GPU 0 over gloo (NCCL needs one GPU per process) and train
resnet18 (batch norm) for one epoch of the generated JPEGs through DALI, fp16, channels_last.
Then: every batch-norm buffer and every weight is identical on both ranks (the trainer averages
the running statistics before evaluating), and the eval top-1 the run logged equals what
`powergrad-train validate` computes from last.pt in one process (batches of other sizes may
pick other cuDNN kernels, so at most one image may change sides; the result says which).

Without a GPU: two CPU processes over gloo, amp off, DALI on the CPU, at small sizes.
"""

import argparse
import csv
import re
import subprocess
import sys
from pathlib import Path

import torch
from gpu_check_common import ON_GPU, SCRIPTS, Results, data_backend, is_small, jpeg_folder, parser, work_dir

REPO = SCRIPTS.parent


def worker(run_dir: Path, overrides: list[str]) -> None:
    """One rank of the run (under torchrun): the real Trainer, on GPU 0 whatever the rank."""
    import torch.distributed as torch_dist

    from powergrad_train.config.build import build_config, check_runtime
    from powergrad_train.system import dist
    from powergrad_train.training.run import build_run

    env = dist.env_from_torchrun()
    device = torch.device("cuda", 0) if ON_GPU else torch.device("cpu")
    if ON_GPU:
        torch.cuda.set_device(device)
    torch_dist.init_process_group("gloo", rank=env.rank, world_size=env.world_size)
    cfg = build_config("smoke.yaml", overrides)
    check_runtime(cfg, env.world_size, cuda=ON_GPU)
    trainer = build_run(cfg, run_dir, env, device)
    trainer.announce(None)
    trainer.fit()
    trainer.close()
    torch.save({k: v.cpu() for k, v in trainer.model.state_dict().items()}, run_dir / f"state-rank{env.rank}.pt")
    dist.close()


def main():
    p = parser(__doc__)
    p.add_argument("--worker", type=Path, metavar="RUN_DIR", help=argparse.SUPPRESS)  # one rank, under torchrun
    args, overrides = p.parse_known_args()
    if args.worker:
        return worker(args.worker, overrides)
    small = is_small(args)
    size = dict(train=12, val=4, model="resnet10t", image=32, batch=16, workers=1) if small else \
        dict(train=1000, val=50, model="resnet18", image=112, batch=128, workers=4)
    backend = data_backend()
    root = jpeg_folder(args.out, size["train"], size["val"])
    results = Results("gpu check part 4: a batch-norm model under DDP on one GPU",
                      f"2 processes over gloo on {'GPU 0' if ON_GPU else 'the CPU'}; {size['model']}, {size['image']} "
                      f"px, global batch {size['batch']}, amp {'fp16' if ON_GPU else 'off'}, {backend} backend, "
                      f"1 epoch of {root}")
    if backend != "dali":
        results.skip("DALI is not installed: the run reads with the torchvision backend")
    run_dir = work_dir(args.out, "part4") / "run"
    run_dir.mkdir()
    values = {"model.name": size["model"], "model.num_classes": 10, "data.root": root, "data.backend": backend,
              "data.dali_device": "gpu" if ON_GPU else "cpu", "data.image_size": size["image"],
              "data.batch_size": size["batch"], "data.workers": size["workers"], "amp": "fp16" if ON_GPU else "off",
              "channels_last": ON_GPU, "loss.pgt_alpha": 0.25, "optim.lr": 0.05, "schedule.epochs": 1,
              "schedule.warmup_epochs": 0.2, "schedule.cooldown_epochs": 0, "train.log_every_steps": 10}
    settings = [f"{k}={v}" for k, v in values.items()]
    with open(run_dir.with_suffix(".log"), "w") as log:
        code = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(SCRIPTS / "gpu_check_ddp.py"), "--worker", str(run_dir), *settings],
                              cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    if not results.check(code == 0, f"the 2-process run: exit status {code} (log: {run_dir}.log)"):
        results.exit()
    ranks = [torch.load(run_dir / f"state-rank{r}.pt", weights_only=True) for r in (0, 1)]
    differ = [k for k in ranks[0] if not torch.equal(ranks[0][k], ranks[1][k])]
    buffers = [k for k in ranks[0] if "running_" in k or "num_batches_tracked" in k]
    differing_buffers = [k for k in buffers if k in differ]
    results.check(not differing_buffers, f"batch-norm buffers identical on both ranks ({len(buffers)} tensors)" +
                  (f"; differing: {', '.join(differing_buffers)[:300]}" if differing_buffers else ""))
    results.check(not differ, f"every tensor of the model identical on both ranks ({len(ranks[0])} tensors)")

    with open(run_dir / "summary.csv", newline="") as f:
        logged = float(list(csv.DictReader(f))[-1]["eval_top1"])
    validated = subprocess.run([sys.executable, "-m", "powergrad_train", "validate", "--checkpoint",
                                str(run_dir / "last.pt")], cwd=REPO, capture_output=True, text=True)
    found = re.search(r"top1 ([0-9.]+) .*\((\d+) images\)", validated.stdout)
    if not results.check(validated.returncode == 0 and found is not None,
                         f"powergrad-train validate on last.pt: exit status {validated.returncode}"):
        print(validated.stderr[-2000:])
        results.exit()
    top1, images = float(found.group(1)), int(found.group(2))
    one_image = 100 / images
    results.check(abs(top1 - round(logged, 2)) <= one_image + 0.005,
                  f"logged eval top-1 {logged:.2f} (2 processes) vs validate on last.pt {top1:.2f} (1 process), "
                  f"{images} images: {'equal' if abs(top1 - round(logged, 2)) < 0.005 else 'within one image'}")
    results.exit()


if __name__ == "__main__":
    main()
