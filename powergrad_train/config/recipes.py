"""Recipes: YAML files of config keys, read the way people write them, with `base:` chains.

A recipe is found by path or among the bundled ones (powergrad_train/configs/); what it holds is
bounded, so no file can make reading it slow or large.
"""

from __future__ import annotations

import math
import os
import re
import stat
from pathlib import Path
from typing import Optional

import yaml

from powergrad_train.config import schema
from powergrad_train.system.errors import ConfigError, printable, shown
from powergrad_train.system.user_files import read_bytes

BUNDLED_RECIPES = Path(__file__).parent.parent / "configs"

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
                                   f"is a mapping of at most {len(schema.keys())} keys)")
        return super().construct_document(node)


_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp")
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _NUMBER_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
INT_TEXT = re.compile(r"[-+]?[0-9]+")
FLOAT_TEXT = re.compile(r"[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+(?=[eE]))(?:[eE][-+]?[0-9]+)?")
_NONFINITE_TEXT = re.compile(r"[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)")  # YAML's spelling
_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(f"^(?:{INT_TEXT.pattern})$"),
                                    list("-+0123456789"))
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(f"^(?:{FLOAT_TEXT.pattern}|{_NONFINITE_TEXT.pattern})$"),
    list("-+0123456789."))


def _float_of(text: str) -> float:
    """A float written as FLOAT_TEXT, or as YAML's .inf / .nan (kept: the value check refuses them by name)."""
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
    return layers + [(where, schema.flatten(raw, where))]


