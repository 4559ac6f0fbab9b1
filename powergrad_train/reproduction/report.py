"""`powergrad-train report RUN_DIR... [--compare KEY] [--effect X] [--reference AUTHORS_DIR]`.

Each run folder is read (config.yaml, summary.csv, diagnostics/) and placed by its resolved
config, not by its name. Runs equal in every setting but the seed (paper.setting: bookkeeping
such as the data location aside) are one arm, its runs the seeds. Two arms that differ in the
compared keys alone (the loss method, or --compare KEY) are a comparison: each arm's n and mean ±
sd, the gain on the final and on the best epoch with its 95% interval over seeds, p-value and
verdict (seed_stats.py), the seeds per arm the observed spread needs, and the time to accuracy.
Arms that differ in more are named with the keys that keep them apart.

Against the paper's Tables 1-3 (paper.py): a run that trains exactly what a row trained is that
row, and its seeds give the row's numbers and each baseline/PGT pair's gain. When some run is a
row, the tables come first; when none is, the comparisons do, and the tables are left out (unless
--reference is given: the authors' logged final and best test top-1 stand beside each row, and
their curves in the figures). The figures are drawn by report_figures.py.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Optional

import yaml

from powergrad_train.config.build import build_config
from powergrad_train.config.recipes import read_yaml_text
from powergrad_train.config.schema import KEYS, Config, get, suggestion
from powergrad_train.reproduction import paper, seed_stats
from powergrad_train.reproduction.authors import AuthorsLog, find_logs
from powergrad_train.system.atomic import make_folder, write_text
from powergrad_train.system.errors import ConfigError, DataError, printable, shown

TABLE_TITLES = {1: "Table 1: networks with batch norm", 2: "Table 2: ResNet-18 without batch norm, cosine",
                3: "Table 3: ablation, ResNet-50"}
AUTHORS_COLUMNS = {"train_acc": "train_top1"}  # their summary.csv's names for ours


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
        """The last epoch it logged (0 before its first): how far it got."""
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


def read_epochs(folder: Path) -> list[dict[str, float]]:
    """A run folder's summary.csv (read_summary); none before its first epoch."""
    summary = folder / "summary.csv"
    return read_summary(summary) if summary.is_file() else []


def read_run(folder: Path) -> Run:
    folder = Path(folder)
    if not (folder / "config.yaml").is_file():
        raise DataError(f"report: {folder} is not a run folder (no config.yaml)")
    return Run(folder, read_run_config(folder / "config.yaml"), read_epochs(folder))


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
    rows: dict[int, list[paper.Row]]  # by id(run): the rows it is

    def nearest_related(self, run: Run) -> Optional[tuple[paper.Row, list]]:
        """The row `run` (no row itself) is about with the fewest differences to it, and those; None if none."""
        found = [(row, diffs) for row, related in self.related.items() for r, diffs in related if r is run]
        return min(found, key=lambda x: len(x[1]), default=None)


def place(runs: list[Run], reading: str = "global") -> Placed:
    """Each run against each row of the paper's tables, once: the rows it is (paper.matches), else the
    rows it is about, with its differences to each."""
    exact = {row: [] for row in paper.ROWS}
    related = {row: [] for row in paper.ROWS}
    others, rows = [], {}
    for run in runs:
        about = [(row, diffs) for row in paper.ROWS
                 if (diffs := paper.about_differences(row, run.cfg, reading)) is not None]
        rows[id(run)] = [row for row, diffs in about if not diffs]
        for row in rows[id(run)]:
            exact[row].append(run)
        if not rows[id(run)]:
            others.append(run)
            for row, diffs in about:
                related[row].append((run, diffs))
    return Placed(exact, related, others, rows)


def per_seed(runs: list[Run]) -> list[Run]:
    """The runs the numbers of a row or an arm come from: one per seed (the furthest), the finished
    ones if any, else the single furthest run."""
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


