"""`reproduce TABLE --slurm`: a paper table as one SLURM job array; `reproduce TABLE --status`: where each run stands.

The array has one task per row and seed. Its script is written to OUT/slurm/table<N>.sbatch, to be read,
or edited and submitted by hand. Each task runs its row's recipe under srun and torchrun into the run
folder `reproduce` uses (OUT/<recipe>[-seed<S>]) with --resume auto; a row on several nodes meets
through torchrun's c10d rendezvous on its first node.

Slices: the batch shell is sent USR1 SIGNAL_SECONDS before the job's time limit. It then has the run
stop (SIGTERM to the job step: every process finishes its step, rank 0 writes the checkpoint, they
exit) and puts the job back in the queue (scontrol requeue), so a 100-epoch row trains in slices of
any length and ends as one uninterrupted run would. A job the scheduler preempts or requeues is
signalled by SLURM itself and resumes the same way. A run that fails (a user error, a diverged run,
a crash) is not requeued: its task records the failure, and a slice that ends without a new
checkpoint counts as one (its time limit is too short to make progress).

What OUT/slurm holds:
  table<N>.sbatch            the array's script (a later submission rewrites it, unless it was edited)
  logs/table<N>-<A>_<i>.log  a task's output, every slice of it; logs/report-<J>.log the report job's
  runs/<run>/submitted       a line per submission of the run: job, when, log
  runs/<run>/config.yaml     the config the run was last submitted with
  runs/<run>/<job>.events    what the task did: start, requeued, stopped, failed, finished (its script writes them)
  report.job                 the last report job: it runs `powergrad-train report` once the array has ended

Never twice: a submission asks the scheduler (squeue) about the recorded jobs and submits only the runs
that are neither finished, queued nor running; a run queued or running with another config than the
command's is refused, as `reproduce` refuses a run folder that holds another run. A task of the script
submitted by hand is known from its first start on (by its events), not while it waits.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from powergrad_train.config.build import dump
from powergrad_train.reproduction import paper
from powergrad_train.reproduction.report import Run, read_epochs, read_run_config
from powergrad_train.reproduction.reproduce import PlannedRun, changed_keys, chosen_rows, folder_name
from powergrad_train.system.atomic import make_folder, reason, write_text
from powergrad_train.system.errors import ConfigError, RunFolderError, UserError, WriteError, printable, shown

STEP_NAME = "powergrad-train"  # the job step that trains, found by this name to be signalled
SIGNAL_SECONDS = 300  # USR1 this long before the time limit: the current step, a checkpoint, a margin
REPORT_TIME = "1:00:00"
# squeue's states of a job that is still the scheduler's: waiting, or holding its resources.
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
RUNNING = {"CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}
# The options of `reproduce` that only a submission uses: argparse dest -> option.
SLURM_ONLY = {"partition": "--partition", "account": "--account", "qos": "--qos", "nodes": "--nodes",
              "gpus_per_node": "--gpus-per-node", "time": "--time", "sbatch": "--sbatch", "setup": "--setup"}
TAIL_BYTES = 256 << 10  # what is read of a log: its last progress line and error line are near its end


@dataclass
class Options:
    """What clusters differ in (reproduce's options, checked)."""

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 1  # 0: CPU nodes, one process each
    time: Optional[str] = None
    sbatch: list[str] = field(default_factory=list)
    setup: Optional[str] = None

    @property
    def processes_per_node(self) -> int:
        return max(self.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes_per_node


def options(args) -> Optional[Options]:
    """The submission's options from reproduce's arguments; None without --slurm. A SLURM option
    without --slurm, or --status with what only a submission or a plan uses, is a user error."""
    given = [flag for name, flag in SLURM_ONLY.items() if getattr(args, name) not in (None, [])]
    if args.status:
        others = (["--slurm"] if args.slurm else []) + (["--dry-run"] if args.dry_run else []) + given
        if others:
            raise ConfigError(f"reproduce --status: it only reads where the runs in --out stand; give it without "
                              f"{', '.join(others)}")
        return None
    if not args.slurm:
        if given:
            raise ConfigError(f"reproduce {given[0]}: an option of a SLURM submission; add --slurm to submit the "
                              "table as a job array")
        return None
    for name in ("partition", "account", "qos"):
        value = getattr(args, name)
        if value is not None and not re.fullmatch(r"[^\s'\"\\#]+", value):
            raise ConfigError(f"reproduce {SLURM_ONLY[name]} {shown(value)}: not a SLURM {name} name")
    if args.time is not None and time_seconds(args.time) < 2 * SIGNAL_SECONDS:
        raise ConfigError(f"reproduce --time {shown(args.time)}: a job is told to stop {SIGNAL_SECONDS} s before its "
                          f"time limit (to write its checkpoint), so give at least {2 * SIGNAL_SECONDS // 60} minutes")
    lines = []
    for line in args.sbatch:
        text = re.sub(r"^\s*#SBATCH\s+", "", line).strip()
        if not text.startswith("-") or not text.isprintable():
            raise ConfigError(f"reproduce --sbatch {shown(line)}: give one sbatch option, e.g. "
                              "--sbatch=--cpus-per-task=32 or --sbatch='--constraint=a100'")
        lines.append(text)
    if args.setup is not None and (not args.setup.strip() or not args.setup.isprintable()):
        raise ConfigError(f"reproduce --setup {shown(args.setup)}: give one line of shell, e.g. --setup "
                          "'module load cuda && source ~/venv/bin/activate'")
    gpus = args.gpus_per_node if args.gpus_per_node is not None else args.nproc
    return Options(args.partition, args.account, args.qos, args.nodes or 1, gpus, args.time, lines, args.setup)


def time_seconds(text: str) -> int:
    """A SLURM time limit (minutes, minutes:seconds, hours:minutes:seconds, days-hours,
    days-hours:minutes, days-hours:minutes:seconds) in seconds."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise ConfigError(f"reproduce --time {shown(text)}: not a SLURM time limit (e.g. 4:00:00, or 1-00:00:00 "
                          "for a day)")
    days, a, b, c = match.groups()
    if days is None:
        hours, minutes, seconds = (a, b, c) if c is not None else (0, a, b or 0)
    else:
        hours, minutes, seconds = a, b or 0, c or 0
    return ((int(days or 0) * 24 + int(hours)) * 60 + int(minutes)) * 60 + int(seconds)


# ---- the script --------------------------------------------------------------------------------------

@dataclass
class Task:
    index: int  # the array task
    run: PlannedRun

    @property
    def name(self) -> str:
        return self.run.output.name

    @property
    def title(self) -> str:
        return f"{self.run.row.title}, seed {self.run.cfg.seed}"


def _sites(opts: Options) -> tuple:
    return ("partition", opts.partition), ("account", opts.account), ("qos", opts.qos)


def _sbatch_value(text: str) -> str:
    return f'"{text}"' if re.search(r"\s", text) else text


def script_name(table: int) -> str:
    return f"table{table}.sbatch"


def render_script(table: int, tasks: list[Task], opts: Options, out: Path, python: str, command: str) -> str:
    lines = [
        "#!/bin/bash",
        f"# Table {table} of the PGT paper as a SLURM job array: one task per row and seed ({len(tasks)} runs).",
        f"# Written by: {command}",
        "# That command submits it again with only the runs neither finished, queued nor running; by hand:",
        f"#   sbatch [--array=I,J] {shlex.quote(str(out / 'slurm' / script_name(table)))}",
        f"# Where each run stands: powergrad-train reproduce {table} --out {shlex.quote(str(out))} --status",
        f"#SBATCH --job-name=pgt-table{table}",
        f"#SBATCH --array=0-{len(tasks) - 1}",
        f"#SBATCH --nodes={opts.nodes}",
        "#SBATCH --ntasks-per-node=1",
    ]
    lines += [f"#SBATCH --gpus-per-node={opts.gpus_per_node}"] if opts.gpus_per_node else []
    lines += [f"#SBATCH --{name}={value}" for name, value in (("time", opts.time), *_sites(opts)) if value]
    lines += [
        f"# USR1 {SIGNAL_SECONDS} s before the time limit: the run writes its checkpoint and the job requeues itself.",
        f"#SBATCH --signal=B:USR1@{SIGNAL_SECONDS}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={_sbatch_value(str(out / 'slurm' / 'logs' / f'table{table}-%A_%a.log'))}",
        *[f"#SBATCH {line}" for line in opts.sbatch],
        *([opts.setup] if opts.setup else []),
        "set -uo pipefail",
        "# srun (SLURM 22.05 on) takes --cpus-per-task from this variable, not from the job's",
        '[ -n "${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK',
        "",
        f"OUT={shlex.quote(str(out))}",
        f"PYTHON={shlex.quote(python)}",
        'case "${SLURM_ARRAY_TASK_ID:-}" in',
    ]
    for task in tasks:
        lines += [f"  {task.index}) RUN={shlex.quote(task.name)}  # {task.title}",
                  f"     ARGS=({shlex.join(task.run.train_args)}) ;;"]  # the script gives --output and --resume
    lines += [
        '  *) echo "error: $0: no run for array task ${SLURM_ARRAY_TASK_ID:-(none: submit it as an array)}" >&2',
        "     exit 2 ;;",
        "esac",
        'EVENTS="$OUT/slurm/runs/$RUN/${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}.events"',
        'mkdir -p "$OUT/slurm/runs/$RUN"',
        'note() { echo "$1 $(date -Iseconds) ${*:2}" >> "$EVENTS"; }',
        "",
        "# The time limit is near: SIGTERM to the run's job step (each process finishes its step, rank 0 writes",
        "# the checkpoint, they exit); the job is requeued below. The step alone: a signal to the job would reach",
        "# this shell too, and SLURM 22.05 keeps retrying one to an array task whose siblings still wait.",
        "stop_the_run() {",
        "  local step_id",
        '  for step_id in $(squeue -h -s -j "$SLURM_JOB_ID" -o "%i %j" |',
        f"                   awk '$2 == \"{STEP_NAME}\" {{print $1}}'); do",
        '    scancel --signal=TERM "$step_id"',
        "  done",
        "}",
        "stop=",
        "trap '[ -n \"$stop\" ] || { stop=USR1; stop_the_run; }' USR1",
        "# Preempted, requeued or cancelled: SLURM signals the run itself (srun must not be: it would kill the step).",
        "trap '[ -n \"$stop\" ] || stop=TERM' TERM",
        'note start "${SLURM_RESTART_COUNT:-0}" "$(hostname)"',
    ]
    launch = [f"srun --job-name={STEP_NAME} --kill-on-bad-exit=1 --ntasks-per-node=1 \\"]
    if opts.nodes == 1:
        launch.append(f'  "$PYTHON" -m torch.distributed.run --standalone '
                      f'--nproc_per_node={opts.processes_per_node} \\')
    else:
        lines += ["# torchrun's c10d rendezvous on the job's first node",
                  'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                  "PORT=$((20000 + SLURM_JOB_ID % 20000))"]
        launch += [f'  "$PYTHON" -m torch.distributed.run --nnodes="$SLURM_JOB_NUM_NODES" '
                   f'--nproc_per_node={opts.processes_per_node} \\',
                   '  --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$HEAD:$PORT" \\']
    lines += [
        *launch,
        '  -m powergrad_train --output "$OUT/$RUN" --resume auto "${ARGS[@]}" &',
        "step=$!",
        'wait "$step"',
        'while kill -0 "$step" 2>/dev/null; do wait "$step"; done  # a trapped signal ends a wait early',
        'wait "$step"; code=$?',
        'if [ "$code" -eq 0 ]; then',
        "  note finished",
        'elif [ "$stop" = USR1 ] && [ "$OUT/$RUN/last.pt" -nt "$EVENTS" ]; then',
        '  note requeued "$code"',
        '  scontrol requeue "$SLURM_JOB_ID" || note failed "$code" "scontrol requeue refused"',
        'elif [ "$stop" = USR1 ]; then',
        '  note failed "$code" "no checkpoint written in this slice: give a longer --time"',
        'elif [ "$stop" = TERM ]; then',
        '  note stopped "$code"',
        "else",
        '  note failed "$code"',
        "fi",
        'exit "$code"',
    ]
    return "\n".join(lines) + "\n"


def report_command(out: Path, python: str, reading: str, setup: Optional[str]) -> str:
    """The report job's shell (sbatch --wrap runs it with /bin/sh): every run folder in OUT, as `reproduce`
    reports them."""
    return "\n".join([
        *([setup] if setup else []),
        f"OUT={shlex.quote(str(out))}",
        'set --; for d in "$OUT"/*/; do [ -f "${d}config.yaml" ] && set -- "$@" "${d%/}"; done',
        f'exec {shlex.quote(python)} -m powergrad_train report --out "$OUT/report" --table2-batch {reading} "$@"',
    ])


# ---- the scheduler -------------------------------------------------------------------------------------

def _tool(name: str, why: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise UserError(f"{why}: {name} not found (run this on a SLURM login node, where {name} is on the PATH)")
    return path


def _run(args: list[str], what: str) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"{what}: {Path(args[0]).name} did not answer ({e})") from None
    if done.returncode:
        said = [line for line in done.stderr.splitlines() if line.strip()] or [f"exit status {done.returncode}"]
        raise UserError(f"{what}: {printable(said[-1].strip())}")
    return done.stdout


@dataclass
class Queued:
    state: str  # squeue's
    reason: str
    node: str

    @property
    def waiting(self) -> bool:
        return self.state in QUEUED

    @property
    def why(self) -> str:
        """' (Resources)': what the job waits for, as squeue says it, if anything."""
        return f" ({self.reason})" if self.reason not in ("", "None") else ""


def ask_queue(jobs: list[str], why: str) -> dict[str, Queued]:
    """The scheduler's jobs among `jobs` (array tasks as A_i) that are still queued or running."""
    if not jobs:
        return {}
    try:
        answer = _run([_tool("squeue", why), "-h", "-r", "-t", "all", "-j", ",".join(sorted(set(jobs))),
                       "-o", "%i|%T|%r|%N"], f"{why}: squeue failed")
    except UserError as e:
        if "Invalid job id" in str(e):  # (squeue's answer when asked about one job it no longer holds)
            return {}
        raise
    found = {}
    for line in answer.splitlines():
        job, state, why_waiting, node = (line.split("|") + ["", "", ""])[:4]
        state = state.split()[0] if state.strip() else ""
        if state in QUEUED or state in RUNNING:
            found[job.strip()] = Queued(state, why_waiting.strip(), node.strip())
    return found


# ---- what each run's folder in OUT/slurm says --------------------------------------------------------------

@dataclass
class Event:
    kind: str
    when: str
    fields: list[str]


@dataclass
class Record:
    """OUT/slurm/runs/<run>: the run's last submission and what its task did."""

    folder: Path
    job: Optional[str] = None
    submitted: Optional[str] = None
    log: Optional[Path] = None
    events: list[Event] = field(default_factory=list)

    @classmethod
    def read(cls, folder: Path) -> "Record":
        record = cls(folder)
        lines = _lines(folder / "submitted")
        if lines:
            parts = lines[-1].split(" ", 2)
            if len(parts) == 3:
                record.job, record.submitted, record.log = parts[0], parts[1], Path(parts[2])
        # A task of the script submitted by hand (sbatch) is known once it has started: by its events.
        started = max(folder.glob("*.events"), key=lambda p: p.stat().st_mtime, default=None)
        if started is not None and started.name != f"{record.job}.events" and (
                record.job is None or started.stat().st_mtime > (folder / "submitted").stat().st_mtime):
            record.job, record.submitted = started.name[:-len(".events")], None
            record.log = next(folder.parent.parent.glob(f"logs/*-{record.job}.log"), None)
        if record.job:
            for line in _lines(folder / f"{record.job}.events"):
                kind, _, rest = line.partition(" ")
                when, _, rest = rest.partition(" ")
                record.events.append(Event(kind, when, rest.split(" ", 1)))
        return record

    @property
    def starts(self) -> list[Event]:
        return [e for e in self.events if e.kind == "start"]

    @property
    def last(self) -> Optional[Event]:
        return self.events[-1] if self.events else None


def _lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return []


def _tail(path: Optional[Path]) -> list[str]:
    if path is None:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - TAIL_BYTES))
            return f.read().decode(errors="replace").splitlines()
    except OSError:
        return []


