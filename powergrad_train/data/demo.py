"""A small ImageFolder of generated JPEGs that a CNN can learn: 10 shape/texture classes.

Colours, position, size and noise are random, so only the shape tells the class. It is
generated deterministically on first use into a cache folder and reused afterwards.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from powergrad_train.config.sections import DEMO_ROOT
from powergrad_train.system.atomic import fsync_folder, reason
from powergrad_train.system.cache import cache_dir
from powergrad_train.system.errors import DataError

CLASSES = ("checker", "circle", "cross", "diagonal", "dots", "hstripes", "ring", "square", "triangle", "vstripes")
IMAGE_SIZE = 64
PER_CLASS = {"train": 100, "val": 30}
VERSION = "v1"


def draw(kind: str, rng: np.random.Generator) -> Image.Image:
    s = IMAGE_SIZE
    bg = tuple(int(v) for v in rng.integers(0, 256, 3))
    # A foreground colour far from the background, so the shape is always visible.
    fg = tuple(int((b + rng.integers(90, 166)) % 256) for b in bg)
    img = Image.new("RGB", (s, s), bg)
    d = ImageDraw.Draw(img)
    r = int(rng.integers(s // 6, s // 3))
    cx, cy = (int(v) for v in rng.integers(r + 2, s - r - 2, 2))
    box = (cx - r, cy - r, cx + r, cy + r)
    w = max(2, r // 3)
    if kind == "circle":
        d.ellipse(box, fill=fg)
    elif kind == "ring":
        d.ellipse(box, outline=fg, width=w)
    elif kind == "square":
        d.rectangle(box, fill=fg)
    elif kind == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif kind == "cross":
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fg)
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fg)
    else:  # textures fill the whole box
        period = int(rng.integers(6, 10))
        for i in range(-2 * r, 2 * r + 1, period):
            if kind == "hstripes":
                d.rectangle((cx - r, cy + i, cx + r, cy + i + period // 2 - 1), fill=fg)
            elif kind == "vstripes":
                d.rectangle((cx + i, cy - r, cx + i + period // 2 - 1, cy + r), fill=fg)
            elif kind == "diagonal":
                d.line((cx - r + i, cy - r, cx + r + i, cy + r), fill=fg, width=period // 2)
        if kind == "checker":
            for i in range(0, 2 * r, period):
                for j in range(0, 2 * r, period):
                    if (i // period + j // period) % 2 == 0:
                        d.rectangle((cx - r + i, cy - r + j, cx - r + i + period - 1, cy - r + j + period - 1), fill=fg)
        elif kind == "dots":
            for i in range(0, 2 * r, period):
                for j in range(0, 2 * r, period):
                    d.ellipse((cx - r + i, cy - r + j, cx - r + i + period // 2, cy - r + j + period // 2), fill=fg)
        if kind in ("hstripes", "vstripes", "diagonal"):  # keep the texture inside its box
            mask = Image.new("L", (s, s), 0)
            ImageDraw.Draw(mask).rectangle(box, fill=255)
            img = Image.composite(img, Image.new("RGB", (s, s), bg), mask)
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 12, (s, s, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_demo_dataset(root: Path, per_class: dict[str, int] = PER_CLASS, seed: int = 0) -> None:
    """Write train/ and val/ ImageFolders of the demo classes under `root`."""
    for split_index, (split, count) in enumerate(per_class.items()):
        for class_index, kind in enumerate(CLASSES):
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, split_index, class_index])
            for i in range(count):
                # Encoded in memory, then written: PIL's own file writer can leave a file cut short
                # by a full disk without an error.
                encoded = io.BytesIO()
                draw(kind, rng).save(encoded, format="JPEG", quality=90)
                (folder / f"{kind}_{i:04d}.jpg").write_bytes(encoded.getvalue())


def ensure_demo_dataset() -> Path:
    """The demo ImageFolder root, generated on first use (safe when several processes race).

    It is written into a temporary folder, flushed to disk and renamed, so it appears whole or
    not at all."""
    root = cache_dir() / f"demo-{VERSION}"
    if (root / "COMPLETE").exists():
        return root
    tmp = None
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=root.parent))
        write_demo_dataset(tmp)
        os.sync()  # once for all its files: an fsync per file would take longer than making them
        (tmp / "COMPLETE").touch()
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first, or a partial folder is in the way
            if (root / "COMPLETE").exists():
                shutil.rmtree(tmp, ignore_errors=True)
                return root
            shutil.rmtree(root, ignore_errors=True)
            os.rename(tmp, root)
        fsync_folder(root.parent)
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"data.root: {DEMO_ROOT}: cannot write the demo set under {root.parent} ({reason(e)}); "
                        "set POWERGRAD_TRAIN_CACHE to a writable folder") from None
    return root
