"""Command line: `powergrad-train [train] ...`, `powergrad-train validate ...`, `powergrad-train bench ...`.

The only place that prints a user error and exits: a UserError becomes one
`error: ...` line on stderr and exit status 2; real bugs keep their tracebacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Optional

# Only light imports here: `--help` and config errors answer without loading torch.
from powergrad_train import __version__
from powergrad_train.config import Config, build_config, check_runtime, describe_keys, dump
from powergrad_train.errors import CheckpointError, ConfigError, InstallError, UserError

COMMANDS = ("train", "validate", "bench", "env", "report", "reproduce")


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="powergrad-train",
        description="Train an ImageNet classifier from a YAML recipe, with the PowerGrad Transform, "
                    "label smoothing and GC/AGC. Subcommands: train (default), validate, bench, env, report, reproduce "
                    "(see 'powergrad-train validate --help' and so on).",
        epilog="config keys (set in a recipe, or with --set KEY=VALUE):\n" + describe_keys(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="RECIPE",
                   help="recipe file, or the name of a bundled recipe (e.g. smoke.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set schedule.epochs=2 (repeatable)")
    p.add_argument("--output", metavar="DIR", help="run folder (default: runs/<recipe name>)")
    p.add_argument("--resume", metavar="PATH|auto",
                   help="continue from a checkpoint; 'auto' = last.pt in the run folder, or a fresh start if none")
    p.add_argument("--resume-force", action="store_true",
                   help="resume even though the recipe changes keys marked [fixed on resume] below")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, print the resolved config and LR per epoch, build model and data, then exit")
    p.add_argument("--version", action="version", version=f"powergrad-train {__version__}")
    return p


def _validate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="powergrad-train validate",
                                description="Evaluate a checkpoint on the val split: top-1, top-5, loss.")
    p.add_argument("--checkpoint", required=True, metavar="PATH")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the checkpoint's config, e.g. --set data.root=/data/imagenet")
    return p


def _count(low: int):
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {low}, got {text!r}")
        return int(text)
    return parse


def _bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="powergrad-train bench",
                                description="Images/s of the full training step and of data loading alone "
                                            "(warm-up excluded), for a recipe on this machine.")
    p.add_argument("--config", required=True, metavar="RECIPE")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=_count(1), default=50, help="timed steps (default 50)")
    p.add_argument("--warmup", type=_count(0), default=10, help="untimed steps first (default 10)")
    p.add_argument("--data", choices=("synthetic", "real"), default="synthetic",
                   help="synthetic: one random batch on the device (the step alone); real: the recipe's data")
    return p


def _check_machine(cfg: Config, world_size: int) -> None:
    """Before any CUDA work: can the installed builds drive these GPUs, and does the recipe suit them?"""
    from powergrad_train import hardware
    gpus = hardware.check_gpus(dali_on_gpu=cfg.data.backend == "dali" and cfg.data.dali_device != "cpu")
    check_runtime(cfg, world_size, cuda=bool(gpus), capability=min((g.capability for g in gpus), default=None))


def _dry_run(cfg: Config, env) -> None:
    import torch

    from powergrad_train.engine import build_data, build_model_on
    from powergrad_train.optim import lr_at_step

    print(dump(cfg), end="")
    model = build_model_on(cfg, env, torch.device("cpu"))
    data = build_data(cfg, env, torch.device("cpu"))
    data.close()
    steps = data.train.batches_per_epoch
    print(f"model {cfg.model.name}: {sum(p.numel() for p in model.parameters()):,} parameters")
    print(f"data: {len(data.classes)} classes, {data.train.num_samples} train / {data.val.num_samples} val images, "
          f"{steps} steps per epoch at global batch {cfg.data.batch_size}")
    modes = [cfg.schedule.mode] + [m for m in ("per_step", "authors_per_epoch") if m != cfg.schedule.mode]
    schedules = [dataclasses.replace(cfg.schedule, mode=m) for m in modes]
    print(f"LR at the first step of each epoch: schedule.mode {modes[0]} (in use) | {modes[1]} (for comparison)")
    for epoch in range(cfg.schedule.epochs):
        lrs = [lr_at_step(s, cfg.optim.lr, epoch * steps, steps) for s in schedules]
        print(f"  epoch {epoch + 1:4d} (step {epoch * steps:7d}): {lrs[0]:.6g} | {lrs[1]:.6g}")


def train_command(argv: list[str]) -> None:
    args = _train_parser().parse_args(argv)
    cfg = build_config(args.config, args.set)
    from powergrad_train import dist, run_folder
    env = dist.env_from_torchrun()
    _check_machine(cfg, env.world_size)
    if args.dry_run:
        _dry_run(cfg, env)
        return
    from powergrad_train.data import check_data
    from powergrad_train.engine import Trainer
    from powergrad_train.preemption import Preempted

    run_dir = Path(args.output or Path("runs") / Path(args.config).stem)
    resume_from, note = run_folder.resume_point(run_dir, args.resume)
    if note and env.is_main:
        print(note, flush=True)
    check_data(cfg.data)

    device = dist.device_for(env)
    dist.init(env, device)
    try:
        # Every check (data, classes, checkpoint compatibility) runs in here before the run folder
        # is created or locked, and before anything in it is written.
        trainer = Trainer(cfg, run_dir, env, device, resume_from, resume_force=args.resume_force)
        if env.is_main:
            from powergrad_train.atomic import write_text
            write_text(run_dir / "config.yaml", dump(cfg))
        trainer.announce(resume_from)
        try:
            trainer.fit()
        except Preempted as stop:
            if env.is_main:
                print(str(stop), file=sys.stderr, flush=True)
            sys.exit(stop.exit_code)
        finally:
            trainer.close()
    finally:
        dist.close()


def validate_command(argv: list[str]) -> None:
    args = _validate_parser().parse_args(argv)
    from powergrad_train import checkpoint, dist
    from powergrad_train.engine import autocast_for, build_data, build_model_on, evaluate_model
    from powergrad_train.metrics import format_eval

    path = Path(args.checkpoint)
    state = checkpoint.load(path)
    cfg = build_config(None, args.set, start=(f"{path} (its config)", state["config"]), lenient=True)
    env = dist.env_from_torchrun()
    _check_machine(cfg, env.world_size)
    device = dist.device_for(env)
    dist.init(env, device)
    try:
        model = build_model_on(cfg, env, device, train=False)
        checkpoint.load_model_weights(model, state, path, cfg.model.name)
        data = build_data(cfg, env, device, train=False)
        try:
            if state.get("classes") and list(state["classes"]) != list(data.classes):
                raise CheckpointError(f"{path}: trained on other classes than {cfg.data.root}/val holds")
            values = evaluate_model(model, data.val, device, autocast_for(cfg.amp, device))
        finally:
            data.close()
        if env.is_main:
            print(f"{path}: {format_eval(values)}")
    finally:
        dist.close()


def bench_command(argv: list[str]) -> None:
    import tempfile

    from powergrad_train import dist
    from powergrad_train.bench import describe_setup, measure
    from powergrad_train.data import check_data
    from powergrad_train.engine import Trainer

    args = _bench_parser().parse_args(argv)
    overrides = args.set + (["data.backend=synthetic"] if args.data == "synthetic" else [])
    cfg = build_config(args.config, overrides)
    env = dist.env_from_torchrun()
    _check_machine(cfg, env.world_size)
    check_data(cfg.data)
    device = dist.device_for(env)
    dist.init(env, device)
    try:
        with tempfile.TemporaryDirectory(prefix="powergrad-bench-") as run_dir:
            trainer = Trainer(cfg, Path(run_dir), env, device)
            try:
                lines = measure(trainer, args.steps, args.warmup)
            finally:
                trainer.close()
        if env.is_main:
            print(describe_setup(cfg, env.world_size, device) + f"; {args.warmup} warm-up + {args.steps} timed steps")
            print("\n".join(lines))
    finally:
        dist.close()


def _env_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog="powergrad-train env",
                                   description="Print the torch, CUDA, cuDNN, NCCL and DALI builds and the GPUs "
                                               "with their compute capability; exit 2 when the builds cannot "
                                               "drive a GPU (with the install that can).")


def env_command(argv: list[str]) -> None:
    _env_parser().parse_args(argv)
    from powergrad_train import hardware
    lines, problems = hardware.report()
    print("\n".join(lines + [f"problem: {p}" for p in problems]))
    if problems:
        raise InstallError(f"{len(problems)} GPU problem(s) with this install (listed above)")
    print("supported: yes")


def report_command(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="powergrad-train report",
                                description="Put runs beside the paper's Tables 1-3 (matched by their resolved "
                                            "config) and draw the paper's figures from them.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, finished or not")
    p.add_argument("--out", default="report", metavar="DIR", help="where report.md and the PNG figures go "
                                                                  "(default: ./report)")
    args = p.parse_args(argv)
    from powergrad_train.report import write_report
    text, figures = write_report([Path(r) for r in args.runs], Path(args.out))
    print(text)
    print(f"written: {Path(args.out) / 'report.md'}" + "".join(f", {f}" for f in figures))


def reproduce_command(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="powergrad-train reproduce",
                                description="Run every row of one of the paper's tables in turn (finished rows "
                                            "skipped, interrupted ones resumed), then write the report.")
    p.add_argument("table", type=int, choices=(1, 2, 3))
    p.add_argument("--data", required=True, metavar="DIR", help="ImageNet root holding train/ and val/")
    p.add_argument("--nproc", type=_count(1), default=1, help="processes (GPUs) per row, under torchrun")
    p.add_argument("--out", default="runs/reproduce", metavar="DIR", help="a run folder per row, and report/")
    p.add_argument("--rows", metavar="N,N", help="only these rows of the table, counted from 1 (default: all)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every row")
    p.add_argument("--images-per-sec", type=float, metavar="X",
                   help="measured training images/s on --nproc GPUs (powergrad-train bench), for the estimate")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = p.parse_args(argv)
    from powergrad_train import paper, reproduce
    from powergrad_train.report import write_report
    count = sum(r.table == args.table for r in paper.ROWS)
    try:
        rows = [int(n) for n in args.rows.split(",")] if args.rows else None
    except ValueError:
        rows = [0]
    if rows and not all(1 <= n <= count for n in rows):
        raise ConfigError(f"reproduce --rows {args.rows}: Table {args.table} has rows 1 to {count}")
    runs = reproduce.plan(args.table, Path(args.data), args.nproc, Path(args.out), args.set, rows)
    print(reproduce.describe(runs, args.nproc, args.images_per_sec), flush=True)
    if args.dry_run:
        return
    code, failure = reproduce.execute(runs)
    if code:
        print(failure, file=sys.stderr, flush=True)
        sys.exit(code)
    _, figures = write_report([r.output for r in runs], Path(args.out) / "report")
    print(f"report: {Path(args.out) / 'report' / 'report.md'}" + "".join(f", {f}" for f in figures))


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else "train"
    if argv and argv[0] in COMMANDS:
        argv = argv[1:]
    try:
        commands = {"train": train_command, "validate": validate_command, "bench": bench_command, "env": env_command,
                    "report": report_command, "reproduce": reproduce_command}
        commands[command](argv)
    except UserError as e:
        _say_once(f"error: {e}")
        sys.exit(2)
    except KeyboardInterrupt:  # a second Ctrl-C (the first asks for a checkpoint), or one during start-up
        _say_once("error: interrupted: stopped at once, no checkpoint written for this stop "
                  "(the run folder's last.pt, if any, is intact; continue with --resume auto)")
        sys.exit(130)
    except Exception as e:
        # Under torchrun the process that fails first says why (a bug: its traceback); an error that
        # follows another process's failure (a collective whose peer left) ends this one quietly.
        dist = sys.modules.get("powergrad_train.dist")  # loaded once a command got as far as torch
        if dist is None or not dist.env_from_torchrun().distributed:
            raise
        if dist.lost_a_peer(e):
            if not dist.another_failed():
                print(f"error: process {os.environ.get('RANK', '0')} of the run lost contact with the others "
                      f"({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]})", file=sys.stderr,
                      flush=True)
        elif not dist.failed_after_another():
            raise
        sys.exit(1)


def _say_once(line: str) -> None:
    """One line however many processes hit the error: under torchrun, the first process to report
    it prints it, whichever rank found it (many find the same one)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from powergrad_train import dist
        if not dist.report_once(line):
            return
    print(line, file=sys.stderr, flush=True)
