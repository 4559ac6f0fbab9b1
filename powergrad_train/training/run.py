"""Assembling a run, for every command that builds one: the checks before any device is touched,
the device and process group, and every part built from its own config section, with the run's
global side effects in one visible order. train, --dry-run, validate and bench all come through
here (cli.py parses the arguments and prints); the Trainer (engine.py) then owns only the loop.

    check_start(cfg, env.world_size)          # machine, data folder, model: before any device
    with process_group(env) as device:        # the device, the process group, its close
        trainer = build_run(cfg, run_dir, env, device, resume_from)
        trainer.fit()

The parts and where they come from: the model (timm, models.py), the data (data/, by
data.backend), the objective (objectives.py, by loss.name), the batch transform
(batch_transforms.py, by batch_transform.name), the optimizer and how it skips a bad step
(optim.py, by optim.name), the gradient stage (optim.py, grad_clip), the weight average (ema.py),
the checkpoint's parts (checkpoint.py) and the outputs (outputs.py, by log.outputs).
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed
from torch.nn.parallel import DistributedDataParallel

from powergrad_train import __version__
from powergrad_train.config.build import check_runtime, check_schedule
from powergrad_train.config.schema import to_dict
from powergrad_train.config.sections import Config
from powergrad_train.data import Loaders, build_loaders, check_data
from powergrad_train.system import dist, hardware
from powergrad_train.system.dist import DistEnv
from powergrad_train.system.errors import InstallError, RunFolderError, printable
from powergrad_train.training import checkpoint, run_folder
from powergrad_train.training.batch_transforms import build_batch_transform
from powergrad_train.training.checkpoint import Checkpointer, RngState, TrainState
from powergrad_train.training.diagnostics import PooledFeatureWatch
from powergrad_train.training.ema import build_weight_average
from powergrad_train.training.engine import LoopSettings, Trainer, autocast_for, evaluate_model, memory_format_for
from powergrad_train.training.metrics import TrainMeter
from powergrad_train.training.models import build_model, check_compile, check_model_runs, load_initial_weights
from powergrad_train.training.objectives import build_objective
from powergrad_train.training.optim import OptimizerState, ScalerState, build_grad_clipper, build_optimizer, lr_at_step
from powergrad_train.training.outputs import Output, OutputStates, RunInfo, RunLog, build_outputs
from powergrad_train.training.run_folder import RunFolderLock
from powergrad_train.training.step_guard import BufferSnapshot

# ----------------------------------------------------------------------------- checks before any device

def check_start(cfg: Config, world_size: int, *, train: bool = True, measuring: str = "",
                announce: bool = True) -> None:
    """Every check a command makes before it touches a GPU or starts a process group, in one order for
    all of them: the machine, the data folder, the model. train=False: what evaluation builds (the val
    split, the model in eval mode). measuring, announce: see check_machine."""
    check_machine(cfg, world_size, measuring, announce)
    check_data(cfg.data, ("train", "val") if train else ("val",))  # cheap checks: nothing is listed
    check_model(cfg, world_size, train)


def check_machine(cfg: Config, world_size: int, measuring: str = "", announce: bool = True) -> None:
    """Can the installed builds drive these GPUs, and does the recipe suit them?

    measuring: what a command that trains nothing lasting does ("evaluating", "timing"): fp16 needs a
    GPU only for its loss scaling, so on the CPU it runs in float32 instead, said in one line (when
    `announce`)."""
    gpus = hardware.check_gpus(dali_on_gpu=cfg.data.backend == "dali" and cfg.data.dali_device != "cpu")
    if measuring and cfg.amp == "fp16" and not gpus:
        cfg.amp = "off"
        if announce:
            print(f"amp: fp16 needs a CUDA GPU; {measuring} in float32 on the CPU", flush=True)
    check_runtime(cfg, world_size, cuda=bool(gpus), capability=min((g.capability for g in gpus), default=None))


def check_model(cfg: Config, world_size: int, train: bool = True) -> None:
    """The model runs at the recipe's image size and per-process micro-batch, and model.compile has its
    tools: checked in seconds before any data is listed."""
    if not train:
        check_model_runs(cfg.model, cfg.data.image_size, cfg.data.val_batch_per_process(world_size), train=False)
        return
    acc = cfg.train.accumulate_steps
    batch = cfg.data.batch_size // (world_size * acc)
    note = f" (data.batch_size {cfg.data.batch_size} over {world_size} process(es) and {acc} accumulation step(s))"
    if cfg.model.sync_bn and world_size > 1:  # batch norm statistics then span every process's micro-batch
        batch, note = batch * world_size, note + " with model.sync_bn over all processes"
    check_model_runs(cfg.model, cfg.data.image_size, batch, train=True, batch_note=note)
    if cfg.model.compile:
        check_compile(cuda=torch.cuda.is_available())


def check_run_folder(run_dir: Path, resume: Optional[str]) -> tuple[Optional[Path], Optional[str]]:
    """A training start's run folder: (checkpoint to resume from or None, a note to print or None);
    refused when it cannot be created or written where it is asked for."""
    resume_from, note = run_folder.resume_point(run_dir, resume)
    existing = next(p for p in (run_dir, *run_dir.parents) if os.path.lexists(p))
    why = f"{printable(existing)} is a file" if existing != run_dir and not existing.is_dir() else \
        f"{printable(existing)} is not writable" if not os.access(existing, os.W_OK | os.X_OK) else None
    if why:
        raise RunFolderError(f"--output: cannot create or write the run folder {printable(run_dir)} ({why})")
    return resume_from, note


# ----------------------------------------------------------------------------- the device

@contextlib.contextmanager
def process_group(env: DistEnv, dry_run: bool = False):
    """This process's device, with the process group up (under torchrun) until the block ends, then
    closed. A dry run trains nothing: it builds on the CPU and starts no group."""
    if dry_run:
        yield torch.device("cpu")
        return
    device = dist.device_for(env)
    dist.init(env, device)
    try:
        yield device
    finally:
        dist.close()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_backend_flags(cfg: Config, device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # shapes are fixed: let cuDNN pick its fastest kernels
        # One rule for float32 convolutions and matmuls (torch's defaults differ for the two).
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = cfg.tf32


# ----------------------------------------------------------------------------- the parts

def build_model_on(cfg: Config, env: DistEnv, device: torch.device, train: bool = True) -> torch.nn.Module:
    """The model on its device, as training (train=True) or evaluation uses it."""
    model = build_model(cfg.model)
    if train and cfg.model.sync_bn and env.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device, memory_format=memory_format_for(cfg.channels_last))


def build_data(cfg: Config, env: DistEnv, device: torch.device, train: bool = True) -> Loaders:
    """This process's loaders, checked against the model's classes and the schedule (train=False:
    the val loader only)."""
    data = build_loaders(cfg.data, cfg.model.num_classes, cfg.seed, env, device, train=train)
    if train:
        check_schedule(cfg, data.train.batches_per_epoch)
    return data


def loop_settings(cfg: Config, world_size: int) -> LoopSettings:
    """What the Trainer's loop uses of the recipe."""
    return LoopSettings(epochs=cfg.schedule.epochs, batch_per_process=cfg.data.batch_size // world_size,
                        accumulate_steps=cfg.train.accumulate_steps, log_every_steps=cfg.train.log_every_steps,
                        max_nonfinite_steps=cfg.train.max_nonfinite_steps,
                        checkpoint_every_steps=cfg.checkpoint.every_steps, amp=cfg.amp,
                        channels_last=cfg.channels_last, compile=cfg.model.compile)


