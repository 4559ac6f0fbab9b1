"""Every kind of part a recipe can name, its built-in parts, and the parts other packages add.

A part is one file that declares a `Part` (config/declare.py): what its kind builds, a help line, its
config keys and its checks. The built-in ones are listed below as `module:attribute`; a package adds
its own with a Python entry point in the group `powergrad_train.<kind>`, e.g. in its pyproject.toml

    [project.entry-points."powergrad_train.optimizer"]
    my_sgd = "my_package.my_sgd:PART"

after which `optim.name: my_sgd` trains with it (docs/extending.md). Nothing is imported before it
is needed: the schema imports each part's declaration, which imports nothing heavy, and a part's
heavy libraries (DALI, TensorBoard, W&B) load only when a run builds it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from dataclasses import dataclass

from powergrad_train.config.declare import Part
from powergrad_train.system.errors import ConfigError, InstallError, shown


@dataclass(frozen=True)
class Kind:
    section: str  # the config section its parts read
    selector: str  # the key of that section that names the part (a list of names for outputs)
    help: str  # what the selector chooses, for its help text
    builtin: dict[str, str]  # name -> `module:attribute` of the part's Part


KINDS = {
    "data_backend": Kind("data", "backend", "data pipeline", {
        "torchvision": "powergrad_train.data.imagefolder:PART",
        "dali": "powergrad_train.data.dali:PART",
        "synthetic": "powergrad_train.data.synthetic:PART",
    }),
    "objective": Kind("loss", "name", "objective", {
        "cross_entropy": "powergrad_train.training.objectives:CROSS_ENTROPY",
    }),
    "batch_transform": Kind("batch_transform", "name", "applied to each training batch on the device before the "
                                                       "forward (targets may become class probabilities)", {
        "none": "powergrad_train.training.batch_transforms:NONE",
        "mixup": "powergrad_train.training.batch_transforms:MIXUP",
        "cutmix": "powergrad_train.training.batch_transforms:CUTMIX",
        "mixup_cutmix": "powergrad_train.training.batch_transforms:MIXUP_CUTMIX",
    }),
    "optimizer": Kind("optim", "name", "optimizer", {
        "sgd": "powergrad_train.training.optimizers:SGD",
        "adamw": "powergrad_train.training.optimizers:ADAMW",
        "lamb": "powergrad_train.training.optimizers:LAMB",
    }),
    "schedule": Kind("schedule", "name", "LR decay after warmup", {
        "cosine": "powergrad_train.training.schedules:COSINE",
        "step": "powergrad_train.training.schedules:STEP",
        "multistep": "powergrad_train.training.schedules:MULTISTEP",
        "linear": "powergrad_train.training.schedules:LINEAR",
    }),
    "weight_average": Kind("weight_average", "name", "an average of the weights, updated after every applied step "
                                                     "and evaluated beside them (eval_<name>_top1)", {
        "none": "powergrad_train.training.ema:NONE",
        "ema": "powergrad_train.training.ema:EMA",
    }),
    "output": Kind("log", "outputs", "where rank 0 sends the run's numbers", {
        "console": "powergrad_train.training.outputs:CONSOLE",
        "csv": "powergrad_train.training.outputs:CSV",
        "tensorboard": "powergrad_train.training.outputs:TENSORBOARD",
        "jsonl": "powergrad_train.training.outputs:JSON_LINES",
        "wandb": "powergrad_train.training.outputs_wandb:PART",  # pip install -e ".[wandb]"
        "mlflow": "powergrad_train.training.outputs_mlflow:PART",  # pip install -e ".[mlflow]"
    }),
}

ENTRY_POINT_GROUP = "powergrad_train.{kind}"


@functools.cache
def _plugins(kind: str) -> dict[str, importlib.metadata.EntryPoint]:
    """The entry points other installed packages declare for `kind` (read from their metadata, not imported)."""
    found = {}
    for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP.format(kind=kind)):
        where = _origin(point)
        if point.name in KINDS[kind].builtin:
            raise InstallError(f"{where} registers {kind.replace('_', ' ')} {shown(point.name)}, which is built in: "
                               "rename it in that package's entry points")
        if point.name in found and found[point.name].value != point.value:
            raise InstallError(f"{where} and {_origin(found[point.name])} both register "
                               f"{kind.replace('_', ' ')} {shown(point.name)}")
        found[point.name] = point
    return found


def _origin(point: importlib.metadata.EntryPoint) -> str:
    package = f"package {point.dist.name}" if point.dist is not None else "an installed package"
    return f"{package} (entry point {point.name} = {point.value})"


def names(kind: str) -> tuple[str, ...]:
    """Every name `kind` can take: the built-in ones, then the installed packages' ones (nothing imported)."""
    return tuple(KINDS[kind].builtin) + tuple(sorted(_plugins(kind)))


@functools.cache
def load(kind: str, name: str) -> Part:
    """The Part registered under `name` for `kind` (its module imported now)."""
    if name in KINDS[kind].builtin:
        module, attribute = KINDS[kind].builtin[name].split(":")
        part = getattr(importlib.import_module(module), attribute)
    elif name in _plugins(kind):
        point = _plugins(kind)[name]
        try:
            part = point.load()
        except Exception as e:  # the plugin's own import: whatever it raises is its problem, told in one line
            raise InstallError(f"{_origin(point)}: cannot load it ({type(e).__name__}: {e})") from None
        if not isinstance(part, Part):
            raise InstallError(f"{_origin(point)}: names a {type(part).__name__}, not a "
                               "powergrad_train.config.declare.Part")
    else:
        raise ConfigError(f"no {kind.replace('_', ' ')} is registered as {shown(name)}")
    return part


def parts(kind: str) -> dict[str, Part]:
    """Every part of `kind`, by name (each declaration imported)."""
    return {name: load(kind, name) for name in names(kind)}


def chosen(cfg, kind: str) -> list[tuple[str, Part]]:
    """The part(s) `cfg` selects for `kind`, with their names."""
    spec = KINDS[kind]
    value = getattr(getattr(cfg, spec.section), spec.selector)
    return [(name, load(kind, name)) for name in (value if isinstance(value, list) else [value])]
