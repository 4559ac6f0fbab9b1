"""Command line: `powergrad-train [train]`, `validate`, `bench`, `env`, `report` and `reproduce`.

The only place that prints a user error and exits: a UserError becomes one
`error: ...` line on stderr and exit status 2; real bugs keep their tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import sys
from pathlib import Path
from typing import Optional

# Only light imports here: `--help` and config errors answer without loading torch.
from powergrad_train import __version__
from powergrad_train.config.build import build_config, dump
from powergrad_train.config.schema import absolute_path, check_path, describe_keys, suggestion
from powergrad_train.config.sections import Config
from powergrad_train.system.errors import CheckpointError, ConfigError, InstallError, UserError, printable, shown
from powergrad_train.system.preemption import STOP_SIGNALS

COMMANDS = ("train", "validate", "bench", "env", "report", "reproduce")


class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake as one `error:` line (a UserError) and the closest option suggested
    for an unknown one."""

    def add_argument(self, *names, **kwargs):
        self.option_names = getattr(self, "option_names", []) + [n for n in names if n.startswith("-")]
        return super().add_argument(*names, **kwargs)

    def parse_args(self, args=None, namespace=None):
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            name = extra[0].split("=", 1)[0]
            self.error(f"unrecognized argument {shown(extra[0])}"
                       + (suggestion(name, self.option_names) if name.startswith("-") else ""))
        return parsed

    def error(self, message):
        raise ConfigError(f"{self.prog}: {message} (see {self.prog} --help)")


def _user_path(option: str, text) -> Path:
    """A path the user gave, as every later use sees it: `~` expanded, absolute from the current folder,
    and one the system can name."""
    path = absolute_path(text)
    check_path(option, path)
    return path


def _docs_line() -> str:
    docs = Path(__file__).resolve().parent.parent / "docs"
    where = docs if (docs / "index.md").is_file() else "the docs/ folder of the source checkout"
    return (f"documentation: {where} (start with index.md; `pip install -e \".[docs]\" && mkdocs serve` "
            "in the checkout shows it as a site)")


def _train_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="powergrad-train",
        description="Train an ImageNet classifier from a YAML recipe, with the PowerGrad Transform, "
                    "label smoothing and GC/AGC. Subcommands: train (default), validate, bench, env, report, reproduce "
                    "(see 'powergrad-train validate --help' and so on).",
        epilog="config keys (set in a recipe, or with --set KEY=VALUE):\n" + describe_keys() + "\n\n" + _docs_line(),
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
    p = _Parser(prog="powergrad-train validate",
                description="Evaluate a checkpoint on the val split: top-1, top-5, loss.")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a checkpoint of this program (.pt), or one of the PGT authors' (.pth.tar, timm 0.4.12's "
                        "format: their args are printed and their weights evaluated here)")
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
    p = _Parser(prog="powergrad-train bench",
                description="Images/s of the full training step and of data loading alone "
                            "(warm-up excluded), for a recipe on this machine.")
    p.add_argument("--config", required=True, metavar="RECIPE")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=_count(1), default=50, help="timed steps (default 50)")
    p.add_argument("--warmup", type=_count(0), default=10, help="untimed steps first (default 10)")
    p.add_argument("--data", choices=("synthetic", "real"), default="synthetic",
                   help="synthetic: one random batch on the device (the step alone); real: the recipe's data")
    return p


def _dry_run(cfg: Config, trainer) -> None:
    """What a start would do, down to the checkpoint's compatibility, without writing anything: the parts
    are built (and restored) as a start builds them."""
    from powergrad_train.config import registry
    from powergrad_train.training.optim import lr_at_step

    steps = trainer.steps_per_epoch
    if trainer.init_note:
        print(trainer.init_note)
    print(f"model {cfg.model.name}: {sum(p.numel() for p in trainer.model.parameters()):,} parameters")
    print(f"data: {len(trainer.data.classes)} classes, {trainer.data.train.num_samples} train / "
          f"{trainer.data.val.num_samples} val images, {steps} steps per epoch at global batch {cfg.data.batch_size}")
    # the other mode for comparison, where the schedule has both (authors_per_epoch: cosine and step only)
    both = registry.load("schedule", cfg.schedule.name).build.like_authors is not None
    modes = [cfg.schedule.mode] + [m for m in ("per_step", "authors_per_epoch") if m != cfg.schedule.mode and both]
    schedules = [dataclasses.replace(cfg.schedule, mode=m) for m in modes]
    print(f"LR at the first step of each epoch: schedule.mode {modes[0]} (in use)" +
          "".join(f" | {m} (for comparison)" for m in modes[1:]))
    for epoch in range(cfg.schedule.epochs):
        lrs = [lr_at_step(s, cfg.optim.lr, epoch * steps, steps) for s in schedules]
        print(f"  epoch {epoch + 1:4d} (step {epoch * steps:7d}): " + " | ".join(f"{lr:.6g}" for lr in lrs))