def _when(iso: str) -> str:
    try:
        return datetime.datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return iso


def _times(n: int) -> str:
    return f"requeued {n} time{'s' if n != 1 else ''}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{days}d"] * bool(days) + [f"{hours}h"] * bool(hours) + [f"{minutes}m"] * bool(minutes)
    return " ".join(parts[:2]) or f"{seconds}s"


# The console's lines (outputs.Console, printed every train.log_every_steps and at each epoch's end; the
# SLURM tests read a status line made from them).
PROGRESS = re.compile(r"epoch (\d+)/(\d+) step (\d+)/(\d+) \|.*\| (\d+) img/s \| ETA epoch [^,]*, run (.+?)\s*$")
EPOCH_END = re.compile(r"epoch (\d+): train loss .*\| (\d+) img/s \| ([\d.]+)s\s*$")


def progress(log: Optional[Path], epochs: Optional[int]) -> str:
    """'epoch e/E step b/B, N images/s, ETA T' from the run's last line of progress in its log."""
    for line in reversed(_tail(log)):
        if match := PROGRESS.search(line):
            epoch, total, step, steps, speed, eta = match.groups()
            return f"epoch {epoch}/{total} step {step}/{steps}, {speed} images/s, ETA {eta}"
        if match := EPOCH_END.search(line):
            done, speed, seconds = int(match[1]), match[2], float(match[3])
            left = f", ETA {_duration((epochs - done) * seconds)}" if epochs else ""
            return f"epoch {done}/{epochs or '?'} done, {speed} images/s{left}"
    return "starting"


