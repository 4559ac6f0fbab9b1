"""The report's figures (PNG, matplotlib): accuracy per epoch (Fig. 4), filter norms with the pooled
features (Fig. 5-7), logit norm and loss against alpha (Fig. 8), drawn from the runs report.py read
and placed."""

from __future__ import annotations

import re
import statistics
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from powergrad_train import paper
from powergrad_train.atomic import write_file
from powergrad_train.config import get
from powergrad_train.report import Placed, Reference, Run, arm, pairs, place, warn


@dataclass
class FigurePair:
    name: str  # for file names
    title: str
    base: list[Run]
    pgt: list[Run]
    theirs: list[Run]  # the authors' runs of the two rows, when given


def figure_pairs(placed: Placed, reference: Optional[Reference]) -> list[FigurePair]:
    """Each baseline/PGT pair of the paper's rows with runs (or the authors' logs), then pairs among
    the other runs: runs equal in every key a row fixes but alpha, the plain-gradient ones the baseline."""
    found, drawn = [], set()
    for table in (1, 2, 3):
        for base_row, row in pairs(table):
            base, pgt = arm(placed.exact[base_row]), arm(placed.exact[row])
            theirs = [t for t in (reference.of(base_row), reference.of(row)) if t] if reference else []
            if (base_row.recipe, row.recipe) in drawn or not (base or pgt or theirs):
                continue  # Tables 1 and 3 share rows
            drawn.add((base_row.recipe, row.recipe))
            found.append(FigurePair(f"table{table}-{_slug(row.label)}", f"Table {table}: {base_row.label} vs {row.label}",
                                    base, pgt, theirs))
    for group in alpha_groups(placed.others, need_losses=False).values():
        base = arm([r for r in group if r.cfg.loss.pgt_alpha is None])
        for alpha in sorted({r.cfg.loss.pgt_alpha for r in group} - {None}):
            pgt = arm([r for r in group if r.cfg.loss.pgt_alpha == alpha])
            if base and pgt:
                c = pgt[0].cfg
                found.append(FigurePair(_slug(f"{base[0].name}-vs-{pgt[0].name}"),
                                        f"{c.model.name} {c.schedule.name} (no paper row): baseline vs {pgt[0].method}",
                                        base, pgt, []))
    return found


def figures(runs: list[Run], out: Path, reference: Optional[Reference] = None, reading: str = "global") -> list[Path]:
    """PNG files: accuracy per epoch (Fig. 4), filter norms (Fig. 5-7), logit norm and loss vs alpha (Fig. 8)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    placed = place(runs, reading)
    written, in_pairs = [], set()
    for pair in figure_pairs(placed, reference):
        colors = ["C0"] * len(pair.base) + ["C1"] * len(pair.pgt)  # one color per arm, the authors' dashed in it
        written.append(accuracy_figure(pair.base + pair.pgt, pair.theirs, pair.title, out / f"pair-{pair.name}.png",
                                       plt, colors=colors))
        if pair.base and pair.pgt:
            path = filter_norm_figure([pair.base[0], pair.pgt[0]], pair.title, out / f"filters-{pair.name}.png", plt)
            written += [path] if path else []
            in_pairs.update(id(r) for r in (pair.base[0], pair.pgt[0]))
    runs = [r for r in runs if r.epochs]
    if runs:
        written.append(accuracy_figure(runs, [], "every run", out / "accuracy.png", plt, setting=True))
    for run in runs:
        if id(run) not in in_pairs:
            path = filter_norm_figure([run], run.label(setting=True), out / f"filters-{_slug(run.name)}.png", plt)
            written += [path] if path else []
    path = alpha_figure(runs, out / "alpha.png", plt)
    return written + ([path] if path else [])


def _slug(text: str) -> str:
    return re.sub(r"-+", "-", "".join(c if c.isalnum() or c == "." else "-" for c in text)).strip("-")


def _legend_labels(runs: list[Run], setting: bool) -> list[str]:
    """Method and alpha (and seed when several); the folder name only where two runs would read alike."""
    labels = [r.label(setting=setting, seed=len({x.seed for x in runs}) > 1) for r in runs]
    return [f"{label} ({r.name})" if labels.count(label) > 1 else label for label, r in zip(labels, runs)]


def accuracy_figure(runs: list[Run], theirs: list[Run], title: str, path: Path, plt, setting: bool = False,
                    colors: Optional[list[str]] = None) -> Path:
    """Train and test top-1 per epoch; the authors' curves dashed, and the per-epoch difference to them."""
    compare = [(r, t) for t in theirs for r in runs if r.cfg.loss.pgt_alpha == t.cfg.loss.pgt_alpha]
    panels = 3 if compare else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
    color_of = dict(zip(map(id, runs), colors)) if colors else {}
    seeds = sorted({r.seed for r in runs})
    for run, label in zip(runs, _legend_labels(runs, setting)):
        style = ("-", "-.", ":")[seeds.index(run.seed) % 3] if colors else "-"  # the authors' are dashed
        for ax, column in zip(axes, ("train_top1", "eval_top1")):
            ax.plot(*run.curve(column), style, label=label, color=color_of.get(id(run)))
    for t in theirs:
        for ax, column in zip(axes, ("train_top1", "eval_top1")):
            ax.plot(*t.curve(column), "--", color="C0" if t.cfg.loss.pgt_alpha is None else "C1",
                    label=f"authors: {t.method}")
    for ax, what in zip(axes, ("train", "test (val)")):
        ax.set(xlabel="epoch", ylabel=f"{what} top-1 (%)", title=f"{what} accuracy")
    if compare:
        diff_ax = axes[2]
        for run, t in compare:
            ours, mine = dict(zip(*t.curve("eval_top1"))), dict(zip(*run.curve("eval_top1")))
            epochs = sorted(set(ours) & set(mine))
            diff_ax.plot(epochs, [mine[e] - ours[e] for e in epochs], label=run.label(seed=len(runs) > 2),
                         color=color_of.get(id(run)))
        diff_ax.axhline(0, color="0.5", lw=0.8)
        diff_ax.set(xlabel="epoch", ylabel="test top-1: run - authors (points)", title="difference to the authors")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path, plt)


