"""The PGT paper's Tables 1-3 as data: what each row trained and the top-1 it reported.

From "Altering Backward Pass Gradients improves Convergence", the paper that introduces the
PowerGrad Transform (code: github.com/bishshoy/power-grad-transform): ImageNet train / test
top-1 %, 4 V100s, 100 epochs.
A run matches a row when its resolved config trains what the row did (model, schedule, PGT
alpha, label smoothing, gradient clipping, and for Table 2 the global batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Row:
    table: int
    label: str  # the row as the paper names it
    model: str
    schedule: str
    alphas: tuple  # PGT alpha(s) that match: (None,) for the plain gradient
    train: float
    test: float
    recipe: str  # the bundled recipe that trains this row
    label_smoothing: float = 0.0
    clip: str = "none"
    batch: Optional[int] = None  # Table 2 only: the global batch

    @property
    def baseline(self) -> bool:
        return self.alphas == (None,)


def _t1(model, schedule, alpha, train, test, alphas=None):
    method = "baseline" if alpha is None else f"PGT {alpha}"
    recipe = f"{model}{'_step' if schedule == 'step' else ''}_{'baseline' if alpha is None else 'pgt'}.yaml"
    return Row(1, f"{model} {schedule} {method}", model, schedule, alphas or (alpha,), train, test, recipe)


def _t2(batch, clip, alpha, train, test):
    method = {"none": "", "value": "GC", "agc": "AGC"}[clip]
    if alpha is not None:
        method = f"{method} + PGT {alpha}" if method else f"PGT {alpha}"
    parts = [{"value": "gc", "agc": "agc"}.get(clip, "")] + (["pgt"] if alpha is not None else [])
    recipe = f"nobn_b{batch}_{'_'.join(p for p in parts if p) or 'baseline'}.yaml"
    return Row(2, f"batch {batch} {method or 'baseline'}", "resnet18_nobn", "cosine", (alpha,), train, test, recipe,
               clip=clip, batch=batch)


def _t3(row, schedule, ls, alpha, train, test, recipe):
    parts = [f"row {row}: {schedule}"] + (["LS 0.1"] if ls else []) + ([f"PGT {alpha}"] if alpha else [])
    return Row(3, ", ".join(parts), "resnet50", schedule, (alpha,), train, test, recipe, label_smoothing=ls)


ROWS = [
    _t1("seresnet50", "cosine", None, 81.50, 77.218), _t1("seresnet50", "cosine", 0.3, 82.47, 77.952),
    _t1("resnet50", "cosine", None, 79.18, 76.56), _t1("resnet50", "cosine", 0.05, 79.68, 77.216),
    _t1("resnet50", "step", None, 78.99, 75.97),
    # Table 1 prints 0.05 here; Table 3 (row 2) and the authors' README say 0.3.
    _t1("resnet50", "step", 0.05, 79.56, 76.494, alphas=(0.05, 0.3)),
    _t1("resnet101", "cosine", None, 82.29, 77.896), _t1("resnet101", "cosine", 0.3, 83.10, 78.258),
    _t1("seresnet18", "cosine", None, 71.42, 71.09), _t1("seresnet18", "cosine", 0.25, 71.60, 71.436),
    _t1("resnet18", "step", None, 69.95, 69.704), _t1("resnet18", "step", 0.25, 70.30, 69.844),
    _t1("resnet18", "cosine", None, 70.38, 70.208), _t1("resnet18", "cosine", 0.25, 70.53, 70.298),
    _t2(1024, "none", None, 66.27, 64.816), _t2(1024, "none", 0.92, 66.62, 65.498),
    _t2(512, "none", None, 68.02, 66.552), _t2(512, "none", 0.25, 69.50, 67.236),
    _t2(256, "none", None, 68.86, 66.796), _t2(256, "value", None, 69.04, 67.064),
    _t2(256, "agc", None, 69.06, 67.298), _t2(256, "none", 0.25, 69.97, 67.814),
    _t2(256, "value", 0.25, 68.67, 67.088), _t2(256, "agc", 0.25, 70.92, 68.856),
    _t3(1, "step", 0.0, None, 78.99, 75.97, "resnet50_step_baseline.yaml"),
    _t3(2, "step", 0.0, 0.3, 79.56, 76.494, "resnet50_step_pgt.yaml"),
    _t3(3, "cosine", 0.0, None, 79.18, 76.56, "resnet50_baseline.yaml"),
    _t3(4, "cosine", 0.1, None, 78.81, 76.698, "resnet50_ls.yaml"),
    _t3(5, "cosine", 0.0, 0.3, 79.43, 76.886, "resnet50_pgt03.yaml"),
    _t3(6, "cosine", 0.1, 0.3, 78.47, 76.968, "resnet50_ls_pgt03.yaml"),
    _t3(7, "cosine", 0.0, 0.05, 79.68, 77.216, "resnet50_pgt.yaml"),
    _t3(8, "cosine", 0.1, 0.05, 77.69, 76.39, "resnet50_ls_pgt.yaml"),
]


def matches(row: Row, cfg) -> bool:
    """Does a resolved config train what this row trained?"""
    return (cfg.model.name == row.model and cfg.schedule.name == row.schedule
            and cfg.loss.pgt_alpha in row.alphas and cfg.loss.label_smoothing == row.label_smoothing
            and cfg.grad_clip.mode == row.clip and (row.batch is None or cfg.data.batch_size == row.batch))


def baseline_of(row: Row) -> Optional[Row]:
    """The row's plain-gradient partner (same table, model, schedule, smoothing, clipping, batch)."""
    if row.baseline:
        return None
    for other in ROWS:
        if other.table == row.table and other.baseline and (other.model, other.schedule, other.label_smoothing,
                                                            other.clip, other.batch) == (
                row.model, row.schedule, row.label_smoothing, row.clip, row.batch):
            return other
    return None