def error_line(log: Optional[Path]) -> str:
    """The run's `error: ...` line in its log, else the log's last line."""
    lines = [line.strip() for line in _tail(log) if line.strip()]
    said = [line for line in lines if line.startswith("error:")]
    return printable((said or lines or ["(no output)"])[-1])


def _epochs(run_dir: Path) -> list[dict]:
    """The run folder's summary.csv (report.read_epochs); none where it cannot be read (a status never stops on it)."""
    try:
        return read_epochs(run_dir)
    except UserError:
        return []


def finished_text(rows: list[dict]) -> str:
    best = max(rows, key=lambda r: r.get("eval_top1", float("-inf")))
    return (f"finished: final test top-1 {rows[-1]['eval_top1']:.2f}, best {best['eval_top1']:.2f} "
            f"(epoch {int(best['epoch'])})")


def standing(run: Run, record: Record, queue: Optional[dict[str, Queued]], unasked: str = "") -> str:
    """Where one run stands: its run folder (`run.cfg` None where no config of it could be read), its
    record in OUT/slurm, and the scheduler's answer (None when it could not be asked: `unasked` says why)."""
    epochs = run.cfg.schedule.epochs if run.cfg is not None else None
    if run.epochs and epochs is not None and run.finished:
        return finished_text(run.epochs)
    done = f"{run.done}/{epochs} epochs" if epochs else f"{run.done} epochs"
    job, starts, last = record.job, record.starts, record.last
    if job is None:
        return f"not submitted ({done} in {printable(run.folder)})" if run.epochs else "not submitted"
    if queue is not None and job in queue:
        q = queue[job]
        if q.waiting:
            since = _when(last.when if last and last.kind != "start" else record.submitted or "?")
            again = f", {_times(len(starts))}" if starts else ""
            return f"queued since {since}{q.why}, job {job}{again}"
        since = f" since {_when(starts[-1].when)}" if starts else ""
        return (f"running on {q.node or '?'}{since}, job {job}: {progress(record.log, epochs)}, "
                f"{_times(max(len(starts) - 1, 0))}")
    if last is not None and last.kind == "failed":
        code, why = (last.fields + [""])[:2]
        return (f"failed (exit status {code}{'; ' + why if why else ''}), job {job}: {error_line(record.log)}; "
                f"log {printable(record.log)}")
    if queue is None:
        return f"submitted as job {job}, {done}; queued or running? {unasked}"
    ended = f"stopped at {done}" if starts else "never started"
    log = f"; log {printable(record.log)}" if starts else ""
    return (f"{ended}: job {job} is no longer queued (cancelled, or its time ran out); the same reproduce --slurm "
            f"command submits it again{log}")