def train_command(argv: list[str]) -> None:
    if argv and not argv[0].startswith("-"):  # a word where an option belongs: a command misspelled, most likely
        word = argv[0]
        hint = f" (did you mean --config {word}?)" if word.endswith((".yaml", ".yml")) else suggestion(word, COMMANDS)
        raise ConfigError(f"unknown command {shown(word)}{hint}; the commands are {', '.join(COMMANDS)}")
    args = _train_parser().parse_args(argv)
    cfg = build_config(args.config, args.set)
    from powergrad_train.system import dist
    from powergrad_train.training import run
    env = dist.env_from_torchrun()
    with _stop_signals_end_the_start():
        # Every check a start makes before it touches a GPU or writes anything (a dry run makes them too).
        run_dir = _user_path("--output", args.output or Path("runs") / Path(args.config).stem)
        resume = args.resume if args.resume in (None, "auto") else str(_user_path("--resume", args.resume))
        resume_from, note = run.check_run_folder(run_dir, resume)
        run.check_start(cfg, env.world_size)
        try:
            _train(cfg, args, env, run_dir, resume_from, note)
        except KeyboardInterrupt as e:
            raise Interrupted(getattr(e, "signum", signal.SIGINT), run_dir) from None


class Interrupted(KeyboardInterrupt):
    """A command stopped at once by a signal: one during start-up (before the trainer takes stop
    signals as a request for a checkpoint), or a second Ctrl-C. `run_dir`: the run folder, once known."""

    def __init__(self, signum: int, run_dir: Optional[Path] = None):
        super().__init__(signum)
        self.signum, self.run_dir = signum, run_dir


def _stop_at_once(signum, frame) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def _stop_signals_end_the_start():
    """SIGTERM, SIGUSR1 and SIGHUP would end a start silently (their default action), Ctrl-C with a
    traceback: each ends it with one line instead (see main), until the trainer takes them over
    (preemption.StopRequest, for the whole of fit()). A signal set to be ignored (nohup) stays so."""
    previous = {}
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler):
            with contextlib.suppress(ValueError):  # (not the main thread: signals stay as they are)
                previous[signum] = signal.signal(signum, _stop_at_once)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _train(cfg: Config, args, env, run_dir: Path, resume_from: Optional[Path], note: Optional[str]) -> None:
    from powergrad_train.system.preemption import Preempted
    from powergrad_train.training.run import build_run, process_group

    if note and env.is_main:
        print(note, flush=True)
    if args.dry_run:
        print(dump(cfg), end="")
    with process_group(env, dry_run=args.dry_run) as device:
        # Every check (data, classes, checkpoint compatibility) runs in here before the run folder
        # is created or locked, and before anything in it is written; a dry run writes nothing.
        trainer = build_run(cfg, run_dir, env, device, resume_from, resume_force=args.resume_force,
                            open_folder=not args.dry_run)
        try:
            if args.dry_run:
                _dry_run(cfg, trainer)
                return
            if env.is_main:
                from powergrad_train.system.atomic import write_text
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


