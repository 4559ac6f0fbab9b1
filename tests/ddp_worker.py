"""Run the real Trainer and save every rank's final weights (and EMA weights) for tests: under
torchrun for several processes, or called in the test's own process for one.

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py RUN_DIR KEY=VALUE ...
"""

import sys
from pathlib import Path

import torch

from powergrad_train.config.build import build_config, check_runtime
from powergrad_train.system import dist
from powergrad_train.training.run import build_run


def train_and_save(run_dir: Path, overrides: list[str]) -> None:
    cfg = build_config(None, overrides)
    env = dist.env_from_torchrun()
    check_runtime(cfg, env.world_size, cuda=False)
    device = dist.device_for(env)
    dist.init(env, device)
    trainer = build_run(cfg, run_dir, env, device)  # rank 0 creates the run folder
    trainer.fit()
    trainer.close()
    torch.save(trainer.model.state_dict(), run_dir / f"weights-rank{env.rank}.pt")
    if trainer.weight_average is not None:
        torch.save(trainer.weight_average.state_dict(), run_dir / f"ema-rank{env.rank}.pt")
    dist.close()


if __name__ == "__main__":
    train_and_save(Path(sys.argv[1]), sys.argv[2:])