# ---- submitting ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def _submitting(slurm_dir: Path):
    """One submission at a time into OUT: its check of the queue and its sbatch go together."""
    make_folder(slurm_dir)
    lock = slurm_dir / ".lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise WriteError(lock, reason(e)) from None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RunFolderError(f"reproduce --slurm: another reproduce command is submitting into "
                                 f"{printable(slurm_dir.parent)}; wait for it to end") from None
        yield
    finally:
        os.close(fd)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def submit(table: int, runs: list[PlannedRun], opts: Options, out: Path, command: list[str], reading: str,
           dry_run: bool) -> None:
    """Write the table's script into OUT/slurm and submit the runs neither finished, queued nor running,
    then the report job; `dry_run`: print the script, write and submit nothing. A refused submission
    leaves OUT as it was."""
    tasks = [Task(i, run) for i, run in enumerate(runs)]
    python = sys.executable
    script = render_script(table, tasks, opts, out, python, shlex.join(command))
    if dry_run:
        print(f"the job array's script ({out / 'slurm' / script_name(table)}; nothing written or submitted):")
        print(script, end="")
        return
    why = "reproduce --slurm"
    sbatch = _tool("sbatch", why)
    slurm_dir = out / "slurm"
    script_path = slurm_dir / script_name(table)
    # What this command makes before sbatch has accepted the array, removed again if it does not.
    made = [p for p in (out, slurm_dir, slurm_dir / ".lock") if not os.path.lexists(p)]
    array = None
    try:
        with _submitting(slurm_dir):
            records = {t.name: Record.read(slurm_dir / "runs" / t.name) for t in tasks}
            queue = ask_queue([r.job for r in records.values() if r.job], why)
            _refuse_other_configs(tasks, records, queue)
            _refuse_an_edited_script(script_path)
            chosen, before = [], {}
            for task in tasks:
                record = records[task.name]
                if task.run.progress().finished:
                    print(f"{task.title}: finished, not submitted ({printable(task.run.output)})")
                elif record.job in queue:
                    print(f"{task.title}: {'queued' if queue[record.job].waiting else 'running'} as job {record.job}, "
                          "not submitted again")
                else:
                    chosen.append(task)
                    if record.job:  # it failed, or left the queue unfinished
                        failed = record.last is not None and record.last.kind == "failed"
                        before[task.name] = f"job {record.job} " + (f"failed: {error_line(record.log)}" if failed else
                                                                     "left the queue unfinished")
            if not chosen:
                print("nothing submitted: every run is finished, queued or running")
                return
            folders = [slurm_dir / "logs", *(slurm_dir / "runs" / t.name for t in chosen)]
            made += [f for f in folders if not f.exists()]
            for folder in folders:
                make_folder(folder)
            array = _sbatch_script(sbatch, script_path, script, [t.index for t in chosen])
            report = _record_and_report(table, chosen, before, array, queue, opts, out, python, reading, sbatch)
    finally:
        if array is None:
            _remove(made)
    print(f"submitted: job array {array} ({len(chosen)} run(s)) from {printable(script_path)}; report job {report} "
          f"writes {printable(out / 'report' / 'report.md')} once the array has ended")
    print(f"where each run stands: powergrad-train reproduce {table} --out {shlex.quote(str(out))} --status")


