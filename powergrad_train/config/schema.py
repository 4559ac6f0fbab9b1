"""The config schema: every option defined once, with its type, default, range and help.

Recipes (YAML), `--set KEY=VALUE` overrides, validation, `--help` and the key
table all come from the dataclasses below. A recipe may start from another with
`base: other.yaml`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import stat
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from powergrad_train.config import registry
from powergrad_train.system.errors import SHOWN_CHARS, ConfigError, printable, shown
from powergrad_train.system.user_files import read_bytes

BUNDLED_RECIPES = Path(__file__).parent.parent / "configs"
DEMO_ROOT = "builtin:demo"


def opt(default, help, *, choices=None, ge=None, gt=None, le=None, lt=None, fixed=False, path=False):
    """A config field: default, help text and the allowed values (for a list: of each element; a
    number is always finite).

    fixed=True: the key defines the run, so resuming with another value is refused
    (unless --resume-force). path=True: a file or folder; `~` is expanded and a relative path
    is made absolute from the current folder when the value is read, so the stored config means
    the same from any folder.
    """
    meta = dict(help=help, choices=choices, ge=ge, gt=gt, le=le, lt=lt, fixed=fixed, path=path)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = opt("resnet50", "timm model name (e.g. resnet18, seresnet50), or resnet18_nobn: ResNet-18 with every norm layer replaced by identity", fixed=True)
    num_classes: int = opt(1000, "number of classes of the classifier head", ge=1, fixed=True)
    zero_init_last: bool = opt(True, "zero-initialise the last batch-norm scale of each residual block (timm's default); "
                                     "the PGT authors' runs effectively had false", fixed=True)
    sync_bn: bool = opt(False, "convert batch norm to SyncBatchNorm in distributed GPU runs, so statistics cover the global batch")
    compile: bool = opt(False, "torch.compile the model (and the loss with it) for speed; first steps compile. Needs a "
                               "C++ compiler on the CPU, triton and a C compiler on CUDA GPUs (checked at start)")
    init_from: Optional[str] = opt(None, "start from these weights instead of a random init: a state_dict file (timm or "
                                         "torchvision .pth, or a file holding 'state_dict' or 'model') or a "
                                         "powergrad-train checkpoint; the classifier head is re-initialised when its "
                                         "class count differs; not used when resuming", fixed=True, path=True)


@dataclass
class DataConfig:
    root: str = opt(DEMO_ROOT, f"ImageFolder root holding train/ and val/ (~ and a relative path are stored as the "
                               f"absolute path); '{DEMO_ROOT}' generates a small learnable demo set on first use",
                    path=True)
    backend: str = opt("torchvision", "data pipeline: torchvision (portable), dali (NVIDIA DALI, pip install -e "
                                      "'.[dali]'), or synthetic (one random batch on the device, for benchmarks)",
                       choices=tuple(registry.DATA_BACKENDS))
    dali_device: str = opt("auto", "dali: where to decode and augment; auto = gpu when CUDA is available",
                           choices=("auto", "gpu", "cpu"))
    image_size: int = opt(224, "train crop and val crop size in pixels", ge=8, fixed=True)
    crop_pct: float = opt(0.875, "val: resize the shorter side to image_size / crop_pct, then center crop", gt=0.0, le=1.0, fixed=True)
    crop_scale_min: float = opt(0.08, "train: smallest area fraction of the random resized crop (largest is 1)", gt=0.0, le=1.0, fixed=True)
    batch_size: int = opt(256, "GLOBAL train batch size, split evenly over all processes", ge=1, fixed=True)
    val_batch_size: Optional[int] = opt(None, "GLOBAL val batch size; null = batch_size", ge=1)
    val_interpolation: str = opt("bilinear", "val: interpolation of the resize (the paper's runs: bicubic for "
                                             "resnet50/101 and the SE-ResNets, bilinear for resnet18)",
                                 choices=("bilinear", "bicubic"))
    val_backend: str = opt("same", "val pipeline: same = the train backend's; torchvision = PIL resize and center "
                                   "crop in a DataLoader (how the paper's runs evaluated, also when training with DALI)",
                           choices=("same", "torchvision"))
    workers: int = opt(4, "per training process: torchvision loader worker processes (0 = main process), "
                          "or DALI threads (at least 1)", ge=0)

    def val_batch_per_process(self, world_size: int) -> int:
        """The val batch of one process: val_batch_size (or batch_size) split over the processes."""
        val_batch = self.val_batch_size or self.batch_size
        if val_batch % world_size:
            raise ConfigError(f"data.val_batch_size {val_batch} does not split evenly over {world_size} process(es)")
        return val_batch // world_size


@dataclass
class OptimConfig:
    name: str = opt("sgd", "optimizer: sgd (torch's fused SGD), adamw (torch's fused AdamW) or lamb (timm's LAMB)",
                    choices=tuple(registry.OPTIMIZERS), fixed=True)
    lr: float = opt(0.1, "peak learning rate (reached at the end of warmup)", gt=0.0, fixed=True)
    momentum: float = opt(0.9, "sgd: momentum", ge=0.0, lt=1.0, fixed=True)
    nesterov: bool = opt(True, "sgd: Nesterov momentum (needs momentum > 0)", fixed=True)
    weight_decay: float = opt(5e-4, "weight decay (L2 for sgd, decoupled for adamw and lamb); never applied to "
                                    "biases and norm parameters", ge=0.0, fixed=True)
    beta1: float = opt(0.9, "adamw, lamb: decay of the first moment estimate", ge=0.0, lt=1.0, fixed=True)
    beta2: float = opt(0.999, "adamw, lamb: decay of the second moment estimate", ge=0.0, lt=1.0, fixed=True)
    eps: float = opt(1e-8, "adamw, lamb: added to the denominator", gt=0.0, fixed=True)


@dataclass
class ScheduleConfig:
    name: str = opt("cosine", "LR decay after warmup: cosine (to min_lr), step (times decay_rate every decay_epochs), "
                              "multistep (times decay_rate at each of milestones), linear (to min_lr)",
                    choices=tuple(registry.SCHEDULES), fixed=True)
    mode: str = opt("per_step", "per_step: the LR changes every optimizer step; authors_per_epoch: the PGT authors' "
                                "code as it ran: one LR per epoch, epoch 1 at t=0 and epoch E>=2 at t=E (t=1 never "
                                "used), warmup inside the decay's count", choices=("per_step", "authors_per_epoch"),
                    fixed=True)
    epochs: int = opt(100, "total epochs trained, warmup and cooldown included", ge=1, fixed=True)
    warmup_epochs: float = opt(5.0, "linear warmup from warmup_lr to optim.lr over this many epochs", ge=0.0, fixed=True)
    warmup_lr: float = opt(1e-4, "LR at the first step of warmup", ge=0.0, fixed=True)
    min_lr: float = opt(0.0, "cosine, linear: LR at the end of the decay; all: LR during cooldown", ge=0.0, fixed=True)
    cooldown_epochs: int = opt(10, "final epochs held at min_lr", ge=0, fixed=True)
    decay_epochs: float = opt(30.0, "step: multiply the LR by decay_rate every this many epochs (counted from epoch 0)", gt=0.0, fixed=True)
    decay_rate: float = opt(0.1, "step, multistep: LR factor at each decay", gt=0.0, le=1.0, fixed=True)
    milestones: list[float] = opt([], "multistep (and only it): the epochs, increasing and counted from epoch 0, at "
                                      "which the LR is multiplied by decay_rate (as timm's MultiStepLRScheduler, "
                                      "a milestone applies from the step before it), e.g. [30, 60, 80]",
                                  gt=0.0, fixed=True)


@dataclass
class LossConfig:
    name: str = opt("cross_entropy", "objective: cross_entropy (with the PowerGrad Transform and label smoothing "
                                     "below; takes class indices or the class probabilities mixup makes)",
                    choices=tuple(registry.OBJECTIVES), fixed=True)
    pgt_alpha: Optional[float] = opt(None, "PowerGrad Transform exponent alpha in (0, 1]; null = plain cross-entropy gradient", gt=0.0, le=1.0, fixed=True)
    label_smoothing: float = opt(0.0, "label smoothing epsilon", ge=0.0, lt=1.0, fixed=True)
    pgt_impl: str = opt("exact", "how the PGT gradient is computed: exact = softmax(alpha * logits) from the logits "
                                 "themselves; authors_hook = the PGT authors' tensor hook, which rebuilds the "
                                 "probabilities from the incoming gradient in the logits' dtype, so it depends on "
                                 "the fp16 loss scale and the per-process batch (to study their numbers)",
                        choices=("exact", "authors_hook"), fixed=True)


@dataclass
class GradClipConfig:
    mode: str = opt("none", "gradient stage: none | value (GC, clip each element) | norm (global L2 norm) | agc (adaptive, head excluded)", choices=("none", "value", "norm", "agc"), fixed=True)
    value: Optional[float] = opt(None, "threshold: max |g| for value, max norm for norm, clipping factor lambda for agc", gt=0.0, fixed=True)


@dataclass
class BatchTransformConfig:
    name: str = opt("none", "applied to each training batch on the device before the forward (timm's Mixup; "
                            "targets become class probabilities): none; mixup (each image blended with another); "
                            "cutmix (a box pasted from another); mixup_cutmix (per batch one or the other, "
                            "CutMix with probability switch_prob)",
                    choices=tuple(registry.BATCH_TRANSFORMS), fixed=True)
    mixup_alpha: float = opt(0.8, "mixup, mixup_cutmix: the mixing weight is drawn from Beta(mixup_alpha, mixup_alpha) "
                                  "(cutmix: not used, stored as 0)", ge=0.0, fixed=True)
    cutmix_alpha: float = opt(1.0, "cutmix, mixup_cutmix: the same for CutMix's box area (mixup: not used, stored as 0)",
                              ge=0.0, fixed=True)
    prob: float = opt(1.0, "mixup, cutmix, mixup_cutmix: probability that a batch is mixed", ge=0.0, le=1.0, fixed=True)
    switch_prob: float = opt(0.5, "mixup_cutmix: probability of CutMix instead of mixup", ge=0.0, le=1.0,
                             fixed=True)


# the batch transforms that pair each image with another of its process's batch
PAIRING_TRANSFORMS = ("mixup", "cutmix", "mixup_cutmix")


@dataclass
class EmaConfig:
    decay: Optional[float] = opt(None, "exponential moving average of the weights (timm's ModelEmaV3), updated after "
                                       "every applied step and evaluated beside the weights (eval_ema_top1); "
                                       "null = off", gt=0.0, lt=1.0, fixed=True)


@dataclass
class CheckpointConfig:
    keep_last: int = opt(2, "numbered epoch checkpoints kept besides last.pt and best.pt", ge=0)
    every_steps: int = opt(0, "also write last.pt every this many optimizer steps inside an epoch (0 = only at epoch ends)", ge=0)


@dataclass
class TrainConfig:
    accumulate_steps: int = opt(1, "micro-batches per optimizer step (gradient accumulation)", ge=1)
    log_every_steps: int = opt(50, "progress/TensorBoard interval in optimizer steps (metrics are read from the device only then)", ge=1)
    max_nonfinite_steps: int = opt(20, "stop the run when this many steps in a row had non-finite gradients (such steps are skipped completely)", ge=1)


@dataclass
class LogConfig:
    outputs: list[str] = opt(["console", "csv", "tensorboard"],
                             "where rank 0 sends the run's numbers: console (progress and epoch lines), csv "
                             "(summary.csv), tensorboard (event files), jsonl (log.jsonl, one JSON record per line), wandb "
                             "(Weights & Biases, offline unless WANDB_MODE or WANDB_API_KEY is set), mlflow (MLflow: "
                             "MLFLOW_TRACKING_URI or a store in the run folder); wandb and mlflow are optional extras",
                             choices=tuple(registry.OUTPUTS))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    grad_clip: GradClipConfig = field(default_factory=GradClipConfig)
    batch_transform: BatchTransformConfig = field(default_factory=BatchTransformConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    amp: str = opt("off", "mixed precision: off | fp16 (GradScaler, CUDA only) | bf16", choices=("off", "fp16", "bf16"))
    channels_last: bool = opt(False, "channels_last memory format for model and images")
    tf32: bool = opt(True, "Ampere and newer GPUs: float32 convolutions and matmuls use TF32 tensor cores (torch's "
                           "own default does so for convolutions only); false = full float32. No effect on older "
                           "GPUs, the CPU, or the ops autocast runs in fp16/bf16")
    seed: int = opt(0, "seed for init, data order and augmentation: same seed, same run", ge=0, lt=2**32, fixed=True)


# ----------------------------------------------------------------------------- schema walk

@dataclass(frozen=True)
class Key:
    """One leaf of the schema: `section.name` (or `name` for top-level keys)."""

    dotted: str
    type: Any  # int, float, str, bool, or list (of `element`)
    nullable: bool
    default: Any
    meta: dict
    element: Any = None  # a list's element type

    def type_name(self) -> str:
        name = f"list of {self.element.__name__}" if self.type is list else self.type.__name__
        return f"{name} or null" if self.nullable else name


def _leaf_type(tp) -> tuple[Any, bool]:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def schema_keys(cls=Config, prefix: str = "") -> list[Key]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += schema_keys(tp, f"{prefix}{f.name}.")
        else:
            leaf, nullable = _leaf_type(tp)
            if typing.get_origin(leaf) is list:
                keys.append(Key(prefix + f.name, list, nullable, _default(f), dict(f.metadata),
                                element=typing.get_args(leaf)[0]))
            else:
                keys.append(Key(prefix + f.name, leaf, nullable, _default(f), dict(f.metadata)))
    return keys


KEYS = {k.dotted: k for k in schema_keys()}


def describe_keys() -> str:
    """The key list shown by --help and copied into docs/config.md."""
    lines = []
    for k in KEYS.values():
        allowed = _allowed_text(k.meta)
        extra = f"; {allowed}" if allowed else ""
        fixed = " [fixed on resume]" if k.meta["fixed"] else ""
        lines.append(f"  {k.dotted} ({k.type_name()}, default {_yaml_scalar(k.default)}{extra}){fixed}\n      {k.meta['help']}")
    return "\n".join(lines)


def describe_keys_markdown() -> str:
    """The same, as the Markdown table in docs/config.md."""
    rows = ["| key | type | default | allowed | help |", "|---|---|---|---|---|"]
    for k in KEYS.values():
        fixed = " *(fixed on resume)*" if k.meta["fixed"] else ""
        cells = [f"`{k.dotted}`", k.type_name(), f"`{_yaml_scalar(k.default)}`", _allowed_text(k.meta),
                 k.meta["help"] + fixed]
        # A bare | would end the cell where it stands (help texts write "none | value | ...").
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows)


def _yaml_scalar(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def _allowed_text(meta: dict) -> str:
    if meta["choices"]:
        return "one of " + ", ".join(meta["choices"])
    lo = f"[{meta['ge']}" if meta["ge"] is not None else f"({meta['gt']}" if meta["gt"] is not None else None
    hi = f"{meta['le']}]" if meta["le"] is not None else f"{meta['lt']})" if meta["lt"] is not None else None
    if lo and hi:
        return f"in {lo}, {hi}"
    if lo:
        return (">= " if lo[0] == "[" else "> ") + lo[1:]
    if hi:
        return ("<= " if hi[-1] == "]" else "< ") + hi[:-1]
    return ""


# ----------------------------------------------------------------------------- values

def _coerce(key: Key, value, where: str):
    """Check one value against its key's type and range; return it in the key's type."""
    given = value

    def bad(why):
        return ConfigError(f"{where}: {key.dotted} = {shown(given)} {why}", key=key.dotted, source=where)

    if value is None:
        if key.nullable:
            return None
        raise bad(f"must be a {key.type.__name__}, not null")
    if key.type is list:
        return _coerce_list(key, value, bad)
    if key.type is bool:
        if not isinstance(value, bool):
            raise bad("must be true or false")
    elif key.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("must be a whole number")
    elif key.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("must be a number")
        try:
            value = float(value)
        except OverflowError:  # a whole number beyond a float's range
            raise bad("must be a finite number") from None
        if not math.isfinite(value):  # nan passes every range comparison below
            raise bad("must be a finite number")
    elif key.type is str:
        if isinstance(value, bool) and key.meta["choices"] and "off" in key.meta["choices"]:
            value = "off" if value is False else "on"  # YAML 1.1 reads a bare off / on as a boolean
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise bad(f"must be a string: YAML reads {shown(given)} as a number; put it in quotes")
        if not isinstance(value, str):
            raise bad("must be a string")
        if key.meta["path"]:
            value = _path_value(value, bad)
    m = key.meta
    if m["choices"] and value not in m["choices"]:
        raise bad(f"is not allowed: {_allowed_text(m)}{suggestion(value, m['choices'])}")
    if (m["ge"] is not None and value < m["ge"]) or (m["gt"] is not None and value <= m["gt"]) \
            or (m["le"] is not None and value > m["le"]) or (m["lt"] is not None and value >= m["lt"]):
        raise bad(f"is out of range: must be {_allowed_text(m)}")
    return value


def _coerce_list(key: Key, value, bad) -> list:
    """A list of distinct elements of the key's element type, each one of its choices (if any) and in
    its range (if any); a list of float takes whole numbers too, and holds finite numbers only."""
    kinds = (int, float) if key.element is float else key.element
    if not isinstance(value, list) or not all(isinstance(v, kinds) and not isinstance(v, bool) for v in value):
        example = ", ".join(key.meta["choices"] or (("30", "60") if key.element is float else ("a", "b")))
        raise bad(f"must be a list of {key.element.__name__}, e.g. [{example}]")
    if key.element is float:
        try:
            value = [float(v) for v in value]
        except OverflowError:  # a whole number beyond a float's range
            raise bad("must hold finite numbers") from None
        if not all(math.isfinite(v) for v in value):
            raise bad("must hold finite numbers")
    m = key.meta
    out = [v for v in value if (m["ge"] is not None and v < m["ge"]) or (m["gt"] is not None and v <= m["gt"])
           or (m["le"] is not None and v > m["le"]) or (m["lt"] is not None and v >= m["lt"])]
    if out:
        raise bad(f"holds {out[0]:g}, which is out of range: each must be {_allowed_text(m)}")
    unknown = [v for v in value if key.meta["choices"] and v not in key.meta["choices"]]
    if unknown:
        raise bad(f"holds {shown(unknown[0])}, which is not allowed: {_allowed_text(key.meta)}"
                  f"{suggestion(unknown[0], key.meta['choices'])}")
    if len(set(value)) != len(value):
        raise bad("names an entry twice")
    return list(value)


def absolute_path(text) -> Path:
    """A path as the user gave it, with `~` expanded, made absolute from the current folder (links
    are kept as written: a linked data folder stays reachable by the name the user knows)."""
    return Path(os.path.expanduser(text)).absolute()


def _path_value(text: str, bad) -> str:
    if text == DEMO_ROOT:
        return text
    if text.startswith("builtin:"):
        raise bad(f"is not a built-in data set (the one there is: {DEMO_ROOT})")
    if not text.strip() or "\0" in text:
        raise bad("is not a path" + (" (it holds a NUL character)" if "\0" in text else ""))
    return str(absolute_path(text))


def check_path(where: str, path: Path) -> None:
    """Refuse a path the OS cannot look up or create (a name longer than the file system allows,
    a folder that cannot be searched), before anything depends on it."""
    existing = next(p for p in (path, *path.parents) if os.path.lexists(p))
    name_max, path_max = os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    too_long = [part for part in path.relative_to(existing).parts if len(os.fsencode(part)) > name_max]
    if too_long:
        raise ConfigError(f"{where}: the name {shown(too_long[0])} in {printable(existing)} is longer than this "
                          f"file system allows ({name_max} bytes)")
    if len(os.fsencode(path)) >= path_max:
        raise ConfigError(f"{where}: {shown(str(path))} is longer than this system allows for a path "
                          f"({path_max} bytes)")
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as e:
        raise ConfigError(f"{where}: {printable(path)}: {e.strerror or e}") from None


def suggestion(given, valid) -> str:
    """' (did you mean X?)' with the valid name closest to a wrong one (the same name in other case,
    else difflib's best), or ''."""
    if not isinstance(given, str) or len(given) > 200:  # no name is that long; difflib would take seconds
        return ""
    lowered = {v.lower(): v for v in valid}
    close = lowered.get(given.lower()) or next(iter(difflib.get_close_matches(given.lower(), lowered, n=1)), None)
    return f" (did you mean {lowered[close] if close in lowered else close}?)" if close else ""


def _unknown_key(dotted: str, where: str) -> ConfigError:
    """A wrong key, with the closest real one: the same name in other case, else a key of that last
    part in any section (`lr` and `optimizer.lr` both mean optim.lr), else difflib's closest by the
    whole name, then by the last part."""
    leaves = {k: k.rsplit(".", 1)[-1] for k in KEYS}
    leaf = dotted.rsplit(".", 1)[-1].lower()
    close = [k for k in KEYS if k == dotted.lower()] or [k for k, name in leaves.items() if name == leaf]
    if not close and len(dotted) <= 200:  # no key is that long; difflib would take seconds
        close = difflib.get_close_matches(dotted.lower(), KEYS, n=1) or \
            [k for k, name in leaves.items() if name in difflib.get_close_matches(leaf, set(leaves.values()), n=1)]
    hint = f" (did you mean {' or '.join(close)}?)" if close else " (powergrad-train --help lists every key)"
    return ConfigError(f"{where}: unknown config key {shown(dotted)}{hint}", key=dotted, source=where)


def _flatten(raw: dict, where: str, prefix: str = "", lenient: bool = False) -> dict[str, Any]:
    """Nested sections to dotted keys. lenient: an unknown key is dropped with a warning (a stored
    config from an older version), not an error."""
    flat = {}
    for name, value in raw.items():
        dotted = f"{prefix}{name}"
        is_section = any(k.startswith(dotted + ".") for k in KEYS)
        if is_section:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {shown(dotted)} is a section and needs keys under it, got {shown(value)}")
            flat.update(_flatten(value, where, dotted + ".", lenient))
        elif dotted in KEYS:
            flat[dotted] = value
        elif lenient:
            print(f"warning: {where}: ignoring config key {shown(dotted)} that this version does not know "
                  "(renamed or removed since it was saved)", file=sys.stderr, flush=True)
        else:
            raise _unknown_key(dotted, where)
    return flat


def _set(cfg: Config, dotted: str, value) -> None:
    *sections, name = dotted.split(".")
    obj = cfg
    for s in sections:
        obj = getattr(obj, s)
    setattr(obj, name, value)


def get(cfg: Config, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------- recipes

# Bounds on what a recipe may hold (the bundled ones: under 3 KiB, a few flow collections, no aliases),
# so that no file can make reading it take more than a few seconds or more than a little memory.
MAX_RECIPE_BYTES = 64 << 10
MAX_FLOW_COLLECTIONS = 256  # `[` and `{`: PyYAML's parser slows quadratically with their nesting
MAX_RECIPE_VALUES = 10_000  # values once its YAML aliases are expanded


def _is_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):  # a name too long for the system, a NUL character
        return False


def resolve_recipe(name: str, referrer: Optional[Path] = None) -> Path:
    """Where a recipe is. `--config NAME`: a path from the current folder; `base: NAME` in the recipe
    `referrer`: a path from that recipe's folder, never from the current one. Either way, else the
    recipe bundled with the package of that name; `~` is expanded and `.yaml` may be left out."""
    given = Path(os.path.expanduser(name))
    local = referrer.parent / given if referrer is not None else given  # an absolute `given` stays itself
    candidates = [local, BUNDLED_RECIPES / name]
    if not name.endswith((".yaml", ".yml")):
        candidates = [local, Path(f"{local}.yaml"), BUNDLED_RECIPES / name, BUNDLED_RECIPES / f"{name}.yaml"]
    for path in candidates:
        if _is_file(path):
            return path
    where = f"{printable(referrer)}: base: " if referrer is not None else ""
    bundled = ", ".join(sorted(p.name for p in BUNDLED_RECIPES.glob("*.yaml")))
    raise ConfigError(f"{where}recipe not found: {shown(name)} (neither a file nor a bundled recipe; "
                      f"bundled: {bundled})")


class _Refused(yaml.MarkedYAMLError):
    """YAML that parses but is refused as a recipe (its `problem` says why)."""


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe YAML 1.1, read the way people write recipes.

    Numbers are read as they look (as in YAML 1.2): `1e-3` and `.5` are floats, `010` is ten,
    never octal; `0x10`, `1:30` (sexagesimal), `1_000` and dates are text, which a number key
    refuses. A key given twice, a list or mapping used as a key, and aliases that expand the
    document beyond MAX_RECIPE_VALUES values are errors.
    """

    def construct_document(self, node):
        if _expanded_size(node) > MAX_RECIPE_VALUES:
            raise _Refused(problem=f"its YAML aliases expand it to more than {MAX_RECIPE_VALUES} values (a recipe "
                                   f"is a mapping of at most {len(KEYS)} keys)")
        return super().construct_document(node)


_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp")
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _NUMBER_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_INT_TEXT = re.compile(r"[-+]?[0-9]+")
_FLOAT_TEXT = re.compile(r"[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+(?=[eE]))(?:[eE][-+]?[0-9]+)?")
_NONFINITE_TEXT = re.compile(r"[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)")  # YAML's spelling
_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(f"^(?:{_INT_TEXT.pattern})$"),
                                    list("-+0123456789"))
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(f"^(?:{_FLOAT_TEXT.pattern}|{_NONFINITE_TEXT.pattern})$"),
    list("-+0123456789."))


def _float_of(text: str) -> float:
    """A float written as _FLOAT_TEXT, or as YAML's .inf / .nan (kept: the value check refuses them by name)."""
    return float(text.replace(".", "", 1) if _NONFINITE_TEXT.fullmatch(text) else text)


_RecipeLoader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: int(loader.construct_scalar(node)))
_RecipeLoader.add_constructor("tag:yaml.org,2002:float", lambda loader, node: _float_of(loader.construct_scalar(node)))


