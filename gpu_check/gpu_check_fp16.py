"""GPU check, part 2: fp16 from step 1. Steps the GradScaler skips leave no trace.

    python gpu_check/gpu_check_fp16.py [--out DIR] [--size auto|full|small]

Run A starts with a loss scale so large (2^40) that the first steps overflow in fp16 and the
GradScaler skips them, halving the scale each time, until one step is real. Run B starts from
the same weights with the scale A's real step used, and takes that one step on the same batch.
After it, both must hold the same weights, batch-norm buffers and momentum (within fp16
tolerance: the two runs compute the same float16 kernels, but cuDNN may pick others). The LR is
constant here, so the skipped steps' count on the schedule's clock does not matter.

On a machine without a GPU (no fp16 loss scaling there) the same is checked for the trainer's
own skip of a non-finite step: run A's first batch holds an inf pixel; then the runs must agree
exactly.
"""

import tempfile
from pathlib import Path

import torch
from gpu_check_common import ON_GPU, Results, device, is_small, max_relative_difference, parser, work_dir

from powergrad_train.config.build import build_config
from powergrad_train.system.dist import DistEnv
from powergrad_train.training.run import build_run

FORCED_SCALE = 2.0 ** 40
FP16_TOLERANCE = 1e-3  # relative, per tensor


def trainer_for(size, run_dir):
    overrides = [f"model.name={size['model']}", "model.num_classes=1000", "data.backend=synthetic",
                 f"data.image_size={size['image']}", f"data.batch_size={size['batch']}", f"amp={size['amp']}",
                 f"channels_last={ON_GPU}", "loss.pgt_alpha=0.25", "schedule.name=step", "schedule.warmup_epochs=0",
                 "schedule.cooldown_epochs=0", "schedule.decay_epochs=1000", "schedule.epochs=10"]
    trainer = build_run(build_config("smoke.yaml", overrides), Path(tempfile.mkdtemp(dir=run_dir)), DistEnv(), device())
    trainer.model.train()
    return trainer


def state(trainer) -> dict:
    """Weights, batch-norm buffers and momentum buffers, on the CPU."""
    parts = {f"model.{k}": v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
    for name, p in trainer.model.named_parameters():
        buffer = trainer.optimizer.state.get(p, {}).get("momentum_buffer")
        if buffer is not None:
            parts[f"momentum.{name}"] = buffer.detach().cpu().clone()
    return parts


def main():
    args = parser(__doc__).parse_args()
    small = is_small(args)
    size = dict(model="resnet10t", image=32, batch=8) if small else dict(model="resnet50", image=224, batch=128)
    size["amp"] = "fp16" if ON_GPU else "off"
    results = Results("gpu check part 2: fp16 from step 1",
                      f"{size['model']}, {size['image']} px, batch {size['batch']}, amp {size['amp']}, synthetic data")
    run_dir = work_dir(args.out, "part2")
    a, b = trainer_for(size, run_dir), trainer_for(size, run_dir)
    images, targets = next(iter(a.data.train))
    initial = state(a)
    skipped, used_scale = 0, None
    if ON_GPU:
        a.scaler.load_state_dict({**a.scaler.state_dict(), "scale": FORCED_SCALE})
        while skipped < 80:
            before = a.scaler.get_scale()
            a.train_step(images, targets)
            if a.scaler.get_scale() < before:  # the GradScaler found an overflow and backed off
                skipped += 1
            else:
                used_scale = before
                break
        b.scaler.load_state_dict({**b.scaler.state_dict(), "scale": used_scale})
        results.check(skipped > 0 and used_scale is not None,
                      f"run A: the GradScaler skipped its first {skipped} step(s) from scale 2^40, then stepped at "
                      f"scale {used_scale:g}")
    else:
        results.skip("fp16 loss scaling: no CUDA GPU here; checking the trainer's skip of a non-finite step instead")
        bad = images.clone()
        bad.view(-1)[0] = float("inf")
        a.train_step(bad, targets)
        skipped = 1
        results.check(max_relative_difference(initial, state(a)) == 0.0,
                      "run A: a step with an inf pixel left weights, buffers and momentum as they were")
        a.train_step(images, targets)
    b.train_step(images, targets)
    difference = max_relative_difference(state(b), state(a))
    tolerance = FP16_TOLERANCE if ON_GPU else 0.0
    results.check(difference <= tolerance,
                  f"after the first real step, run A (with {skipped} skipped step(s) before it) and run B (none) hold "
                  f"the same weights, batch-norm buffers and momentum: largest relative difference {difference:.2e} "
                  f"(tolerance {tolerance:g})")
    after = state(b)
    weights = [k for k in initial if k.startswith("model.") and initial[k].is_floating_point()]
    changed = sum(not torch.equal(initial[k], after[k]) for k in weights)
    results.check(changed > 0, f"the real step changed {changed} of the {len(weights)} floating-point tensors of the "
                               "model")
    for trainer in (a, b):
        trainer.close()
    results.exit()


if __name__ == "__main__":
    main()