def _record_and_report(table: int, chosen: list[Task], before: dict[str, str], array: str, queue: dict[str, Queued],
                       opts: Options, out: Path, python: str, reading: str, sbatch: str) -> str:
    """Record each submitted run's job, log and config; submit the report job; its id. `before`: what became
    of a run's earlier job, by run."""
    slurm_dir = out / "slurm"
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    for task in chosen:
        job = f"{array}_{task.index}"
        log = slurm_dir / "logs" / f"table{table}-{job}.log"
        try:
            with open(slurm_dir / "runs" / task.name / "submitted", "a") as f:
                f.write(f"{job} {now} {log}\n")
        except OSError as e:
            raise WriteError(slurm_dir / "runs" / task.name / "submitted", reason(e)) from None
        write_text(slurm_dir / "runs" / task.name / "config.yaml", dump(task.run.cfg))
        again = f"; again: {before[task.name]}" if task.name in before else ""
        print(f"{task.title}: submitted as job {job} ({printable(task.run.output)}, log {printable(log)}){again}")
    # The report waits for every array of OUT still queued or running, this one included.
    arrays = sorted({array, *(job.split("_")[0] for job in queue if "_" in job)}, key=int)
    sites = [f"--{name}={value}" for name, value in _sites(opts) if value]
    report = _run([sbatch, "--parsable", f"--job-name=pgt-table{table}-report",
                   f"--dependency=afterany:{':'.join(arrays)}", "--nodes=1", "--ntasks=1", f"--time={REPORT_TIME}",
                   f"--output={slurm_dir / 'logs' / 'report-%j.log'}", *sites, *opts.sbatch,
                   f"--wrap={report_command(out, python, reading, opts.setup)}"],
                  f"reproduce --slurm: job array {array} was submitted, but sbatch refused its report job "
                  f"(powergrad-train report writes it at any time)").strip().split(";")[0]
    write_text(slurm_dir / "report.job", report + "\n")
    return report


