"""`powergrad-train report RUN_DIR... [--reference AUTHORS_DIR]`: runs beside the paper's Tables 1-3.

Each run folder is read (config.yaml, summary.csv, diagnostics/) and placed by its resolved
config, not by its name (paper.py): a run that trains exactly what a row trained is that row; the
runs of a row are its seeds (n, mean ± sd); a run that is about a row but differs in some key is
only related to it, and sits with every run that is no row in the "other runs" table. For each
baseline/PGT pair: the gain on the final and on the best epoch with its 95% interval over seeds
(seed_stats.py), the seeds per arm the observed spread would need, and the time to accuracy.
With --reference, the authors' logged final and best test top-1 stand beside each row and their
curves in the accuracy figures. The figures are drawn by report_figures.py.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from powergrad_train import paper, seed_stats
from powergrad_train.atomic import make_folder, write_text
from powergrad_train.authors import AuthorsLog, find_logs
from powergrad_train.config import Config, build_config, read_yaml_text
from powergrad_train.errors import DataError

TABLE_TITLES = {1: "Table 1: networks with batch norm", 2: "Table 2: ResNet-18 without batch norm, cosine",
                3: "Table 3: ablation, ResNet-50"}
AUTHORS_COLUMNS = {"train_acc": "train_top1"}  # their summary.csv's names for ours


def warn(text: str) -> None:
    print(f"warning: report: {text}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- reading

def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan  # a blank or hand-written cell


def read_summary(path: Path) -> list[dict[str, float]]:
    """summary.csv as one dict per epoch (in epoch order). Rows whose epoch is not a whole number
    (a note, a header written again by a resumed run) are skipped, blank cells read as NaN, and an
    epoch logged twice (a resume from an older checkpoint) counts as its last row."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"report: {path} is not a text file (a summary.csv is CSV text)") from None
    except OSError as e:
        raise DataError(f"report: cannot read {path} ({e.strerror or e})") from None
    lines = [row for row in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in row)]
    if not lines:
        return []
    header = [cell.strip() for cell in lines[0]]
    if "epoch" not in header:
        raise DataError(f"report: {path}: its first line is not a header naming the columns (epoch, ...)")
    by_epoch = {}
    for cells in lines[1:]:
        row = dict(zip(header, (cell.strip() for cell in cells)))
        epoch = row.get("epoch", "")
        if epoch.isascii() and epoch.isdigit():
            by_epoch[int(epoch)] = {AUTHORS_COLUMNS.get(k, k): _number(v) for k, v in row.items()}
    return [by_epoch[e] for e in sorted(by_epoch)]


def read_run_config(path: Path) -> Config:
    try:
        raw = read_yaml_text(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"report: {path} is not a text file (a run's config.yaml is YAML text)") from None
    except OSError as e:
        raise DataError(f"report: cannot read {path} ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise DataError(f"report: {path}{f':{mark.line + 1}' if mark else ''}: not valid YAML "
                        f"({getattr(e, 'problem', None) or e})") from None
    if not raw:
        raise DataError(f"report: {path} is empty; a run folder's config.yaml holds the run's whole resolved config")
    if not isinstance(raw, dict):
        raise DataError(f"report: {path} is not a run's config (a mapping of config keys), it holds a "
                        f"{type(raw).__name__}")
    return build_config(None, start=(str(path), raw), lenient=True)


@dataclass
class Run:
    folder: Path
    cfg: Config
    epochs: list[dict[str, float]] = field(default_factory=list)  # summary.csv

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def seed(self) -> int:
        return self.cfg.seed

    @property
    def done(self) -> int:
        return int(self.epochs[-1]["epoch"]) if self.epochs else 0

    @property
    def finished(self) -> bool:
        return self.done >= self.cfg.schedule.epochs

    @property
    def status(self) -> str:
        return "finished" if self.finished else f"at epoch {self.done}/{self.cfg.schedule.epochs}"

    def curve(self, column: str) -> tuple[list[int], list[float]]:
        points = [(int(r["epoch"]), r[column]) for r in self.epochs if math.isfinite(r.get(column, math.nan))]
        return [e for e, _ in points], [v for _, v in points]

    def final(self, column: str) -> Optional[float]:
        values = self.curve(column)[1]
        return values[-1] if values else None

    def best(self, column: str) -> Optional[float]:
        return max(self.curve(column)[1], default=None)

    @property
    def method(self) -> str:
        loss = self.cfg.loss
        text = paper.method_name(loss.pgt_alpha, self.cfg.grad_clip.mode, loss.label_smoothing)
        return text + (" (authors' hook)" if loss.pgt_alpha is not None and loss.pgt_impl == "authors_hook" else "")

    def label(self, setting: bool = False, seed: bool = True) -> str:
        """What the run trains, for legends: method and alpha (and model and schedule, seed)."""
        head = f"{self.cfg.model.name} {self.cfg.schedule.name} " if setting else ""
        return head + self.method + (f", seed {self.seed}" if seed else "")


