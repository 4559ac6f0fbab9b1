"""GPU check, part 3: checkpoints on the GPU. A run stopped by SIGTERM mid-epoch and resumed ends
where an uninterrupted run ends.

    python gpu_check/gpu_check_resume.py [--out DIR] [--size auto|full|small]

Three runs of `powergrad-train` (resnet18, fp16, channels_last, DALI on the GPU, two epochs of the
generated JPEGs, checkpoint.every_steps): one uninterrupted; one stopped with SIGTERM right after
its first periodic checkpoint (inside epoch 1) and continued with `--resume auto`; and, on a GPU,
a second uninterrupted one, whose difference from the first is the noise floor of the GPU's
non-deterministic kernels (cuDNN's benchmark mode picks them). The resumed run must end within
three times that floor of the uninterrupted one (any two of these runs differ by about the same
amount), so exactly on it where the floor is zero.

Without a GPU: resnet10t, amp off and DALI on the CPU (torchvision when DALI is missing), at small
sizes; such runs are deterministic, so the floor is taken as zero.
"""

import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from gpu_check_common import (
    ON_GPU,
    SCRIPTS,
    Results,
    data_backend,
    is_small,
    jpeg_folder,
    max_relative_difference,
    parser,
    work_dir,
)

from powergrad_train.training import checkpoint


def overrides(root, size, backend):
    values = {"model.name": size["model"], "model.num_classes": 10, "data.root": root, "data.backend": backend,
              "data.dali_device": "gpu" if ON_GPU else "cpu", "data.image_size": size["image"],
              "data.batch_size": size["batch"], "data.workers": size["workers"], "amp": "fp16" if ON_GPU else "off",
              "channels_last": ON_GPU, "loss.pgt_alpha": 0.25, "optim.lr": 0.05, "schedule.epochs": 2,
              "schedule.warmup_epochs": 0.5, "schedule.cooldown_epochs": 0, "train.log_every_steps": 10,
              "checkpoint.every_steps": size["every"], "checkpoint.keep_last": 1}
    return [f"--set={k}={v}" for k, v in values.items()]


def launch(run_dir: Path, settings, *extra) -> subprocess.Popen:
    log = open(run_dir.with_suffix(".log"), "a")
    return subprocess.Popen([sys.executable, "-m", "powergrad_train", "--config", "smoke.yaml", "--output",
                             str(run_dir), *settings, *extra], cwd=SCRIPTS.parent, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["model"]


def main():
    args = parser(__doc__).parse_args()
    small = is_small(args)
    size = dict(train=12, val=4, model="resnet10t", image=32, batch=16, workers=2, every=3) if small else \
        dict(train=1000, val=50, model="resnet18", image=112, batch=128, workers=8, every=20)
    backend = data_backend()
    root = jpeg_folder(args.out, size["train"], size["val"])
    results = Results("gpu check part 3: checkpoints on the GPU",
                      f"{size['model']}, {size['image']} px, batch {size['batch']}, amp {'fp16' if ON_GPU else 'off'}, "
                      f"{backend} backend on the {'GPU' if ON_GPU else 'CPU'}, 2 epochs of {root}, "
                      f"checkpoint.every_steps {size['every']}")
    if backend != "dali":
        results.skip("DALI is not installed: the runs read with the torchvision backend")
    work = work_dir(args.out, "part3")
    settings = overrides(root, size, backend)
    straight = [work / "straight", work / "straight-again"] if ON_GPU else [work / "straight"]
    for run_dir in straight:
        code = launch(run_dir, settings).wait()
        results.check(code == 0, f"uninterrupted run {run_dir.name}: exit status {code} (log: {run_dir}.log)")
    if not ON_GPU:
        results.skip("a second uninterrupted run for the noise floor: runs on the CPU are deterministic")

    stopped = work / "preempted"
    proc = launch(stopped, settings)
    while not (stopped / "last.pt").exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait()
    at = checkpoint.load(stopped / "last.pt")["train_state"]
    results.check(code == 128 + signal.SIGTERM and at["batch_in_epoch"] > 0,
                  f"SIGTERM after the first periodic checkpoint: exit status {code}, last.pt at step {at['step']}, "
                  f"batch {at['batch_in_epoch']} of epoch {at['epoch'] + 1}")
    code = launch(stopped, settings, "--resume", "auto").wait()
    results.check(code == 0, f"--resume auto: exit status {code} (log: {stopped}.log)")

    reference = weights(straight[0])
    floor = max_relative_difference(reference, weights(straight[1])) if ON_GPU else 0.0
    difference = max_relative_difference(reference, weights(stopped))
    results.check(difference <= 3 * floor,
                  f"the resumed run ends with the uninterrupted run's weights: largest relative difference "
                  f"{difference:.2e}, noise floor {floor:.2e} (two uninterrupted runs; tolerance: three times "
                  "the floor)")
    results.exit()


if __name__ == "__main__":
    main()