def main_path_convs(names: list[str]) -> list[str]:
    """The first convolution, a middle block's last convolution and the last block's last one, on
    the main path: never a shortcut (downsample) or squeeze-excitation 1x1 convolution."""
    side = re.compile(r"(^|\.)(downsample|shortcut|se|attn)(\.|$)")
    main = [n for n in names if not side.search(n)]
    blocks = [n for n in main if re.fullmatch(r"layer\d+\.\d+\.conv\d+", n)]
    if not blocks:  # not a ResNet layout: first, middle and last of the main-path convolutions
        return list(dict.fromkeys([main[0], main[len(main) // 2], main[-1]])) if main else []
    block_of = {n: n.rsplit(".", 1)[0] for n in blocks}
    order = list(dict.fromkeys(block_of.values()))
    middle = [n for n in blocks if block_of[n] == order[len(order) // 2]][-1]
    stem = [n for n in main if not n.startswith("layer")]
    return list(dict.fromkeys([(stem or blocks)[0], middle, blocks[-1]]))


def filter_norms(run: Run) -> tuple[list[int], list[dict]]:
    """(epochs, per epoch {layer: norms of its filters}); unreadable files are left out with a warning."""
    from powergrad_train.diagnostics import load_filter_norms
    epochs, norms = [], []
    for path in sorted((run.folder / "diagnostics").glob("filter-norms-epoch-*.npz")):
        try:
            epoch, values = int(path.stem.rsplit("-", 1)[1]), load_filter_norms(path)
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as e:
            warn(f"{path} is unreadable ({type(e).__name__}); left out of the filter-norm figure")
            continue
        if values:
            epochs.append(epoch)
            norms.append(values)
    return epochs, norms


def pooled_features(run: Run) -> Optional[tuple]:
    """(epoch, each pooled-feature channel's RMS over the val images) of the last epoch saved, or None."""
    import numpy as np
    for path in sorted((run.folder / "diagnostics").glob("pooled-features-epoch-*.npz"), reverse=True):
        try:
            with np.load(path) as arrays:
                return int(path.stem.rsplit("-", 1)[1]), arrays["rms"]
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as e:
            warn(f"{path} is unreadable ({type(e).__name__}); left out of the pooled-feature panel")
    return None


def filter_norm_figure(runs: list[Run], title: str, path: Path, plt) -> Optional[Path]:
    """Fig. 5-7: for three main-path layers, one line per filter (its L2 norm over the epochs), the
    runs side by side on one scale; then the share of zeroed filters, the dead pooled features and
    the pooled features' channel RMS (Fig. 5c)."""
    import numpy as np
    from matplotlib.collections import LineCollection

    from powergrad_train.diagnostics import ZEROED_NORM
    data = [filter_norms(r) for r in runs]
    if not all(epochs for epochs, _ in data):
        return None
    layers = [n for n in main_path_convs(list(data[0][1][0])) if all(n in d[1][0] for d in data)]
    if len(runs) == 1:  # the layers in a row, the summaries below them
        fig = plt.figure(figsize=(15.6, 6.4))
        grid = fig.add_gridspec(2, 3)
        layer_axes = [[fig.add_subplot(grid[0, i])] for i in range(len(layers))]
    else:  # a row per layer, the runs side by side
        fig = plt.figure(figsize=(12.0, 3.1 * (len(layers) + 1)))
        grid = fig.add_gridspec(len(layers) + 1, 6)
        layer_axes = [[fig.add_subplot(grid[i, :3]), fig.add_subplot(grid[i, 3:])] for i in range(len(layers))]
        grid = grid[-1, :].subgridspec(1, 3)
    summary = [fig.add_subplot(grid[-1, i]) for i in range(3)]
    labels = _legend_labels(runs, setting=False)
    for row_axes, layer in zip(layer_axes, layers):
        top = max(max(norms[layer].max() for norms in d[1]) for d in data)
        for ax, (epochs, norms), label in zip(row_axes, data, labels):
            # One line per filter, drawn as one collection (hundreds of separate lines draw slowly).
            values = np.stack([n[layer] for n in norms]).T  # (filters, epochs)
            x = np.broadcast_to(np.asarray(epochs, dtype=float), values.shape)
            ax.add_collection(LineCollection(np.stack([x, values], axis=-1), lw=0.6, alpha=0.6,
                                             colors=[f"C{i % 10}" for i in range(len(values))]))
            ax.set_xlim(min(epochs) - 0.05, max(epochs) + 0.05)
            ax.set(xlabel="epoch", ylabel="filter L2 norm", ylim=(0, 1.05 * top),
                   title=f"{label}: {layer} ({len(norms[0][layer])} filters)")
    zero_ax, dead_ax, rms_ax = summary
    for (epochs, norms), label, run, style in zip(data, labels, runs, ("-", "--")):
        for color, layer in enumerate(layers):
            zero_ax.plot(epochs, [100 * (n[layer] < ZEROED_NORM).mean() for n in norms], style, color=f"C{color}",
                         label=f"{label}: {layer}")
        dead_ax.plot(*run.curve("dead_features"), style, marker=".", color="C0" if style == "-" else "C1", label=label)
    zero_ax.set(xlabel="epoch", ylabel=f"filters with norm < {ZEROED_NORM:g} (%)", title="zeroed filters")
    zero_ax.set_ylim(bottom=0, top=max(1.0, zero_ax.get_ylim()[1]))
    dead_ax.set(xlabel="epoch", ylabel="dead channels", title="pooled features zero on every val image (Fig. 5c)")
    dead_ax.set_ylim(bottom=0, top=max(1.0, dead_ax.get_ylim()[1]))
    for run, label, style in zip(runs, labels, ("-", "--")):
        last = pooled_features(run)
        if last is not None:
            epoch, rms = last
            rms_ax.plot(np.sort(rms)[::-1], style, label=f"{label} (epoch {epoch}, {int((rms == 0).sum())} at 0)")
    rms_ax.set(xlabel="channel, sorted by its value", ylabel="RMS over the val images",
               title="pooled feature channels, last epoch")
    rms_ax.set_ylim(bottom=0)
    for ax in (zero_ax, dead_ax, rms_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in fig.axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: filter norms", fontsize=10)
    return _save(fig, path, plt)


def alpha_groups(runs: list[Run], need_losses: bool = True) -> dict[tuple, list[Run]]:
    """Runs equal in every key a row fixes but alpha, in groups of more than one alpha."""
    groups = {}
    for run in runs:
        if not need_losses or (run.final("logit_norm") is not None and run.final("train_loss") is not None):
            key = tuple(str(get(run.cfg, k)) for k in paper.ROW_KEYS if k != "loss.pgt_alpha")
            groups.setdefault(key, []).append(run)
    return {k: g for k, g in groups.items() if len({r.cfg.loss.pgt_alpha for r in g}) > 1}


def alpha_figure(runs: list[Run], path: Path, plt) -> Optional[Path]:
    """Fig. 8: the last epoch's train logit norm and training loss against alpha, one curve per
    group of runs equal in every key a row fixes but alpha (never mixing models or schedules)."""
    groups = alpha_groups(runs)
    if not groups:
        return None
    fig, (norm_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [f"{g[0].cfg.model.name} {g[0].cfg.schedule.name}"
             + (f", LS {g[0].cfg.loss.label_smoothing:g}" if g[0].cfg.loss.label_smoothing else "") for g in groups.values()]
    for name, group in zip(names, groups.values()):
        label = name if names.count(name) == 1 else f"{name} ({', '.join(sorted({r.name for r in group}))})"
        by_alpha = {}
        for run in group:
            by_alpha.setdefault(run.cfg.loss.pgt_alpha or 1.0, []).append(run)
        alphas = sorted(by_alpha)
        for ax, column in ((norm_ax, "logit_norm"), (loss_ax, "train_loss")):
            values = [[r.final(column) for r in by_alpha[a]] for a in alphas]
            sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            ax.errorbar(alphas, [statistics.fmean(v) for v in values], yerr=sd, marker="o", capsize=3, label=label)
    norm_ax.set(xlabel="PGT alpha (1 = plain gradient)", ylabel="mean L2 norm of the train logits",
                title="logit norm at the last epoch")
    loss_ax.set(xlabel="PGT alpha (1 = plain gradient)",
                ylabel="train cross-entropy (running mean over the last epoch)", title="final training loss")
    for ax in (norm_ax, loss_ax):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path, plt)


def _save(fig, path: Path, plt) -> Path:
    """The figure, written whole (a temporary file renamed) or not at all."""
    from matplotlib.ticker import MaxNLocator
    for ax in fig.axes:
        if ax.get_xlabel() == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    try:
        write_file(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path