def validate_command(argv: list[str]) -> None:
    args = _validate_parser().parse_args(argv)
    from powergrad_train.reproduction import authors
    from powergrad_train.system import dist
    from powergrad_train.training import checkpoint
    from powergrad_train.training.run_folder import checkpoints_in

    path = _user_path("--checkpoint", args.checkpoint)
    if path.is_dir():
        held = ", ".join(p.name for p in checkpoints_in(path)) or "none"
        raise CheckpointError(f"--checkpoint: {printable(path)} is a folder; pass a checkpoint file in it "
                              f"(checkpoints there: {held})")
    about = None
    if authors.is_timm_checkpoint(path):  # the PGT authors' published files (timm 0.4.12's format)
        theirs = authors.load_checkpoint(path)
        about, state, cfg = theirs.describe(), {"model": theirs.state_dict}, theirs.config(args.set)
    else:
        state = checkpoint.load(path)
        cfg = build_config(None, args.set, start=(f"{path} (its config)", state["config"]), lenient=True)
    from powergrad_train.training import run  # timm: seconds
    from powergrad_train.training.outputs import format_eval

    env = dist.env_from_torchrun()
    run.check_start(cfg, env.world_size, train=False, measuring="evaluating", announce=env.is_main)
    with run.process_group(env) as device:
        values = run.evaluate_checkpoint(cfg, state, path, env, device)
    if env.is_main:
        print(f"{about}\n" if about else "", end="")
        print(f"{path}: {format_eval(values)}")


def bench_command(argv: list[str]) -> None:
    args = _bench_parser().parse_args(argv)  # a mistake here is told before torch loads
    import tempfile

    from powergrad_train.system import dist
    from powergrad_train.training import run
    from powergrad_train.training.bench import describe_setup, measure

    overrides = args.set + (["data.backend=synthetic"] if args.data == "synthetic" else [])
    cfg = build_config(args.config, overrides)
    env = dist.env_from_torchrun()
    run.check_start(cfg, env.world_size, measuring="timing", announce=env.is_main)
    with run.process_group(env) as device, tempfile.TemporaryDirectory(prefix="powergrad-bench-") as run_dir:
        # The parts a start builds, with its checks; no output is started (a tracker would record a run).
        trainer = run.build_run(cfg, Path(run_dir), env, device, open_folder=False)
        try:
            lines = measure(trainer, args.steps, args.warmup)
            setup = describe_setup(cfg, trainer, env.world_size, device)
        finally:
            trainer.close()
    if env.is_main:
        print(setup + f"; {args.warmup} warm-up + {args.steps} timed steps")
        print("\n".join(lines))


def _env_parser() -> argparse.ArgumentParser:
    return _Parser(prog="powergrad-train env",
                   description="Print the torch, CUDA, cuDNN, NCCL and DALI builds and the GPUs "
                               "with their compute capability; exit 2 when the builds cannot "
                               "drive a GPU (with the install that can).")


def env_command(argv: list[str]) -> None:
    _env_parser().parse_args(argv)
    from powergrad_train.system import hardware
    lines, problems = hardware.report()
    print("\n".join(lines + [f"problem: {p}" for p in problems]))
    if problems:
        raise InstallError(f"{len(problems)} GPU problem(s) with this install (listed above)")
    print("supported: yes")


def report_command(argv: list[str]) -> None:
    p = _Parser(prog="powergrad-train report",
                                description="Group runs into arms (equal resolved configs but the seed), compare "
                                            "arms that differ in one setting over their seeds (the gain with its "
                                            "95% interval, p-value, verdict and the seeds needed), put runs beside "
                                            "the paper's Tables 1-3 (matched by their resolved config) and draw the "
                                            "paper's figures from them.")
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run folders, finished or not (a folder given twice is read once)")
    p.add_argument("--compare", metavar="KEY",
                   help="the config key two arms differ in to be compared, e.g. optim.name or loss.label_smoothing "
                        "(default: the loss method, loss.pgt_alpha and loss.pgt_impl)")
    p.add_argument("--effect", type=float, metavar="X",
                   help="the seeds per arm needed to resolve a gain of X points of test top-1 (default: the "
                        "observed gain)")
    p.add_argument("--out", default="report", metavar="DIR", help="where report.md and the PNG figures go "
                                                                  "(default: ./report)")
    p.add_argument("--reference", metavar="AUTHORS_DIR",
                   help="the PGT authors' published folder (<model>/<schedule>-scheduler-alpha-<a>/summary.csv): "
                        "their final and best test top-1 beside each row, their curves in the figures")
    p.add_argument("--table2-batch", choices=paper_readings(), default="global",
                   help="read Table 2's batch as the global batch (the recipes) or per GPU on the authors' 4 GPUs")
    args = p.parse_args(argv)
    if not args.runs and not args.reference:
        raise ConfigError("report: give run folders, or --reference AUTHORS_DIR, or both")
    from powergrad_train.reproduction.report import write_report
    out = _user_path("report --out", args.out)
    text, figures = write_report([_user_path("report", r) for r in args.runs], out,
                                 _user_path("report --reference", args.reference) if args.reference else None,
                                 args.table2_batch, args.compare, args.effect)
    print(text)
    print(f"written: {out / 'report.md'}" + "".join(f", {f}" for f in figures))