def _expanded_size(root: yaml.Node) -> float:
    """Nodes of the document with every alias expanded (a node shared by aliases counts each time)."""
    sizes = {}

    def size(node):
        if id(node) not in sizes:
            sizes[id(node)] = math.inf  # a node reached again inside itself expands without end
            children = node.value if isinstance(node, yaml.SequenceNode) else \
                [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
            sizes[id(node)] = 1 + sum(size(child) for child in children)
        return sizes[id(node)]

    return size(root)


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    first_line = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            kind = "list" if isinstance(key_node, yaml.SequenceNode) else "mapping"
            raise _Refused(problem=f"a {kind} is used as a key (a key is a name, such as lr)",
                           problem_mark=key_node.start_mark)
        key = loader.construct_object(key_node)
        if key in first_line:
            raise yaml.constructor.ConstructorError(
                None, None, f"{shown(key)} is given twice (first on line {first_line[key] + 1})", key_node.start_mark)
        first_line[key] = key_node.start_mark.line
    return loader.construct_mapping(node)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def read_yaml_text(text: str):
    if text.count("[") + text.count("{") > MAX_FLOW_COLLECTIONS:
        raise _Refused(problem=f"more than {MAX_FLOW_COLLECTIONS} '[' and '{{' (a recipe holds a few lists at most)")
    try:
        return yaml.load(text, Loader=_RecipeLoader)
    except RecursionError:
        raise _Refused(problem="nested too deeply for a recipe") from None


def _read_yaml(path: Path) -> dict:
    where = printable(path)
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise ConfigError(f"{where}: {size} bytes is too large for a recipe (at most {MAX_RECIPE_BYTES})")
        data = read_bytes(path, MAX_RECIPE_BYTES)  # a regular file only, and no more than that however it grows
    except OSError as e:
        raise ConfigError(f"{where}: cannot read the recipe ({e.strerror or e})") from None
    if data[:4] == b"PK\x03\x04":  # a zip archive: what torch.save writes
        raise ConfigError(f"{where}: this is a checkpoint, not a recipe: did you mean --resume {where}?")
    try:
        raw = read_yaml_text(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not a recipe (a recipe is a UTF-8 text file of YAML)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        if isinstance(e, _Refused):
            raise ConfigError(f"{where}{line}: {e.problem}") from None
        raise ConfigError(f"{where}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if raw is None:
        raise ConfigError(f"{where}: the recipe is empty (it would train every default); give at least the keys "
                          "you mean, or 'base: OTHER.yaml'")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a recipe must be a mapping of config keys, got {type(raw).__name__}")
    return raw


def load_recipe(name: str, referrer: Optional[Path] = None, _seen=()) -> list[tuple[str, dict]]:
    """The recipe and its bases as (source, flat keys) pairs, base first."""
    path = resolve_recipe(name, referrer)
    where = printable(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{where}: 'base' chain loops back to this recipe")
    raw = _read_yaml(path)
    base = raw.pop("base", None)
    layers = []
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{where}: base must be a recipe file name, got {shown(base)}")
        layers = load_recipe(base, path, _seen + (path.resolve(),))
    return layers + [(where, _flatten(raw, where))]


_NULL_TEXT = ("", "~", "null", "Null", "NULL")
_BOOL_TEXT = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def read_value(key: Key, text: str):
    """A command-line value read as it looks, by its key's type (no YAML: `#` is part of the value).

    Whole numbers in decimal (`010` is ten); floats as `1e-3`, `.5`, `5.`; true/false (and YAML's
    yes/no/on/off) for switches; a list as `[a, b]`; else the text itself, which the value check
    then accepts or refuses, surrounding quotes dropped. An empty value is null, and so are null and
    `~` for a key that may be null or is no string (for a path, `~` is the home folder).
    """
    text = text.strip()
    home = text == "~" and key.meta.get("path")
    if not text or (text in _NULL_TEXT and (key.nullable or key.type is not str) and not home):
        return None
    if key.type is list:
        item = dataclasses.replace(key, type=key.element, nullable=False, element=None)
        inner = text[1:-1].strip() if text.startswith("[") and text.endswith("]") else None
        if inner is None:
            return [read_value(item, text)]
        return [read_value(item, t) for t in inner.split(",")] if inner else []
    if key.type is bool:
        return _BOOL_TEXT.get(text.lower(), text)
    if key.type is int:
        return int(text) if _INT_TEXT.fullmatch(text) else text
    if key.type is float:
        if _FLOAT_TEXT.fullmatch(text) or _INT_TEXT.fullmatch(text):
            return float(text)
        nonfinite = text.lower().replace(".", "", 1)
        return float(nonfinite) if nonfinite.lstrip("+-") in ("nan", "inf", "infinity") else text
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _override_where(text: str) -> str:
    return "--set " + printable(text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "...")


def parse_override(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` from --set, the value read by `read_value`."""
    if "=" not in text:
        raise ConfigError(f"{_override_where(text)}: expected KEY=VALUE, e.g. --set schedule.epochs=2")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key not in KEYS:
        raise _unknown_key(key, _override_where(text))
    return key, read_value(KEYS[key], raw)


def _read_old_mixup(flat: dict[str, Any], where: str) -> dict[str, Any]:
    """A stored config from before `mixup` meant mixup only: its `mixup` was timm's Mixup with both
    alphas as given, so it is read as the transform that makes exactly the same draws."""
    if flat.get("batch_transform.name") != "mixup":
        return flat
    alpha = {k: _coerce(KEYS[f"batch_transform.{k}"], flat.get(f"batch_transform.{k}", KEYS[f"batch_transform.{k}"].default),
                        where) for k in ("mixup_alpha", "cutmix_alpha")}
    name = ("mixup_cutmix" if alpha["mixup_alpha"] > 0 else "cutmix") if alpha["cutmix_alpha"] > 0 else "mixup"
    if name != "mixup":
        print(f"notice: {where}: batch_transform.name = mixup with mixup_alpha {alpha['mixup_alpha']:g} and "
              f"cutmix_alpha {alpha['cutmix_alpha']:g} is what this version calls {name}; read as {name}",
              file=sys.stderr, flush=True)
    return {**flat, "batch_transform.name": name}


def build_config(recipe: Optional[str], overrides: list[str] = (), start: Optional[tuple[str, dict]] = None,
                 lenient: bool = False) -> Config:
    """Recipe (with its bases), then --set overrides, each value checked where it came from.

    `start` = (source, nested dict) is a config to start from (a checkpoint's) instead of a recipe;
    lenient: unknown keys in it only warn.
    """
    layers = load_recipe(recipe) if recipe else []
    if start is not None:
        flat = _flatten(start[1], start[0], lenient=lenient)
        layers.insert(0, (start[0], _read_old_mixup(flat, start[0]) if lenient else flat))
    for text in overrides:
        key, value = parse_override(text)
        layers.append((_override_where(text), {key: value}))
    cfg = Config()
    sources = {}
    for source, flat in layers:
        for key, value in flat.items():
            _set(cfg, key, _coerce(KEYS[key], value, source))
            sources.pop(key, None)  # keep the order of last setting
            sources[key] = source
    check(cfg, sources)
    return cfg


def check(cfg: Config, sources: dict[str, str]) -> None:
    """Rules that tie several keys together; an error names where the last of those keys was set."""
    def where(*keys):
        return ([sources[k] for k in sources if k in keys] or ["defaults"])[-1]

    s = cfg.schedule
    if s.warmup_epochs + s.cooldown_epochs > s.epochs:
        at = where("schedule.epochs", "schedule.warmup_epochs", "schedule.cooldown_epochs")
        raise ConfigError(f"{at}: schedule.warmup_epochs ({s.warmup_epochs:g}) + schedule.cooldown_epochs "
                          f"({s.cooldown_epochs}) exceed schedule.epochs ({s.epochs})")
    if cfg.grad_clip.mode != "none" and cfg.grad_clip.value is None:
        raise ConfigError(f"{where('grad_clip.mode', 'grad_clip.value')}: grad_clip.mode is '{cfg.grad_clip.mode}' "
                          "but grad_clip.value is not set (the threshold, or the clipping factor for agc, e.g. 0.01)")
    schedule = registry.load(registry.SCHEDULES, s.name)
    if s.mode == "authors_per_epoch" and schedule.like_authors is None:
        raise ConfigError(f"{where('schedule.mode', 'schedule.name')}: schedule.mode = authors_per_epoch reproduces "
                          f"the authors' cosine and step schedules only; schedule.name = {s.name} runs with "
                          "schedule.mode = per_step")
    if s.milestones and "schedule.milestones" not in schedule.keys:
        raise ConfigError(f"{where('schedule.milestones', 'schedule.name')}: schedule.milestones is read by the "
                          f"multistep schedule only; schedule.name = {s.name} would ignore it (set it to [])")
    if not s.milestones and "schedule.milestones" in schedule.keys:
        raise ConfigError(f"{where('schedule.milestones', 'schedule.name')}: schedule.name = {s.name} needs "
                          "schedule.milestones, the epochs to decay at, e.g. [30, 60, 80]")
    if any(a >= b for a, b in zip(s.milestones, s.milestones[1:])):
        raise ConfigError(f"{where('schedule.milestones')}: schedule.milestones = {_yaml_scalar(s.milestones)} must "
                          "be increasing")
    if s.mode == "authors_per_epoch" and not (float(s.warmup_epochs).is_integer() and float(s.decay_epochs).is_integer()):
        at = where("schedule.mode", "schedule.warmup_epochs", "schedule.decay_epochs")
        raise ConfigError(f"{at}: schedule.mode = authors_per_epoch steps the LR once per epoch: schedule.warmup_epochs "
                          f"({s.warmup_epochs:g}) and schedule.decay_epochs ({s.decay_epochs:g}) must be whole numbers")
    if cfg.optim.name == "sgd" and cfg.optim.nesterov and cfg.optim.momentum == 0:
        raise ConfigError(f"{where('optim.nesterov', 'optim.momentum')}: optim.nesterov needs optim.momentum > 0")
    b = cfg.batch_transform
    if b.name != "none" and cfg.loss.pgt_impl == "authors_hook":
        raise ConfigError(f"{where('batch_transform.name', 'loss.pgt_impl')}: loss.pgt_impl = authors_hook is the "
                          "authors' computation for class-index targets; it cannot take the probabilities "
                          f"batch_transform.name = {b.name} makes")
    # the alpha a name draws from must be > 0; the other one, set > 0, asks for the switch
    drawn = {"mixup": ("mixup_alpha",), "cutmix": ("cutmix_alpha",), "mixup_cutmix": ("mixup_alpha", "cutmix_alpha")}
    for alpha in drawn.get(b.name, ()):
        if getattr(b, alpha) == 0:
            alone = {"mixup_alpha": "cutmix", "cutmix_alpha": "mixup"}[alpha] if b.name == "mixup_cutmix" else None
            raise ConfigError(f"{where('batch_transform.name', 'batch_transform.' + alpha)}: batch_transform.name = "
                              f"{b.name} needs batch_transform.{alpha} > 0"
                              + (f" (with it 0 only {alone} is on: use batch_transform.name = {alone})" if alone else ""))
    unused = {"mixup": "cutmix_alpha", "cutmix": "mixup_alpha"}.get(b.name)
    if unused:
        if getattr(b, unused) > 0 and f"batch_transform.{unused}" in sources:
            raise ConfigError(f"{where('batch_transform.name', 'batch_transform.' + unused)}: batch_transform.name = "
                              f"{b.name} does not use batch_transform.{unused} ({getattr(b, unused):g}); for timm's "
                              "switch between mixup and CutMix use batch_transform.name = mixup_cutmix")
        setattr(b, unused, 0.0)  # stored as what it trains, so the saved config reads back unambiguously


def check_runtime(cfg: Config, world_size: int, cuda: bool, capability: Optional[tuple[int, int]] = None) -> None:
    """Rules that depend on the machine and launcher; run before any process group exists.

    capability: the oldest visible GPU's compute capability, when there are GPUs.
    """
    acc = cfg.train.accumulate_steps
    if cfg.data.batch_size % (world_size * acc):
        raise ConfigError(f"data.batch_size {cfg.data.batch_size} does not split evenly over {world_size} "
                          f"process(es) x {acc} accumulation step(s); choose a multiple of {world_size * acc}")
    cfg.data.val_batch_per_process(world_size)
    if cfg.batch_transform.name in PAIRING_TRANSFORMS and (cfg.data.batch_size // world_size) % 2:
        raise ConfigError(f"batch_transform.name = {cfg.batch_transform.name} pairs each image with another of its process's batch: "
                          f"data.batch_size {cfg.data.batch_size} over {world_size} process(es) gives "
                          f"{cfg.data.batch_size // world_size} per process; choose an even number per process")
    if cfg.model.sync_bn and world_size > 1 and not cuda:
        raise ConfigError("model.sync_bn needs CUDA GPUs (torch's SyncBatchNorm runs on GPUs only); "
                          "set model.sync_bn: false on the CPU")
    if cfg.amp == "fp16" and not cuda:
        raise ConfigError("amp = fp16 needs a CUDA GPU (fp16 loss scaling); on the CPU use amp: bf16 or off")
    if cfg.amp == "bf16" and capability is not None and capability < (8, 0):
        raise ConfigError(f"amp = bf16 needs a GPU of compute capability 8.0 or newer (Ampere); this one is "
                          f"{capability[0]}.{capability[1]} (a V100 is 7.0): use amp: fp16")
    if cfg.amp == "bf16" and cfg.channels_last and not cuda:
        raise ConfigError("amp = bf16 with channels_last = true is refused on the CPU: oneDNN's bf16 channels_last "
                          "convolution backward returns non-finite weight gradients for 1x1 feature maps; "
                          "set channels_last: false (or amp: off) on the CPU")


def check_schedule(cfg: Config, steps_per_epoch: int) -> None:
    """Rules that need the number of steps per epoch (known once the data is listed)."""
    s = cfg.schedule
    if s.name == "step" and round(s.decay_epochs * steps_per_epoch) == 0:
        raise ConfigError(f"schedule.decay_epochs = {s.decay_epochs:g} is less than one step at "
                          f"{steps_per_epoch} steps per epoch; use at least {1 / steps_per_epoch:.3g}")


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
