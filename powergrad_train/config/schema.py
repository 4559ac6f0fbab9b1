"""The config schema: the sections of config/sections.py with every registered part's keys added to
its kind's section; each key once, with its type, default, range and help.

Recipes (config/recipes.py), `--set` overrides and validation (config/build.py), `--help` and the
key table of docs/config.md all come from it. It is assembled on first use (`KEYS`, `Config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from powergrad_train.config import registry, sections
from powergrad_train.config.sections import DEMO_ROOT
from powergrad_train.system.errors import ConfigError, InstallError, printable, shown

if TYPE_CHECKING:
    from powergrad_train.config.sections import Config


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


def schema_keys(cls, prefix: str = "") -> list[Key]:
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


def _copy(f: dataclasses.Field, tp, **meta) -> tuple[str, Any, dataclasses.Field]:
    """A field for another dataclass: the same default, its metadata updated with `meta`."""
    kwargs = {"default_factory": f.default_factory} if f.default_factory is not dataclasses.MISSING else \
        {"default": f.default}
    return f.name, tp, dataclasses.field(**kwargs, metadata={**f.metadata, **meta})


def _section(kind: str, core: type) -> type:
    """`core` (config/sections.py) with the selector's choices and help from the registry, and every
    part's keys after its own; a key several parts read names them all in its help."""
    spec = registry.KINDS[kind]
    parts = registry.parts(kind)
    core_hints = typing.get_type_hints(core)
    readers: dict[str, list[str]] = {}
    declared: dict[str, tuple[dataclasses.Field, Any, type]] = {}
    for name, part in parts.items():
        for keys in part.keys:
            hints = typing.get_type_hints(keys)
            for f in dataclasses.fields(keys):
                if f.name in core_hints or (f.name in declared and declared[f.name][2] is not keys):
                    owner = "the section itself" if f.name in core_hints else "another part"
                    raise InstallError(f"{kind.replace('_', ' ')} {shown(name)} declares "
                                       f"{spec.section}.{f.name}, which {owner} declares too")
                declared[f.name] = (f, hints[f.name], keys)
                readers.setdefault(f.name, []).append(name)
    selector = next(f for f in dataclasses.fields(core) if f.name == spec.selector)
    choices = "; ".join(f"{name} ({part.help})" for name, part in parts.items())
    fields = [_copy(selector, core_hints[selector.name], choices=tuple(parts), help=f"{spec.help}: {choices}")]
    fields += [_copy(f, tp, help=f"{', '.join(readers[name])}: {f.metadata['help']}", readers=tuple(readers[name]))
               for name, (f, tp, _) in declared.items()]
    return dataclasses.make_dataclass(core.__name__, fields, bases=(core,))


@functools.cache
def assembled() -> tuple[type, dict[str, Key]]:
    """The Config class with every part's keys, and its keys by dotted name."""
    core = typing.get_type_hints(sections.Config)
    fields = [(spec.section, cls, dataclasses.field(default_factory=cls)) for kind, spec in registry.KINDS.items()
              for cls in [_section(kind, core[spec.section])]]
    config = dataclasses.make_dataclass("Config", fields, bases=(sections.Config,))
    return config, {k.dotted: k for k in schema_keys(config)}


def keys() -> dict[str, Key]:
    """Every key of the schema by its dotted name."""
    return assembled()[1]


def __getattr__(name: str):
    """`Config` and `KEYS`, assembled when first asked for (importing the parts' declarations)."""
    if name == "Config":
        return assembled()[0]
    if name == "KEYS":
        return assembled()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def describe_keys() -> str:
    """The key list shown by --help and copied into docs/config.md."""
    lines = []
    for k in keys().values():
        allowed = _allowed_text(k.meta)
        extra = f"; {allowed}" if allowed else ""
        fixed = " [fixed on resume]" if k.meta["fixed"] else ""
        lines.append(f"  {k.dotted} ({k.type_name()}, default {yaml_scalar(k.default)}{extra}){fixed}\n      {k.meta['help']}")
    return "\n".join(lines)


def describe_keys_markdown() -> str:
    """The same, as the Markdown table in docs/config.md."""
    rows = ["| key | type | default | allowed | help |", "|---|---|---|---|---|"]
    for k in keys().values():
        fixed = " *(fixed on resume)*" if k.meta["fixed"] else ""
        cells = [f"`{k.dotted}`", k.type_name(), f"`{yaml_scalar(k.default)}`", _allowed_text(k.meta),
                 k.meta["help"] + fixed]
        # A bare | would end the cell where it stands (help texts write "none | value | ...").
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows)


def yaml_scalar(v) -> str:
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

def coerce(key: Key, value, where: str):
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


def unknown_key(dotted: str, where: str) -> ConfigError:
    """A wrong key, with the closest real one: the same name in other case, else a key of that last
    part in any section (`lr` and `optimizer.lr` both mean optim.lr), else difflib's closest by the
    whole name, then by the last part."""
    leaves = {k: k.rsplit(".", 1)[-1] for k in keys()}
    leaf = dotted.rsplit(".", 1)[-1].lower()
    close = [k for k in keys() if k == dotted.lower()] or [k for k, name in leaves.items() if name == leaf]
    if not close and len(dotted) <= 200:  # no key is that long; difflib would take seconds
        close = difflib.get_close_matches(dotted.lower(), keys(), n=1) or \
            [k for k, name in leaves.items() if name in difflib.get_close_matches(leaf, set(leaves.values()), n=1)]
    hint = f" (did you mean {' or '.join(close)}?)" if close else " (powergrad-train --help lists every key)"
    return ConfigError(f"{where}: unknown config key {shown(dotted)}{hint}", key=dotted, source=where)


@dataclass(frozen=True)
class Renamed:
    """A key of an earlier version, still read: its value becomes `convert(value)`, new keys and their
    values, with a one-line notice naming them (`new`). `reads_as`: the key whose type reads a --set value."""

    new: str
    reads_as: str
    convert: Any


RENAMED = {
    "ema.decay": Renamed("weight_average.name: ema with weight_average.decay", "weight_average.decay",
                         lambda v: {} if v is None else {"weight_average.name": "ema", "weight_average.decay": v}),
}


def renamed(dotted: str, value, where: str) -> dict[str, Any]:
    """The new keys an old key's value is read as, said once in a notice (not for a value that meant the
    default then and now)."""
    new = RENAMED[dotted].convert(value)
    if new:
        print(f"notice: {where}: {dotted} is now {RENAMED[dotted].new}; read as "
              + ", ".join(f"{k} = {yaml_scalar(v)}" for k, v in new.items()), file=sys.stderr, flush=True)
    return new


def flatten(raw: dict, where: str, prefix: str = "", lenient: bool = False) -> dict[str, Any]:
    """Nested sections to dotted keys. lenient: an unknown key is dropped with a warning (a stored
    config from an older version), not an error."""
    flat = {}
    for name, value in raw.items():
        dotted = f"{prefix}{name}"
        is_section = any(k.startswith(dotted + ".") for k in (*keys(), *RENAMED))
        if is_section:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {shown(dotted)} is a section and needs keys under it, got {shown(value)}")
            flat.update(flatten(value, where, dotted + ".", lenient))
        elif dotted in keys():
            flat[dotted] = value
        elif dotted in RENAMED:
            flat.update(renamed(dotted, value, where))
        elif lenient:
            print(f"warning: {where}: ignoring config key {shown(dotted)} that this version does not know "
                  "(renamed or removed since it was saved)", file=sys.stderr, flush=True)
        else:
            raise unknown_key(dotted, where)
    return flat


def set_key(cfg: Config, dotted: str, value) -> None:
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


