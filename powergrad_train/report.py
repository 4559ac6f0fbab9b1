"""`powergrad-train report RUN_DIR...`: runs beside the paper's Tables 1-3, and the paper's figures.

Each run folder is read (config.yaml, summary.csv, diagnostics/) and matched to the paper's
rows by its resolved config, not by its name. Every paper row is printed; a matched row adds
the run's final train top-1, final and best test top-1 and the difference to the paper, and a
PGT row whose baseline was run too adds the measured PGT gain beside the paper's.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from powergrad_train import paper
from powergrad_train.config import Config, build_config, read_yaml_text
from powergrad_train.errors import DataError

TABLE_TITLES = {1: "Table 1: networks with batch norm", 2: "Table 2: ResNet-18 without batch norm, cosine",
                3: "Table 3: ablation, ResNet-50"}


@dataclass
class Run:
    folder: Path
    cfg: Config
    rows: list[dict]  # summary.csv

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def finished(self) -> bool:
        return bool(self.rows) and int(self.rows[-1]["epoch"]) >= self.cfg.schedule.epochs

    def last(self, column: str) -> float:
        return float(self.rows[-1][column])

    @property
    def best_test(self) -> float:
        return max(float(r["eval_top1"]) for r in self.rows)

    @property
    def status(self) -> str:
        done = int(self.rows[-1]["epoch"]) if self.rows else 0
        return "finished" if self.finished else f"at epoch {done}/{self.cfg.schedule.epochs}"


def read_run(folder: Path) -> Run:
    folder = Path(folder)
    config, summary = folder / "config.yaml", folder / "summary.csv"
    if not config.is_file():
        raise DataError(f"report: {folder} is not a run folder (no config.yaml)")
    cfg = build_config(None, start=(str(config), read_yaml_text(config.read_text()) or {}), lenient=True)
    rows = list(csv.DictReader(open(summary, newline=""))) if summary.is_file() else []
    return Run(folder, cfg, rows)


def _match(row: paper.Row, runs: list[Run]) -> Optional[Run]:
    """The matching run that got furthest (finished first, then most epochs)."""
    found = [r for r in runs if paper.matches(row, r.cfg) and r.rows]
    return max(found, key=lambda r: (r.finished, len(r.rows)), default=None)


def tables(runs: list[Run]) -> str:
    """Markdown: the paper's three tables with the runs' numbers beside them."""
    out = []
    for table in (1, 2, 3):
        out += [f"## {TABLE_TITLES[table]}", "",
                "| row | paper train | paper test | run | run train | run test (final) | run test (best) | "
                "test - paper | PGT gain: run / paper |",
                "|---|---|---|---|---|---|---|---|---|"]
        for row in (r for r in paper.ROWS if r.table == table):
            run = _match(row, runs)
            cells = [row.label, f"{row.train:.2f}", f"{row.test:.3f}"]
            if run is None:
                cells += ["not run", "", "", "", "", ""]
            else:
                test = run.last("eval_top1")
                cells += [f"{run.name} ({run.status})", f"{run.last('train_top1'):.2f}", f"{test:.2f}",
                          f"{run.best_test:.2f}", f"{test - row.test:+.2f}", _gain(row, run, runs)]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _gain(row: paper.Row, run: Run, runs: list[Run]) -> str:
    base_row = paper.baseline_of(row)
    if base_row is None:
        return ""
    base_run = _match(base_row, runs)
    paper_gain = row.test - base_row.test
    if base_run is None:
        return f"baseline not run / {paper_gain:+.2f}"
    return f"{run.last('eval_top1') - base_run.last('eval_top1'):+.2f} / {paper_gain:+.2f}"


# ----------------------------------------------------------------------------- figures

def figures(runs: list[Run], out: Path) -> list[Path]:
    """PNG files: accuracy per epoch (Fig. 4), filter norms (Fig. 5-7), logit norm and loss vs alpha (Fig. 8)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    written = []
    runs = [r for r in runs if r.rows]
    for row in paper.ROWS:  # Fig. 4: each baseline / PGT pair that was run
        base_row = paper.baseline_of(row)
        pair = (_match(base_row, runs), _match(row, runs)) if base_row else (None, None)
        if all(pair):
            written.append(_accuracy_figure(list(pair), f"Table {row.table}: {base_row.label} vs {row.label}",
                                            out / f"pair-table{row.table}-{_slug(row.label)}.png", plt))
    if runs:
        written.append(_accuracy_figure(runs, "every run", out / "accuracy.png", plt))
    for run in runs:
        path = _filter_norm_figure(run, out, plt)
        if path:
            written.append(path)
    alphas = {r.cfg.loss.pgt_alpha or 1.0 for r in runs}
    if len(alphas) > 1:

        fig, (norm_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
        for run in sorted(runs, key=lambda r: r.cfg.loss.pgt_alpha or 1.0):
            alpha = run.cfg.loss.pgt_alpha or 1.0
            norm_ax.scatter(alpha, run.last("logit_norm"))
            loss_ax.scatter(alpha, run.last("train_loss"))
            norm_ax.annotate(run.name, (alpha, run.last("logit_norm")), fontsize=7)
            loss_ax.annotate(run.name, (alpha, run.last("train_loss")), fontsize=7)
        norm_ax.set(xlabel="PGT alpha (1 = plain gradient)", ylabel="mean L2 norm of the train logits",
                    title="logit norm at the last epoch")
        loss_ax.set(xlabel="PGT alpha (1 = plain gradient)", ylabel="train cross-entropy",
                    title="final training loss")
        for ax in (norm_ax, loss_ax):
            ax.grid(alpha=0.3)
        written.append(_save(fig, out / "alpha.png", plt))
    return written


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c == "." else "-" for c in text).strip("-")


