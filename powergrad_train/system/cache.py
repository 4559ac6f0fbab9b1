"""Where powergrad-train keeps what it can regenerate: the demo set and the file-scan caches."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$POWERGRAD_TRAIN_CACHE, or ~/.cache/powergrad_train."""
    return Path(os.environ.get("POWERGRAD_TRAIN_CACHE", Path.home() / ".cache" / "powergrad_train"))