def read_run(folder: Path) -> Run:
    folder = Path(folder)
    if not (folder / "config.yaml").is_file():
        raise DataError(f"report: {folder} is not a run folder (no config.yaml)")
    summary = folder / "summary.csv"
    return Run(folder, read_run_config(folder / "config.yaml"), read_summary(summary) if summary.is_file() else [])


@dataclass
class Reference:
    """The authors' logs, by the paper row each one is."""

    logs: dict[paper.Row, AuthorsLog]
    epochs: dict[AuthorsLog, list[dict[str, float]]]

    def of(self, row: Optional[paper.Row]) -> Optional[Run]:
        """The authors' run of `row` as a Run (their curves, their config as this project reads the row)."""
        log = self.logs.get(row) if row is not None else None
        if log is None:
            return None
        return Run(log.folder, paper.row_config(row), self.epochs[log])


def read_reference(root: Path) -> Reference:
    logs, epochs = {}, {}
    for log in find_logs(root):
        epochs[log] = read_summary(log.summary)
        for row in log.rows():
            logs[row] = log
    return Reference(logs, epochs)


# ----------------------------------------------------------------------------- placing runs

@dataclass
class Placed:
    exact: dict[paper.Row, list[Run]]
    related: dict[paper.Row, list[tuple[Run, list]]]  # (run, its differences to the row)
    others: list[Run]  # runs that are no row


def place(runs: list[Run], reading: str = "global") -> Placed:
    exact = {row: [] for row in paper.ROWS}
    related = {row: [] for row in paper.ROWS}
    others = []
    for run in runs:
        rows = [row for row in paper.ROWS if paper.matches(row, run.cfg, reading)]
        for row in rows:
            exact[row].append(run)
        if not rows:
            others.append(run)
            for row in paper.ROWS:
                if paper.is_about(row, run.cfg, reading):
                    related[row].append((run, paper.differences(row, run.cfg, reading)))
    return Placed(exact, related, others)


def arm(runs: list[Run]) -> list[Run]:
    """The runs a row's numbers come from: one per seed (the furthest), the finished ones if any,
    else the single furthest run."""
    per_seed = {}
    for run in sorted((r for r in runs if r.epochs), key=lambda r: (r.finished, r.done)):
        per_seed[run.seed] = run
    chosen = sorted(per_seed.values(), key=lambda r: r.seed)
    finished = [r for r in chosen if r.finished]
    return finished or sorted(chosen, key=lambda r: r.done)[-1:]


def _values(runs: list[Run], which: str, column: str = "eval_top1") -> dict[int, float]:
    values = {r.seed: (r.final if which == "final" else r.best)(column) for r in runs}
    return {s: v for s, v in values.items() if v is not None}


def _spread_text(values: dict[int, float]) -> str:
    return seed_stats.spread(list(values.values())).text() if values else ""


def _runs_cell(row_runs: list[Run], used: list[Run], related: list) -> str:
    if not used:
        if row_runs:
            return ", ".join(f"{r.name} (no epoch yet)" for r in row_runs)
        return "not run" + (f"; related: {', '.join(r.name for r, _ in related)} (see other runs)" if related else "")
    if len(used) == 1:
        text = f"{used[0].name} ({used[0].status})"
    else:
        text = f"{len(used)} seeds ({', '.join(str(r.seed) for r in used)}), {used[0].status}"
    left_out = len(row_runs) - len(used)
    return text + (f"; {left_out} other run(s) left out (unfinished or the same seed)" if left_out else "")