def _accuracy_figure(runs: list[Run], title: str, path: Path, plt) -> Path:
    fig, (train_ax, test_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        epochs = [int(r["epoch"]) for r in run.rows]
        train_ax.plot(epochs, [float(r["train_top1"]) for r in run.rows], label=run.name)
        test_ax.plot(epochs, [float(r["eval_top1"]) for r in run.rows], label=run.name)
    for ax, what in ((train_ax, "train"), (test_ax, "test (val)")):
        ax.set(xlabel="epoch", ylabel=f"{what} top-1 (%)", title=f"{title}: {what} accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path, plt)


def _filter_norm_figure(run: Run, out: Path, plt) -> Optional[Path]:
    from powergrad_train.diagnostics import ZEROED_NORM, load_filter_norms
    files = sorted((run.folder / "diagnostics").glob("filter-norms-epoch-*.npz"))
    if not files:
        return None
    per_epoch = [load_filter_norms(f) for f in files]
    epochs = [int(f.stem.rsplit("-", 1)[1]) for f in files]
    layers = list(per_epoch[0])
    picked = [layers[0], layers[len(layers) // 2], layers[-1]]  # first, middle and last convolution
    fig, (norm_ax, zero_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for layer in picked:
        norm_ax.plot(epochs, [norms[layer].mean() for norms in per_epoch], label=layer)
        zero_ax.plot(epochs, [100 * (norms[layer] < ZEROED_NORM).mean() for norms in per_epoch], label=layer)
    norm_ax.set(xlabel="epoch", ylabel="mean filter L2 norm", title=f"{run.name}: filter norms")
    zero_ax.set(xlabel="epoch", ylabel=f"filters with norm < {ZEROED_NORM:g} (%)", title=f"{run.name}: zeroed filters")
    for ax in (norm_ax, zero_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out / f"filters-{run.name}.png", plt)


def _save(fig, path: Path, plt) -> Path:
    from matplotlib.ticker import MaxNLocator
    for ax in fig.axes:
        if ax.get_xlabel() == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(run_dirs: list[Path], out: Path) -> tuple[str, list[Path]]:
    runs = [read_run(d) for d in run_dirs]
    text = "# Runs beside the paper\n\n" + tables(runs)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(text)
    except OSError as e:
        raise DataError(f"report --out: cannot write {out} ({e.strerror or e})") from None
    return text, figures(runs, out)