def startup_lines(cfg: Config, env: DistEnv, device: torch.device, model: torch.nn.Module, data: Loaders,
                  loss: str) -> tuple[str, ...]:
    """The start-up block's lines on what is trained, on what data and device, with what loss."""
    params = sum(p.numel() for p in model.parameters())
    on_gpu = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if on_gpu else f"cpu ({torch.get_num_threads()} threads per process)"
    capability = tuple(torch.cuda.get_device_capability(device)) if on_gpu else None
    return (
        f"model: {cfg.model.name}, {params:,} parameters, {cfg.model.num_classes} classes",
        f"data: {cfg.data.root} ({cfg.data.backend}), {len(data.classes)} classes, "
        f"{data.train.num_samples} train / {data.val.num_samples} val images, "
        f"{data.train.batches_per_epoch} steps per epoch, batch {cfg.data.batch_size} global = "
        f"{cfg.data.batch_size // env.world_size} per process",
        f"device: {name}; {env.world_size} process(es); "
        f"precision: {hardware.precision_in_use(cfg.amp, cfg.tf32, capability)}",
        f"loss: {loss}",
    )


def _has_state(part) -> bool:
    return callable(getattr(part, "state_dict", None)) and callable(getattr(part, "load_state_dict", None))


def build_run(cfg: Config, run_dir: Path, env: DistEnv, device: torch.device, resume_from: Optional[Path] = None,
              resume_force: bool = False, outputs: Sequence[Output] = (), open_folder: bool = True) -> Trainer:
    """Every part of the run, resumed from `resume_from` if given; `outputs` are added to those
    log.outputs names (rank 0 only). Every check runs before the run folder is created or changed.

    open_folder=False (--dry-run, bench): the same parts and checks, but the run folder is neither
    created nor changed and no output is started: the Trainer logs nowhere."""
    run_dir = Path(run_dir)
    # 1. Process-wide settings.
    seed_everything(cfg.seed)
    set_backend_flags(cfg, device)

    # 2. The parts, each from its own section.
    model = build_model_on(cfg, env, device)
    init_note = load_initial_weights(model, Path(cfg.model.init_from).expanduser()) \
        if cfg.model.init_from and resume_from is None else None
    # On a GPU, measured from here: what the data pipelines take outside torch's allocator.
    gpu_memory = hardware.MemoryOutsideTorch(device) if device.type == "cuda" else None
    data = build_data(cfg, env, device)
    try:
        objective = build_objective(cfg.loss)
        batch_transform = build_batch_transform(cfg.batch_transform, cfg.model.num_classes)
        optimizer, skipper = build_optimizer(cfg.optim, model)
        clip_gradients = build_grad_clipper(cfg.grad_clip, model)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        weight_average = build_weight_average(cfg, model)
        buffers, feature_watch = BufferSnapshot(model), PooledFeatureWatch(model)  # after the average's copy of the model
        # DDP broadcasts rank 0's initial weights; evaluation uses the unwrapped model. (A dry run has no
        # process group: it trains nothing.)
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
            if env.distributed and torch.distributed.is_initialized() else model
        state, meter = TrainState(), TrainMeter(device)
        # Rank 0's outputs, built now (a missing optional package is refused here) and started in 4.
        named_outputs = list(zip(cfg.log.outputs, build_outputs(cfg.log.outputs, cfg.log))) if env.is_main \
            else []

        # 3. What a checkpoint holds: one entry per part (the optimizer's and the scaler's state only: their
        # settings stay the recipe's), and each of the objective, the batch transform and the weight average
        # that has a state of its own. A checkpoint saved before an optional part kept a state resumes it fresh.
        parts = {"model": model, "optimizer": OptimizerState(optimizer), "scaler": ScalerState(scaler),
                 "train_state": state, "outputs": OutputStates(named_outputs)}
        optional = {"outputs"}
        for name, part in (("objective", objective), ("batch_transform", batch_transform)):
            if _has_state(part):
                parts[name] = part
                optional.add(name)
        if weight_average is not None:
            if weight_average.name in parts:  # a package's weight average, misnamed: told like its other faults
                raise InstallError(f"weight_average.name = {cfg.weight_average.name}: its name "
                                   f"{weight_average.name!r} is that of another checkpoint part ({', '.join(parts)})")
            parts[weight_average.name] = weight_average
        checkpointer = Checkpointer(
            run_dir, cfg.checkpoint.keep_last, parts=parts,
            per_rank={"rng": RngState(), "data": data.train, "train_meter": meter},
            meta={"version": __version__, "config": to_dict(cfg), "classes": list(data.classes),
                  "steps_per_epoch": data.train.batches_per_epoch, "world_size": env.world_size},
            optional=optional)
        if resume_from is not None:
            saved = checkpoint.load(resume_from)
            checkpoint.check_compatible(saved, resume_from, cfg, classes=data.classes,
                                        steps_per_epoch=data.train.batches_per_epoch, world_size=env.world_size,
                                        force=resume_force)
            # A data set that lost or gained a few files since keeps the run's steps per epoch (docs/data.md).
            data.train.batches_per_epoch = checkpointer.meta["steps_per_epoch"] = saved["steps_per_epoch"]
            checkpointer.restore(saved, resume_from, env.rank, env.world_size)
        steps_per_epoch = data.train.batches_per_epoch

        def lr_at(step: int) -> float:
            return lr_at_step(cfg.schedule, cfg.optim.lr, step, steps_per_epoch)

        # 4. Only now, with every check passed, is the run folder created, locked and changed (rank 0).
        folder_lock, log = None, RunLog([])
        run_outputs = [output for _, output in named_outputs] + (list(outputs) if env.is_main else [])
        for output in run_outputs:
            output.check_resume(run_dir)
        if open_folder and env.is_main:
            folder_lock = RunFolderLock(run_dir)
            checkpointer.remove_partial_files()
            if resume_from is not None and Path(resume_from).resolve() == (run_dir / resume_from.name).resolve() \
                    and resume_from.name != checkpointer.last.name:  # last.pt was missing or damaged
                checkpointer.restore_last(Path(resume_from))
            # Each output drops what it wrote after the checkpoint (written again); a torn last line is said once.
            for output in run_outputs:
                note = output.resume_at(run_dir, state.epoch, state.step)
                if note:
                    print(note, flush=True)
            log = RunLog(run_outputs)
            if not log.outputs:
                print("warning: log.outputs is empty: this run prints no progress and writes no summary.csv, log.jsonl "
                      "or TensorBoard events, only its checkpoints (log.outputs: [console, csv, tensorboard] is the "
                      "default)", flush=True)
            log.start(RunInfo(run_dir, to_dict(cfg), state.epoch, state.step, resume_from))
        lines = startup_lines(cfg, env, device, model, data, objective.describe())
    except BaseException:
        data.close()  # DALI pipelines and loader workers hold threads and processes
        raise

    return Trainer(settings=loop_settings(cfg, env.world_size), lr_at=lr_at, startup_lines=lines, run_dir=run_dir,
                   env=env, device=device, model=model, train_model=train_model, data=data, objective=objective,
                   batch_transform=batch_transform, optimizer=optimizer, skipper=skipper,
                   clip_gradients=clip_gradients, scaler=scaler, weight_average=weight_average, buffers=buffers,
                   feature_watch=feature_watch, state=state, meter=meter, checkpointer=checkpointer, log=log,
                   folder_lock=folder_lock, init_note=init_note, gpu_memory=gpu_memory)


def evaluate_checkpoint(cfg: Config, state: dict, path: Path, env: DistEnv, device: torch.device) -> dict:
    """validate: the checkpoint's model weights (state["model"]) evaluated on the val split."""
    model = build_model_on(cfg, env, device, train=False)
    checkpoint.load_model_weights(model, state, path, cfg.model.name)
    data = build_data(cfg, env, device, train=False)
    try:
        checkpoint.check_classes(state, path, data.classes, where=f"{printable(cfg.data.root)}/val")
        return evaluate_model(model, data.val, device, autocast_for(cfg.amp, device))
    finally:
        data.close()
