"""The PGT paper's Tables 1-3 as data: what each row trained and the top-1 it reported.

From "Altering Backward Pass Gradients improves Convergence", the paper that introduces the
PowerGrad Transform (code: github.com/bishshoy/power-grad-transform): ImageNet train / test
top-1 %, 4 V100s.

A run IS a row when its resolved config equals the resolved config of the row's bundled recipe
on every key in ROW_KEYS (everything the row fixes; a key the config does not use, such as the
step decay under a cosine schedule, differs in nothing). A run that is about the row (same model,
schedule, PGT alpha, label smoothing and clipping: SUBJECT_KEYS, and Table 2's batch) but
differs in other keys is only related to it, and the differing keys are named.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

from powergrad_train.config.build import build_config, unread_keys
from powergrad_train.config.schema import KEYS, Config, get

# Keys that never change what a run trains: where the data lives and how it is read (data.root,
# backend, dali_device, val_backend, workers, val_batch_size), speed settings that keep the numbers
# (channels_last, tf32, model.compile, train.accumulate_steps, which keeps the global batch) and
# bookkeeping (checkpoint.*, train.log_every_steps, train.max_nonfinite_steps, log.*). Runs that
# differ only in these and the seed trained the same thing: a paper row's runs (ROW_KEYS) and the
# report's arms (SETTING_KEYS) both leave them out.
BOOKKEEPING_KEYS = (
    "data.root", "data.backend", "data.dali_device", "data.val_backend", "data.workers", "data.val_batch_size",
    "channels_last", "tf32", "model.compile", "train.accumulate_steps",
    "checkpoint.keep_last", "checkpoint.every_steps", "train.log_every_steps", "train.max_nonfinite_steps",
    "log.outputs",
)
# What an arm fixes: every key but the seed (its runs differ in it) and bookkeeping.
SETTING_KEYS = tuple(k for k in KEYS if k != "seed" and k not in BOOKKEEPING_KEYS)
# What a row fixes, of those: not model.sync_bn nor an EMA of the weights (it leaves the weights the
# row reports as they train); the other optimizers' betas and eps, the multistep milestones, and mixup's
# settings, only matter once optim.name, schedule.name or batch_transform.name differ, which is compared.
ROW_FREE = ("model.sync_bn", "weight_average.name", "weight_average.decay", "optim.beta1", "optim.beta2", "optim.eps", "schedule.milestones",
            "batch_transform.mixup_alpha", "batch_transform.cutmix_alpha", "batch_transform.prob",
            "batch_transform.switch_prob")
ROW_KEYS = tuple(k for k in SETTING_KEYS if k not in ROW_FREE)
METHOD_KEYS = ("loss.pgt_alpha", "loss.pgt_impl")  # the loss method: what the report compares by default
SUBJECT_KEYS = ("model.name", "schedule.name", "loss.pgt_alpha", "loss.label_smoothing", "grad_clip.mode")

# Table 2's batch: "global" reads 256/512/1024 as the global batch (what the recipes run);
# "per-gpu" as the authors' -b, per GPU on their 4 GPUs (a global batch 4x as large).
BATCH_READINGS = ("global", "per-gpu")
AUTHORS_GPUS = 4


@dataclass(frozen=True)
class Row:
    table: int
    number: int  # the row's place in its table, from 1
    label: str  # the row as the paper names it
    model: str
    schedule: str
    alpha: Optional[float]  # PGT alpha; None for the plain gradient
    train: float
    test: float
    recipe: str  # the bundled recipe that trains this row
    label_smoothing: float = 0.0
    clip: str = "none"
    batch: Optional[int] = None  # Table 2 only: the batch the paper prints

    @property
    def baseline(self) -> bool:
        return self.alpha is None

    @property
    def title(self) -> str:
        """`Table 1 row 13: resnet18 cosine baseline` (Table 3's labels start with their row)."""
        return f"Table {self.table} {self.label}" if self.table == 3 else \
            f"Table {self.table} row {self.number}: {self.label}"


def method_name(alpha, clip="none", ls=0.0) -> str:
    parts = [{"value": "GC", "agc": "AGC", "norm": "norm clipping"}[clip]] if clip != "none" else []
    parts += [f"LS {ls:g}"] if ls else []
    parts += [f"PGT {alpha:g}"] if alpha is not None else []
    return " + ".join(parts) or "baseline"


def _t1(model, schedule, alpha, train, test, note=""):
    recipe = f"{model}{'_step' if schedule == 'step' else ''}_{'baseline' if alpha is None else 'pgt'}.yaml"
    return dict(table=1, label=f"{model} {schedule} {method_name(alpha)}{note}", model=model, schedule=schedule,
                alpha=alpha, train=train, test=test, recipe=recipe)


def _t2(batch, clip, alpha, train, test):
    parts = [{"value": "gc", "agc": "agc"}.get(clip, "")] + (["pgt"] if alpha is not None else [])
    recipe = f"nobn_b{batch}_{'_'.join(p for p in parts if p) or 'baseline'}.yaml"
    return dict(table=2, label=f"batch {batch} {method_name(alpha, clip)}", model="resnet18_nobn", schedule="cosine",
                alpha=alpha, train=train, test=test, recipe=recipe, clip=clip, batch=batch)


def _t3(row, schedule, ls, alpha, train, test, recipe):
    parts = [f"row {row}: {schedule}"] + (["LS 0.1"] if ls else []) + ([f"PGT {alpha}"] if alpha else [])
    return dict(table=3, label=", ".join(parts), model="resnet50", schedule=schedule, alpha=alpha, train=train,
                test=test, recipe=recipe, label_smoothing=ls)


_SPECS = [
    _t1("seresnet50", "cosine", None, 81.50, 77.218), _t1("seresnet50", "cosine", 0.3, 82.47, 77.952),
    _t1("resnet50", "cosine", None, 79.18, 76.56), _t1("resnet50", "cosine", 0.05, 79.68, 77.216),
    _t1("resnet50", "step", None, 78.99, 75.97),
    # Table 1 prints 0.05 here; Table 3 (row 2) and the authors' README say 0.3, which the recipe runs.
    _t1("resnet50", "step", 0.3, 79.56, 76.494, note=" (Table 1 prints 0.05)"),
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
ROWS = [Row(number=sum(s["table"] == spec["table"] for s in _SPECS[:i]) + 1, **spec) for i, spec in enumerate(_SPECS)]


def table_rows(table: int) -> list[Row]:
    return [r for r in ROWS if r.table == table]


def batch_overrides(row: Row, reading: str = "global") -> list[str]:
    """The --set a Table 2 row needs under a reading of its batch (none for the recipes' own reading)."""
    if row.batch is None or reading == "global":
        return []
    return [f"data.batch_size={row.batch * AUTHORS_GPUS}"]


@functools.lru_cache(maxsize=None)
def row_config(row: Row, reading: str = "global") -> Config:
    """What the row trains: its recipe's resolved config (not to be changed by callers)."""
    return build_config(row.recipe, batch_overrides(row, reading))


def unused(cfg: Config) -> set[str]:
    """The keys that do nothing under this config (a value there changes no run): those of parts it
    does not select, a clipping threshold without clipping, the PGT implementation of the plain gradient."""
    keys = unread_keys(cfg)
    keys |= {"grad_clip.value"} if cfg.grad_clip.mode == "none" else set()
    keys |= {"loss.pgt_impl"} if cfg.loss.pgt_alpha is None else set()  # the plain gradient has one way
    return keys


def setting_differences(a: Config, b: Config, keys=SETTING_KEYS) -> list[tuple[str, Any, Any]]:
    """(key, a's value, b's value) for every key of `keys` both configs use and set apart."""
    idle = unused(a) | unused(b)
    return [(k, get(a, k), get(b, k)) for k in keys if k not in idle and get(a, k) != get(b, k)]


def setting(cfg: Config) -> tuple:
    """What a run trains, seed aside: runs with equal settings are the seeds of one arm."""
    idle = unused(cfg)
    return tuple((k, repr(get(cfg, k))) for k in SETTING_KEYS if k not in idle)


def differences(row: Row, cfg: Config, reading: str = "global") -> list[tuple[str, Any, Any]]:
    """(key, run value, row value) for every key in ROW_KEYS where the run differs from the row."""
    return setting_differences(cfg, row_config(row, reading), ROW_KEYS)


def is_about(row: Row, cfg: Config, reading: str = "global") -> bool:
    """Does the run train the row's subject (model, schedule, method, and Table 2's batch)?"""
    want = row_config(row, reading)
    keys = SUBJECT_KEYS + (("data.batch_size",) if row.batch is not None else ())
    return all(get(cfg, k) == get(want, k) for k in keys)


def about_differences(row: Row, cfg: Config, reading: str = "global") -> Optional[list[tuple[str, Any, Any]]]:
    """The run's differences to the row when it is about the row (none: it is the row), else None."""
    return differences(row, cfg, reading) if is_about(row, cfg, reading) else None


def matches(row: Row, cfg: Config, reading: str = "global") -> bool:
    """Does a resolved config train exactly what this row trained?"""
    return about_differences(row, cfg, reading) == []


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