def paper_readings() -> tuple[str, ...]:
    from powergrad_train.reproduction.paper import BATCH_READINGS
    return BATCH_READINGS


def reproduce_command(argv: list[str]) -> None:
    p = _Parser(prog="powergrad-train reproduce",
                                description="Run every row of one of the paper's tables in turn, once per seed "
                                            "(finished runs skipped, interrupted ones resumed), then write the report; "
                                            "or submit them to SLURM as one job array (--slurm) and follow them "
                                            "(--status).")
    p.add_argument("table", type=int, choices=(1, 2, 3))
    p.add_argument("--data", metavar="DIR", help="ImageNet root holding train/ and val/ (not needed with --status)")
    p.add_argument("--nproc", type=_count(1), default=1, help="processes (GPUs) per row, under torchrun")
    p.add_argument("--out", default="runs/reproduce", metavar="DIR", help="a run folder per row and seed, and report/")
    p.add_argument("--rows", metavar="N,N", help="only these rows of the table, counted from 1 (default: all)")
    p.add_argument("--seeds", metavar="S,S", help="run every row once per seed, e.g. 0,1,2 (folder OUT/<recipe> for "
                                                  "seed 0, OUT/<recipe>-seed<S> for the others)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every row")
    p.add_argument("--table2-batch", choices=paper_readings(), default="global",
                   help="Table 2's batch as the global batch (the recipes) or per GPU on the authors' 4 GPUs "
                        "(global batch 4x; folders OUT/<recipe>-per-gpu)")
    p.add_argument("--images-per-sec", metavar="X|MODEL=X,...",
                   help="measured training images/s on --nproc GPUs (powergrad-train bench), for all models or "
                        "per model; without it the plan uses stated V100 estimates")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit (needs no data folder); with "
                                                          "--slurm also the job array's script, submitting nothing")
    p.add_argument("--slurm", action="store_true",
                   help="submit the rows and seeds as one requeueable job array (its script: "
                        "OUT/slurm/table<N>.sbatch) and a report job after it; again: submits only the runs "
                        "neither finished, queued nor running")
    p.add_argument("--status", action="store_true",
                   help="one line per row and seed in OUT: queued, running, finished or failed (no --data needed)")
    p.add_argument("--partition", help="SLURM partition of the jobs")
    p.add_argument("--account", help="SLURM account charged")
    p.add_argument("--qos", help="SLURM quality of service")
    p.add_argument("--nodes", type=_count(1), help="nodes per row (default 1; several meet through torchrun's "
                                                   "c10d rendezvous on the first)")
    p.add_argument("--gpus-per-node", type=_count(0), metavar="N",
                   help="GPUs, and processes, per node (default: --nproc); 0: CPU nodes, one process each")
    p.add_argument("--time", metavar="LIMIT", help="time limit per job, e.g. 4:00:00: a row longer than that "
                                                   "trains in slices, each job requeueing itself (default: the "
                                                   "partition's)")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="an extra #SBATCH line, e.g. --sbatch=--cpus-per-task=32 (repeatable)")
    p.add_argument("--setup", metavar="SHELL", help="a line each job runs first, e.g. "
                                                    "'module load cuda && source ~/venv/bin/activate'")
    args = p.parse_args(argv)
    from powergrad_train.reproduction import reproduce, slurm
    from powergrad_train.reproduction.report import write_report
    rows = reproduce.parse_rows(args.rows, args.table)
    seeds = reproduce.parse_seeds(args.seeds, args.set)
    throughput = reproduce.parse_throughput(args.images_per_sec)
    cluster = slurm.options(args)
    if args.status:
        print(slurm.status(args.table, _user_path("reproduce --out", args.out), rows, seeds, args.table2_batch))
        return
    if args.data is None:
        p.error("the following arguments are required: --data")
    nproc = cluster.world_size if cluster else args.nproc
    out, data = _user_path("reproduce --out", args.out), _user_path("reproduce --data", args.data)
    runs = reproduce.plan(args.table, data, nproc, out, args.set, rows, seeds, args.table2_batch)
    reproduce.check_out(out, runs, writing=not args.dry_run)
    reproduce.check_reuse(runs)
    print(reproduce.describe(runs, nproc, throughput, data), flush=True)
    if cluster:
        slurm.submit(args.table, runs, cluster, out, ["powergrad-train", "reproduce", *argv], args.table2_batch,
                     args.dry_run)
        return
    if args.dry_run:
        return
    code, failure = reproduce.execute(runs)
    if code:
        print(failure, file=sys.stderr, flush=True)
        sys.exit(code)
    # Every run in OUT, of every table: reports of tables sharing OUT never erase each other's runs.
    _, figures = write_report(reproduce.run_folders(out), out / "report", reading=args.table2_batch)
    print(f"report: {out / 'report' / 'report.md'}" + "".join(f", {f}" for f in figures))


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if hasattr(sys.stdout, "reconfigure"):  # a name with bytes that are not UTF-8 prints, escaped
        sys.stdout.reconfigure(errors="backslashreplace")
    command = argv[0] if argv and argv[0] in COMMANDS else "train"
    if argv and argv[0] in COMMANDS:
        argv = argv[1:]
    try:
        commands = {"train": train_command, "validate": validate_command, "bench": bench_command, "env": env_command,
                    "report": report_command, "reproduce": reproduce_command}
        if command in ("train", "reproduce"):  # each takes stop signals over for its own checkpoints
            commands[command](argv)
        else:
            with _stop_signals_end_the_start():
                commands[command](argv)
    except UserError as e:
        _say_once(f"error: {e}")
        sys.exit(2)
    except KeyboardInterrupt as e:  # a second Ctrl-C (the first asks for a checkpoint), or a signal during start-up
        signum = getattr(e, "signum", signal.SIGINT)
        if command in ("train", "reproduce"):
            _say_once(_interrupted_line(signum, getattr(e, "run_dir", None)))
        else:
            _say_once(f"error: {_what_stopped(signum)}: {command} stopped at once (nothing it writes is left "
                      "half-written; run it again)")
        sys.exit(128 + signum)
    except Exception as e:
        # Under torchrun the process that fails first says why (a bug: its traceback); an error that
        # follows another process's failure (a collective whose peer left) ends this one quietly.
        dist = sys.modules.get("powergrad_train.system.dist")  # loaded once a command got as far as torch
        if dist is None or not dist.env_from_torchrun().distributed:
            raise
        if dist.lost_a_peer(e):
            dist.outlast_the_stop()  # (until this process has said what it lost)
            # A broken connection means the peer is gone, and one that failed on an error said so before.
            if not dist.another_failed(0 if dist.connection_lost(e) else 5) and dist.report_once("lost a peer"):
                print(f"error: process {os.environ.get('RANK', '0')} of the run lost contact with another, which "
                      f"ended without saying why (killed, out of memory, or its machine failed): "
                      f"{dist.lost_peer_reason(e)}; --resume auto continues from the last checkpoint",
                      file=sys.stderr, flush=True)
        elif not dist.failed_after_another():
            raise
        sys.exit(1)


def _what_stopped(signum: int) -> str:
    return "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"


def _interrupted_line(signum: int, run_dir: Optional[Path]) -> str:
    what = _what_stopped(signum)
    if run_dir is not None:
        from powergrad_train.training.run_folder import checkpoints_in
        if not [p for p in checkpoints_in(run_dir) if p.name != "nonfinite.pt"]:  # what --resume auto would skip
            return (f"error: {what}: stopped at once, before this run wrote any checkpoint (nothing to continue: "
                    "run the same command again to start it)")
    return (f"error: {what}: stopped at once, no checkpoint written for this stop "
            "(the run folder's last.pt, if any, is intact; continue with --resume auto)")


def _say_once(line: str) -> None:
    """One line however many processes hit the error: under torchrun, the first process to report
    it prints it, whichever rank found it (many find the same one)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from powergrad_train.system import dist
        if not dist.report_once(line):
            return
    print(line, file=sys.stderr, flush=True)
