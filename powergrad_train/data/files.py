"""Listing an ImageFolder split the way torchvision does, minus files that are not images.

Classes are the sorted sub-folder names and files are sorted, exactly as torchvision's
ImageFolder orders them, so both backends give the same labels and sample indices.
Every file gets a fast header/trailer check (in parallel, cached by size and mtime):
DALI's CPU decoder can crash the whole process on a file that is not an image, so such
files are left out, counted and listed instead.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from powergrad_train.data.demo import cache_dir
from powergrad_train.errors import DataError


def _jpeg_header_ok(f) -> bool:
    """Walk the JPEG markers up to the start of scan: a frame header with a real size must come first."""
    f.seek(2)
    frame = False
    while True:
        if f.read(1) != b"\xff":
            return False
        kind = 0xFF
        while kind == 0xFF:  # a marker may be preceded by any number of 0xFF fill bytes
            byte = f.read(1)
            if not byte:
                return False
            kind = byte[0]
        if kind == 0xDA:  # start of scan: entropy-coded data follows
            return frame
        length = int.from_bytes(f.read(2), "big")
        if length < 2:
            return False
        body = f.read(length - 2)
        if len(body) < length - 2:
            return False
        if kind in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            height, width, components = int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big"), body[5]
            frame = height > 0 and width > 0 and components in (1, 3, 4)


def _decodes(path: str) -> bool:
    """Other formats (BMP, TIFF, WebP, PNM) are rare in image sets: decode them fully with PIL."""
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except Exception:  # PIL raises many types for a bad file
        return False


def looks_like_image(path: str) -> bool:
    """True for a file both backends can decode.

    JPEG (nearly every file) and PNG get a fast structural check: a JPEG whose markers parse
    up to the scan and that ends with its end marker, a PNG with its header and IEND chunk,
    which is what a garbage, empty, truncated or foreign file lacks. Any other file is decoded
    with PIL; DALI's CPU and GPU decoders read the same formats (BMP, TIFF, WebP, PNM).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(24)
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 32))
            tail = f.read()
            if head[:3] == b"\xff\xd8\xff":
                return b"\xff\xd9" in tail and _jpeg_header_ok(f)  # some writers pad after the end marker
    except OSError:
        return False
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return head[12:16] == b"IHDR" and int.from_bytes(head[16:20], "big") > 0 and b"IEND" in tail
    return _decodes(path)


def _scan(paths: list[str], cache_file: Path) -> set[str]:
    """The paths that fail the check, reusing earlier answers for unchanged files."""
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cached = {}

    def check(path):
        st = os.stat(path)
        key = f"{st.st_size}:{st.st_mtime_ns}"
        hit = cached.get(path)
        ok = hit[1] if hit and hit[0] == key else looks_like_image(path)
        return path, key, ok

    with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) * 4)) as pool:
        results = list(pool.map(check, paths, chunksize=256))
    fresh = {path: [key, ok] for path, key, ok in results}
    if fresh != cached:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(fresh))
        os.replace(tmp, cache_file)
    return {path for path, _, ok in results if not ok}


def check_split(root: Path, split: str) -> list[str]:
    """The class names of root/split, after cheap checks: the folder, its classes, an image in each."""
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"data.root: {root} has no '{split}/' folder (expected an ImageFolder root with train/ and val/)")
    classes = sorted(d.name for d in os.scandir(folder) if d.is_dir())
    if not classes:
        raise DataError(f"{folder}: no class folders (expected one sub-folder of images per class)")
    for name in classes:
        if not any(f.lower().endswith(IMG_EXTENSIONS) for _, _, names in os.walk(folder / name, followlinks=True)
                   for f in names):
            raise DataError(f"{folder / name}: class folder holds no images")
    return classes


def list_split(root: Path, split: str, verbose: bool) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(path, label), ...]) of root/split, unreadable files left out."""
    folder = root / split
    classes = check_split(root, split)
    samples = []
    for label, name in enumerate(classes):
        samples += [(os.path.join(dirpath, f), label)
                    for dirpath, _, names in sorted(os.walk(folder / name, followlinks=True))
                    for f in sorted(names) if f.lower().endswith(IMG_EXTENSIONS)]
    key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
    scan_dir = cache_dir() / "scans" / key
    bad = _scan([p for p, _ in samples], scan_dir / "checked-v2.json")  # v2: formats beyond JPEG/PNG
    if bad:
        report = scan_dir / "skipped.txt"
        report.write_text("".join(f"{p}\n" for p in sorted(bad)))
        samples = [(p, label) for p, label in samples if p not in bad]
        if verbose:
            names = ", ".join(os.path.relpath(p, folder) for p in sorted(bad)[:3]) + (", ..." if len(bad) > 3 else "")
            print(f"data: skipped {len(bad)} unreadable file(s) in {folder} ({names}); list in {report}", flush=True)
    return classes, samples
