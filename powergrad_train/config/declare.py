"""What a part declares, in the file that implements it: `opt` for each of its config keys and one `Part`.

    @dataclass
    class Keys:
        momentum: float = opt(0.9, "momentum", ge=0.0, lt=1.0, fixed=True)

    PART = Part(build=sgd, help="torch's fused SGD", keys=Keys, check=_check)

This module imports nothing heavy: the config schema is assembled from every registered part's
declaration, and `--help` answers without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional


def opt(default, help, *, choices=None, ge=None, gt=None, le=None, lt=None, fixed=False, path=False):
    """A config key: default, help text and the allowed values (for a list: of each element; a
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


# check(cfg, where): raise errors.ConfigError for a combination of keys this part cannot run with;
# where(*keys) names the recipe line or --set that last set one of those keys.
Check = Callable[[Any, Callable[..., str]], None]


@dataclass(frozen=True)
class Part:
    """One part a recipe can name (its name is the one it is registered under).

    build: what the part's kind calls to make it (docs/extending.md lists each kind's signature).
    help: a few words, shown in the kind's choices in --help and docs/config.md.
    keys: dataclasses of `opt` fields: the keys it reads in its kind's section besides the section's
        own; parts that read the same key share the same dataclass.
    check: rules that tie its keys to others, run when a config selects it.
    """

    build: Any
    help: str
    keys: tuple[type, ...] = ()
    check: Optional[Check] = None

    def __post_init__(self):
        if not isinstance(self.keys, tuple):
            object.__setattr__(self, "keys", (self.keys,))