def _left_out(runs: list[Run], used: list[Run]) -> str:
    """What the numbers of `used` leave out of `runs` (nothing to say when no run has an epoch)."""
    left_out = len(runs) - len(used)
    return f"; {left_out} other run(s) left out (unfinished or the same seed)" if used and left_out else ""


def _runs_cell(row_runs: list[Run], used: list[Run], related: list) -> str:
    if not used:
        if row_runs:
            return ", ".join(f"{r.name} (no epoch yet)" for r in row_runs)
        return "not run" + (f"; related: {', '.join(r.name for r, _ in related)} (see other runs)" if related else "")
    if len(used) == 1:
        text = f"{used[0].name} ({used[0].status})"
    else:
        text = f"{len(used)} seeds ({', '.join(str(r.seed) for r in used)}), {used[0].status}"
    return text + _left_out(row_runs, used)


def _key_value(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else f"{value:g}" \
        if isinstance(value, float) else str(value)


def describe_differences(diffs: list) -> str:
    return ", ".join(f"{k} (run {_key_value(a)}, row {_key_value(b)})" for k, a, b in diffs)


# ----------------------------------------------------------------------------- arms and comparisons

@dataclass
class Arm:
    """The runs of one experiment: equal in every setting but the seed (paper.setting)."""

    runs: list[Run]

    @property
    def cfg(self) -> Config:
        return self.runs[0].cfg

    @property
    def used(self) -> list[Run]:
        """The runs its numbers come from (one per seed), those with a logged test top-1."""
        return [r for r in per_seed(self.runs) if r.final("eval_top1") is not None]

    @property
    def names(self) -> str:
        return ", ".join(r.name for r in self.runs)


def group_arms(runs: list[Run]) -> list[Arm]:
    """The runs by arm, whatever their folders are called; arms in the order their first run was given."""
    arms = {}
    for run in runs:
        arms.setdefault(paper.setting(run.cfg), Arm([])).runs.append(run)
    return list(arms.values())


def compare_keys(key: Optional[str]) -> tuple[str, ...]:
    """The keys in which two arms may differ to be compared: the loss method, or the key --compare names."""
    if key is None:
        return paper.METHOD_KEYS
    if key not in KEYS:
        raise ConfigError(f"report --compare: {shown(key)} is not a config key{suggestion(key, KEYS)}")
    if key == "seed":
        raise ConfigError("report --compare: seed: the runs of one arm are its seeds; name a setting the arms "
                          "differ in (for example optim.name)")
    if key in paper.BOOKKEEPING_KEYS:
        raise ConfigError(f"report --compare: {key} never changes what a run trains (data location, speed or "
                          "bookkeeping), so runs that differ only in it are the seeds of one arm")
    return (key,)


@dataclass
class Comparison:
    """Two arms that differ in compared keys and nothing else; the gain is `other` minus `base`."""

    base: Arm
    other: Arm
    keys: list[str]  # the compared keys they differ in
    paper_pair: bool  # a baseline/PGT pair of the paper's rows: its gains table holds it

    @property
    def by_method(self) -> bool:
        return all(k in paper.METHOD_KEYS for k in self.keys)

    def label(self, arm: Arm) -> str:
        if self.by_method:
            return arm.runs[0].method
        return ", ".join(f"{k} {_key_value(get(arm.cfg, k))}" for k in self.keys)

    @property
    def title(self) -> str:
        c = self.base.cfg
        epochs = f"{c.schedule.epochs} epoch{'s' if c.schedule.epochs > 1 else ''}"
        common = f"{c.model.name} {c.schedule.name}, {epochs}" + \
            ("" if self.by_method else f", {self.base.runs[0].method}")
        return f"{common}: {self.label(self.base)} vs {self.label(self.other)}"


@dataclass
class Apart:
    """Two arms that differ in a compared key and in others besides: not compared."""

    a: Arm
    b: Arm
    diffs: list  # (key, a's value, b's value)


def _defaults(cfg: Config, keys) -> int:
    return sum(get(cfg, k) == KEYS[k].default for k in keys)


def _paper_pair(a: Arm, b: Arm, placed: Placed) -> bool:
    # The runs of an arm are the same rows (the keys that make a row are settings): its first run's.
    rows_a, rows_b = placed.rows[id(a.runs[0])], placed.rows[id(b.runs[0])]
    return any(paper.baseline_of(y) == x or paper.baseline_of(x) == y for x in rows_a for y in rows_b)


def find_comparisons(arms: list[Arm], keys: tuple[str, ...], placed: Placed) -> tuple[list[Comparison], list[Apart]]:
    """Every two arms that differ in `keys` alone (the one at the keys' defaults, else the one given
    first, is the base), and, for each arm compared with none, the nearest arms that differ in `keys`
    and more."""
    comparisons, near = [], {id(a): [] for a in arms}
    for i, a in enumerate(arms):
        for b in arms[i + 1:]:
            diffs = paper.setting_differences(a.cfg, b.cfg)
            if not any(k in keys for k, _, _ in diffs):
                continue
            if all(k in keys for k, _, _ in diffs):
                base, other = sorted((a, b), key=lambda arm: -_defaults(arm.cfg, keys))
                comparisons.append(Comparison(base, other, [k for k, _, _ in diffs], _paper_pair(a, b, placed)))
            else:
                near[id(a)].append((b, diffs))
                near[id(b)].append((a, [(k, y, x) for k, x, y in diffs]))
    compared = {id(arm) for c in comparisons for arm in (c.base, c.other)}
    apart, said = [], set()
    for a in arms:
        if id(a) in compared or not near[id(a)]:
            continue
        fewest = min(len(diffs) for _, diffs in near[id(a)])
        for b, diffs in near[id(a)]:
            if len(diffs) == fewest and frozenset((id(a), id(b))) not in said:
                said.add(frozenset((id(a), id(b))))
                apart.append(Apart(a, b, diffs))
    return comparisons, apart


def _seeds_needed(gain: seed_stats.Gain, effect: float) -> str:
    """Seeds per arm the observed spread needs to resolve a gain of `effect` points."""
    if gain.test is None:
        return "unknown (needs 2 seeds per arm)"
    if effect == 0:
        return "none: no gain observed"
    n = seed_stats.seeds_needed(gain.noise, effect, paired=gain.test == "paired")
    return f"more than {seed_stats.MAX_SEEDS}" if n is None else str(n)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def comparison_lines(c: Comparison, effect: Optional[float] = None) -> list[str]:
    """One comparison: each arm's seeds with mean ± sd, the gain on the final and the best epoch with
    its interval, p-value and verdict, the seeds needed, and the time to accuracy."""
    rows = []
    for arm, target in ((c.base, c.other), (c.other, c.base)):
        used = arm.used
        rows.append([c.label(arm), arm.names + _left_out(arm.runs, per_seed(arm.runs)), str(len(used)),
                     ", ".join(str(r.seed) for r in used), _spread_text(_values(used, "final", "train_top1")),
                     _spread_text(_values(used, "final")), _spread_text(_values(used, "best")),
                     time_to_accuracy(target.used, used, c.label(target)) if used and target.used else ""])
    lines = [f"### {c.title}", ""] + _table(
        ["arm", "runs", "n", "seeds", "train top-1 (final)", "test top-1 (final)", "test top-1 (best)",
         "first epoch at the other arm's final test top-1"], rows)
    base, other = c.base.used, c.other.used
    if not base or not other:
        return lines + ["", f"No gain yet: {c.label(c.other if base else c.base)} has no test top-1 logged.", ""]
    gains = []
    for which in ("final", "best"):
        g = seed_stats.compare(_values(base, which), _values(other, which))
        interval = [f"[{g.low:+.2f}, {g.high:+.2f}]", f"{g.p:.2g}", g.test] if g.test else ["", "", ""]
        gains.append([f"{which} epoch", f"{g.gain:+.2f}", *interval, g.verdict,
                      _seeds_needed(g, abs(g.gain) if effect is None else effect)])
    size = "the observed gain" if effect is None else f"a gain of {effect:g}"
    lines += [""] + _table([f"{c.label(c.other)} minus {c.label(c.base)} (test top-1)", "gain",
                            "95% interval", "p", "test", "verdict", f"seeds per arm to resolve {size}"], gains)
    if not all(r.finished for r in base + other):
        lines += ["", "Some of these runs are unfinished: their numbers are those of their last logged epoch."]
    return lines + [""]


def listed(comparisons: list[Comparison]) -> list[Comparison]:
    """The comparisons the comparisons section shows: all but the paper's pairs, which the tables hold."""
    return [c for c in comparisons if not c.paper_pair]


def comparisons_section(comparisons: list[Comparison], apart: list[Apart], keys: tuple[str, ...],
                        effect: Optional[float]) -> list[str]:
    """Every comparison of the arms (but the paper's pairs), and the arms that differ in more than `keys`."""
    shown = listed(comparisons)
    named = "the loss method (loss.pgt_alpha, loss.pgt_impl)" if keys == paper.METHOD_KEYS else keys[0]
    lines = ["## Comparisons", "",
             f"An arm is the runs whose resolved configs are equal in every key but the seed (and the keys that "
             f"never change what a run trains: where the data lives, speed settings, checkpoints and logs). Two "
             f"arms are compared when they differ in {named} and nothing else. Test top-1 gains carry a 95% t "
             f"interval, paired by seed where both arms ran the same seeds, else Welch's: 'resolved' when it "
             f"excludes 0, 'within noise' otherwise. The seeds per arm are those the observed spread needs to "
             f"resolve the gain with 80% power (two-sided, 5%).", ""]
    for c in shown:
        lines += comparison_lines(c, effect)
    if not shown:
        pairs_note = " besides the paper's baseline/PGT pairs (in the tables above)" if comparisons else ""
        lines += [f"No two arms differ in {named} alone{pairs_note}.", ""]
    if apart:
        lines += [f"Not compared: arms that differ in {named} and in other keys besides:", ""]
        for x in apart:
            compared, besides = ([f"{k} ({_key_value(va)} vs {_key_value(vb)})" for k, va, vb in x.diffs
                                  if (k in keys) == side] for side in (True, False))
            lines.append(f"- {x.a.names} and {x.b.names}: they differ in {', '.join(compared)}, and also in "
                         f"{', '.join(besides)}")
        lines.append("")
    return lines


# Keys the arms table shows in its own columns.
_SHOWN_KEYS = ("model.name", "schedule.name", "schedule.mode", "schedule.epochs", "data.batch_size", "optim.lr",
               "loss.pgt_alpha", "loss.pgt_impl", "loss.label_smoothing", "grad_clip.mode", "amp")


def arms_table(arms: list[Arm]) -> list[str]:
    """One line per arm: what it trains, its seeds and their mean ± sd; a column for any other key the
    arms differ in."""
    varying = [k for k in paper.SETTING_KEYS if k not in _SHOWN_KEYS and
               len({_key_value(get(a.cfg, k)) for a in arms if k not in paper.unused(a.cfg)}) > 1]
    head = ["runs", "model", "schedule (mode)", "epochs", "global batch", "lr", "method", "amp"] + \
        (["also set"] if varying else []) + ["seeds", "status", "train (final)", "test (final)", "test (best)"]
    rows = []
    for arm in arms:
        c, used = arm.cfg, per_seed(arm.runs)
        status = "no epoch yet" if not used else "finished" if all(r.finished for r in used) else \
            "; ".join(dict.fromkeys(r.status for r in used))
        also = [", ".join(f"{k} {_key_value(get(c, k))}" for k in varying if k not in paper.unused(c))] \
            if varying else []
        rows.append([arm.names + _left_out(arm.runs, used), c.model.name, f"{c.schedule.name} ({c.schedule.mode})",
                     str(c.schedule.epochs), str(c.data.batch_size), f"{c.optim.lr:g}", arm.runs[0].method, c.amp,
                     *also, ", ".join(str(r.seed) for r in used), status,
                     _spread_text(_values(used, "final", "train_top1")), _spread_text(_values(used, "final")),
                     _spread_text(_values(used, "best"))])
    return _table(head, rows)


def closest_rows(report: Report, arms: list[Arm], about: bool) -> list[str]:
    """Once per arm: the row it is closest to, and what keeps it from being that row: among the rows it
    is about (same model, schedule and method; place() found them), else, unless about=True, among all."""
    lines = []
    for arm in arms:
        found, how = report.placed.nearest_related(arm.runs[0]), "related to"
        if found is None and not about:
            found = min(((row, paper.differences(row, arm.cfg, report.reading)) for row in paper.ROWS),
                        key=lambda x: len(x[1]))
            how = "closest to"
        if found:
            row, diffs = found
            lines.append(f"- {arm.names}: {how} Table {row.table} {row.label}: "
                         f"differs in {describe_differences(diffs)}")
    return lines


def other_runs_section(report: Report) -> list[str]:
    """Beside the paper's tables: the runs that are no row, by arm, and the rows they are about."""
    # An arm's runs are all rows or none (see _paper_pair).
    arms = [arm for arm in report.arms if not report.placed.rows[id(arm.runs[0])]]
    if not arms:
        return ["## Other runs", "", "Every run given is a row of the paper's tables."]
    lines = ["## Other runs", "", "Runs that train no row of the paper exactly, by arm (equal settings but the seed).",
             ""] + arms_table(arms)
    related = closest_rows(report, arms, about=True)
    if related:
        lines += ["", "Related to a row (same model, schedule and method), but not the row:", ""] + related
    return lines


def arms_section(report: Report) -> list[str]:
    """When no run is a row: the arms, and the row closest to each."""
    return ["## Arms", "", "The runs by arm (equal settings but the seed)."] + [""] + arms_table(report.arms) + [
        "", "None of the runs is a row of the paper's tables (a run is a row when it trains exactly what the row "
            "trained), so the tables are left out. The row closest to each arm:", ""] + \
        closest_rows(report, report.arms, about=False)


# ----------------------------------------------------------------------------- tables

def tables(report: Report) -> str:
    """Markdown: the paper's three tables with the runs' numbers beside them, and the PGT gains with
    their statistics."""
    placed, reference, reading = report.placed, report.reference, report.reading
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
            used = per_seed(placed.exact[row])
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
        base, pgt = ([r for r in per_seed(placed.exact[x]) if r.final("eval_top1") is not None]
                     for x in (base_row, row))
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
            cells.append(" / ".join(_seeds_needed(g, abs(paper_gain)) for g in gains))
            cells.append(time_to_accuracy(base, pgt))
        lines.append("| " + " | ".join(cells) + " |")
    return lines if shown else [f"No baseline/PGT pair of Table {table} was run."]


def time_to_accuracy(target: list[Run], runs: list[Run], target_name: str = "baseline") -> str:
    """The first epoch at which the test top-1 of `runs` (mean over their seeds) reaches the final one
    of `target` (mean over its seeds)."""
    from powergrad_train.reproduction.report_figures import mean_curve  # (no plotting library: that loads to draw)
    goal = statistics.fmean(_values(target, "final").values())
    for epoch, mean in zip(*mean_curve(runs, "eval_top1")):
        if mean >= goal:
            return f"epoch {epoch} of {runs[0].cfg.schedule.epochs} ({target_name} final {goal:.2f})"
    return f"never ({target_name} final {goal:.2f})"


# ----------------------------------------------------------------------------- what the figures draw

@dataclass
class FigurePair:
    name: str  # for file names
    title: str
    arms: list[tuple[str, list[Run]]]  # (label, its seeds' runs): the base arm first
    theirs: list[Run]  # the authors' runs of the two rows, when given
    filters: bool = False  # a filter-norm figure too (every arm has runs)


@dataclass
class FigurePlan:
    """What report_figures.figures draws: the pairs, every run's accuracy by arm, a filter-norm
    figure for each arm drawn in no pair (file name, label, its seeds' runs), and the runs for alpha."""
    pairs: list[FigurePair]
    every_run: list[tuple[str, list[Run]]]
    arms: list[tuple[str, str, list[Run]]]
    runs: list[Run]


def figure_pairs(report: Report) -> list[FigurePair]:
    """Each baseline/PGT pair of the paper's rows with runs (or the authors' logs), then each other
    comparison of arms."""
    placed, reference = report.placed, report.reference
    found, drawn = [], set()
    for table in (1, 2, 3):
        for base_row, row in pairs(table):
            base, pgt = per_seed(placed.exact[base_row]), per_seed(placed.exact[row])
            theirs = [t for t in (reference.of(base_row), reference.of(row)) if t] if reference else []
            if (base_row.recipe, row.recipe) in drawn or not (base or pgt or theirs):
                continue  # Tables 1 and 3 share rows
            drawn.add((base_row.recipe, row.recipe))
            found.append(FigurePair(f"table{table}-{_slug(row.label)}", f"Table {table}: {base_row.label} vs {row.label}",
                                    [(base_row.label, base), (row.label, pgt)], theirs))
    names = {pair.name for pair in found}
    for c in listed(report.comparisons[0]):  # (the paper's pairs are drawn above)
        name = _unique(_slug(f"{c.base.cfg.model.name} {c.label(c.base)} vs {c.label(c.other)}"), names)
        found.append(FigurePair(name, c.title, [(c.label(c.base), c.base.used), (c.label(c.other), c.other.used)], []))
    for pair in found:
        pair.filters = all(seeds for _, seeds in pair.arms)
    return found


def figure_plan(report: Report) -> FigurePlan:
    found = figure_pairs(report)
    in_pairs = {id(r) for pair in found if pair.filters for _, seeds in pair.arms for r in seeds}
    names = {pair.name for pair in found}
    runs = [r for r in report.runs if r.epochs]
    # The arms of the runs with an epoch, each in the order of the first of them (as group_arms orders).
    arm_of, drawn = {id(r): arm for arm in report.arms for r in arm.runs}, {}
    for run in runs:
        drawn.setdefault(id(arm_of[id(run)]), Arm([])).runs.append(run)
    arms = list(drawn.values())
    labelled, own = _labelled(arms), []
    for (label, _), arm in zip(labelled, arms):
        if not any(id(r) in in_pairs for r in arm.runs):  # an arm drawn in a pair gets no figure of its own
            seeds = per_seed(arm.runs)
            own.append((_unique(_slug(seeds[0].name if len(seeds) == 1 else label), names), label, seeds))
    return FigurePlan(found, labelled, own, runs)


def _slug(text: str) -> str:
    return re.sub(r"-+", "-", "".join(c if c.isalnum() or c == "." else "-" for c in text)).strip("-")


def _unique(name: str, taken: set[str]) -> str:
    """`name`, or `name-2`, `name-3`... when a figure of that name is already drawn; then taken."""
    unique = name
    for n in range(2, len(taken) + 2):
        if unique not in taken:
            break
        unique = f"{name}-{n}"
    taken.add(unique)
    return unique


def _labelled(arms) -> list[tuple[str, list[Run]]]:
    """Each arm's runs with what it trains as its label; the folders only where two arms would read alike."""
    labels = [a.runs[0].label(setting=True, seed=False) for a in arms]
    return [(f"{label} ({a.names})" if labels.count(label) > 1 else label, a.runs) for label, a in zip(labels, arms)]


# ----------------------------------------------------------------------------- the report

@dataclass
class Report:
    """What the report shows, from the runs read: each part is computed once, when first needed, and
    the sections, tables and figures all read it from here."""

    runs: list[Run]
    reference: Optional[Reference] = None
    reading: str = "global"
    keys: tuple[str, ...] = paper.METHOD_KEYS  # the keys arms are compared by
    effect: Optional[float] = None

    @cached_property
    def placed(self) -> Placed:
        return place(self.runs, self.reading)

    @cached_property
    def arms(self) -> list[Arm]:
        return group_arms(self.runs)

    @cached_property
    def comparisons(self) -> tuple[list[Comparison], list[Apart]]:
        return find_comparisons(self.arms, self.keys, self.placed)

    @cached_property
    def compared(self) -> list[str]:
        """The comparisons section (report.md holds it where it has something to say)."""
        return comparisons_section(*self.comparisons, self.keys, self.effect)

    @cached_property
    def text(self) -> str:
        """report.md"""
        return report_text(self)

    @cached_property
    def plan(self) -> FigurePlan:
        return figure_plan(self)


def report_text(report: Report) -> str:
    """report.md: when some run is a paper row, the paper's tables first, then the comparisons of the
    other arms and the runs that are no row; when none is, the comparisons first, the arms and the
    row closest to each, and the tables only where the authors' logs were given."""
    if any(report.placed.exact.values()) or not report.runs:
        comparisons, apart = report.comparisons
        parts = ["# Runs beside the paper", "", tables(report),
                 *(report.compared if listed(comparisons) or apart else []), *other_runs_section(report)]
    else:
        parts = ["# Runs compared over seeds", "", *report.compared, *arms_section(report)]
        if report.reference is not None:
            parts += ["", "# The paper's tables, beside the authors' logs", "", tables(report)]
    return "\n".join(parts)


def distinct(folders: list[Path]) -> list[Path]:
    """Each folder once, however often or by whichever path it was given (the first name kept)."""
    seen = {}
    for folder in folders:
        seen.setdefault(os.path.realpath(folder), Path(folder))
    return list(seen.values())


def check_out(out: Path) -> None:
    """The report's folder can be made: neither it nor a folder above it is a file."""
    existing = next(p for p in (out, *out.parents) if os.path.lexists(p))
    if not existing.is_dir():
        what = "is a file, not a folder" if existing.is_file() else "is not a folder"
        raise ConfigError(f"report --out: {printable(existing)} {what}"
                          + (f", so {printable(out)} cannot be made" if existing != out else "")
                          + " (report.md and the figures go into a folder)")


def build_report(run_dirs: list[Path], out: Path, reference_dir: Optional[Path] = None, reading: str = "global",
                 compare: Optional[str] = None, effect: Optional[float] = None) -> Report:
    """Check and read everything (any bad input, `out` included, stops before a file is written)."""
    keys = compare_keys(compare)
    if effect is not None and not (math.isfinite(effect) and effect > 0):
        raise ConfigError(f"report --effect: the gain to resolve, in points of test top-1, must be a number > 0, "
                          f"got {effect:g}")
    check_out(out)
    runs = [read_run(d) for d in distinct(run_dirs)]
    reference = read_reference(reference_dir) if reference_dir is not None else None
    return Report(runs, reference, reading, keys, effect)


def save(report: Report, out: Path) -> list[Path]:
    """Write report.md and the figures into `out`; the figures' paths."""
    text = report.text  # (computed before the folder is made)
    make_folder(out)
    write_text(out / "report.md", text)
    from powergrad_train.reproduction.report_figures import figures
    return figures(report.plan, out)


def write_report(run_dirs: list[Path], out: Path, reference_dir: Optional[Path] = None, reading: str = "global",
                 compare: Optional[str] = None, effect: Optional[float] = None) -> tuple[str, list[Path]]:
    """`powergrad-train report`: report.md and the figures of the runs in `run_dirs` into `out`; the
    text and the figures' paths."""
    report = build_report(run_dirs, out, reference_dir, reading, compare, effect)
    return report.text, save(report, out)