def _key_value(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else f"{value:g}" \
        if isinstance(value, float) else str(value)


def describe_differences(diffs: list) -> str:
    return ", ".join(f"{k} (run {_key_value(a)}, row {_key_value(b)})" for k, a, b in diffs)


# ----------------------------------------------------------------------------- tables

def tables(runs: list[Run], reference: Optional[Reference] = None, reading: str = "global") -> str:
    """Markdown: the paper's three tables with the runs' numbers beside them, the PGT gains with
    their statistics, and the runs that are no row."""
    placed = place(runs, reading)
    authors = reference is not None
    out = ["The paper's test top-1 is compared with the runs' best epoch (`best - paper`): it most likely reports "
           "the best epoch (the authors' model_best checkpoints). Values over several seeds are mean ± standard "
           "deviation; gains carry a 95% t interval (paired by seed where both arms ran the same seeds, else "
           "Welch's) and are 'resolved' when it excludes 0.", ""]
    for table in (1, 2, 3):
        title = TABLE_TITLES[table]
        if table == 2:
            title += (" (batch read as the global batch)" if reading == "global" else
                      f" (batch read per GPU: global batch = {paper.AUTHORS_GPUS} x the printed batch)")
        head = ["row", "paper train", "paper test", "runs", "train (final)", "test (final)", "test (best)",
                "final - paper / best - paper"] + (["authors final / best"] if authors else [])
        out += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in paper.table_rows(table):
            used = arm(placed.exact[row])
            cells = [row.label, f"{row.train:.2f}", f"{row.test:.3f}",
                     _runs_cell(placed.exact[row], used, placed.related[row])]
            final, best = _values(used, "final"), _values(used, "best")
            if final:
                cells += [_spread_text(_values(used, "final", "train_top1")), _spread_text(final),
                          _spread_text(best), f"{statistics.fmean(final.values()) - row.test:+.2f} / "
                                              f"{statistics.fmean(best.values()) - row.test:+.2f}"]
            else:
                cells += ["", "", "", ""]
            if authors:
                theirs = reference.of(row)
                cells.append(f"{theirs.final('eval_top1'):.2f} / {theirs.best('eval_top1'):.2f}"
                             if theirs and theirs.epochs else "not published")
            out.append("| " + " | ".join(cells) + " |")
        out += [""] + gains_table(table, placed) + [""]
    out += other_runs_table(placed)
    return "\n".join(out)


def pairs(table: int) -> list[tuple[paper.Row, paper.Row]]:
    return [(paper.baseline_of(r), r) for r in paper.table_rows(table) if paper.baseline_of(r)]


def gains_table(table: int, placed: Placed) -> list[str]:
    lines = [f"PGT gains in Table {table} (PGT minus its baseline, test top-1):", "",
             "| PGT row | paper gain | final epoch | best epoch | seeds per arm for 80% power (final / best) | "
             "PGT reaches the baseline's final test top-1 |", "|---|---|---|---|---|---|"]
    shown = 0
    for base_row, row in pairs(table):
        # Runs with a logged test top-1 (a diverged run's may be NaN throughout).
        base, pgt = ([r for r in arm(placed.exact[x]) if r.final("eval_top1") is not None] for x in (base_row, row))
        if not base and not pgt:
            continue
        shown += 1
        paper_gain = row.test - base_row.test
        unfinished = not all(r.finished for r in base + pgt)
        cells = [row.label + (" (unfinished runs)" if unfinished else ""), f"{paper_gain:+.2f}"]
        if not base or not pgt:
            cells += ["baseline not run" if not base else "PGT not run", "", "", ""]
        else:
            gains = [seed_stats.compare(_values(base, w), _values(pgt, w)) for w in ("final", "best")]
            cells += [g.text() for g in gains]
            cells.append(" / ".join(_seeds_needed(g, paper_gain) for g in gains))
            cells.append(time_to_accuracy(base, pgt))
        lines.append("| " + " | ".join(cells) + " |")
    return lines if shown else [f"No baseline/PGT pair of Table {table} was run."]


def _seeds_needed(gain: seed_stats.Gain, paper_gain: float) -> str:
    if gain.test is None:
        return "unknown (needs 2 seeds per arm)"
    n = seed_stats.seeds_needed(gain.noise, paper_gain, paired=gain.test == "paired")
    return f"more than {seed_stats.MAX_SEEDS}" if n is None else str(n)


def time_to_accuracy(base: list[Run], pgt: list[Run]) -> str:
    """The first epoch at which PGT's test top-1 (mean over its seeds) reaches the baseline's final one."""
    target = statistics.fmean(_values(base, "final").values())
    curves = [dict(zip(*r.curve("eval_top1"))) for r in pgt]
    for epoch in sorted(set.intersection(*(set(c) for c in curves))):
        if statistics.fmean(c[epoch] for c in curves) >= target:
            return f"epoch {epoch} of {pgt[0].cfg.schedule.epochs} (baseline final {target:.2f})"
    return f"never (baseline final {target:.2f})"


def other_runs_table(placed: Placed) -> list[str]:
    if not placed.others:
        return ["## Other runs", "", "Every run given is a row of the paper's tables."]
    head = ["run", "model", "schedule (mode)", "epochs", "global batch", "lr", "method", "amp", "seed", "status",
            "train (final)", "test (final)", "test (best)"]
    lines = ["## Other runs", "", "Runs that train no row of the paper exactly.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in placed.others:
        c = run.cfg
        numbers = [run.final("train_top1"), run.final("eval_top1"), run.best("eval_top1")]
        lines.append("| " + " | ".join([
            run.name, c.model.name, f"{c.schedule.name} ({c.schedule.mode})", str(c.schedule.epochs),
            str(c.data.batch_size), f"{c.optim.lr:g}", run.method, c.amp, str(c.seed), run.status,
            *("" if v is None else f"{v:.2f}" for v in numbers)]) + " |")
    related = [(row, run, diffs) for row, found in placed.related.items() for run, diffs in found]
    if related:
        lines += ["", "Related to a row (same model, schedule and method), but not the row:", ""]
        lines += [f"- {run.name}: related to Table {row.table} {row.label}: differs in {describe_differences(diffs)}"
                  for row, run, diffs in related]
    return lines


# ----------------------------------------------------------------------------- figures

def write_report(run_dirs: list[Path], out: Path, reference_dir: Optional[Path] = None,
                 reading: str = "global") -> tuple[str, list[Path]]:
    """Read everything first (any bad input stops before a file is written), then write report.md
    and the figures into `out`."""
    runs = [read_run(d) for d in run_dirs]
    reference = read_reference(reference_dir) if reference_dir is not None else None
    text = "# Runs beside the paper\n\n" + tables(runs, reference, reading)
    make_folder(out)
    write_text(out / "report.md", text)
    from powergrad_train.report_figures import figures
    return text, figures(runs, out, reference, reading)
