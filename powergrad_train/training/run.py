"""Assembling a run: every part built from its own config section, and the run's global side
effects in one visible order. The Trainer (engine.py) then owns only the loop.

    trainer = build_run(cfg, run_dir, env, device, resume_from)
    trainer.fit()

The parts and where they come from: the model (timm, models.py), the data (data/, by
data.backend), the objective (objectives.py, by loss.name), the batch transform
(batch_transforms.py, by batch_transform.name), the optimizer and how it skips a bad step
(optim.py, by optim.name), the gradient stage (optim.py, grad_clip), the EMA of the weights
(ema.py), the checkpoint's parts (checkpoint.py) and the outputs (metrics.py, by log.outputs).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from powergrad_train import __version__

from powergrad_train.training import checkpoint, metrics
from powergrad_train.training.batch_transforms import build_batch_transform
from powergrad_train.training.checkpoint import Checkpointer, RngState, TrainState
from powergrad_train.config.schema import Config, to_dict
from powergrad_train.training.diagnostics import PooledFeatureWatch
from powergrad_train.system.dist import DistEnv
from powergrad_train.training.ema import WeightAverage
from powergrad_train.system.hardware import MemoryOutsideTorch
from powergrad_train.training.engine import Trainer, build_data, build_model_on
from powergrad_train.training.metrics import Output, OutputStates, RunInfo, RunLog, TrainMeter
from powergrad_train.training.models import load_initial_weights
from powergrad_train.training.objectives import build_objective
from powergrad_train.training.optim import OptimizerState, ScalerState, build_grad_clipper, build_optimizer
from powergrad_train.training.run_folder import RunFolderLock
from powergrad_train.training.step_guard import BufferSnapshot


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_backend_flags(cfg: Config, device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # shapes are fixed: let cuDNN pick its fastest kernels
        # One rule for float32 convolutions and matmuls (torch's defaults differ for the two).
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = cfg.tf32


def build_run(cfg: Config, run_dir: Path, env: DistEnv, device: torch.device, resume_from: Optional[Path] = None,
              resume_force: bool = False, outputs: Sequence[Output] = ()) -> Trainer:
    """Every part of the run, resumed from `resume_from` if given; `outputs` are added to those
    log.outputs names (rank 0 only). Every check runs before the run folder is created or changed."""
    run_dir = Path(run_dir)
    # 1. Process-wide settings.
    seed_everything(cfg.seed)
    set_backend_flags(cfg, device)

    # 2. The parts, each from its own section.
    model = build_model_on(cfg, env, device)
    init_note = load_initial_weights(model, Path(cfg.model.init_from).expanduser()) \
        if cfg.model.init_from and resume_from is None else None
    # On a GPU, measured from here: what the data pipelines take outside torch's allocator.
    gpu_memory = MemoryOutsideTorch(device) if device.type == "cuda" else None
    data = build_data(cfg, env, device)
    try:
        objective = build_objective(cfg.loss)
        batch_transform = build_batch_transform(cfg.batch_transform, cfg.model.num_classes)
        optimizer, skipper = build_optimizer(cfg.optim, model)
        clip_gradients = build_grad_clipper(cfg.grad_clip, model)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        ema = WeightAverage(model, cfg.ema.decay) if cfg.ema.decay is not None else None
        buffers, feature_watch = BufferSnapshot(model), PooledFeatureWatch(model)  # after the EMA's copy of the model
        # DDP broadcasts rank 0's initial weights; evaluation uses the unwrapped model.
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None) if env.distributed else model
        state, meter = TrainState(), TrainMeter(device)
        # Rank 0's outputs, built now (a missing optional package is refused here) and started in 4.
        named_outputs = list(zip(cfg.log.outputs, metrics.build_outputs(cfg.log.outputs))) if env.is_main else []

        # 3. What a checkpoint holds: one entry per part (the optimizer's and the scaler's state only: their
        # settings stay the recipe's).
        parts = {"model": model, "optimizer": OptimizerState(optimizer), "scaler": ScalerState(scaler),
                 "train_state": state, "outputs": OutputStates(named_outputs)}
        if ema is not None:
            parts["ema"] = ema
        checkpointer = Checkpointer(
            run_dir, cfg.checkpoint.keep_last, parts=parts,
            per_rank={"rng": RngState(), "data": data.train, "train_meter": meter},
            meta={"version": __version__, "config": to_dict(cfg), "classes": list(data.classes),
                  "steps_per_epoch": data.train.batches_per_epoch, "world_size": env.world_size})
        if resume_from is not None:
            saved = checkpoint.load(resume_from)
            checkpoint.check_compatible(saved, resume_from, cfg, classes=data.classes,
                                        steps_per_epoch=data.train.batches_per_epoch, world_size=env.world_size,
                                        force=resume_force)
            # A data set that lost or gained a few files since keeps the run's steps per epoch (docs/data.md).
            data.train.batches_per_epoch = checkpointer.meta["steps_per_epoch"] = saved["steps_per_epoch"]
            saved.setdefault("outputs", {})  # saved before outputs kept a state: none to continue
            checkpointer.restore(saved, resume_from, env.rank, env.world_size)

        # 4. Only now, with every check passed, is the run folder created, locked and changed (rank 0).
        folder_lock, log = None, RunLog([])
        if env.is_main:
            metrics.summary_columns(run_dir)  # a summary.csv without its header is refused, not rewritten
            folder_lock = RunFolderLock(run_dir)
            checkpointer.remove_partial_files()
            if resume_from is not None and Path(resume_from).resolve() == (run_dir / resume_from.name).resolve() \
                    and resume_from.name != checkpointer.last.name:  # last.pt was missing or damaged
                checkpointer.restore_last(Path(resume_from))
            # Rows and records of steps after the checkpoint are written again; a torn last line is said once.
            torn = [metrics.trim_summary_csv(run_dir, state.epoch), metrics.trim_jsonl(run_dir, state.step)]
            for note in filter(None, torn):
                print(note, flush=True)
            metrics.prepare_tensorboard_folder(run_dir, state.step)
            log = RunLog([output for _, output in named_outputs] + list(outputs))
            if not log.outputs:
                print("warning: log.outputs is empty: this run prints no progress and writes no summary.csv, log.jsonl "
                      "or TensorBoard events, only its checkpoints (log.outputs: [console, csv, tensorboard] is the "
                      "default)", flush=True)
            log.start(RunInfo(run_dir, to_dict(cfg), state.epoch, state.step, resume_from))
    except BaseException:
        data.close()  # DALI pipelines and loader workers hold threads and processes
        raise

    trainer = Trainer(cfg=cfg, run_dir=run_dir, env=env, device=device, model=model, train_model=train_model,
                      data=data, objective=objective, batch_transform=batch_transform, optimizer=optimizer,
                      skipper=skipper, clip_gradients=clip_gradients, scaler=scaler, ema=ema, buffers=buffers,
                      feature_watch=feature_watch, state=state, meter=meter, checkpointer=checkpointer, log=log,
                      folder_lock=folder_lock, init_note=init_note, gpu_memory=gpu_memory)
    return trainer
