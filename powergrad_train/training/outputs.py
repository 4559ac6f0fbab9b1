"""The outputs `log.outputs` names (config/registry.py): where rank 0 sends the run's numbers (console,
summary.csv, TensorBoard, JSON lines; W&B and MLflow in outputs_wandb.py and outputs_mlflow.py), each
behind one small interface, `Output`. No torch here: the schema imports the outputs' declarations, and
TensorBoard loads only when a run starts it."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from powergrad_train.config.declare import Part
from powergrad_train.system.atomic import reason, write_file
from powergrad_train.system.errors import ConfigError, RunFolderError, WriteError, printable
from powergrad_train.system.user_files import check_regular, open_regular, open_regular_fd, read_bytes

# The columns every summary.csv has (eval_ema_top1 empty without an EMA, as run folders have always had
# it); a row's other keys (a weight average's eval_<name>_top1) get a column when they first come.
SUMMARY_COLUMNS = ("epoch", "step", "train_loss", "train_top1", "eval_loss", "eval_top1", "eval_top5", "lr",
                   "images_per_sec", "epoch_time_s", "logit_norm", "eval_logit_norm", "zeroed_filters",
                   "dead_features", "eval_ema_top1")


@dataclass(frozen=True)
class RunInfo:
    """What an output is told when the run starts: enough for an external tracker to resume its run."""

    run_dir: Path
    config: dict  # the resolved config, as config.yaml holds it
    start_epoch: int  # epochs already done
    start_step: int  # optimizer steps already done (0 for a fresh start)
    resumed_from: Path | None


class Output:
    """One place a run's numbers go, on rank 0. Every method does nothing unless overridden, so an
    output (an experiment tracker, say) implements only what it needs. It is a part that
    `log.outputs` names (a Part below, or an installed package's), or handed to build_run in its
    `outputs` list.

    start(info) comes first, once. Per epoch: epoch_start, then step() after every optimizer step
    and progress(values) every train.log_every_steps, epoch_stop; then epoch_end(row) after
    evaluation, with the summary.csv columns. scalars() carries other series (zeroed filters per
    layer), message() start-up lines and warnings; flush() comes before every checkpoint, close()
    at the end (with the run's error in flight, if it ends by one).

    An output that must remember something across a resume (an experiment tracker's run id)
    returns it from state_dict(): the checkpoint's `outputs` part keeps it under the output's
    name, and load_state_dict() hands it back before start(). An output that writes files in the
    run folder puts them back to the checkpoint's point in resume_at(), after check_resume()
    refused, before anything was written, what it could not continue.
    """

    def check_resume(self, run_dir: Path) -> None:
        """Before anything in the run folder is written: raise a UserError for a file of this output
        that the run could not continue (nothing is changed yet)."""

    def resume_at(self, run_dir: Path, epoch: int, step: int) -> Optional[str]:
        """The run starts at `epoch` and `step` (0 and 0 for a fresh start), before start(): what this
        output wrote after that point (a killed run's, or an earlier try's) goes. Returns a line to
        print (what was dropped as torn), or None."""
        return None

    def state_dict(self) -> dict | None:
        """What to keep in the checkpoint, or None (nothing)."""
        return None

    def load_state_dict(self, state: dict) -> None:
        """The state_dict() of the checkpoint this run resumes from."""

    def start(self, info: RunInfo) -> None:
        """The run begins (or resumes at info.start_step)."""

    def epoch_start(self, epoch: int, epochs: int, batches: int, batch: int) -> None:
        """Training of `epoch` (counted from 1) of `epochs` begins (or resumes) at `batch` of `batches`."""

    def step(self) -> None:
        """One optimizer step done."""

    def progress(self, values: dict) -> None:
        """step, epoch, epochs, batch, batches, loss, top1, lr, images_per_sec, eta_epoch_s, eta_run_s."""

    def epoch_stop(self) -> None:
        """Training of the epoch ended (completed or interrupted)."""

    def epoch_end(self, row: dict) -> None:
        """The epoch's summary row (SUMMARY_COLUMNS)."""

    def scalars(self, group: str, step: int, values: dict) -> None:
        """Named values of one group at a step."""

    def message(self, text: str) -> None:
        """A start-up line, a warning, the final line."""

    def flush(self) -> None:
        """Everything so far durable: a checkpoint is about to be written."""

    def close(self) -> None:
        pass


class Console(Output):
    """The terminal: messages and each epoch's summary line; during an epoch a tqdm bar on a
    terminal, and elsewhere (SLURM, nohup, a pipe) a compact line every train.log_every_steps."""

    def __init__(self):
        self.terminal = sys.stderr.isatty()
        self.bar = None

    def epoch_start(self, epoch: int, epochs: int, batches: int, batch: int) -> None:
        if self.terminal:
            from tqdm import tqdm
            self.bar = tqdm(total=batches, initial=batch, desc=f"epoch {epoch}/{epochs}", unit="step", leave=False,
                            dynamic_ncols=True)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def progress(self, p: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{p['loss']:.4f}", top1=f"{p['top1']:.1f}", lr=f"{p['lr']:.4g}")
        else:
            print(f"epoch {p['epoch']}/{p['epochs']} step {p['batch']}/{p['batches']} | loss {p['loss']:.4f} "
                  f"top1 {p['top1']:.2f} | lr {p['lr']:.4g} | {p['images_per_sec']:.0f} img/s | "
                  f"ETA epoch {_duration(p['eta_epoch_s'])}, run {_duration(p['eta_run_s'])}", flush=True)

    def epoch_stop(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def epoch_end(self, row: dict) -> None:
        averages = "".join(f" ({name} {row[f'eval_{name}_top1']:.2f})" for name in averaged_models(row))
        print(f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} top1 {row['train_top1']:.2f} | "
              f"val loss {row['eval_loss']:.4f} top1 {row['eval_top1']:.2f}{averages} top5 {row['eval_top5']:.2f} | "
              f"lr {row['lr']:.4g} | {row['images_per_sec']:.0f} img/s | {row['epoch_time_s']:.1f}s", flush=True)

    def message(self, text: str) -> None:
        print(text, flush=True)


def averaged_models(row: dict) -> list[str]:
    """The names of the weight averages evaluated in an epoch's row (its eval_<name>_top1 values)."""
    return [key[len("eval_"):-len("_top1")] for key, value in row.items()
            if key.startswith("eval_") and key.endswith("_top1") and key != "eval_top1" and value is not None]


SUMMARY_CSV = "summary.csv"


@contextlib.contextmanager
def writing(path):
    """A failed write to the file (or files) `path` as one WriteError naming it."""
    try:
        yield
    except OSError as e:
        raise WriteError(path, reason(e)) from None


def append(path: Path, text: str) -> None:
    """Add `text` (whole lines) at the end of the log `path`, completely or not at all: a write cut
    short (a full disk, a quota) is cut off again, so the log keeps whole lines. A path that is not
    a regular file (a FIFO would block the open) or a failed write is a WriteError naming it."""
    data = memoryview(text.encode(errors="surrogateescape"))
    with writing(path):
        fd = open_regular_fd(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                while data:
                    data = data[os.write(fd, data):]
            except BaseException:  # an OSError, or an interrupt between two parts of the write
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, end)
                raise
        finally:
            os.close(fd)


class SummaryCsv(Output):
    """summary.csv: one row per epoch, with our columns and then any added by hand (left empty in
    new rows); a key of the row that has no column yet (a weight average's eval_<name>_top1) gets one
    at the end. On a resume, the rows of epochs after the checkpoint go."""

    def check_resume(self, run_dir: Path) -> None:
        summary_columns(run_dir)  # a summary.csv without its header is refused, not rewritten

    def resume_at(self, run_dir: Path, epoch: int, step: int) -> Optional[str]:
        return trim_summary_csv(run_dir, epoch)

    def start(self, info: RunInfo) -> None:
        self.path = info.run_dir / SUMMARY_CSV
        self.columns = summary_columns(info.run_dir)

    def epoch_end(self, row: dict) -> None:
        with writing(self.path):
            new = not self.path.exists() or self.path.stat().st_size == 0
        added = [k for k in row if k not in self.columns]
        if added:
            self.columns += added
            if not new:  # the rows so far get the column too, empty
                header, rows, _ = read_summary(self.path.parent)
                _rewrite_summary(self.path, header, rows, self.columns)
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, self.columns, restval="")
        if new:
            w.writeheader()
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        append(self.path, text.getvalue())


# A summary.csv holds a row per epoch (about 200 bytes): one larger than this is not ours to read.
MAX_SUMMARY_BYTES = 64 << 20


def read_summary(run_dir: Path) -> tuple[Optional[list[str]], list[list[str]], bool]:
    """(header, rows, whether a torn last row was left out) of the run's summary.csv; (None, [], False)
    when there is none. A row this program writes always ends with its line end: a last row
    without one, with fewer cells than the header and a whole number as its epoch, is what a
    write cut short (a full disk, a kill) left, and is left out."""
    path = Path(run_dir) / SUMMARY_CSV
    if not os.path.lexists(path):
        return None, [], False
    try:
        text = read_bytes(path, MAX_SUMMARY_BYTES).decode(errors="surrogateescape")
    except OSError as e:
        raise RunFolderError(f"{printable(path)}: cannot read it ({reason(e)}); move it away") from None
    try:
        header, *rows = list(csv.reader(io.StringIO(text, newline=""))) or [None]
    except csv.Error as e:
        raise RunFolderError(f"{printable(path)}: not a CSV file ({e}); move it away") from None
    torn = False
    if header is not None and rows and not text.endswith(("\n", "\r")) and "epoch" in header:
        torn = len(rows[-1]) < len(header) and epoch_of(rows[-1], header.index("epoch")) is not None
    return header, rows[:-1] if torn else rows, torn


def epoch_of(row: list[str], column: int) -> Optional[int]:
    """The epoch of a summary.csv row, or None for a row whose epoch cell is not a whole number (a
    note added by hand)."""
    cell = row[column] if len(row) > column else ""
    return int(cell) if cell.isascii() and cell.isdigit() else None


def summary_columns(run_dir: Path) -> list[str]:
    """The columns summary.csv is written with: ours, then those added to it by hand. A file whose
    first line is not a header with an `epoch` column is refused rather than rewritten."""
    return _columns(read_summary(run_dir)[0], Path(run_dir) / SUMMARY_CSV)


def _columns(header: Optional[list[str]], path: Path) -> list[str]:
    if header is not None and "epoch" not in header:
        raise RunFolderError(f"{path}: its first line is not a header with an 'epoch' column (edited by hand?); "
                             f"put the header back ({','.join(SUMMARY_COLUMNS)}) or move the file away")
    return list(SUMMARY_COLUMNS) + [c for c in header or () if c not in SUMMARY_COLUMNS]


def trim_summary_csv(run_dir: Path, start_epoch: int) -> Optional[str]:
    """Drop the summary rows of epochs after `start_epoch` (a resumed run trains them again), and a
    torn last row; keep what was added by hand: columns, and rows whose epoch cell is not a whole
    number (notes). Returns a line saying a torn row was dropped, or None."""
    path = Path(run_dir) / SUMMARY_CSV
    header, rows, torn = read_summary(run_dir)
    if header is None:
        return None
    columns = _columns(header, path)  # (refuses a header without an epoch column)
    epoch = header.index("epoch")
    kept = [row for row in rows if row and not (epoch_of(row, epoch) or 0) > start_epoch]
    _rewrite_summary(path, header, kept, columns)
    return f"{printable(path)}: {TORN_NOTE}" if torn else None


def _rewrite_summary(path: Path, header: list[str], rows: list[list[str]], columns: list[str]) -> None:
    """summary.csv as `rows` (read under `header`) under `columns`, atomically."""
    where = {c: i for i, c in enumerate(header)}
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(columns)
    # Each cell under its column's new position; cells beyond the old header stay at the end.
    w.writerows([row[where[c]] if c in where and where[c] < len(row) else "" for c in columns]
                + row[len(header):] for row in rows)
    write_file(path, lambda f: f.write(text.getvalue().encode(errors="surrogateescape")))  # the old file or the new


TORN_NOTE = "dropped its last line, cut short when it was written (a full disk or a kill); the rest is kept"


JSONL = "log.jsonl"


class JsonLines(Output):
    """log.jsonl: one JSON object per line: a start record, progress every log interval, each epoch's
    row, messages. On a resume, the records written after the checkpoint go."""

    def resume_at(self, run_dir: Path, epoch: int, step: int) -> Optional[str]:
        return trim_jsonl(run_dir, step)

    def start(self, info: RunInfo) -> None:
        self.path, self.last_step = info.run_dir / JSONL, info.start_step
        self._write({"kind": "start", "step": info.start_step, "epoch": info.start_epoch,
                     "resumed_from": str(info.resumed_from) if info.resumed_from else None})

    def _write(self, record: dict) -> None:
        self.last_step = record["step"]
        append(self.path, json.dumps(record, allow_nan=True) + "\n")

    def progress(self, values: dict) -> None:
        self._write({"kind": "progress", **values})

    def epoch_end(self, row: dict) -> None:
        self._write({"kind": "epoch", **row})

    def message(self, text: str) -> None:
        self._write({"kind": "message", "step": self.last_step, "text": text})


MAX_RECORD_BYTES = 1 << 20  # a record is a few hundred bytes: a longer line is none of ours


def trim_jsonl(run_dir: Path, start_step: int) -> Optional[str]:
    """Drop the log.jsonl records of steps after `start_step` (a resumed run writes them again), and
    every line that is not a whole record (what a write cut short by a full disk or a kill left).
    The log is read a line at a time. Returns a line saying what was dropped as torn, or None."""
    path = Path(run_dir) / JSONL
    if not os.path.lexists(path):
        return None
    try:
        check_regular(path)
    except OSError as e:
        raise RunFolderError(f"{printable(path)}: cannot read it ({reason(e)}); move it away") from None
    torn = 0

    def copy(out) -> None:
        nonlocal torn
        with open_regular(path) as f:
            for line in _lines(f, MAX_RECORD_BYTES):
                record = _record(line)
                if record is None:
                    torn += line is None or bool(line.strip())
                    continue
                step = record.get("step")
                if not isinstance(step, (int, float)) or step <= start_step:
                    out.write(line if line.endswith(b"\n") else line + b"\n")

    write_file(path, copy)
    if not torn:
        return None
    return f"{printable(path)}: " + (TORN_NOTE if torn == 1 else f"dropped {torn} lines that are not whole records "
                                     "(writes cut short by a full disk or a kill); the rest is kept")


def _lines(f, limit: int):
    """The lines of binary file `f`, each with its line end; None for a line longer than `limit`
    (which is read past, never held whole)."""
    while line := f.readline(limit + 1):
        if len(line) > limit and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = f.readline(limit + 1)
            yield None
        else:
            yield line


def _record(line: Optional[bytes]) -> Optional[dict]:
    """The JSON object on a line of log.jsonl, or None when it holds none."""
    try:
        record = json.loads(line)
    except (TypeError, ValueError):  # (TypeError: None, a line too long)
        return None
    return record if isinstance(record, dict) else None


class SeriesOutput(Output):
    """An output of named series: train/loss|top1|lr every log interval, epoch/<summary column> per
    epoch and the other groups, each at its optimizer step; a subclass writes scalars()."""

    def progress(self, values: dict) -> None:
        self.scalars("train", values["step"], {k: values[k] for k in ("loss", "top1", "lr")})

    def epoch_end(self, row: dict) -> None:
        self.scalars("epoch", row["step"], {k: v for k, v in row.items() if k not in ("epoch", "step") and v is not None})


class TensorBoard(SeriesOutput):
    """Event files in the run folder: train/* every log interval, epoch/* per epoch, other groups.

    An event file cannot be written atomically (it is a log, appended to); a failed write is a
    WriteError naming it."""

    def resume_at(self, run_dir: Path, epoch: int, step: int) -> Optional[str]:
        prepare_tensorboard_folder(run_dir, step)
        return None

    def start(self, info: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter
        _leave_writer_thread_errors_to_the_writer()
        earlier = set(Path(info.run_dir).glob(f"{EVENT_FILES}*"))
        self.path = Path(info.run_dir) / f"{EVENT_FILES}*"  # until the writer has made its file
        with self._writing():
            # Events up to a checkpoint's step are written before it; purge_step drops those a killed
            # run wrote after its last checkpoint.
            self.writer = SummaryWriter(str(info.run_dir), purge_step=info.start_step + 1 if info.start_step else None)
        self.path = next(iter(set(Path(info.run_dir).glob(f"{EVENT_FILES}*")) - earlier), self.path)

    def _writing(self):
        """A failed write, here or in the writer's thread (handed on at its next call), as one WriteError."""
        return writing(self.path)

    def epoch_end(self, row: dict) -> None:
        super().epoch_end(row)
        self.flush()

    def scalars(self, group: str, step: int, values: dict) -> None:
        with self._writing():
            for name, value in values.items():
                self.writer.add_scalar(f"{group}/{name}", value, step)

    def flush(self) -> None:
        with self._writing():
            self.writer.flush()

    def close(self) -> None:
        if sys.exc_info()[1] is not None:  # closing on the way out of another error: that one is reported
            with contextlib.suppress(OSError):
                self.writer.close()
            return
        with self._writing():
            self.writer.close()


def prepare_tensorboard_folder(run_dir: Path, start_step: int) -> None:
    """Before a TensorBoard writer opens: a fresh start drops the event files of an earlier try that
    left no checkpoint; a resume makes sure the new file sorts after the existing ones."""
    earlier = list(Path(run_dir).glob(f"{EVENT_FILES}*"))
    try:
        if not start_step:
            for stale in earlier:
                stale.unlink()
        else:
            _sort_before_this_second(earlier)
    except OSError as e:
        raise WriteError(Path(run_dir) / f"{EVENT_FILES}*", reason(e)) from None


def build_outputs(names: Sequence[str], section=None) -> list[Output]:
    """The outputs log.outputs names, in its order."""
    from powergrad_train.config import registry
    return [registry.load("output", name).build(section) for name in names]


class Tracker(SeriesOutput):
    """An experiment tracker (log.outputs name = its package = its extra): the package is checked when
    the output is built (before the run folder is touched) and imported only in start(), so a run
    without it never loads it; the tracker's run id is kept in the checkpoint, so a resumed run
    continues the same tracker run."""

    package = ""

    def __init__(self):
        import importlib.util
        if importlib.util.find_spec(self.package) is None:
            raise ConfigError(f'log.outputs: {self.package} needs the {self.package} package: '
                              f'pip install -e ".[{self.package}]"', key="log.outputs")
        self.run_id = None

    def state_dict(self) -> dict | None:
        return {"run_id": self.run_id} if self.run_id else None

    def load_state_dict(self, state: dict) -> None:
        self.run_id = state["run_id"]


class OutputStates:
    """The checkpoint part `outputs`: {log.outputs name: state} of the outputs that keep a state
    (rank 0's; other ranks hold none). The state of an output this leg of the run leaves out is
    kept for a later leg that names it again."""

    def __init__(self, outputs: Sequence[tuple[str, Output]]):
        self.outputs, self.saved = list(outputs), {}

    def state_dict(self) -> dict:
        states = {name: output.state_dict() for name, output in self.outputs}
        return self.saved | {name: state for name, state in states.items() if state is not None}

    def load_state_dict(self, state: dict) -> None:
        self.saved = dict(state)
        for name, output in self.outputs:
            if name in self.saved:
                output.load_state_dict(self.saved[name])


class RunLog(Output):
    """Hands every call to each of its outputs, in order (it has none on ranks other than 0)."""

    def __init__(self, outputs: Sequence[Output]):
        self.outputs = list(outputs)

    def _each(self, method: str, *args) -> None:
        for output in self.outputs:
            getattr(output, method)(*args)

    def start(self, info: RunInfo) -> None:
        self._each("start", info)

    def epoch_start(self, epoch: int, epochs: int, batches: int, batch: int) -> None:
        self._each("epoch_start", epoch, epochs, batches, batch)

    def step(self) -> None:
        self._each("step")

    def progress(self, values: dict) -> None:
        self._each("progress", values)

    def epoch_stop(self) -> None:
        self._each("epoch_stop")

    def epoch_end(self, row: dict) -> None:
        self._each("epoch_end", row)

    def scalars(self, group: str, step: int, values: dict) -> None:
        self._each("scalars", group, step, values)

    def message(self, text: str) -> None:
        self._each("message", text)

    def flush(self) -> None:
        self._each("flush")

    def close(self) -> None:
        self._each("close")


def format_eval(values: dict) -> str:
    return (f"val loss {values['loss']:.4f} top1 {values['top1']:.2f} top5 {values['top5']:.2f} "
            f"({int(values['images'])} images)")


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _leave_writer_thread_errors_to_the_writer() -> None:
    """TensorBoard writes from a thread of its own; a failed write there is raised again by the
    writer's next call (then one line, see TensorBoard._writing), so the thread's traceback is not
    printed as well."""
    if getattr(threading.excepthook, "leaves_tensorboard_alone", False):
        return
    previous = threading.excepthook

    def hook(args):
        if not (issubclass(args.exc_type, OSError) and type(args.thread).__module__.startswith("tensorboard.")):
            previous(args)

    hook.leaves_tensorboard_alone = True
    threading.excepthook = hook


EVENT_FILES = "events.out.tfevents."  # then the second the file was made in, host, pid, a counter


def _sort_before_this_second(event_files: list[Path]) -> None:
    """TensorBoard reads event files in name order, and a name starts with the second it was made
    in. A file named with this second or a later one (made by a killed try a moment ago, or on a
    machine whose clock runs ahead) would sort after the one we are about to make and, read
    last, purge our events. Such files are renamed into the past, keeping their order."""
    limit = int(time.time()) - 1
    for path in sorted(event_files, reverse=True):
        second, _, rest = path.name[len(EVENT_FILES):].partition(".")
        if not second.isdigit() or int(second) <= limit:
            break
        while (target := path.with_name(f"{EVENT_FILES}{limit:010d}.{rest}")).exists():
            limit -= 1
        path.rename(target)
        limit -= 1


CONSOLE = Part(lambda section: Console(), "progress and epoch lines")
CSV = Part(lambda section: SummaryCsv(), "summary.csv")
TENSORBOARD = Part(lambda section: TensorBoard(), "event files")
JSON_LINES = Part(lambda section: JsonLines(), "log.jsonl, one JSON record per line")