def _refuse_an_edited_script(path: Path) -> None:
    """A script edited by hand is not overwritten: it is the user's to submit."""
    digest = path.with_name(f".{path.name}.sha256")
    if path.exists() and (not digest.is_file() or _digest(path.read_bytes()) != digest.read_text().strip()):
        raise ConfigError(f"reproduce --slurm: {printable(path)} was edited since it was written; nothing was "
                          "submitted: submit it yourself with sbatch, or move it away to have it written anew "
                          "(--sbatch and --setup add lines to it)")


def _remove(made: list[Path]) -> None:
    """Remove what a refused submission made (`made`: outermost first)."""
    for path in made:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()


def _sbatch_script(sbatch: str, path: Path, text: str, indices: list[int]) -> str:
    """Submit `text` as the array's script with only `indices`; it is written to `path` (with its digest,
    to tell an edit) once submitted."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write_text(tmp, text)
    try:
        answer = _run([sbatch, "--parsable", f"--array={','.join(map(str, indices))}", str(tmp)],
                      "reproduce --slurm: sbatch refused the job array; nothing was submitted")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    write_text(path.with_name(f".{path.name}.sha256"), _digest(text.encode()) + "\n")
    return answer.strip().split(";")[0]


def _refuse_other_configs(tasks: list[Task], records: dict[str, Record], queue: dict[str, Queued]) -> None:
    """A run queued or running with another config than the command's is refused, as reproduce.check_reuse
    refuses a run folder holding another run."""
    for task in tasks:
        record = records[task.name]
        stored = record.folder / "config.yaml"
        if record.job not in queue or not stored.is_file():
            continue
        changed = changed_keys(read_run_config(stored), task.run.cfg)
        if changed:
            where = "queued" if queue[record.job].waiting else "running"
            raise ConfigError(f"reproduce --slurm: {printable(task.run.output)} is {where} as job {record.job} with "
                              f"another config than this command's ({'; '.join(changed)}); "
                              f"nothing was submitted: cancel it (scancel {record.job}), or give the settings it was "
                              "submitted with")


# ---- status --------------------------------------------------------------------------------------------

def _seeds_in(out: Path, row: paper.Row, reading: str) -> list[int]:
    """The seeds of a row with a run folder or a submission record in OUT."""
    pattern = re.compile(re.escape(folder_name(row, 0, reading)) + r"(?:-seed(\d+))?")
    names = [p.name for base in (out, out / "slurm" / "runs") if base.is_dir() for p in base.iterdir() if p.is_dir()]
    return sorted({int(m[1] or 0) for n in names if (m := pattern.fullmatch(n))})


def status(table: int, out: Path, rows: Optional[list[int]], seeds: Optional[list[int]], reading: str) -> str:
    """One line per row and seed of the table in OUT (the seeds given, else those found there), then the report's."""
    runs = [(row, seed) for row in chosen_rows(table, rows)
            for seed in (seeds if seeds is not None else _seeds_in(out, row, reading))]
    if not runs:
        return (f"no run of Table {table} in {printable(out)} yet (submit them with powergrad-train reproduce {table} "
                f"--data DIR --out {shlex.quote(str(out))} --slurm)")
    slurm_dir = out / "slurm"
    records = {(row, seed): Record.read(slurm_dir / "runs" / folder_name(row, seed, reading)) for row, seed in runs}
    report_job = (_lines(slurm_dir / "report.job") or [None])[-1]
    jobs = [r.job for r in records.values() if r.job] + ([report_job] if report_job else [])
    try:
        queue, unasked = ask_queue(jobs, "reproduce --status"), ""
    except UserError as e:
        queue, unasked = None, f"({e})"
    lines = []
    for (row, seed), record in records.items():
        run_dir = out / folder_name(row, seed, reading)
        config = next((p for p in (run_dir / "config.yaml", record.folder / "config.yaml") if p.is_file()), None)
        try:
            cfg = read_run_config(config) if config else None
        except UserError:
            cfg = None
        run = Run(run_dir, cfg, _epochs(run_dir))
        lines.append(f"{row.title}, seed {seed}: {standing(run, record, queue, unasked)}")
    report = out / "report" / "report.md"
    if report_job and queue is not None and report_job in queue:
        q = queue[report_job]
        lines.append(f"report: job {report_job} {'waits' if q.waiting else 'runs'}{q.why}; it writes "
                     f"{printable(report)}")
    elif report.is_file():
        written = datetime.datetime.fromtimestamp(report.stat().st_mtime).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(f"report: {printable(report)} (written {written}; powergrad-train report writes one at any time)")
    return "\n".join(lines)
