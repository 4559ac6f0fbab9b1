"""What the PGT authors published, read safely: their checkpoints and the layout of their logs.

Their code (a fork of timm 0.4.12) saved checkpoints with timm's CheckpointSaver as
`checkpoint-N.pth.tar`, `last.pth.tar` and `model_best.pth.tar`: a dict of `epoch`, `arch`
(the model name), `state_dict`, `optimizer`, `version`, `args` (the argparse Namespace of the
training command), `amp_scaler` (the GradScaler's state) and `metric` (the epoch's val top-1).
Their published runs sit in folders `<model>/<schedule>-scheduler-alpha-<a>[-label-smoothing]/`
with the checkpoints and a `summary.csv` (epoch, train_loss, train_acc, eval_loss, eval_top1,
eval_top5). Their no-BN ResNet-18 is `resnet18_wobn` (the folder says `resnet_non_bn`), which is
`resnet18_nobn` here; alpha 1.0 in a folder name is the plain gradient.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from powergrad_train.config.build import build_config
from powergrad_train.config.schema import Config
from powergrad_train.reproduction import paper
from powergrad_train.system.errors import CheckpointError

MODEL_NAMES = {"resnet18_wobn": "resnet18_nobn", "resnet_non_bn": "resnet18_nobn"}
SUFFIX = ".pth.tar"  # what timm's CheckpointSaver writes; this project writes .pt
FOLDER = re.compile(r"(?P<schedule>cosine|step)-scheduler-alpha-(?P<alpha>\d+(?:\.\d+)?)(?P<ls>-label-smoothing)?")
SMOOTHING = 0.1  # their README: --smoothing 0.1 where label smoothing was used


def our_model_name(theirs: str) -> str:
    return MODEL_NAMES.get(theirs, theirs)


def is_timm_checkpoint(path: Path) -> bool:
    return Path(path).name.endswith(SUFFIX)


@dataclass
class AuthorsCheckpoint:
    path: Path
    state_dict: dict
    args: dict  # their command's arguments (the Namespace as a dict; {} when not saved)
    epoch: Optional[int]
    metric: Optional[float]

    @property
    def model(self) -> str:
        """This project's name of their model."""
        return our_model_name(str(self.args.get("model") or self.arch))

    @property
    def arch(self) -> str:
        return str(self.args.get("model", "?"))

    def describe(self) -> str:
        """Their training command's settings, in the paper's terms."""
        a = self.args.get
        gpus, batch = a("world_size"), a("batch_size")
        total = f" x {gpus} GPUs = {batch * gpus} global" if isinstance(gpus, int) and isinstance(batch, int) else ""
        epochs, cooldown, sched = a("epochs"), a("cooldown_epochs"), a("sched")
        if sched == "step":  # timm 0.4.12's create_scheduler adds the cooldown for cosine only
            length = f"{epochs} (step: timm 0.4.12 ignores --cooldown-epochs {cooldown} for step)"
        else:
            length = f"{epochs} + {cooldown} cooldown" if isinstance(epochs, int) and cooldown else f"{epochs}"
        alpha = a("modify_softmax")
        amp = "fp16 (native AMP, GradScaler)" if a("amp") or a("native_amp") else "apex" if a("apex_amp") else "off"
        model = self.arch + (f" (here {self.model})" if self.model != self.arch else "")
        lines = [f"{self.path}: the PGT authors' checkpoint (timm 0.4.12 format) of epoch {self.epoch}, their logged "
                 f"val top-1 {self.metric if self.metric is not None else '?'}",
                 f"  their args: model {model}, batch {batch} per GPU{total}, epochs {length}, sched {sched}, "
                 f"seed {a('seed')}, modify_softmax {alpha} ({'PGT alpha' if alpha else 'plain gradient'}), "
                 f"smoothing {a('smoothing')}, AMP {amp}, lr {a('lr')}, weight decay {a('weight_decay')}, "
                 f"warmup {a('warmup_epochs')} epochs from {a('warmup_lr')}, min lr {a('min_lr')}"]
        return "\n".join(lines)

    def config(self, overrides: list[str]) -> Config:
        """A config to evaluate their weights through this project's val pipeline: the paper's
        validation (PIL resize and center crop, imagenet.yaml) at the interpolation this project's
        recipes use for the model; `overrides` (--set) last."""
        classes = self.args.get("num_classes") or _classifier_size(self.state_dict)
        sets = [f"model.name={self.model}", f"model.num_classes={classes}",
                f"amp={'fp16' if self.args.get('amp') or self.args.get('native_amp') else 'off'}"]
        row = next((r for r in paper.ROWS if r.model == self.model), None)
        if row is not None:
            sets.append(f"data.val_interpolation={paper.row_config(row).data.val_interpolation}")
        return build_config("imagenet.yaml", sets + list(overrides))


def _classifier_size(state_dict: dict) -> int:
    weight = state_dict.get("fc.weight")
    return int(weight.shape[0]) if weight is not None else 1000


def load_checkpoint(path: Path) -> AuthorsCheckpoint:
    """One of their `.pth.tar` files, loaded as every torch file here is (checkpoint.torch_load:
    weights only, with argparse.Namespace allowed for their `args`; anything else is refused)."""
    from powergrad_train.training.checkpoint import torch_load

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint file (a folder: give the .pth.tar file in it)")
    state = torch_load(path)
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a timm checkpoint (no state_dict in it)")
    args = state.get("args")
    weights = state["state_dict"]
    if weights and all(k.startswith("module.") for k in weights):  # saved from inside DDP
        weights = {k.removeprefix("module."): v for k, v in weights.items()}
    return AuthorsCheckpoint(path, weights, vars(args) if isinstance(args, argparse.Namespace) else {},
                             state.get("epoch"), state.get("metric"))


# ----------------------------------------------------------------------------- their logs

@dataclass(frozen=True)
class AuthorsLog:
    """One of their published run folders (its summary.csv is read by the report)."""

    folder: Path
    model: str  # this project's name
    schedule: str
    alpha: Optional[float]  # None: the plain gradient (their alpha 1.0)
    label_smoothing: float

    @property
    def summary(self) -> Path:
        return self.folder / "summary.csv"

    @property
    def label(self) -> str:
        return f"authors: {'baseline' if self.alpha is None else f'PGT {self.alpha:g}'}"

    def rows(self) -> list[paper.Row]:
        """The paper's rows this run is (their no-BN runs are Table 2's batch-256 rows, as their README says)."""
        return [r for r in paper.ROWS if (r.model, r.schedule, r.alpha, r.label_smoothing, r.clip) ==
                (self.model, self.schedule, self.alpha, self.label_smoothing, "none")
                and r.batch in (None, 256)]


def find_logs(root: Path) -> list[AuthorsLog]:
    """Every `<model>/<schedule>-scheduler-alpha-<a>[-label-smoothing]/summary.csv` under `root`."""
    from powergrad_train.system.errors import DataError

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"report --reference: {root} is not a folder (the authors' checkpoint folder, holding "
                        "<model>/<schedule>-scheduler-alpha-<a>/summary.csv)")
    logs = []
    for summary in sorted(root.glob("*/*/summary.csv")):
        m = FOLDER.fullmatch(summary.parent.name)
        if m is None:
            continue
        alpha = float(m["alpha"])
        logs.append(AuthorsLog(summary.parent, our_model_name(summary.parent.parent.name), m["schedule"],
                               None if alpha == 1.0 else alpha, SMOOTHING if m["ls"] else 0.0))
    if not logs:
        raise DataError(f"report --reference: {root} holds no <model>/<schedule>-scheduler-alpha-<a>/summary.csv")
    return logs
