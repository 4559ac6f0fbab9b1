"""GPU check, part 6 (with bench_step.py --compile): one compiled training step against the eager one.

    python gpu_check/gpu_check_compile.py [--out DIR] [--size auto|full|small]

Two trainers from the same seed, model.compile false and true (torch.compile of model and loss
together), take one step on the same batch (resnet50, 64 px, batch 64, bf16, PGT 0.3); their
updates (new weights less the initial ones) must agree within bf16 tolerance, measured against
the update itself so that a wrong step cannot hide behind the weights. Without a GPU: resnet10t at
32 px, batch 8, float32.
"""

import tempfile
from pathlib import Path

from gpu_check_common import ON_GPU, Results, device, is_small, max_relative_difference, parser, work_dir

from powergrad_train.config.build import build_config
from powergrad_train.system.dist import DistEnv
from powergrad_train.training.run import build_run

TOLERANCE = {"bf16": 5e-2, "off": 1e-3}  # ||compiled - eager|| / ||eager|| of each tensor's update


def main():
    args = parser(__doc__).parse_args()
    small = is_small(args)
    size = dict(model="resnet10t", image=32, batch=8) if small else dict(model="resnet50", image=64, batch=64)
    amp = "bf16" if ON_GPU else "off"
    results = Results("gpu check part 6: a compiled step against the eager one",
                      f"{size['model']}, {size['image']} px, batch {size['batch']}, amp {amp}, PGT 0.3")
    run_dir = work_dir(args.out, "part6")
    overrides = [f"model.name={size['model']}", "data.backend=synthetic", f"data.batch_size={size['batch']}",
                 f"data.image_size={size['image']}", f"amp={amp}", "loss.pgt_alpha=0.3", "schedule.epochs=10",
                 "schedule.warmup_epochs=0", "schedule.cooldown_epochs=0"]
    trainers = [build_run(build_config("smoke.yaml", overrides + [f"model.compile={c}"]),
                        Path(tempfile.mkdtemp(dir=run_dir)), DistEnv(), device()) for c in (False, True)]
    images, targets = next(iter(trainers[0].data.train))
    before = {n: p.detach().cpu().clone() for n, p in trainers[0].model.named_parameters()}
    updates = []
    for trainer in trainers:
        trainer.train_model.train()
        trainer.train_step(images, targets)
        updates.append({n: p.detach().cpu() - before[n] for n, p in trainer.model.named_parameters()})
    moved = {n: u for n, u in updates[0].items() if u.abs().max() > 0}
    difference = max_relative_difference(moved, updates[1])
    results.check(len(moved) > len(before) // 2 and difference <= TOLERANCE[amp],
                  f"compiled vs eager, one step: the updates of {len(moved)} of {len(before)} parameters agree within "
                  f"{difference:.2e} (largest relative difference; tolerance {TOLERANCE[amp]:g})")
    for trainer in trainers:
        trainer.close()
    results.exit()


if __name__ == "__main__":
    main()
