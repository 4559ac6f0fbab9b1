"""A config built from a recipe and `--set` overrides, each value checked where it came from, then the
rules that tie keys together: the config's own, and each selected part's (declared with the part).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING, Any, Optional

import yaml

from powergrad_train.config import recipes, registry, schema
from powergrad_train.config.recipes import load_recipe
from powergrad_train.config.schema import Key

if TYPE_CHECKING:
    from powergrad_train.config.sections import Config

from powergrad_train.system.errors import SHOWN_CHARS, ConfigError, printable

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
        return int(text) if recipes.INT_TEXT.fullmatch(text) else text
    if key.type is float:
        if recipes.FLOAT_TEXT.fullmatch(text) or recipes.INT_TEXT.fullmatch(text):
            return float(text)
        nonfinite = text.lower().replace(".", "", 1)
        return float(nonfinite) if nonfinite.lstrip("+-") in ("nan", "inf", "infinity") else text
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _override_where(text: str) -> str:
    return "--set " + printable(text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "...")


def parse_override(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` from --set, the value read by `read_value` (a renamed key's by its new key's type)."""
    if "=" not in text:
        raise ConfigError(f"{_override_where(text)}: expected KEY=VALUE, e.g. --set schedule.epochs=2")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key not in schema.keys() and key not in schema.RENAMED:
        raise schema.unknown_key(key, _override_where(text))
    return key, read_value(schema.keys()[schema.RENAMED[key].reads_as if key in schema.RENAMED else key], raw)


def _read_old_mixup(flat: dict[str, Any], where: str) -> dict[str, Any]:
    """A stored config from before `mixup` meant mixup only: its `mixup` was timm's Mixup with both
    alphas as given, so it is read as the transform that makes exactly the same draws."""
    if flat.get("batch_transform.name") != "mixup":
        return flat
    alpha = {k: schema.coerce(schema.keys()[f"batch_transform.{k}"],
                              flat.get(f"batch_transform.{k}", schema.keys()[f"batch_transform.{k}"].default), where)
             for k in ("mixup_alpha", "cutmix_alpha")}
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
        flat = schema.flatten(start[1], start[0], lenient=lenient)
        layers.insert(0, (start[0], _read_old_mixup(flat, start[0]) if lenient else flat))
    for text in overrides:
        key, value = parse_override(text)
        where = _override_where(text)
        layers.append((where, schema.renamed(key, value, where) if key in schema.RENAMED else {key: value}))
    cfg = schema.assembled()[0]()
    sources = {}
    for source, flat in layers:
        for key, value in flat.items():
            schema.set_key(cfg, key, schema.coerce(schema.keys()[key], value, source))
            sources.pop(key, None)  # keep the order of last setting
            sources[key] = source
    check(cfg, sources)
    return cfg


class Where:
    """Where keys were last set, for an error's first words: where(*keys) is the recipe line or --set
    that set the last of them ("defaults" when none was); where.given(key): whether one did."""

    def __init__(self, sources: dict[str, str]):
        self.sources = sources

    def __call__(self, *keys: str) -> str:
        return ([self.sources[k] for k in self.sources if k in keys] or ["defaults"])[-1]

    def given(self, key: str) -> bool:
        return key in self.sources


