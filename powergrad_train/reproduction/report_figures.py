"""The report's figures (PNG, matplotlib): accuracy per epoch (Fig. 4), filter norms with the pooled
features (Fig. 5-7), logit norm and loss against alpha (Fig. 8), drawn from the runs report.py read,
placed and grouped into arms: one accuracy and one filter-norm figure per comparison (and per
baseline/PGT pair of the paper's rows), the arms side by side and each seed drawn.

What to draw comes in as arguments (report.figure_plan, report.Run): report.py imports this module,
never the other way round.
"""

from __future__ import annotations

import re
import statistics
import sys
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from powergrad_train.reproduction import paper
from powergrad_train.system.atomic import write_file

if TYPE_CHECKING:  # names for the annotations only; at run time the dependency is report -> here
    from powergrad_train.reproduction.report import FigurePlan, Run

SEED_STYLES = ("-", "--", ":", "-.")  # a seed's line style inside its arm


def figures(plan: FigurePlan, out: Path) -> list[Path]:
    """PNG files: per pair or comparison the accuracy (Fig. 4) and filter norms (Fig. 5-7), the same
    for each arm in none, every run's accuracy, and logit norm and loss vs alpha (Fig. 8)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    written = []
    for pair in plan.pairs:
        written.append(accuracy_figure(pair.arms, pair.theirs, pair.title, out / f"pair-{pair.name}.png", plt))
        if pair.filters:
            path = filter_norm_figure(pair.arms, pair.title, out / f"filters-{pair.name}.png", plt)
            written += [path] if path else []
    if plan.every_run:
        written.append(accuracy_figure(plan.every_run, [], "every run", out / "accuracy.png", plt))
    for name, label, seeds in plan.arms:
        path = filter_norm_figure([(label, seeds)], label, out / f"filters-{name}.png", plt)
        written += [path] if path else []
    path = alpha_figure(plan.runs, out / "alpha.png", plt)
    return written + ([path] if path else [])


def warn(text: str) -> None:
    print(f"warning: report: {text}", file=sys.stderr, flush=True)


def mean_curve(runs: list[Run], column: str) -> tuple[list[int], list[float]]:
    """The mean over the runs at each epoch all of them logged."""
    curves = [dict(zip(*r.curve(column))) for r in runs]
    epochs = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return epochs, [statistics.fmean(c[e] for c in curves) for e in epochs]


def accuracy_figure(arms: list[tuple[str, list[Run]]], theirs: list[Run], title: str, path: Path, plt) -> Path:
    """Train and test top-1 per epoch: one colour per arm, a thin line per seed and the arm's mean
    thicker; the authors' curves dashed, and the difference of each arm's mean to them."""
    color = {id(seeds): f"C{i % 10}" for i, (_, seeds) in enumerate(arms)}
    compare = [(label, seeds, t) for t in theirs for label, seeds in arms
               if seeds and seeds[0].cfg.loss.pgt_alpha == t.cfg.loss.pgt_alpha]
    panels = 3 if compare else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
    marker = "o" if all(len(r.epochs) <= 1 for _, seeds in arms for r in seeds) else None  # a lone point shows
    for label, seeds in arms:
        for ax, column in zip(axes, ("train_top1", "eval_top1")):
            if len(seeds) == 1:
                ax.plot(*seeds[0].curve(column), marker=marker, color=color[id(seeds)],
                        label=f"{label}, seed {seeds[0].seed}")
                continue
            for i, run in enumerate(seeds):
                ax.plot(*run.curve(column), marker=marker, lw=0.8, alpha=0.6, color=color[id(seeds)],
                        label=f"{label}: seeds {', '.join(str(r.seed) for r in seeds)}" if i == 0 else None)
            ax.plot(*mean_curve(seeds, column), marker=marker, lw=2.6, color=color[id(seeds)], label=f"{label}: mean")
    for t in theirs:
        for ax, column in zip(axes, ("train_top1", "eval_top1")):
            ax.plot(*t.curve(column), "--", color="C0" if t.cfg.loss.pgt_alpha is None else "C1",
                    label=f"authors: {t.method}")
    for ax, what in zip(axes, ("train", "test (val)")):
        ax.set(xlabel="epoch", ylabel=f"{what} top-1 (%)", title=f"{what} accuracy")
    if compare:
        diff_ax = axes[2]
        for label, seeds, t in compare:
            ours, mine = dict(zip(*t.curve("eval_top1"))), dict(zip(*mean_curve(seeds, "eval_top1")))
            epochs = sorted(set(ours) & set(mine))
            diff_ax.plot(epochs, [mine[e] - ours[e] for e in epochs], label=label, color=color[id(seeds)])
        diff_ax.axhline(0, color="0.5", lw=0.8)
        diff_ax.set(xlabel="epoch", ylabel="test top-1: runs' mean - authors (points)",
                    title="difference to the authors")
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
    from powergrad_train.training.diagnostics import load_filter_norms
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


def filter_norm_figure(arms: list[tuple[str, list[Run]]], title: str, path: Path, plt) -> Optional[Path]:
    """Fig. 5-7: for three main-path layers, one line per filter (its L2 norm over the epochs), the
    arms side by side on one scale, their seeds as line styles; then the share of zeroed filters
    (each arm's mean over its seeds), the dead pooled features and the pooled features' channel RMS
    (Fig. 5c), one colour per arm and its seeds as line styles. None when an arm saved no filter norms."""
    import numpy as np
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    from powergrad_train.training.diagnostics import ZEROED_NORM

    # Per arm, its seeds that saved filter norms: (run, epochs, {layer: norms} per epoch).
    data = [[d for d in ((run, *filter_norms(run)) for run in seeds) if d[1]] for _, seeds in arms]
    if not all(data):
        return None
    every = [d for arm in data for d in arm]
    layers = [n for n in main_path_convs(list(every[0][2][0])) if all(n in d[2][0] for d in every)]
    if len(arms) == 1:  # the layers in a row, the summaries below them
        fig = plt.figure(figsize=(15.6, 6.4))
        grid = fig.add_gridspec(2, 3)
        layer_axes = [[fig.add_subplot(grid[0, i])] for i in range(len(layers))]
    else:  # a row per layer, the arms side by side
        fig = plt.figure(figsize=(12.0, 3.1 * (len(layers) + 1)))
        grid = fig.add_gridspec(len(layers) + 1, 6)
        layer_axes = [[fig.add_subplot(grid[i, :3]), fig.add_subplot(grid[i, 3:])] for i in range(len(layers))]
        grid = grid[-1, :].subgridspec(1, 3)
    summary = [fig.add_subplot(grid[-1, i]) for i in range(3)]
    labels = [label for label, _ in arms]
    for row_axes, layer in zip(layer_axes, layers):
        top = max(norms[layer].max() for _, _, per_epoch in every for norms in per_epoch)
        for ax, arm, label in zip(row_axes, data, labels):
            for i, (run, epochs, per_epoch) in enumerate(arm):
                # One line per filter, drawn as one collection (hundreds of separate lines draw slowly).
                values = np.stack([n[layer] for n in per_epoch]).T  # (filters, epochs)
                x = np.broadcast_to(np.asarray(epochs, dtype=float), values.shape)
                ax.add_collection(LineCollection(np.stack([x, values], axis=-1), lw=0.6, alpha=0.6,
                                                 linestyles=SEED_STYLES[i % len(SEED_STYLES)],
                                                 colors=[f"C{f % 10}" for f in range(len(values))]))
            epochs = [e for _, arm_epochs, _ in arm for e in arm_epochs]
            ax.set_xlim(min(epochs) - 0.05, max(epochs) + 0.05)
            ax.set(xlabel="epoch", ylabel="filter L2 norm", ylim=(0, 1.05 * top),
                   title=f"{label}: {layer} ({len(arm[0][2][0][layer])} filters)")
            if len(arm) > 1:
                ax.legend(handles=[Line2D([], [], color="0.3", lw=0.8, ls=SEED_STYLES[i % len(SEED_STYLES)],
                                          label=f"seed {run.seed}") for i, (run, _, _) in enumerate(arm)], fontsize=7)
    zero_ax, dead_ax, rms_ax = summary
    for a, (arm, label) in enumerate(zip(data, labels)):
        common = sorted(set.intersection(*(set(epochs) for _, epochs, _ in arm)))
        for marker, layer in zip("os^", layers):
            share = [statistics.fmean(100 * float((per_epoch[epochs.index(e)][layer] < ZEROED_NORM).mean())
                                      for _, epochs, per_epoch in arm) for e in common]
            zero_ax.plot(common, share, marker=marker, color=f"C{a}", label=f"{label}: {layer}")
        for i, (run, _, _) in enumerate(arm):
            style, name = SEED_STYLES[i % len(SEED_STYLES)], f"{label}, seed {run.seed}"
            dead_ax.plot(*run.curve("dead_features"), style, marker=".", color=f"C{a}", label=name)
            last = pooled_features(run)
            if last is not None:
                epoch, rms = last
                rms_ax.plot(np.sort(rms)[::-1], style, color=f"C{a}",
                            label=f"{name} (epoch {epoch}, {int((rms == 0).sum())} at 0)")
    zero_ax.set(xlabel="epoch", ylabel=f"filters with norm < {ZEROED_NORM:g} (%)",
                title="zeroed filters" + (" (mean over seeds)" if len(every) > len(arms) else ""))
    zero_ax.set_ylim(bottom=0, top=max(1.0, zero_ax.get_ylim()[1]))
    dead_ax.set(xlabel="epoch", ylabel="dead channels", title="pooled features zero on every val image (Fig. 5c)")
    dead_ax.set_ylim(bottom=0, top=max(1.0, dead_ax.get_ylim()[1]))
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


def alpha_groups(runs: list[Run]) -> dict[tuple, list[Run]]:
    """Runs with a logit norm and a loss, equal in every setting but the loss method (alpha), in
    groups of more than one alpha."""
    groups = {}
    for run in runs:
        if run.final("logit_norm") is not None and run.final("train_loss") is not None:
            key = tuple(kv for kv in paper.setting(run.cfg) if kv[0] not in paper.METHOD_KEYS)
            groups.setdefault(key, []).append(run)
    return {k: g for k, g in groups.items() if len({r.cfg.loss.pgt_alpha for r in g}) > 1}


def alpha_figure(runs: list[Run], path: Path, plt) -> Optional[Path]:
    """Fig. 8: the last epoch's train logit norm and training loss against alpha, one curve per
    group of runs equal in every setting but alpha (never mixing models or schedules)."""
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