def check(cfg: Config, sources: dict[str, str]) -> None:
    """The rules that tie several keys together: the config's own below, then those of each part it
    selects (declared with the part); an error names where the last of those keys was set."""
    where = Where(sources)
    s = cfg.schedule
    if s.warmup_epochs + s.cooldown_epochs > s.epochs:
        at = where("schedule.epochs", "schedule.warmup_epochs", "schedule.cooldown_epochs")
        raise ConfigError(f"{at}: schedule.warmup_epochs ({s.warmup_epochs:g}) + schedule.cooldown_epochs "
                          f"({s.cooldown_epochs}) exceed schedule.epochs ({s.epochs})")
    if cfg.grad_clip.mode != "none" and cfg.grad_clip.value is None:
        raise ConfigError(f"{where('grad_clip.mode', 'grad_clip.value')}: grad_clip.mode is '{cfg.grad_clip.mode}' "
                          "but grad_clip.value is not set (the threshold, or the clipping factor for agc, e.g. 0.01)")
    if s.mode == "authors_per_epoch" and registry.load("schedule", s.name).build.like_authors is None:
        raise ConfigError(f"{where('schedule.mode', 'schedule.name')}: schedule.mode = authors_per_epoch reproduces "
                          f"the authors' cosine and step schedules only; schedule.name = {s.name} runs with "
                          "schedule.mode = per_step")
    if s.mode == "authors_per_epoch" and not (float(s.warmup_epochs).is_integer() and float(s.decay_epochs).is_integer()):
        at = where("schedule.mode", "schedule.warmup_epochs", "schedule.decay_epochs")
        raise ConfigError(f"{at}: schedule.mode = authors_per_epoch steps the LR once per epoch: schedule.warmup_epochs "
                          f"({s.warmup_epochs:g}) and schedule.decay_epochs ({s.decay_epochs:g}) must be whole numbers")
    for dotted in _ignored_lists(cfg):
        section = dotted.split(".")[0]
        kind, spec = next((kind, spec) for kind, spec in registry.KINDS.items() if spec.section == section)
        selector = f"{section}.{spec.selector}"
        readers = " and ".join(schema.keys()[dotted].meta["readers"])
        raise ConfigError(f"{where(dotted, selector)}: {dotted} is read by the {readers} {kind.replace('_', ' ')} "
                          f"only; {selector} = {schema.get(cfg, selector)} would ignore it (set it to [])")
    for kind in registry.KINDS:
        for _, part in registry.chosen(cfg, kind):
            if part.check is not None:
                part.check(cfg, where)


def _ignored_lists(cfg: Config) -> list[str]:
    """The list keys of parts that are not selected, given non-empty (a list is data a run would be
    expected to act on, such as schedule.milestones; a number left at another part's value is not)."""
    return [dotted for dotted in unread_keys(cfg)
            if schema.keys()[dotted].type is list and schema.get(cfg, dotted)]


def unread_keys(cfg: Config) -> set[str]:
    """The keys that parts declare which none of the parts `cfg` selects reads."""
    unread = set()
    for kind, spec in registry.KINDS.items():
        chosen = {name for name, _ in registry.chosen(cfg, kind)}
        unread |= {k.dotted for k in schema.keys().values()
                   if k.dotted.startswith(spec.section + ".") and k.meta.get("readers")
                   and not chosen & set(k.meta["readers"])}
    return unread


def check_runtime(cfg: Config, world_size: int, cuda: bool, capability: Optional[tuple[int, int]] = None) -> None:
    """Rules that depend on the machine and launcher; run before any process group exists.

    capability: the oldest visible GPU's compute capability, when there are GPUs.
    """
    acc = cfg.train.accumulate_steps
    if cfg.data.batch_size % (world_size * acc):
        raise ConfigError(f"data.batch_size {cfg.data.batch_size} does not split evenly over {world_size} "
                          f"process(es) x {acc} accumulation step(s); choose a multiple of {world_size * acc}")
    cfg.data.val_batch_per_process(world_size)
    transform = registry.load("batch_transform", cfg.batch_transform.name).build
    if getattr(transform, "pairs_images", False) and (cfg.data.batch_size // world_size) % 2:
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
    if "schedule.decay_epochs" not in unread_keys(cfg) and round(s.decay_epochs * steps_per_epoch) == 0:
        raise ConfigError(f"schedule.decay_epochs = {s.decay_epochs:g} is less than one step at "
                          f"{steps_per_epoch} steps per epoch; use at least {1 / steps_per_epoch:.3g}")


def dump(cfg: Config) -> str:
    return yaml.safe_dump(schema.to_dict(cfg), sort_keys=False)
